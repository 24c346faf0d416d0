"""`agent-vm run`, `vm run`, `vm exec`: nothing the user asked for is dropped (issue 23 items 1, 2).

The command line through click's CliRunner. Usage errors come before any
service is called (the addresses point nowhere); what a run sends and what it
says about its result are checked against a fake executor that records the
request and answers with a scripted result. The real-VM versions are in
tests/e2e/test_cli_run.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from agentvm.cli import run_inputs
from agentvm.cli.main import cli
from agentvm.cli.run_cmd import MAX_INLINE_INPUT
from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing of the host's installation: its services must never be reached from here."""
    for name in list(os.environ):
        if name.startswith("AGENTVM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AGENTVM_TLS", "off")
    monkeypatch.setenv("AGENTVM_VM_MANAGER_ADDR", f"unix:{tmp_path}/no-vmm.sock")
    monkeypatch.setenv("AGENTVM_EXECUTOR_ADDR", f"unix:{tmp_path}/no-executor.sock")
    monkeypatch.setenv("AGENTVM_RUN_DIR", str(tmp_path / "run"))


def cli_run(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin)


def one_line_exit_2(result: Result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("agent-vm: error: "), err
    for word in words:
        assert word in err, err
    return err


# -- item 1: a mistyped option is an error, never a program argument ----------------------
@pytest.mark.parametrize(
    ("args", "typo", "meant"),
    [
        (("run", "--timout", "3", "--cmd", "sleep 8; echo slept"), "--timout", "--timeout"),
        (("run", "-c", "print(1)", "--networkk", "isolated"), "--networkk", "--network"),
        (("vm", "run", "--timout", "3", "--", "true"), "--timout", "--timeout"),
        (("vm", "exec", "somevm", "--timout", "3", "true"), "--timout", "--timeout"),
    ],
    ids=["run-timeout", "run-network", "vm-run", "vm-exec"],
)
def test_a_mistyped_option_is_an_error_with_a_suggestion(
    args: tuple[str, ...], typo: str, meant: str
) -> None:
    err = one_line_exit_2(cli_run(*args), f"no such option {typo}; did you mean {meant}?")
    assert "go after `--`" in err


def test_a_programs_own_options_go_after_the_double_dash(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text("print(1)\n")
    one_line_exit_2(cli_run("run", str(script), "--verbose"), "no such option --verbose", "--")
    one_line_exit_2(
        cli_run("vm", "exec", "somevm", "ls", "-la"),
        "no such option -l",
        "agent-vm vm exec NAME -- ls -la",
    )


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("command", [("run",), ("vm", "run"), ("vm", "exec")])
def test_h_is_help(command: tuple[str, ...], flag: str) -> None:
    result = cli_run(*command, flag)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: "), result.output
    assert "after `--`" in result.output


def test_an_unknown_option_without_a_program_is_not_a_missing_file() -> None:
    err = one_line_exit_2(cli_run("run", "--bogus"), "no such option --bogus")
    assert "no such file" not in err


# -- item 2: clashing inputs, bad --env / --cwd, stdin past the cap ---------------------
def test_two_inputs_for_one_place_are_refused_naming_both(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.csv").write_text(d)
    a, b = str(tmp_path / "a" / "x.csv"), str(tmp_path / "b" / "x.csv")
    one_line_exit_2(
        cli_run("run", "--input", a, "--input", b, "--cmd", "true"), a, b, "/workspace/input/x.csv"
    )
    # A file and a directory of one name, from two places.
    (tmp_path / "c" / "x.csv").mkdir(parents=True)
    (tmp_path / "c" / "x.csv" / "inner").write_text("c")
    one_line_exit_2(
        cli_run("run", "--input", a, "--input", str(tmp_path / "c" / "x.csv"), "--cmd", "true"),
        a,
        str(tmp_path / "c" / "x.csv" / "inner"),
    )
    # The program file and an input of its name.
    (tmp_path / "b" / "agent.py").write_text("print(2)")
    (tmp_path / "agent.py").write_text("print(1)")
    one_line_exit_2(
        cli_run("run", str(tmp_path / "agent.py"), "--input", str(tmp_path / "b" / "agent.py")),
        "agent.py",
        "would both be",
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--env", "NOEQUALS"), ("--env 'NOEQUALS'", "NAME=VALUE")),
        (("--env", "1X=a"), ("--env '1X=a'", "NAME=VALUE")),
        (("--env", "=a"), ("NAME=VALUE",)),
        (("--env", "A=1", "--env", "A=2"), ("--env A given twice", "A=1", "A=2")),
        (("--cwd", "work"), ("--cwd work", "absolute")),
        (("--max-output", "0"), ("--max-output",)),
        (("--max-output", str(2**31)), ("--max-output",)),
    ],
    ids=["no-equals", "digit-first", "empty-name", "twice", "relative-cwd", "cap-0", "cap-huge"],
)
def test_bad_env_cwd_and_max_output_give_one_line(
    args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    one_line_exit_2(cli_run("run", *args, "--cmd", "true"), *words)


def test_stdin_past_what_a_run_carries_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in.bin").write_bytes(b"i" * 1024)
    result = cli_run(
        "run",
        "--input",
        str(tmp_path / "in.bin"),
        "--cmd",
        "cat",
        stdin=b"s" * (MAX_INLINE_INPUT - 1024 + 1),
    )
    one_line_exit_2(result, "stdin carries more than", "--input", "--no-stdin")


# -- what a run sends, what it says about the result: a fake executor --------------------
class FakeExecutor(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self) -> None:
        self.requests: list[executor_pb2.RunRequest] = []
        self.result = executor_pb2.RunResult(status=common_pb2.ExitStatus(exit_code=0))

    def Run(self, request: executor_pb2.RunRequest, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        yield executor_pb2.RunResponse(result=self.result)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeExecutor]:
    servicer = FakeExecutor()  # type: ignore[abstract]  # only Run is called
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    addr = f"unix:{tmp_path}/fake-executor.sock"
    server.add_insecure_port(addr)
    server.start()
    monkeypatch.setenv("AGENTVM_EXECUTOR_ADDR", addr)
    try:
        yield servicer
    finally:
        server.stop(None)


def test_stdin_env_cwd_args_and_the_cap_reach_the_executor(
    fake: FakeExecutor, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text("print(1)\n")
    result = cli_run(
        "run",
        str(script),
        "--env",
        "GREETING=hello=world",
        "--env",
        "EMPTY=",
        "--cwd",
        "/workspace/input",
        "--max-output",
        "4096",
        "--",
        "--its-flag",
        "-h",
        stdin=b"piped\n",
    )
    assert result.exit_code == 0, (result.output, result.stderr)
    [req] = fake.requests
    assert req.stdin == b"piped\n"
    assert dict(req.env) == {"GREETING": "hello=world", "EMPTY": ""}
    assert req.cwd == "/workspace/input"
    assert req.max_output_bytes == 4096
    assert list(req.program.argv.args)[-2:] == ["--its-flag", "-h"]
    # --no-stdin leaves stdin unread; the default cap is explicit.
    cli_run("run", "--no-stdin", "--cmd", "cat", stdin=b"unread")
    assert fake.requests[1].stdin == b""
    assert fake.requests[1].max_output_bytes == 16 * 1024 * 1024
    assert fake.requests[1].cwd == ""


def test_cut_output_and_skipped_files_are_said_on_stderr(fake: FakeExecutor) -> None:
    fake.result.status.stdout_truncated = True
    fake.result.skipped_output_files.add(
        path="link",
        size_bytes=11,
        reason=executor_pb2.OUTPUT_FILE_SKIP_REASON_NOT_REGULAR,
        detail="a symlink, not a regular file: Run returns regular files only",
    )
    for extra in ((), ("--json",)):
        result = cli_run("run", *extra, "--max-output", "100", "--cmd", "yes")
        assert result.exit_code == 0, result.stderr
        assert "stdout truncated at 100 bytes (--max-output)" in result.stderr
        assert "stderr truncated" not in result.stderr
        assert "output 'link' not read: a symlink" in result.stderr


def test_symlinks_in_an_input_directory_are_named(fake: FakeExecutor, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a")
    (data / "link").symlink_to("/etc/passwd")
    (data / "dirlink").symlink_to(tmp_path)
    os.mkfifo(data / "fifo")
    result = cli_run("run", "--input", str(data), "--cmd", "true")
    assert result.exit_code == 0, result.stderr
    assert [f.path for f in fake.requests[0].inputs] == ["data/a.txt"]
    for name, kind in (("link", "a symlink"), ("dirlink", "a symlink"), ("fifo", "a FIFO")):
        assert f"{data / name} is {kind}, not sent" in result.stderr


def test_a_silent_open_stdin_is_waited_for_with_a_word(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A parent that keeps stdin open (e.g. Node's default pipe) must not hang us in silence."""
    monkeypatch.setattr(run_inputs, "STDIN_QUIET_S", 0.05)
    r, w = os.pipe()

    def late_writer() -> None:
        time.sleep(0.3)
        os.write(w, b"late\n")
        os.close(w)

    t = threading.Thread(target=late_writer)
    t.start()
    with os.fdopen(r, "rb") as stream:
        assert run_inputs.read_stdin(stream, 100) == b"late\n"
    t.join()
    err = capsys.readouterr().err
    assert "waiting for stdin to end" in err
    assert "--no-stdin" in err
    assert len(err.splitlines()) == 1
