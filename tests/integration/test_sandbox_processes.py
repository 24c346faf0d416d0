"""Terminals and background processes of sandboxes (docs/SANDBOXES.md, section 3), on
real VMs through the executor: a CLI shell driven in a real terminal (pexpect), a
process that outlives its caller and is read by another client process, and the
errors of bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pexpect
import pytest

import agent_vm
from agent_vm import _calls as agent_vm_calls
from agentvm.v1 import executor_pb2, executor_pb2_grpc
from tests.installation import agent_vm as cli
from tests.vmharness import REPO, ExecutorProcess

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sandbox(executor: ExecutorProcess) -> Iterator[agent_vm.Sandbox]:
    with agent_vm.Sandbox.create(network="isolated", lifetime=1800) as sb:
        yield sb


def test_the_cli_shell_is_a_real_terminal(
    executor: ExecutorProcess, sandbox: agent_vm.Sandbox
) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "agentvm.cli.main", "sandbox", "shell", sandbox.id],
        env={**executor.env, "TERM": "xterm"},
        cwd=str(REPO),
        dimensions=(24, 80),
        timeout=60,
    )
    try:
        child.sendline("export PS1='READY$ '")
        child.expect_exact("READY$ ")
        child.sendline("stty size; tty")
        child.expect(r"24 80\r\n/dev/pts/\d+")
        child.expect_exact("READY$ ")
        # A window-size change reaches the guest's terminal.
        child.setwinsize(33, 101)
        time.sleep(1)
        child.sendline("stty size")
        child.expect_exact("33 101")
        child.expect_exact("READY$ ")
        # A REPL keeps its state across lines.
        child.sendline("python3 -q")
        child.expect_exact(">>> ")
        child.sendline("x = 41")
        child.expect_exact(">>> ")
        child.sendline("print(x + 1)")
        child.expect_exact("42")
        child.expect_exact(">>> ")
        child.sendcontrol("d")
        child.expect_exact("READY$ ")
        # Ctrl-C interrupts the foreground job at once; the shell lives on.
        child.sendline("sleep 100")
        time.sleep(1)
        t0 = time.monotonic()
        child.sendcontrol("c")
        child.expect_exact("READY$ ")
        assert time.monotonic() - t0 < 10
        child.sendline("echo status=$?")
        child.expect_exact("status=130")
        child.expect_exact("READY$ ")
        # The shell's exit status is the CLI's.
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3, (child.exitstatus, child.signalstatus)
    # The terminal's process is listed as ended, with that status.
    shells = [p for p in sandbox.processes.list() if p.pty]
    assert shells
    assert shells[-1].exit is not None
    assert shells[-1].exit.exit_code == 3


def test_a_background_process_outlives_its_caller_and_is_read_by_another_client(
    executor: ExecutorProcess, sandbox: agent_vm.Sandbox
) -> None:
    script = "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.2; done"
    proc = sandbox.processes.start(["sh", "-c", script], tag="counter")
    assert proc.exec_id.startswith("pr-")
    assert proc.pid > 0
    # This client reads a few lines and goes away; the process goes on.
    seen = b""
    for piece in proc.output():
        seen += piece.data
        if b"line-3\n" in seen:
            break
    offset = proc.offset
    assert offset == len(seen)
    time.sleep(1)
    # Another client process connects by id and reads on from that offset.
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from agent_vm import Sandbox
                sid, exec_id, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
                sb = Sandbox.connect(sid)
                p = sb.processes.connect(exec_id)
                got = b""
                for piece in p.output(offset):
                    assert piece.offset == offset + len(got), (piece.offset, offset, len(got))
                    got += piece.data
                    if got.count(b"\\n") >= 5:
                        break
                sys.stdout.write(got.decode())
                """
            ),
            sandbox.id,
            proc.exec_id,
            str(offset),
        ],
        env=executor.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reader.returncode == 0, reader.stderr
    lines = reader.stdout.splitlines()
    assert lines[0] == "line-4", lines
    assert lines[:5] == [f"line-{i}" for i in range(4, 9)]
    listed = {p.exec_id: p for p in sandbox.processes.list()}
    assert listed[proc.exec_id].running
    assert listed[proc.exec_id].tag == "counter"
    # Stopped by a signal: the end and its status reach a reader.
    proc.signal(15)
    end = proc.wait()
    assert end.signal == 15
    assert end.exit_code == 128 + 15
    assert not {p.exec_id: p for p in sandbox.processes.list()}[proc.exec_id].running


