"""The guest agent (GuestAgentService) run in-process on the host, without cgroups."""

from __future__ import annotations

import builtins
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm_guest import __version__, agent, agent_host, confine, memory, proctree

from .conftest import NO_CGROUP_ROOT
from .helpers import wait_until

Stub = guest_agent_pb2_grpc.GuestAgentServiceStub


# -- build_argv ---------------------------------------------------------------------------
def test_build_argv_argv() -> None:
    prog = common_pb2.Program(argv=common_pb2.Argv(args=["ls", "-l", "a b"]))
    assert agent.build_argv(prog) == ["ls", "-l", "a b"]


def test_build_argv_python() -> None:
    code = common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source="print(1)", args=["x"])
    assert agent.build_argv(common_pb2.Program(code=code)) == ["python3", "-c", "print(1)", "x"]


def test_build_argv_shell_sets_dollar_zero() -> None:
    code = common_pb2.Code(language=common_pb2.CODE_LANGUAGE_SHELL, source='echo "$1"', args=["hi"])
    argv = agent.build_argv(common_pb2.Program(code=code))
    assert argv == ["/bin/sh", "-c", 'echo "$1"', "sh", "hi"]
    assert subprocess.run(argv, capture_output=True, check=True).stdout == b"hi\n"


@pytest.mark.parametrize(
    ("program", "message"),
    [
        (common_pb2.Program(), "program is empty"),
        (common_pb2.Program(argv=common_pb2.Argv()), "argv.args is empty"),
        (common_pb2.Program(argv=common_pb2.Argv(args=["", "x"])), "argv.args is empty"),
        (
            common_pb2.Program(code=common_pb2.Code(source="x")),
            "CODE_LANGUAGE_PYTHON or CODE_LANGUAGE_SHELL",
        ),
    ],
    ids=["empty", "no-args", "empty-command", "no-language"],
)
def test_build_argv_errors(program: common_pb2.Program, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        agent.build_argv(program)


# -- ProcessTree ---------------------------------------------------------------------------
def _gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_process_tree_falls_back_to_process_group(tmp_path: Path) -> None:
    tree = proctree.ProcessTree()
    assert tree.cgroup is None
    argv = ["sh", "-c", f"sleep 30 & echo $! > {tmp_path}/bg; wait"]
    tree.signal(signal.SIGTERM)  # no process yet: a no-op
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=tree.confiner())  # noqa: PLW1509
    tree.pgid = proc.pid
    assert wait_until(lambda: (tmp_path / "bg").exists() and (tmp_path / "bg").read_text() != "")
    background = int((tmp_path / "bg").read_text())
    tree.kill_all()
    assert proc.wait(5) == -signal.SIGKILL
    assert wait_until(lambda: _gone(background))
    tree.remove()  # nothing to remove without a cgroup
    tree.kill_all()  # and killing again is harmless


def test_process_tree_with_cgroup_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a (fake, plain directory) cgroup: limits written, the command joins before exec."""
    monkeypatch.setattr(proctree, "CGROUP_ROOT", str(tmp_path))
    tree = proctree.ProcessTree()
    assert tree.cgroup is not None
    assert Path(tree.cgroup).parent == tmp_path
    assert Path(tree.cgroup, "pids.max").read_text() == str(confine.PIDS_MAX)
    assert int(Path(tree.cgroup, "memory.max").read_text()) == tree.memory_limit > 0
    assert Path(tree.cgroup, "memory.oom.group").read_text() == "1"
    argv = ["printf", "%s|", "a b", "$HOME", "'"]
    Path(tree.cgroup, "cgroup.procs").touch()  # the kernel's file, in a real cgroup
    out = subprocess.run(argv, capture_output=True, check=True, preexec_fn=tree.confiner())
    assert out.stdout == b"a b|$HOME|'|"  # arguments pass through unchanged
    # The child wrote "0" (itself) into cgroup.procs before exec.
    assert Path(tree.cgroup, "cgroup.procs").read_text() == "0"
    Path(tree.cgroup, "pids.events").write_text("max 7\n")
    Path(tree.cgroup, "memory.events").write_text("low 0\noom 2\noom_kill 3\n")
    usage = tree.usage()
    assert (usage.pids_limit_hits, usage.oom_kills) == (7, 3)
    assert (usage.pids_limit, usage.memory_limit_bytes) == (confine.PIDS_MAX, tree.memory_limit)
    tree.kill_all()  # writes cgroup.kill
    assert Path(tree.cgroup, "cgroup.kill").read_text() == "1"
    for f in Path(tree.cgroup).iterdir():
        f.unlink()
    tree.remove()
    assert not Path(tree.cgroup).exists()


def test_process_tree_cgroups_are_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proctree, "CGROUP_ROOT", str(tmp_path))
    trees = [proctree.ProcessTree() for _ in range(3)]
    assert len({t.cgroup for t in trees}) == 3
    assert all(t.cgroup is not None and Path(t.cgroup).is_dir() for t in trees)
    for t in trees:
        assert t.cgroup is not None
        for f in Path(t.cgroup).iterdir():
            f.unlink()
        t.remove()
    assert list(tmp_path.iterdir()) == []


def _emptied(tree: proctree.ProcessTree) -> proctree.ProcessTree:
    """A fake cgroup's files are plain files: remove them, as the kernel would."""
    assert tree.cgroup is not None
    for f in Path(tree.cgroup).iterdir():
        f.unlink()
    return tree


