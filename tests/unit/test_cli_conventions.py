"""What every `agent-vm` command owes its user: help for each option, tables with
headers, `--json` with numbers as numbers, and Ctrl-C as exit 130."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from agentvm.cli import base, group, main
from agentvm.cli.main import cli
from agentvm.common import tls
from agentvm.v1 import common_pb2, vm_manager_pb2


def commands(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, name
            yield from commands(sub, (*path, name))


ALL = list(commands(cli, ("agent-vm",)))


def test_help_lists_each_command_with_its_own_first_line() -> None:
    """main.COMMANDS keeps each command's help line for `--help` (nothing imported):
    it must be the line the command itself gives."""
    ctx = click.Context(cli)
    for name, (_, line) in main.COMMANDS.items():
        cmd = cli.get_command(ctx, name)
        assert cmd is not None, name
        stand_in = click.Command(name, help=line)
        assert stand_in.get_short_help_str(200) == cmd.get_short_help_str(200), name


def test_help_and_start_up_import_only_what_the_command_needs() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from agentvm.cli.main import cli; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('grpc', 'google.protobuf', 'agentvm.cli.base') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_run_reaches_its_first_rpc_without_server_or_issuing_modules(tmp_path: Path) -> None:
    """`agent-vm run` up to its call: no cryptography (a checked pair, tls.for_identity),
    no health/reflection (servers only), no vm-manager stub, no JSON mapping."""
    tls.ensure(tmp_path)
    tls.for_identity("mutual", tmp_path, tls.CLIENT)  # the check the stamp remembers
    code = (
        # After the failed call, the error path's own imports (cli.services) do not count.
        "import sys, types; from click.testing import CliRunner; from agentvm.cli.main import cli; "
        "sys.modules['agentvm.cli.services'] = types.SimpleNamespace(unreachable=lambda *a: 'x'); "
        "r = CliRunner().invoke(cli, ['run', '-c', 'pass']); assert 'UNAVAILABLE' in r.output; "
        "print(sorted({m.split('.')[0] if m.startswith('crypto') else m for m in sys.modules "
        "if m.startswith(('cryptography', 'grpc_health.', 'grpc_reflection.')) or m in "
        "('google.protobuf.json_format', 'agentvm.v1.vm_manager_pb2_grpc')}))"
    )
    env = {
        **os.environ,
        "AGENTVM_TLS": "mutual",
        "AGENTVM_TLS_DIR": str(tmp_path),
        "AGENTVM_EXECUTOR_ADDR": f"unix:{tmp_path}/nothing.sock",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_tree_is_walked() -> None:
    names = {name for name, _ in ALL}
    assert {"agent-vm run", "agent-vm vm list", "agent-vm vm snapshot list"} <= names


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[n for n, _ in ALL])
def test_every_command_and_option_is_described(name: str, cmd: click.Command) -> None:
    assert (cmd.help or "").strip(), f"`{name}` has no description"
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        assert (param.help or "").strip(), f"`{name} {param.opts[0]}` has no help text"
        if param.multiple:
            assert re.search(r"\brepeat", param.help or ""), (
                f"`{name} {param.opts[0]}` can be given many times: its help must say so ('repeat')"
            )


@pytest.mark.parametrize(("name", "cmd"), ALL, ids=[n for n, _ in ALL])
def test_help_runs_for_every_command(name: str, cmd: click.Command) -> None:
    args = name.split()[1:]
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(cli, [*args, flag])
        assert result.exit_code == 0, (flag, result.output)
        assert "Usage: " in result.output


LISTS = [n for n, _ in ALL if n.endswith((" list", " status")) and " image " not in n]


@pytest.mark.parametrize("name", LISTS)
def test_list_commands_offer_json(name: str) -> None:
    cmd = dict(ALL)[name]
    assert any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params), name


def test_json_keeps_64_bit_integers_as_numbers() -> None:
    t = vm_manager_pb2.Template(
        key="k",
        memory_state_bytes=3 << 30,
        disk_bytes=7,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
    )
    t.build_duration.FromMilliseconds(1500)
    t.created_at.FromSeconds(0)
    v = common_pb2.VM(name="vm", labels={"a": "b"})
    data: Any = json.loads(json.dumps(base.message_dict(t)))
    assert data["memory_state_bytes"] == 3 << 30
    assert data["disk_bytes"] == 7
    assert data["build_duration"] == "1.500s"  # well-known types keep their JSON form
    assert data["created_at"] == "1970-01-01T00:00:00Z"
    assert data["network_mode"] == "NETWORK_MODE_ISOLATED"
    assert base.message_dict(v)["labels"] == {"a": "b"}


def test_json_numbers_inside_repeated_and_nested_messages() -> None:
    resp = vm_manager_pb2.ListSnapshotsResponse(
        snapshots=[vm_manager_pb2.Snapshot(name="a", size_bytes=1 << 40)]
    )
    assert base.message_dict(resp)["snapshots"][0]["size_bytes"] == 1 << 40


def test_tables_have_headers_and_aligned_columns(capsys: pytest.CaptureFixture[str]) -> None:
    base.print_table(("NAME", "SIZE"), [("a", "1 B"), ("longer-name", "2.0 KiB")])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["NAME         SIZE", "a            1 B", "longer-name  2.0 KiB"]
    base.print_table(("NAME",), [])
    assert capsys.readouterr().out == "(none)\n"


def test_words_as_the_cli_spells_them() -> None:
    assert base.network_word(common_pb2.NETWORK_MODE_NAT_FILTERED) == "nat-filtered"
    assert base.network_word(common_pb2.NETWORK_MODE_UNSPECIFIED) == "-"
    assert base.enum_word(common_pb2.VMState, common_pb2.VM_STATE_READY, "VM_STATE_") == "ready"
    assert base.enum_word(common_pb2.VMState, 999, "VM_STATE_") == "999"
    assert base.human_bytes(512) == "512 B"
    assert base.human_bytes(1536) == "1.5 KiB"
    assert base.human_bytes(4 << 30) == "4.0 GiB"


def test_ctrl_c_exits_130_after_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    cleaned: list[str] = []

    class Interrupted:
        def ListVMs(self, *_: object, **__: object) -> object:
            try:
                raise KeyboardInterrupt
            finally:
                cleaned.append("finally ran")

    monkeypatch.setattr("agentvm.cli.vm_cmds.vm_stub", Interrupted)
    result = CliRunner().invoke(cli, ["vm", "list"])
    assert result.exit_code == group.INTERRUPTED == 130
    assert cleaned == ["finally ran"]
    assert "interrupted" in result.output