def test_bad_process_requests_are_clear_errors(sandbox: agent_vm.Sandbox) -> None:
    ended = sandbox.processes.start(["true"])
    assert ended.wait().exit_code == 0
    with pytest.raises(agent_vm.FailedPreconditionError, match="no pty"):
        ended.resize(10, 10)
    with pytest.raises(agent_vm.FailedPreconditionError, match="has ended"):
        ended.send_input("x")
    with pytest.raises(agent_vm.NotFoundError, match="no process"):
        sandbox.processes.connect("pr-nosuchthing")
    with pytest.raises(agent_vm.InvalidArgumentError, match="past the end"):
        next(iter(ended.output(10**9)))
    with pytest.raises(agent_vm.InvalidArgumentError, match="pty size"):
        sandbox.processes.start(["true"], pty=(0, 80))
    # A process still running with the same id: ALREADY_EXISTS, and nothing started.
    long = sandbox.processes.start(["sleep", "30"], exec_id="dup-1")
    with pytest.raises(agent_vm.AgentVMError, match="already in use"):
        sandbox.processes.start(["true"], exec_id="dup-1")
    long.kill()
    assert long.wait().signal == 9


def test_the_process_commands_of_the_cli(
    executor: ExecutorProcess, sandbox: agent_vm.Sandbox
) -> None:
    env = executor.env
    p = cli(
        env,
        "sandbox",
        "start",
        sandbox.id,
        "--tag",
        "ticker",
        "--",
        "sh",
        "-c",
        "echo started; echo oops >&2; sleep 60",
    )
    assert p.returncode == 0, p.stderr
    exec_id = p.stdout.strip()
    time.sleep(1)
    p = cli(env, "sandbox", "ps", sandbox.id, "--json")
    assert p.returncode == 0, p.stderr
    mine = [x for x in json.loads(p.stdout) if x["exec_id"] == exec_id]
    assert mine[0]["tag"] == "ticker"
    assert mine[0]["running"] is True
    p = cli(env, "sandbox", "logs", sandbox.id, exec_id)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "started\n"
    assert p.stderr == "oops\n"
    p = cli(env, "sandbox", "kill", sandbox.id, exec_id, "--signal", "INT")
    assert p.returncode == 0, p.stderr
    p = cli(env, "sandbox", "logs", "-f", sandbox.id, exec_id)
    assert p.returncode == 128 + 2, (p.returncode, p.stderr)
    p = cli(env, "sandbox", "logs", sandbox.id, "nosuch")
    assert p.returncode == 2
    assert "no process 'nosuch'" in p.stderr


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (http to our forward)
        body: bytes = resp.read()
        return body