def test_the_keeper_makes_the_next_tree_ahead_and_removes_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(proctree, "CGROUP_ROOT", str(root))
    keeper = proctree.Keeper()
    first = keeper.take()  # none made ahead yet: made now
    assert first.cgroup is not None
    assert list(root.iterdir()) == [Path(first.cgroup)]  # nothing made beside a start
    keeper.retire(_emptied(first))
    assert wait_until(lambda: not Path(first.cgroup or "").exists())
    assert wait_until(lambda: len(list(root.iterdir())) == 1)
    (ahead,) = root.iterdir()  # the next one, with its limits
    assert Path(ahead, "pids.max").read_text() == str(confine.PIDS_MAX)
    second = keeper.take()
    assert second.cgroup == str(ahead)
    assert second.pids_limit == confine.PIDS_MAX
    keeper.retire(_emptied(second))
    assert wait_until(lambda: [p.name for p in root.iterdir()] not in ([], [ahead.name]))
    # One made ahead under another root is not handed out (and is removed).
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setattr(proctree, "CGROUP_ROOT", str(other))
    third = keeper.take()
    assert third.cgroup is not None
    assert Path(third.cgroup).parent == other


def test_no_cgroup_root_is_unusable() -> None:
    """The autouse fixture really keeps the agent away from /sys/fs/cgroup."""
    assert proctree.CGROUP_ROOT == NO_CGROUP_ROOT
    assert proctree.ProcessTree().cgroup is None


# -- the gRPC service -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("agent") / "a.sock"
    server = agent.serve(f"unix:{path}")
    try:
        yield f"unix:{path}"
    finally:
        server.stop(0)


@pytest.fixture
def stub(agent_address: str) -> Iterator[Stub]:
    with grpc.insecure_channel(agent_address) as channel:
        yield Stub(channel)


@dataclass
class Result:
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    events: list[str] = field(default_factory=list)
    exited: common_pb2.ExitStatus | None = None


def collect(responses: Iterable[guest_agent_pb2.ExecuteResponse]) -> Result:
    res = Result()
    for r in responses:
        kind = r.WhichOneof("event")
        assert kind is not None
        res.events.append(kind)
        if kind == "started":
            res.pid = r.started.pid
        elif kind == "output":
            if r.output.stream == common_pb2.OUTPUT_STREAM_STDOUT:
                res.stdout += r.output.data
            else:
                assert r.output.stream == common_pb2.OUTPUT_STREAM_STDERR
                res.stderr += r.output.data
        else:
            res.exited = r.exited
    return res


def exit_status(res: Result) -> common_pb2.ExitStatus:
    assert res.exited is not None, f"no exit status after {res.events}"
    return res.exited


def request(*args: str, timeout: float = 0, **kw: Any) -> guest_agent_pb2.ExecuteRequest:
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=list(args))), **kw
    )
    if timeout:
        req.timeout.FromNanoseconds(int(timeout * 1e9))
    return req


def run(stub: Stub, req: guest_agent_pb2.ExecuteRequest, deadline: float = 15) -> Result:
    return collect(stub.Execute(req, timeout=deadline))


def shell(script: str, **kw: Any) -> guest_agent_pb2.ExecuteRequest:
    return request("/bin/sh", "-c", script, **kw)


def test_get_status(stub: Stub) -> None:
    info = stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=10).info
    assert info.agent_version == __version__
    assert info.kernel_release == os.uname().release
    assert info.hostname == os.uname().nodename
    assert info.uptime.ToNanoseconds() > 0
    assert info.memory_total_bytes > info.memory_available_bytes > 0
    assert info.disk_total_bytes >= info.disk_free_bytes > 0
    assert info.process_count > 0
    assert len(info.boot_id) == 36
    assert info.load1 >= 0


