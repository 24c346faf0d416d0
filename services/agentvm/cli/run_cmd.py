"""`agent-vm run`: one program in a fresh VM, its output live, its exit code."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from agentvm.cli.base import (
    check_timeout,
    fail,
    network_option,
    profile_option,
    settings,
)
from agentvm.vm_manager.templates import MAX_MEMORY_MIB, MAX_VCPUS

MAX_INLINE_INPUT = 15 * 1024 * 1024


def _collect_inputs(paths: tuple[str, ...]) -> dict[str, Path]:
    """input/-relative name -> local file, for files and (recursively) directories."""
    out: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    out[f"{p.name}/{f.relative_to(p).as_posix()}"] = f
        elif p.is_file():
            out[p.name] = p
        else:
            fail(f"--input {raw}: no such file or directory")
    total = sum(f.stat().st_size for f in out.values())
    if total > MAX_INLINE_INPUT:
        fail(
            f"--input files total {total} bytes, more than a run carries ({MAX_INLINE_INPUT}): "
            "use the Python client (Sandbox.files.upload) for large inputs"
        )
    return out


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "code", help="Python code to run (instead of FILE).")
@click.option("--cmd", "shell", help="Shell command to run (instead of FILE).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@profile_option()
@network_option()
@click.option(
    "--allow-domain",
    "allow_domains",
    multiple=True,
    metavar="NAME",
    help="Name the run may resolve and connect to (repeat; '*.example.com' for a zone). "
    "Replaces the default allowlist.",
)
@click.option(
    "--allow-cidr",
    "allow_cidrs",
    multiple=True,
    metavar="CIDR",
    help="Address range the run may connect to (repeat).",
)
@click.option(
    "--allow-port",
    "ports",
    multiple=True,
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="TCP port allowed (repeat; default 80, 443, 22).",
)
@click.option(
    "--cpus", type=click.IntRange(0, MAX_VCPUS), default=0, help="vCPUs (default: the profile's)."
)
@click.option(
    "--memory",
    type=click.IntRange(0, MAX_MEMORY_MIB),
    default=0,
    help="Memory in MiB (default: the profile's).",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    help="File or directory to copy into /workspace/input (repeat).",
)
@click.option(
    "--output", "output_dir", type=click.Path(file_okay=False), help="Save /workspace/output here."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of live output."
)
def run_cmd(
    argv: tuple[str, ...],
    code: str | None,
    shell: str | None,
    timeout: float,
    profile: str,
    network: str,
    allow_domains: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    ports: tuple[int, ...],
    cpus: int,
    memory: int,
    inputs: tuple[str, ...],
    output_dir: str | None,
    as_json: bool,
) -> None:
    """Run FILE.py [-- ARGS], -c CODE or --cmd 'SHELL' in a fresh VM; exit with its code.

    Exits 124 when the program timed out. Output files written to
    /workspace/output are listed (and saved with --output DIR).
    """
    import agent_vm

    if (
        sum(x is not None for x in (code, shell))
        + (1 if argv and code is None and shell is None else 0)
        != 1
    ):
        fail("give exactly one of FILE.py, -c CODE or --cmd 'SHELL COMMAND'")
    check_timeout(timeout)
    policy = None
    if allow_domains or allow_cidrs or ports:
        if network != "nat-filtered":
            fail("--allow-domain, --allow-cidr and --allow-port need --network nat-filtered")
        policy = agent_vm.NetworkPolicy(allow_domains, allow_cidrs, ports)
    files = _collect_inputs(inputs)
    kwargs: dict[str, Any] = {}
    if code is not None:
        kwargs = {"code": code, "args": argv}
    elif shell is not None:
        kwargs = {"cmd": shell, "args": argv}
    else:
        script = Path(argv[0])
        if not script.is_file():
            fail(f"{argv[0]}: no such file (to run a command, use --cmd)")
        files[script.name] = script
        kwargs = {"cmd": ["python3", f"/workspace/input/{script.name}"], "args": argv[1:]}

    def live(stream: Any) -> Callable[[str], object] | None:
        if as_json:
            return None
        return lambda text: (stream.write(text), stream.flush())

    try:
        result = agent_vm.run(
            **kwargs,
            inputs=files,
            timeout=timeout,
            profile=profile,  # type: ignore[arg-type]
            network=network,  # type: ignore[arg-type]
            policy=policy,
            cpus=cpus,
            memory_mib=memory,
            outputs_dir=output_dir,
            on_stdout=live(sys.stdout),
            on_stderr=live(sys.stderr),
            address=settings().executor_addr,
        )
    except agent_vm.AgentVMError as exc:
        fail(f"{exc.code}: {exc.message}")
    for skipped in result.skipped_output_files:
        click.echo(f"agent-vm: output {skipped.path!r} not read: {skipped.detail}", err=True)
    if result.output_files_error:
        click.echo(f"agent-vm: {result.output_files_error}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "exit_code": result.exit_code,
                    "stdout": result.stdout,
                    "stderr": result.stderr,
                    "timed_out": result.timed_out,
                    "duration_s": round(result.duration_s, 3),
                    "boot_s": round(result.boot_s, 3),
                    "vm": result.vm_name,
                    "output_files": [
                        {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256}
                        | ({"truncated": True} if f.truncated else {})
                        for f in result.output_files
                    ],
                    "skipped_output_files": [
                        dataclasses.asdict(f) for f in result.skipped_output_files
                    ],
                    "output_files_error": result.output_files_error,
                    "stdout_truncated": result.stdout_truncated,
                    "stderr_truncated": result.stderr_truncated,
                    "network_log": [dataclasses.asdict(r) for r in result.network_log],
                }
            )
        )
    elif result.timed_out:
        click.echo(f"agent-vm: timed out after {timeout:g} s", err=True)
    sys.exit(result.exit_code)
