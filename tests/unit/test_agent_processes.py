"""Background processes of the guest agent (processes.py), run in-process on the host."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm_guest import agent, processes
from agentvm_guest.processes import OutputRing

from .helpers import wait_until

Stub = guest_agent_pb2_grpc.GuestAgentServiceStub
G = guest_agent_pb2


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    path = tmp_path_factory.mktemp("agent") / "a.sock"
    server = agent.serve(f"unix:{path}")
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            yield Stub(channel)
    finally:
        server.stop(0)


_seq = iter(range(10**6))


def start(
    stub: Stub, script: str, *, pty: tuple[int, int] | None = None, **kw: object
) -> tuple[str, int]:
    exec_id = f"t-{next(_seq)}-{time.monotonic_ns()}"
    req = G.GuestAgentServiceStartProcessRequest(
        exec_id=exec_id,
        program=common_pb2.Program(argv=common_pb2.Argv(args=["/bin/sh", "-c", script])),
        cwd="/tmp",
        **kw,  # type: ignore[arg-type]
    )
    if pty is not None:
        req.pty.size.rows, req.pty.size.cols = pty
    resp = stub.StartProcess(req, timeout=10)
    assert resp.pid > 0
    return exec_id, resp.pid


def events(stub: Stub, exec_id: str, offset: int = 0) -> list[common_pb2.ProcessEvent]:
    return [
        r.event
        for r in stub.ConnectProcess(
            G.GuestAgentServiceConnectProcessRequest(exec_id=exec_id, offset=offset), timeout=20
        )
    ]


def output(evs: list[common_pb2.ProcessEvent]) -> bytes:
    return b"".join(e.output.data for e in evs if e.WhichOneof("event") == "output")


def read_until(stub: Stub, exec_id: str, want: bytes, offset: int = 0) -> tuple[bytes, int]:
    """Output from ``offset`` until ``want`` appears; (that output, the next offset)."""
    got = b""
    call = stub.ConnectProcess(
        G.GuestAgentServiceConnectProcessRequest(exec_id=exec_id, offset=offset), timeout=20
    )
    try:
        for r in call:
            if r.event.WhichOneof("event") == "output":
                assert r.event.output.offset == offset + len(got)
                got += r.event.output.data
                if want in got:
                    return got, offset + len(got)
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    raise AssertionError(f"{want!r} never came; got {got!r}")


def listed(stub: Stub, exec_id: str) -> common_pb2.ProcessInfo:
    procs = stub.ListProcesses(G.GuestAgentServiceListProcessesRequest(), timeout=10).processes
    return next(p for p in procs if p.exec_id == exec_id)


def ended(stub: Stub, exec_id: str) -> Callable[[], bool]:
    return lambda: not listed(stub, exec_id).running


def write(stub: Stub, exec_id: str, data: bytes, eof: bool = False) -> None:
    stub.WriteStdin(G.WriteStdinRequest(exec_id=exec_id, data=data, eof=eof), timeout=10)


def test_ring_keeps_the_last_bytes_by_offset() -> None:
    ring = OutputRing(capacity=10)
    ring.append(common_pb2.OUTPUT_STREAM_STDOUT, b"abcd")
    ring.append(common_pb2.OUTPUT_STREAM_STDERR, b"efgh")
    assert ring.since(2) == (
        2,
        [
            (2, common_pb2.OUTPUT_STREAM_STDOUT, b"cd"),
            (4, common_pb2.OUTPUT_STREAM_STDERR, b"efgh"),
        ],
    )
    ring.append(common_pb2.OUTPUT_STREAM_STDOUT, b"ijkl")  # 12 bytes: the first chunk goes
    assert (ring.start, ring.end) == (4, 12)
    first, chunks = ring.since(0)
    assert first == 4
    assert b"".join(c[2] for c in chunks) == b"efghijkl"
    assert ring.since(12) == (12, [])


def test_pipes_output_in_order_with_offsets_and_exit_status(stub: Stub) -> None:
    exec_id, _ = start(stub, "echo out; echo err >&2; exit 3")
    evs = events(stub, exec_id)
    assert evs[-1].WhichOneof("event") == "exited"
    assert evs[-1].exited.exit_code == 3
    outs = [e.output for e in evs[:-1]]
    assert {o.stream for o in outs} <= {
        common_pb2.OUTPUT_STREAM_STDOUT,
        common_pb2.OUTPUT_STREAM_STDERR,
    }
    pos = 0
    for o in outs:
        assert o.offset == pos
        pos += len(o.data)
    assert sorted(output(evs).splitlines()) == [b"err", b"out"]
    # Reconnecting after the end gives the same, and listing shows how it ended.
    assert output(events(stub, exec_id)) == output(evs)
    assert events(stub, exec_id, offset=pos)[0].exited.exit_code == 3
    info = next(
        p
        for p in stub.ListProcesses(G.GuestAgentServiceListProcessesRequest()).processes
        if p.exec_id == exec_id
    )
    assert not info.running
    assert info.exit_status.exit_code == 3
    assert info.output_bytes == pos
    assert info.command.startswith("/bin/sh -c")


def test_a_terminal_sizes_resizes_interrupts_and_ends_with_the_shells_status(stub: Stub) -> None:
    exec_id, _ = start(stub, "exec /bin/sh -i", pty=(24, 80))
    write(stub, exec_id, b"stty size; echo T=$TERM\n")
    got, pos = read_until(stub, exec_id, b"T=xterm-256color")
    assert b"24 80" in got
    stub.ResizePty(
        G.GuestAgentServiceResizePtyRequest(
            exec_id=exec_id, size=common_pb2.PtySize(rows=30, cols=100)
        ),
        timeout=10,
    )
    write(stub, exec_id, b"stty size\n")
    got, pos = read_until(stub, exec_id, b"30 100", pos)
    # Ctrl-C through the terminal interrupts the foreground job at once.
    write(stub, exec_id, b"sleep 100; echo after-sleep-$?\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    write(stub, exec_id, b"\x03")
    write(stub, exec_id, b"echo back\n")
    got, pos = read_until(stub, exec_id, b"back\r\n", pos)
    assert time.monotonic() - t0 < 5
    # A signal by id goes to the foreground job too (not to the shell).
    write(stub, exec_id, b"sleep 100\n")
    time.sleep(0.5)
    stub.SignalProcess(G.SignalProcessRequest(exec_id=exec_id, signal=signal.SIGINT), timeout=10)
    write(stub, exec_id, b"echo alive\n")
    got, pos = read_until(stub, exec_id, b"alive\r\n", pos)
    write(stub, exec_id, b"exit 7\n")
    evs = events(stub, exec_id, pos)
    assert evs[-1].exited.exit_code == 7


def test_reconnecting_after_the_buffer_wrapped_reports_the_gap_once(stub: Stub) -> None:
    exec_id, _ = start(stub, "head -c 400000 /dev/zero | tr '\\0' x; echo END")
    assert wait_until(lambda: not listed(stub, exec_id).running, timeout=20)
    evs = events(stub, exec_id)
    kinds = [e.WhichOneof("event") for e in evs]
    assert kinds[0] == "dropped"
    assert kinds.count("dropped") == 1
    assert kinds[-1] == "exited"
    gap = evs[0].dropped
    assert gap.from_offset == 0
    assert gap.to_offset > 0
    data = output(evs)
    assert data.endswith(b"END\n")
    assert gap.to_offset + len(data) == 400004
    assert len(data) <= 256 * 1024
    # From an offset inside what is held: exactly the tail.
    assert output(events(stub, exec_id, offset=400000)) == b"END\n"


def test_bad_requests_are_refused_with_what_to_do(stub: Stub) -> None:
    exec_id, _ = start(stub, "exit 0")
    events(stub, exec_id)  # ended
    cases = [
        (
            lambda: stub.ResizePty(
                G.GuestAgentServiceResizePtyRequest(
                    exec_id=exec_id, size=common_pb2.PtySize(rows=10, cols=10)
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no pty",
        ),
        (lambda: write(stub, exec_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION, "has ended"),
        (lambda: events(stub, "nope"), grpc.StatusCode.NOT_FOUND, "no background process"),
        (lambda: events(stub, exec_id, 10**6), grpc.StatusCode.INVALID_ARGUMENT, "past the end"),
        (
            lambda: stub.StartProcess(
                G.GuestAgentServiceStartProcessRequest(
                    exec_id=exec_id,
                    program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])),
                )
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            "already in use",
        ),
        (
            lambda: stub.StartProcess(
                G.GuestAgentServiceStartProcessRequest(
                    exec_id="bad id",
                    program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exec_id must be",
        ),
        (
            lambda: start(stub, "true", pty=(0, 80)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "pty size",
        ),
        (
            lambda: start(stub, "true", env={"A": "x\0y"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NUL bytes",
        ),
        (
            lambda: stub.SignalProcess(G.SignalProcessRequest(exec_id=exec_id, signal=15)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "has ended",
        ),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()  # type: ignore[no-untyped-call]
        assert err.value.code() == code, err.value
        assert words in (err.value.details() or ""), err.value


def test_stdin_of_a_pipe_process_and_its_end(stub: Stub) -> None:
    exec_id, _ = start(stub, "cat", keep_stdin_open=True)
    write(stub, exec_id, b"hello ")
    write(stub, exec_id, b"world", eof=True)
    evs = events(stub, exec_id)
    assert output(evs) == b"hello world"
    assert evs[-1].exited.exit_code == 0


def test_ended_processes_keep_output_within_one_budget(
    stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "ENDED_OUTPUT_BYTES", 15000)
    ids = []
    for _ in range(3):
        exec_id, _ = start(stub, "head -c 10000 /dev/zero")
        assert wait_until(ended(stub, exec_id), timeout=20)
        ids.append(exec_id)
    stub.ListProcesses(G.GuestAgentServiceListProcessesRequest(), timeout=10)
    # The newest keeps its output; the older ones are reported dropped, with their status.
    assert len(output(events(stub, ids[2]))) == 10000
    for old in ids[:2]:
        evs = events(stub, old)
        assert evs[0].dropped.from_offset == 0
        assert evs[0].dropped.to_offset == 10000
        assert evs[-1].exited.exit_code == 0


def test_a_process_that_closes_its_output_still_ends_at_its_timeout(stub: Stub) -> None:
    t = time.monotonic()
    exec_id, _ = start(
        stub,
        "echo hi; exec >&- 2>&-; sleep 30",
        timeout=duration_pb2.Duration(seconds=1),
    )
    evs = events(stub, exec_id)
    assert output(evs) == b"hi\n"
    assert evs[-1].exited.timed_out
    assert evs[-1].exited.exit_code == 124
    assert time.monotonic() - t < 10