def test_execute_streams_output_and_exit_code(stub: Stub, tmp_path: Path) -> None:
    res = run(stub, shell("echo out; echo err >&2; exit 3", cwd=str(tmp_path)))
    assert res.events[0] == "started"
    assert res.events[-1] == "exited"
    assert res.pid > 0
    assert res.stdout == b"out\n"
    assert res.stderr == b"err\n"
    assert res.exited is not None
    assert res.exited.exit_code == 3
    assert res.exited.signal == 0
    assert not res.exited.timed_out
    assert not res.exited.stdout_truncated
    assert res.exited.duration.ToNanoseconds() > 0


def test_execute_python_code(stub: Stub, tmp_path: Path) -> None:
    code = common_pb2.Code(
        language=common_pb2.CODE_LANGUAGE_PYTHON,
        source="import sys; print(sys.argv[1:])",
        args=["a", "b"],
    )
    req = guest_agent_pb2.ExecuteRequest(program=common_pb2.Program(code=code), cwd=str(tmp_path))
    res = run(stub, req)
    assert res.stdout == b"['a', 'b']\n"
    assert exit_status(res).exit_code == 0


def test_execute_honours_stdin_env_and_cwd(stub: Stub, tmp_path: Path) -> None:
    script = 'cat; echo "|$FOO|$PYTHONUNBUFFERED|$HOME|$(pwd)"'
    res = run(stub, shell(script, cwd=str(tmp_path), env={"FOO": "bar", "HOME": "/h"}, stdin=b"in"))
    assert res.stdout == f"in|bar|1|/h|{tmp_path}\n".encode()
    assert exit_status(res).exit_code == 0


def test_execute_env_does_not_leak_the_agents_environment(
    stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTVM_TEST_SECRET", "s3cret")
    res = run(stub, request("env", cwd=str(tmp_path)))
    names = {line.split(b"=", 1)[0] for line in res.stdout.splitlines()}
    assert b"AGENTVM_TEST_SECRET" not in names
    assert set(agent.DEFAULT_ENV) <= {n.decode() for n in names}


def test_execute_timeout_kills_the_tree(stub: Stub, tmp_path: Path) -> None:
    script = "echo before; sleep 30 & echo $! > bg; sleep 30; echo never"
    start = time.monotonic()
    res = run(stub, shell(script, cwd=str(tmp_path), timeout=1.0))
    elapsed = time.monotonic() - start
    assert res.stdout == b"before\n"
    assert res.exited is not None
    assert res.exited.timed_out
    assert res.exited.exit_code == 124
    assert res.exited.signal == signal.SIGKILL
    # Both sleeps died: the pipes reached EOF right after the timeout.
    assert 0.9 < elapsed < 5
    assert wait_until(lambda: _gone(int((tmp_path / "bg").read_text())))
    assert wait_until(lambda: _gone(res.pid))


def test_execute_leftovers_die_with_the_main_process(stub: Stub, tmp_path: Path) -> None:
    start = time.monotonic()
    res = run(stub, shell("sleep 30 & echo $! > bg; echo done", cwd=str(tmp_path), timeout=20))
    assert time.monotonic() - start < 5
    assert res.stdout == b"done\n"
    assert res.exited is not None
    assert res.exited.exit_code == 0
    assert not res.exited.timed_out
    assert wait_until(lambda: _gone(int((tmp_path / "bg").read_text())))


def test_execute_timeout_holds_when_a_child_escapes_the_process_group(
    stub: Stub, tmp_path: Path
) -> None:
    start = time.monotonic()
    res = run(stub, shell("setsid sleep 3 & sleep 30", cwd=str(tmp_path), timeout=0.5))
    assert exit_status(res).timed_out
    assert time.monotonic() - start < 2.5


def test_execute_output_cap_truncates(stub: Stub, tmp_path: Path) -> None:
    script = "head -c 100000 /dev/zero; printf abc >&2"
    res = run(stub, shell(script, cwd=str(tmp_path), max_output_bytes=1000))
    assert res.stdout == bytes(1000)
    assert res.stderr == b"abc"
    assert res.exited is not None
    assert res.exited.stdout_truncated
    assert not res.exited.stderr_truncated
    assert res.exited.exit_code == 0


def test_execute_output_exactly_at_cap_is_not_truncated(stub: Stub, tmp_path: Path) -> None:
    res = run(stub, shell("printf 0123456789", cwd=str(tmp_path), max_output_bytes=10))
    assert res.stdout == b"0123456789"
    assert not exit_status(res).stdout_truncated


def test_execute_output_one_past_cap_is_truncated(stub: Stub, tmp_path: Path) -> None:
    res = run(stub, shell("printf 0123456789X", cwd=str(tmp_path), max_output_bytes=10))
    assert res.stdout == b"0123456789"
    assert exit_status(res).stdout_truncated


def test_execute_large_output_streams_in_order(stub: Stub, tmp_path: Path) -> None:
    res = run(stub, shell("seq 1 200000", cwd=str(tmp_path)))
    assert res.stdout == b"".join(b"%d\n" % i for i in range(1, 200001))
    assert res.events.count("output") > 1


def expect_code(code: grpc.StatusCode, fn: Any, *args: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    err = info.value
    assert isinstance(err, grpc.Call)
    assert err.code() == code, err.details()
    return err.details() or ""


def test_invalid_cwd(stub: Stub, tmp_path: Path) -> None:
    details = expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, run, stub, request("true", cwd=str(tmp_path / "nope"))
    )
    assert "not a directory" in details


def test_invalid_program(stub: Stub) -> None:
    empty = guest_agent_pb2.ExecuteRequest()
    assert "program is empty" in expect_code(grpc.StatusCode.INVALID_ARGUMENT, run, stub, empty)


def test_invalid_timeout(stub: Stub, tmp_path: Path) -> None:
    req = request("true", cwd=str(tmp_path))
    req.timeout.FromSeconds(int(agent.MAX_TIMEOUT_S) + 1)
    assert "timeout" in expect_code(grpc.StatusCode.INVALID_ARGUMENT, run, stub, req)
    req.timeout.FromSeconds(-1)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, run, stub, req)