def test_a_background_http_server_reached_through_a_port_forward(
    executor: ExecutorProcess,
) -> None:
    blob = os.urandom(1 << 20)
    with agent_vm.Sandbox.create(network="isolated", lifetime=900) as sb:
        sb.files.write("www/hello.txt", "hi from the guest\n")
        sb.files.write("www/blob.bin", blob)
        server = sb.processes.start(
            ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"],
            cwd="/workspace/www",
            tag="web",
        )
        fwd = sb.ports.forward(8000)
        assert fwd.host == "127.0.0.1"
        assert fwd.port > 0
        url = f"http://127.0.0.1:{fwd.port}"
        deadline = time.monotonic() + 60
        while True:  # the server takes a moment to listen under TCG
            try:
                assert _get(f"{url}/hello.txt") == b"hi from the guest\n"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        # Several connections at once, and a large body byte for byte.
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(_get, [f"{url}/hello.txt"] * 8 + [f"{url}/blob.bin"]))
        assert bodies[:8] == [b"hi from the guest\n"] * 8
        assert bodies[8] == blob
        # Its log, read by a second client process that connects by id.
        reader = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                    import sys
                    from agent_vm import Sandbox
                    sb = Sandbox.connect(sys.argv[1])
                    log = b""
                    for piece in sb.processes.connect(sys.argv[2]).output(0):
                        log += piece.data
                        if log.count(b"GET /hello.txt") >= 9 and b"GET /blob.bin" in log:
                            break
                    sb.disconnect()
                    sys.stdout.write(log.decode())
                    """
                ),
                sb.id,
                server.exec_id,
            ],
            env=executor.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert reader.returncode == 0, reader.stderr
        assert reader.stdout.count('"GET /hello.txt HTTP/1.1" 200') >= 9
        assert '"GET /blob.bin HTTP/1.1" 200' in reader.stdout
        # The second client let go without closing the sandbox.
        assert sb.run("true").exit_code == 0
        # Stopped by a signal; the forward's listener goes with close().
        server.signal(15)
        assert server.wait().signal == 15
        fwd.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", fwd.port), timeout=5).close()
        # A forward closes with its sandbox too.
        other = sb.ports.forward(8000)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other.port), timeout=5).close()


def test_a_forward_to_a_port_nothing_listens_on_says_so(
    executor: ExecutorProcess, sandbox: agent_vm.Sandbox
) -> None:
    async def forward() -> None:
        chan = agent_vm_calls.channel(executor.address)
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(chan)

            async def requests() -> AsyncIterator[executor_pb2.ForwardPortRequest]:
                yield executor_pb2.ForwardPortRequest(sandbox_id=sandbox.id, port=9)

            async for _ in stub.ForwardPort(requests(), timeout=60):
                pass
        finally:
            await chan.close(None)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(forward())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing accepts connections on port 9" in (err.value.details() or "")


def test_the_port_forward_command_of_the_cli(
    executor: ExecutorProcess, sandbox: agent_vm.Sandbox
) -> None:
    sandbox.files.write("site/index.html", "cli forward\n")
    server = sandbox.processes.start(
        ["python3", "-m", "http.server", "8001", "--bind", "127.0.0.1"], cwd="/workspace/site"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentvm.cli.main", "sandbox", "port-forward", sandbox.id, "0:8001"],
        env=executor.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Forwarding from 127.0.0.1:"), (line, proc.stderr)
        port = int(line.split()[2].rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while True:
            try:
                assert _get(f"http://127.0.0.1:{port}/index.html") == b"cli forward\n"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr and proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    server.kill()
    p = cli(executor.env, "sandbox", "port-forward", sandbox.id, "8000")
    assert p.returncode == 2
    assert "[HOST:]PORT:GUEST_PORT" in p.stderr


def test_the_shell_command_makes_a_sandbox_and_removes_it_on_exit(
    executor: ExecutorProcess,
) -> None:
    before = {i.id for i in agent_vm.Sandbox.list()}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "agentvm.cli.main", "shell", "--network", "isolated"],
        env={**executor.env, "TERM": "xterm"},
        cwd=str(REPO),
        dimensions=(24, 80),
        timeout=120,
    )
    try:
        child.sendline("echo in-$((40+2)); cat /proc/sys/kernel/hostname")
        child.expect_exact("in-42")
        made = {i.id for i in agent_vm.Sandbox.list()} - before
        assert len(made) == 1, made
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 5, (child.exitstatus, child.signalstatus)
    assert {i.id for i in agent_vm.Sandbox.list()} <= before