def test_missing_command(stub: Stub, tmp_path: Path) -> None:
    req = request(str(tmp_path / "no-such-program"), cwd=str(tmp_path))
    assert "cannot start" in expect_code(grpc.StatusCode.FAILED_PRECONDITION, run, stub, req)


class Background:
    """An Execute consumed in a thread; ``started`` is set once the process runs."""

    def __init__(self, stub: Stub, req: guest_agent_pb2.ExecuteRequest) -> None:
        self.started = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None
        self._responses = stub.Execute(req, timeout=15)
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        def tap() -> Iterator[guest_agent_pb2.ExecuteResponse]:
            for r in self._responses:
                if r.HasField("started"):
                    self.started.set()
                yield r

        try:
            self.result = collect(tap())
        except BaseException as exc:
            self.error = exc

    def join(self) -> Result:
        self._thread.join(15)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def test_duplicate_exec_id_and_signal(stub: Stub, tmp_path: Path) -> None:
    first = Background(stub, request("sleep", "30", cwd=str(tmp_path), exec_id="job-1", timeout=10))
    assert first.started.wait(10)
    details = expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        run,
        stub,
        request("true", cwd=str(tmp_path), exec_id="job-1"),
    )
    assert "job-1" in details
    bad = guest_agent_pb2.SignalProcessRequest(exec_id="job-1", signal=999)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.SignalProcess, bad, 5)
    stub.SignalProcess(guest_agent_pb2.SignalProcessRequest(exec_id="job-1", signal=15), timeout=5)
    res = first.join()
    assert res.exited is not None
    assert res.exited.signal == signal.SIGTERM
    assert res.exited.exit_code == 128 + signal.SIGTERM
    assert not res.exited.timed_out
    # The id is free again once the first Execute ended.
    again = run(stub, request("true", cwd=str(tmp_path), exec_id="job-1"))
    assert exit_status(again).exit_code == 0


def test_signal_kill_of_running_exec(stub: Stub, tmp_path: Path) -> None:
    job = Background(stub, request("sleep", "30", cwd=str(tmp_path), exec_id="job-2", timeout=10))
    assert job.started.wait(10)
    stub.SignalProcess(guest_agent_pb2.SignalProcessRequest(exec_id="job-2", signal=9), timeout=5)
    res = job.join()
    assert res.exited is not None
    assert res.exited.signal == signal.SIGKILL
    assert res.exited.exit_code == 137


def test_signal_unknown_exec_id(stub: Stub) -> None:
    req = guest_agent_pb2.SignalProcessRequest(exec_id="nobody", signal=15)
    assert "nobody" in expect_code(grpc.StatusCode.NOT_FOUND, stub.SignalProcess, req, 5)


def test_reseed_random_needs_32_bytes(stub: Stub) -> None:
    req = guest_agent_pb2.ReseedRandomRequest(seed=bytes(31))
    assert "32 bytes" in expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.ReseedRandom, req, 5)


def test_reseed_random_writes_at_most_4096_bytes(
    stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = tmp_path / "urandom"
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if file == "/dev/urandom":
            file = sink
        return real_open(file, *args, **kwargs)

    # The module's global "open" shadows the builtin for the agent code only.
    monkeypatch.setattr(agent_host, "open", fake_open, raising=False)
    seed = bytes(range(256)) * 20
    stub.ReseedRandom(guest_agent_pb2.ReseedRandomRequest(seed=seed), timeout=5)
    assert sink.read_bytes() == seed[:4096]


def test_reclaim_memory_drops_caches_compacts_and_reports(
    stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's /proc/sys knobs, redirected to files (on the host they would drop
    the host's caches): flush first, drop 3, compact 1; a kernel without compaction is fine."""
    drop, compact = tmp_path / "drop_caches", tmp_path / "compact_memory"
    written: list[str] = []
    real_sync = os.sync

    def sync() -> None:
        written.append("sync")
        real_sync()

    monkeypatch.setattr(memory, "DROP_CACHES", str(drop))
    monkeypatch.setattr(memory, "COMPACT_MEMORY", str(compact))
    monkeypatch.setattr(os, "sync", sync)
    resp = stub.ReclaimMemory(guest_agent_pb2.ReclaimMemoryRequest(), timeout=30)
    assert written == ["sync"]
    assert drop.read_text() == "3"
    assert compact.read_text() == "1"
    mem = proctree.meminfo()
    assert resp.total_bytes == mem["MemTotal"]
    assert 0 < resp.free_bytes <= resp.total_bytes
    compact.unlink()
    monkeypatch.setattr(memory, "COMPACT_MEMORY", str(tmp_path / "absent" / "compact_memory"))
    stub.ReclaimMemory(guest_agent_pb2.ReclaimMemoryRequest(), timeout=30)
    # Not root, or /proc/sys read-only: INTERNAL naming the cause.
    monkeypatch.setattr(memory, "DROP_CACHES", str(tmp_path / "absent" / "drop_caches"))
    msg = expect_code(
        grpc.StatusCode.INTERNAL, stub.ReclaimMemory, guest_agent_pb2.ReclaimMemoryRequest(), 30
    )
    assert "cannot reclaim memory" in msg
    assert "drop_caches" in msg


def _bad_call(channel: grpc.Channel, method: str, streamed: bool) -> None:
    """``method`` of the guest agent with bytes that end inside a length-delimited field."""
    path = f"/agentvm.v1.GuestAgentService/{method}"
    if streamed:
        list(channel.unary_stream(path, None, None)(b"\x0a\x05ab", timeout=10))
    else:
        channel.unary_unary(path, None, None)(b"\x0a\x05ab", timeout=10)


def test_undecodable_requests_are_invalid_argument_and_run_nothing(
    agent_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The guest agent answers bytes that are no valid request like the host services do."""
    with grpc.insecure_channel(agent_address) as channel, caplog.at_level(logging.WARNING):
        for method, streamed in (("GetStatus", False), ("Execute", True), ("ReadFile", True)):
            with pytest.raises(grpc.RpcError) as info:
                _bad_call(channel, method, streamed)
            err: Any = info.value
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"GuestAgentService/{method}: the request is not a valid agentvm.v1." in (
                err.details()
            )
        with pytest.raises(grpc.RpcError) as info:
            channel.stream_unary("/agentvm.v1.GuestAgentService/WriteFile", None, None)(
                iter([b"\xff"]), timeout=10
            )
        err = info.value
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        # The agent still serves.
        assert (
            Stub(channel).GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=10).HasField("info")
        )
    refused = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(refused) <= 5
    assert not any(r.exc_info for r in refused)


def test_execute_timeout_holds_when_the_program_closes_its_output(
    stub: Stub, tmp_path: Path
) -> None:
    """EOF on both pipes is not the end: a program that closed them and runs on
    is still killed at its timeout."""
    start = time.monotonic()
    res = run(stub, shell("echo hi; exec >&- 2>&-; sleep 30", cwd=str(tmp_path), timeout=1.0))
    assert res.stdout == b"hi\n"
    status = exit_status(res)
    assert status.timed_out
    assert status.exit_code == 124
    assert time.monotonic() - start < 10
