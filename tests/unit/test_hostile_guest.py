"""A hostile guest agent against the real host side.

Every test puts a fake guest behind the host code that reads what guests send:
a grpc.aio server speaking raw bytes (so it can send anything a real agent
cannot), or a scripted socket on the guest side of HostRelay. Each proves the
same three things: a clear error for that one sandbox (the host's other calls
and VMs go on), bounded host memory (tracemalloc, with the guest's own bytes
built beforehand), and no hang (everything runs under ``run_async``'s deadline
and the elapsed time is checked). Hypothesis covers the decoders of guest data
that earlier suites do not (mux framing, NFLOG and DNS have their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from agentvm.common.config import Settings
from agentvm.common.errors import (
    AgentVMError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    RemoteError,
)
from agentvm.common.grpc_util import MAX_MESSAGE_BYTES, guest_channel
from agentvm.executor.executor import AgentExecutor, SandboxState
from agentvm.executor.files import check_path
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    vm_manager_pb2,
)
from agentvm.vm_manager import observe, relay_handshake
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.relay import HostRelay
from agentvm.vm_manager.relay_handshake import SessionError
from agentvm_guest import mux
from agentvm_guest.mux import FrameType

from .helpers import PortHost, run_async
from .test_host_relay import raw_client, read_to_eof, scripted, wait_for_hangup

VM = "agent-vm-hostile"
SERVICE = "agentvm.v1.GuestAgentService"
MiB = 1 << 20

Ctx = grpc.aio.ServicerContext[bytes, bytes]
Unary = Callable[[bytes, Ctx], Awaitable[bytes]]
Stream = Callable[[bytes, Ctx], AsyncIterator[bytes]]
StreamIn = Callable[[AsyncIterator[bytes], Ctx], Awaitable[bytes]]

# Bytes that are not a valid message of any type: a length running past the end,
# wire type 7 (does not exist), a group end with no start, invalid UTF-8 in a string.
BAD_PROTOBUF = {
    "truncated-length": b"\x0a\xff\xff\x03",
    "wire-type-7": b"\x0f",
    "stray-end-group": b"\x0c",
    "invalid-utf8-string": b"\x0a\x04\x1a\x02\xff\xfe",  # GetStatusResponse.info.hostname
}


# -- fake guest agents ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def fake_agent(
    path: Path,
    *,
    unary: dict[str, Unary] | None = None,
    stream: dict[str, Stream] | None = None,
    stream_in: dict[str, StreamIn] | None = None,
) -> AsyncIterator[str]:
    """A GuestAgentService at ``path`` whose handlers return raw bytes (any bytes at all)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, fn in (unary or {}).items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(fn)
    for name, sfn in (stream or {}).items():
        handlers[name] = grpc.unary_stream_rpc_method_handler(sfn)
    for name, ifn in (stream_in or {}).items():
        handlers[name] = grpc.stream_unary_rpc_method_handler(ifn)
    # Unlimited sending: the guest is not bound by the host's limits.
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        yield f"unix:{path}"
    finally:
        await server.stop(None)


def replies(data: bytes) -> Unary:
    async def handler(request: bytes, context: Ctx) -> bytes:
        return data

    return handler


def status_bytes(**fields: Any) -> bytes:
    return guest_agent_pb2.GetStatusResponse(
        info=common_pb2.GuestInfo(**fields)
    ).SerializeToString()


def started(pid: int = 42) -> bytes:
    msg = guest_agent_pb2.ExecuteResponse(started=common_pb2.ProcessStarted(pid=pid))
    return msg.SerializeToString()


def output(data: bytes, stream: int = common_pb2.OUTPUT_STREAM_STDOUT) -> bytes:
    chunk = common_pb2.OutputChunk(stream=cast(Any, stream), data=data)
    return guest_agent_pb2.ExecuteResponse(output=chunk).SerializeToString()


def exited(code: int = 0) -> bytes:
    msg = guest_agent_pb2.ExecuteResponse(exited=common_pb2.ExitStatus(exit_code=code))
    return msg.SerializeToString()


async def agent_status(target: str, timeout: float = 5.0) -> common_pb2.GuestInfo:
    """vm-manager's own GetStatus (readiness probe and stats) against ``target``."""
    vm = SimpleNamespace(agent_endpoint=target)
    return await VMManager.agent_status(cast(Any, None), cast(Any, vm), timeout)


# -- the executor, with a fake vm-manager ------------------------------------------------------
class FakeVMM:
    """What the executor asks vm-manager when an exec fails: is the VM gone?"""

    def __init__(self, gone: bool = False, held: str = "") -> None:
        self.gone = gone
        # Why the host holds the running VM (vm-manager's GetVM error: a full disk).
        self.held = held
        self.get_vm_calls = 0

    async def GetVM(
        self, request: vm_manager_pb2.GetVMRequest, timeout: float | None = None
    ) -> vm_manager_pb2.GetVMResponse:
        self.get_vm_calls += 1
        if self.gone:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="destroyed by the test",
                debug_error_string=None,
            )
        vm = common_pb2.VM(name=request.name, state=common_pb2.VM_STATE_READY, error=self.held)
        return vm_manager_pb2.GetVMResponse(vm=vm)


class ClampedStub:
    """The guest agent stub with every deadline cut to ``limit`` (the asked ones are kept).

    exec() gives Execute its timeout plus 30 s of grace; the tests check that deadline
    is asked for and let it fire after ``limit`` seconds instead.
    """

    def __init__(self, stub: Any, limit: float) -> None:
        self._stub = stub
        self.limit = limit
        self.asked: list[tuple[str, float | None]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
            self.asked.append((name, timeout))
            if timeout is not None:
                timeout = min(timeout, self.limit)
            return method(request, timeout=timeout, **kwargs)

        return call


class HostileSandbox(SandboxState):
    """A sandbox whose agent stub is given by the test (clamped, or fully fake)."""

    stub: Any

    @property
    def agent(self) -> Any:
        return self.stub


def sandbox(
    channel: grpc.aio.Channel | None, stub: Any = None, limit: float = 60.0
) -> HostileSandbox:
    sb = HostileSandbox(
        id="sb-hostile",
        spec=executor_pb2.SandboxSpec(),
        vm=common_pb2.VM(name=VM, network_mode=common_pb2.NETWORK_MODE_ISOLATED),
        workspace_mode=common_pb2.WORKSPACE_MODE_API,
        created_at=time.time(),
        expires_at=time.time() + 600,
        boot_duration=0.0,
        channel=cast(Any, channel),
    )
    if stub is None:
        stub = ClampedStub(guest_agent_pb2_grpc.GuestAgentServiceStub(cast(Any, channel)), limit)
    sb.stub = stub
    return sb


def asked_execute(asked: list[tuple[str, float | None]]) -> float:
    """The one deadline exec() asked for, rounded to the millisecond."""
    [(name, timeout)] = asked
    assert name == "Execute"
    assert timeout is not None
    return round(timeout, 3)


def exec_request(timeout_s: float = 0.2, cap: int = 0) -> executor_pb2.ExecRequest:
    req = executor_pb2.ExecRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])), max_output_bytes=cap
    )
    req.timeout.FromNanoseconds(int(timeout_s * 1e9))
    return req


class Outcome:
    """What exec() gave the executor's caller; output is counted, not kept."""

    def __init__(self) -> None:
        self.started = 0
        self.out = {common_pb2.OUTPUT_STREAM_STDOUT: 0, common_pb2.OUTPUT_STREAM_STDERR: 0}
        self.exits: list[common_pb2.ExitStatus] = []
        self.error: BaseException | None = None
        self.after_exit = 0
        self.elapsed = 0.0


async def run_exec(ex: AgentExecutor, sb: SandboxState, req: executor_pb2.ExecRequest) -> Outcome:
    res = Outcome()
    start = time.monotonic()
    try:
        async for ev in ex.exec(sb, req):
            if res.exits:
                res.after_exit += 1
            kind = ev.WhichOneof("event")
            if kind == "started":
                res.started += 1
            elif kind == "output":
                res.out[ev.output.stream] += len(ev.output.data)
            elif kind == "exited":
                res.exits.append(ev.exited)
    except AgentVMError as exc:
        res.error = exc
    res.elapsed = time.monotonic() - start
    await ex.close()  # the execution.finished reports it spawned
    return res


def executor(vmm: FakeVMM | None = None) -> AgentExecutor:
    return AgentExecutor(Settings(), cast(Any, vmm or FakeVMM()))


def code_of(exc: BaseException | None) -> grpc.StatusCode | None:
    return exc.code if isinstance(exc, AgentVMError) else None


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """tracemalloc around a block; yields a function giving the peak so far (bytes)."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- malformed protobuf in valid gRPC responses ------------------------------------------------
@pytest.mark.parametrize("bad", list(BAD_PROTOBUF.values()), ids=list(BAD_PROTOBUF))
def test_malformed_get_status_is_internal_for_that_vm_only(tmp_path: Path, bad: bytes) -> None:
    async def body() -> None:
        good = status_bytes(hostname="fine", agent_version="1")
        async with (
            fake_agent(tmp_path / "bad.sock", unary={"GetStatus": replies(bad)}) as hostile,
            fake_agent(tmp_path / "good.sock", unary={"GetStatus": replies(good)}) as fine,
        ):
            start = time.monotonic()
            results = await asyncio.gather(
                agent_status(hostile), agent_status(fine), return_exceptions=True
            )
            assert time.monotonic() - start < 5
        err, info = results
        assert isinstance(err, grpc.aio.AioRpcError), err
        assert err.code() is grpc.StatusCode.INTERNAL
        assert "malformed /agentvm.v1.GuestAgentService/GetStatus response" in str(err.details())
        assert isinstance(info, common_pb2.GuestInfo)
        assert info.hostname == "fine"

    run_async(body())


def test_malformed_execute_event_fails_that_exec_with_internal(tmp_path: Path) -> None:
    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        yield output(b"before")
        yield BAD_PROTOBUF["truncated-length"]
        yield exited()

    async def body() -> None:
        vmm = FakeVMM()
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            res = await run_exec(executor(vmm), sandbox(ch), exec_request())
        assert res.started == 1
        assert res.out[common_pb2.OUTPUT_STREAM_STDOUT] == len(b"before")
        assert res.exits == []
        assert isinstance(res.error, RemoteError)
        assert res.error.code is grpc.StatusCode.INTERNAL
        assert "malformed" in res.error.message
        assert VM in res.error.message
        assert vmm.get_vm_calls == 1  # it asked whether the VM was gone: it was not

    run_async(body())


def test_malformed_file_responses_are_internal_errors(tmp_path: Path) -> None:
    bad = BAD_PROTOBUF["wire-type-7"]

    async def read_file(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield guest_agent_pb2.GuestAgentServiceReadFileResponse(chunk=b"ok").SerializeToString()
        yield bad

    async def write_file(requests: AsyncIterator[bytes], context: Ctx) -> bytes:
        async for _ in requests:
            pass
        return bad

    async def chunks() -> AsyncIterator[bytes]:
        yield b"content"

    async def body() -> None:
        async with (
            fake_agent(
                tmp_path / "a.sock",
                unary={"ListFiles": replies(bad)},
                stream={"ReadFile": read_file},
                stream_in={"WriteFile": write_file},
            ) as target,
            guest_channel(target) as ch,
        ):
            ex, sb = executor(), sandbox(ch)
            with pytest.raises(RemoteError) as listed:
                await ex.list_files(sb, "output", recursive=True)
            with pytest.raises(RemoteError) as read:
                async for _ in ex.read_file(sb, "output/x"):
                    pass
            with pytest.raises(RemoteError) as written:
                await ex.write_file(sb, "input/x", 0, chunks(), [])
        for info in (listed, read, written):
            assert info.value.code is grpc.StatusCode.INTERNAL
            assert "malformed" in info.value.message

    run_async(body())


@pytest.mark.parametrize(
    ("size", "sha"),
    [(2**63, "right"), (7, "f" * 64), (7, "right-but-long" * 1000), (0, "")],
)
def test_write_file_size_and_hash_are_the_hosts_not_the_guests_claim(
    tmp_path: Path, size: int, sha: str
) -> None:
    """A guest that lies about what it wrote (size or digest) fails the write with DataLoss."""
    content = b"content"
    digest = hashlib.sha256(content).hexdigest()

    async def write_file(requests: AsyncIterator[bytes], context: Ctx) -> bytes:
        async for _ in requests:
            pass
        claim = digest if sha == "right" else sha
        return guest_agent_pb2.GuestAgentServiceWriteFileResponse(
            size_bytes=size, sha256=claim
        ).SerializeToString()

    async def chunks() -> AsyncIterator[bytes]:
        yield content

    async def body() -> None:
        async with (
            fake_agent(tmp_path / "a.sock", stream_in={"WriteFile": write_file}) as target,
            guest_channel(target) as ch,
        ):
            with pytest.raises(DataLoss) as info:
                await executor().write_file(sandbox(ch), "input/x", 0, chunks(), [])
        assert "7 bytes" in info.value.message
        assert digest in info.value.message
        assert len(info.value.message) < 600

    run_async(body())


# -- oversize messages ----------------------------------------------------------------------------
def test_oversize_get_status_is_resource_exhausted_and_never_materialised(tmp_path: Path) -> None:
    huge = status_bytes(hostname="h" * (MAX_MESSAGE_BYTES + 1))
    half = status_bytes(hostname="h" * (MAX_MESSAGE_BYTES // 2))

    async def body() -> tuple[int, int]:
        async with (
            fake_agent(tmp_path / "huge.sock", unary={"GetStatus": replies(huge)}) as hostile,
            fake_agent(tmp_path / "half.sock", unary={"GetStatus": replies(half)}) as big,
        ):
            with traced() as peak:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await agent_status(hostile)
                refused_peak = peak()
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # Control: the same measure does see a large message the host accepts.
            with traced() as peak:
                info = await agent_status(big)
                accepted_peak = peak()
            assert len(info.hostname) == MAX_MESSAGE_BYTES // 2
            return refused_peak, accepted_peak

    refused_peak, accepted_peak = run_async(body())
    assert accepted_peak > MAX_MESSAGE_BYTES // 2
    assert refused_peak < 2 * MiB  # the 16 MiB+ answer never reached Python


def test_oversize_output_chunk_fails_the_exec_with_resource_exhausted(tmp_path: Path) -> None:
    huge = output(b"x" * (MAX_MESSAGE_BYTES + 1))

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        yield huge
        yield exited()

    async def body() -> Outcome:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            return await run_exec(executor(), sandbox(ch), exec_request())

    res = run_async(body())
    assert res.started == 1
    assert res.exits == []
    assert code_of(res.error) is grpc.StatusCode.RESOURCE_EXHAUSTED


# -- endless and stalled streams ----------------------------------------------------------------
def test_endless_output_is_capped_on_the_host_and_cut_at_the_deadline(tmp_path: Path) -> None:
    """The guest ignores the cap and never exits: the host passes on exactly the cap per
    stream, holds no more than a few chunks, and the call's deadline ends it."""
    cap = 256 * 1024
    chunk_out = output(b"o" * 65536)
    chunk_err = output(b"e" * 65536, common_pb2.OUTPUT_STREAM_STDERR)
    sent = [0]

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        while True:
            yield chunk_out
            yield chunk_err
            sent[0] += 2 * 65536

    async def body() -> tuple[Outcome, int, list[tuple[str, float | None]]]:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            sb = sandbox(ch, limit=1.0)
            with traced() as peak:
                res = await run_exec(executor(), sb, exec_request(0.2, cap))
                return res, peak(), sb.stub.asked

    res, peak, asked = run_async(body())
    assert asked_execute(asked) == 30.2  # exec timeout + 30 s of grace
    assert res.out == {common_pb2.OUTPUT_STREAM_STDOUT: cap, common_pb2.OUTPUT_STREAM_STDERR: cap}
    assert res.exits == []
    assert code_of(res.error) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < res.elapsed < 4
    assert sent[0] > 8 * cap  # the guest kept going well past the cap ...
    assert peak < 8 * MiB  # ... and the host kept only what is in flight


def test_output_after_the_exit_status_is_cut_off(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        try:
            yield started()
            yield exited(3)
            while True:
                yield output(b"more")
        finally:
            cancelled.set()

    async def body() -> Outcome:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            res = await run_exec(executor(), sandbox(ch, limit=10), exec_request())
            assert await asyncio.wait_for(cancelled.wait(), 5)  # the call was cancelled
            return res

    res = run_async(body())
    assert res.error is None
    assert [s.exit_code for s in res.exits] == [3]
    assert res.after_exit == 0
    assert res.elapsed < 5


def test_stall_after_started_hits_the_deadline(tmp_path: Path) -> None:
    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        await asyncio.Event().wait()  # and then nothing, ever
        yield exited()

    async def body() -> tuple[Outcome, list[tuple[str, float | None]]]:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            sb = sandbox(ch, limit=0.5)
            return await run_exec(executor(), sb, exec_request(0.2)), sb.stub.asked

    res, asked = run_async(body())
    assert asked_execute(asked) == 30.2
    assert res.started == 1
    assert code_of(res.error) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < res.elapsed < 3


def test_a_silent_agent_socket_hits_the_deadline(tmp_path: Path) -> None:
    """The peer accepts the connection and never says a word of HTTP/2."""

    async def body() -> float:
        conns: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conns.append(writer)
            while await reader.read(65536):
                pass

        server = await asyncio.start_unix_server(silent, path=str(tmp_path / "a.sock"))
        try:
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_status(f"unix:{tmp_path / 'a.sock'}", timeout=0.5)
            assert err.value.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )
            return time.monotonic() - start
        finally:
            for w in conns:
                w.close()
            server.close()
            await server.wait_closed()

    assert run_async(body()) < 3


def test_a_deadline_passed_while_the_host_held_the_vm_says_why(tmp_path: Path) -> None:
    """QEMU paused the VM for a full state disk (vm_manager/diskfull.py): the command's
    deadline passes with the guest silent, and the caller learns why."""
    held = "QEMU paused the VM: its disk could not grow, the file system of /x is full"

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        await asyncio.Event().wait()  # the VM is paused: nothing more comes
        yield exited()

    async def body() -> Outcome:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            vmm = FakeVMM(held=held)
            return await run_exec(executor(vmm), sandbox(ch, limit=0.5), exec_request(0.2))

    res = run_async(body())
    assert code_of(res.error) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "did not end in time" in str(res.error)
    assert held in str(res.error)


# -- an agent that dies mid-command --------------------------------------------------------------
@pytest.mark.parametrize("vm_gone", [False, True])
def test_agent_dying_mid_command(tmp_path: Path, vm_gone: bool) -> None:
    """The server goes away mid-stream: UNAVAILABLE from the guest, ABORTED if the VM is gone."""
    midway = asyncio.Event()

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        yield output(b"partial")
        midway.set()
        await asyncio.Event().wait()
        yield exited()

    async def body() -> Outcome:
        vmm = FakeVMM(gone=vm_gone)
        async with guest_channel(f"unix:{tmp_path / 'a.sock'}") as ch:
            async with fake_agent(tmp_path / "a.sock", stream={"Execute": execute}):
                task = asyncio.ensure_future(
                    run_exec(executor(vmm), sandbox(ch, limit=10), exec_request())
                )
                await asyncio.wait_for(midway.wait(), 5)
            # The server has stopped (no grace): the agent is dead mid-command.
            res = await asyncio.wait_for(task, 5)
        # A broken connection: vm-manager is asked (again, for up to 3 s, while
        # the VM still looks alive: libvirt may not have seen it die yet).
        assert vmm.get_vm_calls >= 1
        return res

    res = run_async(body())
    assert res.started == 1
    assert res.out[common_pb2.OUTPUT_STREAM_STDOUT] == len(b"partial")
    assert res.exits == []
    if vm_gone:
        assert code_of(res.error) is grpc.StatusCode.ABORTED
        assert "is gone" in str(res.error)
    else:
        assert code_of(res.error) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert res.elapsed < 5


# -- GetStatus with absurd values -----------------------------------------------------------
def test_absurd_get_status_is_clamped(tmp_path: Path) -> None:
    absurd = common_pb2.GuestInfo(
        agent_version="v" * 10_000,
        kernel_release="\x1b[2J\u202e\x00" * 1000,
        hostname="h" * (4 * MiB),
        load1=float("nan"),
        load5=float("inf"),
        load15=-1.0,
        memory_total_bytes=2**64 - 1,
        memory_available_bytes=2**64 - 1,
        disk_total_bytes=2**64 - 1,
        disk_free_bytes=2**64 - 1,
        process_count=2**32 - 1,
        boot_id="\U0010ffff" * 5000,
        machine_id="m" * 1000,
    )
    absurd.uptime.seconds = 2**63 - 1
    absurd.uptime.nanos = -1

    async def body() -> common_pb2.GuestInfo:
        wire = guest_agent_pb2.GetStatusResponse(info=absurd).SerializeToString()
        async with fake_agent(tmp_path / "a.sock", unary={"GetStatus": replies(wire)}) as target:
            return await agent_status(target)

    info = run_async(body())
    clean = observe.sanitize_guest(info, 2 * 2**30)
    check_sanitized(clean, info, 2 * 2**30)
    assert clean.memory_total_bytes == 4 * 2**30
    assert clean.process_count == observe.MAX_PROCESSES
    assert not clean.HasField("uptime")
    assert (clean.load1, clean.load5, clean.load15) == (0.0, 0.0, 0.0)


def check_sanitized(
    clean: common_pb2.GuestInfo, raw: common_pb2.GuestInfo, memory_max_bytes: int
) -> None:
    mem_cap = max(memory_max_bytes, 1) * 2
    for name in ("agent_version", "kernel_release", "hostname", "boot_id", "machine_id"):
        value = getattr(clean, name)
        assert len(value) <= observe.MAX_TEXT
        assert getattr(raw, name).startswith(value)
    for load in (clean.load1, clean.load5, clean.load15):
        assert 0.0 <= load <= 1e6
    assert clean.memory_available_bytes <= clean.memory_total_bytes <= mem_cap
    assert clean.disk_free_bytes <= clean.disk_total_bytes <= 1 << 50
    assert clean.process_count <= observe.MAX_PROCESSES
    if clean.HasField("uptime"):
        assert 0 <= clean.uptime.ToNanoseconds() <= observe.MAX_UPTIME_S * 10**9 + 10**9
    # Whatever the guest said, the result renders (CLI --json, evidence metadata).
    json_format.MessageToJson(clean)
    assert common_pb2.GuestInfo.FromString(clean.SerializeToString()) == clean


# -- the relay: hostile bytes from the guest side ------------------------------------------------
def relay_for(tmp_path: Path, **kwargs: Any) -> HostRelay:
    return HostRelay(
        VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "channel.sock"), **kwargs
    )


def answer_with(payload: bytes) -> Callable[[PortHost, int], None]:
    """A guest that acks the session and answers every stream with ``payload`` (as DATA)."""

    def script(port: PortHost, n: int) -> None:
        nonce = port.expect_sync()
        port.send(mux.sync_ack(nonce))
        with contextlib.suppress(OSError, TimeoutError):
            while True:
                f = port.recv_frame(timeout=10)
                if f.type is FrameType.OPEN:
                    for i in range(0, len(payload), mux.MAX_PAYLOAD):
                        port.send_frame(FrameType.DATA, f.stream, payload[i : i + mux.MAX_PAYLOAD])

    return script


def h2_frame(
    ftype: int, flags: int, stream: int, payload: bytes, length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


SETTINGS = h2_frame(4, 0, 0, b"")
FAST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
# (what the guest answers, how the host's call ends)
BAD_HTTP2 = {
    "garbage": (b"HTTP/1.1 400 Bad Request\r\n\r\n" + os.urandom(64), FAST),
    "huge-frame-length": (h2_frame(4, 0, 0, b"", length=0xFFFFFF), FAST),
    # Usually at once; on a loaded machine grpc-core sometimes only at the deadline.
    "bad-hpack": (
        SETTINGS + h2_frame(1, 0x4, 1, b"\xff\xff\xff\xff\x0f"),
        (*FAST, grpc.StatusCode.DEADLINE_EXCEEDED),
    ),
    # A protocol error by the spec that grpc-core lets pass: only the deadline ends it.
    "data-on-stream-0": (
        SETTINGS + h2_frame(0, 0, 0, b"x" * 10),
        (grpc.StatusCode.DEADLINE_EXCEEDED,),
    ),
}


@pytest.mark.parametrize(("payload", "codes"), list(BAD_HTTP2.values()), ids=list(BAD_HTTP2))
def test_malformed_http2_through_the_relay_fails_the_call(
    tmp_path: Path, payload: bytes, codes: tuple[grpc.StatusCode, ...]
) -> None:
    async def body() -> None:
        relay = relay_for(tmp_path)
        await relay.start()
        try:
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_status(f"unix:{relay.listen_path}", timeout=1.0)
            assert err.value.code() in codes
            assert time.monotonic() - start < (0.5 if codes is FAST else 2.0)
            # The mux framing was fine: the session (other clients of this VM) goes on.
            assert relay.protocol_errors == 0
        finally:
            await relay.close()

    with scripted(tmp_path, answer_with(payload)):
        run_async(body())


@pytest.mark.parametrize("length", [mux.MAX_PAYLOAD + 1, 0xFFFFFFFF])
def test_huge_mux_frame_length_ends_the_session_at_the_header(tmp_path: Path, length: int) -> None:
    """Only the header arrives: the relay must not wait for (or buffer) the payload."""

    def script(port: PortHost, n: int) -> None:
        port.send(mux.sync_ack(port.expect_sync()))
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
        port.send(mux.HEADER.pack(mux.MAGIC, int(FrameType.DATA), 0, 1, length))
        wait_for_hangup(port)

    async def body() -> None:
        relay = relay_for(tmp_path)
        await relay.start()
        try:
            r, w = await raw_client(relay.listen_path)
            assert await read_to_eof(r, timeout=3) == b""
            w.close()
            assert relay.protocol_errors == 1
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        run_async(body())


def test_garbage_flood_after_the_ack_costs_no_memory(tmp_path: Path) -> None:
    flood = os.urandom(8 * MiB)
    accepted = []

    def script(port: PortHost, n: int) -> None:
        accepted.append(n)
        nonce = port.expect_sync()
        if n == 1:
            with contextlib.suppress(OSError):
                port.send(mux.sync_ack(nonce))
                port.send(flood)
                port.send(flood)  # and more bytes after the host has hung up
            return
        port.send(mux.sync_ack(nonce))
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
        port.send_frame(FrameType.DATA, 1, b"fine")
        wait_for_hangup(port)

    async def body() -> int:
        relay = relay_for(tmp_path)
        await relay.start()
        try:
            with traced() as peak:
                r, w = await raw_client(relay.listen_path)
                assert await read_to_eof(r) == b""
                w.close()
                assert relay.protocol_errors == 1
                flood_peak = peak()
            r, w = await raw_client(relay.listen_path)  # the next client gets a new session
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"fine"
            w.close()
            assert relay.sessions_started == 2
            return flood_peak
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        assert run_async(body()) < 2 * MiB
    assert accepted == [1, 2]


def test_garbage_flood_during_the_handshake_times_out_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SYNC_ACK (a wrong-nonce one included), only megabytes of noise: SessionError."""
    monkeypatch.setattr(relay_handshake, "SYNC_RETRY_S", 0.1)
    chunk = os.urandom(MiB) + mux.sync_ack(bytes(mux.NONCE_SIZE))
    sent = [0]

    def script(port: PortHost, n: int) -> None:
        port.expect_sync()
        with contextlib.suppress(OSError):
            while True:
                port.send(chunk)
                sent[0] += len(chunk)

    async def body() -> tuple[float, int]:
        relay = relay_for(tmp_path, handshake_timeout=0.5)
        await relay.start()
        try:
            with traced() as peak:
                start = time.monotonic()
                r, w = await raw_client(relay.listen_path)
                assert await read_to_eof(r) == b""
                w.close()
                elapsed = time.monotonic() - start
                assert relay.sessions_started == 0
                return elapsed, peak()
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        elapsed, peak = run_async(body())
    assert 0.4 < elapsed < 3
    assert sent[0] > 4 * MiB
    assert peak < 2 * MiB


def test_valid_data_flood_is_backpressured_not_buffered(tmp_path: Path) -> None:
    """8 MiB of valid DATA to a client that does not read: the relay stops reading the port."""
    payload = os.urandom(8 * MiB)

    def script(port: PortHost, n: int) -> None:
        port.send(mux.sync_ack(port.expect_sync()))
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
        for i in range(0, len(payload), mux.MAX_PAYLOAD):
            port.send_frame(FrameType.DATA, 1, payload[i : i + mux.MAX_PAYLOAD])
        wait_for_hangup(port)

    async def body() -> int:
        relay = relay_for(tmp_path)
        await relay.start()
        try:
            with traced() as peak:
                r, w = await raw_client(relay.listen_path)
                await asyncio.sleep(0.3)  # the client reads nothing meanwhile
                stalled_peak = peak()
            got = await asyncio.wait_for(r.readexactly(len(payload)), 10)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            w.close()
            return stalled_peak
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        assert run_async(body()) < 2 * MiB


def test_frames_after_close_and_for_unknown_streams_are_ignored(tmp_path: Path) -> None:
    def script(port: PortHost, n: int) -> None:
        port.send(mux.sync_ack(port.expect_sync()))
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
        port.send_frame(FrameType.CLOSE, 1)
        port.send_frame(FrameType.DATA, 1, b"after close")  # bytes after close
        port.send_frame(FrameType.CLOSE, 1)  # a second close
        port.send_frame(FrameType.DATA, 99, b"never opened")
        port.send_frame(FrameType.SYNC_ACK, 0, bytes(mux.NONCE_SIZE))  # stale answer
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 3)
        port.send_frame(FrameType.DATA, 3, b"stream three")
        wait_for_hangup(port)

    async def body() -> None:
        relay = relay_for(tmp_path)
        await relay.start()
        try:
            r1, w1 = await raw_client(relay.listen_path)
            assert await read_to_eof(r1) == b""
            w1.close()
            r3, w3 = await raw_client(relay.listen_path)
            assert await asyncio.wait_for(r3.readexactly(12), 5) == b"stream three"
            w3.close()
            assert relay.protocol_errors == 0
            assert relay.sessions_started == 1
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        run_async(body())


# -- property tests of the host's decoders of guest data -------------------------------------------
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
TEXT = st.text(max_size=600)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def guest_infos(draw: st.DrawFn) -> common_pb2.GuestInfo:
    info = common_pb2.GuestInfo(
        agent_version=draw(TEXT),
        kernel_release=draw(TEXT),
        hostname=draw(TEXT),
        load1=draw(DOUBLES),
        load5=draw(DOUBLES),
        load15=draw(DOUBLES),
        memory_total_bytes=draw(UINT64),
        memory_available_bytes=draw(UINT64),
        disk_total_bytes=draw(UINT64),
        disk_free_bytes=draw(UINT64),
        process_count=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        boot_id=draw(TEXT),
        machine_id=draw(TEXT),
    )
    if draw(st.booleans()):
        info.uptime.seconds = draw(st.integers(min_value=-(2**63), max_value=2**63 - 1))
        info.uptime.nanos = draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))
    return info


@given(info=guest_infos(), memory_max=st.integers(min_value=0, max_value=2**45))
def test_sanitize_guest_bounds_any_guest_info(info: common_pb2.GuestInfo, memory_max: int) -> None:
    check_sanitized(observe.sanitize_guest(info, memory_max), info, memory_max)


@given(wire=st.binary(max_size=300))
def test_any_get_status_bytes_parse_or_raise_decode_error_then_sanitize(wire: bytes) -> None:
    """What grpc's deserializer does with guest bytes; then what the host keeps of it."""
    try:
        resp = guest_agent_pb2.GetStatusResponse.FromString(wire)
    except DecodeError:  # the documented error; anything else fails the test
        return
    check_sanitized(observe.sanitize_guest(resp.info, 1 << 30), resp.info, 1 << 30)


class ScriptedCall:
    """A fake Execute/ReadFile call: yields ``events``, records its cancellation."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Any]:
        for ev in self.events:
            yield ev

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class ScriptedStub:
    """A guest agent stub whose answers are given up front (no network: fast properties)."""

    def __init__(self, events: list[Any] | None = None, files: list[str] | None = None) -> None:
        self.call = ScriptedCall(events or [])
        self.files = files or []

    def Execute(self, request: Any, timeout: float | None = None) -> ScriptedCall:
        return self.call

    def ReadFile(self, request: Any, timeout: float | None = None) -> ScriptedCall:
        return self.call

    async def ListFiles(
        self, request: Any, timeout: float | None = None
    ) -> guest_agent_pb2.GuestAgentServiceListFilesResponse:
        return guest_agent_pb2.GuestAgentServiceListFilesResponse(
            files=[common_pb2.FileInfo(path=p) for p in self.files]
        )


STREAMS = st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1])
EVENTS = st.one_of(
    st.builds(lambda pid: ("started", pid), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda s, d: ("output", s, d), STREAMS, st.binary(max_size=40)),
    st.builds(lambda c: ("exited", c), st.integers(-(2**31), 2**31 - 1)),
    st.just(("empty",)),
)


def execute_event(spec: tuple[Any, ...]) -> guest_agent_pb2.ExecuteResponse:
    if spec[0] == "started":
        return guest_agent_pb2.ExecuteResponse(started=common_pb2.ProcessStarted(pid=spec[1]))
    if spec[0] == "output":
        chunk = common_pb2.OutputChunk(stream=spec[1], data=spec[2])
        return guest_agent_pb2.ExecuteResponse(output=chunk)
    if spec[0] == "exited":
        return guest_agent_pb2.ExecuteResponse(exited=common_pb2.ExitStatus(exit_code=spec[1]))
    return guest_agent_pb2.ExecuteResponse()


@given(specs=st.lists(EVENTS, max_size=25), cap=st.integers(min_value=1, max_value=120))
def test_exec_stream_handling_is_total_and_capped(specs: list[tuple[Any, ...]], cap: int) -> None:
    """Any event sequence: output within the cap per stream, one exit status at most and
    nothing after it, the call always cancelled, and only DataLoss/FailedPrecondition."""
    stub = ScriptedStub(events=[execute_event(s) for s in specs])
    res = run_async(run_exec(executor(), sandbox(None, stub), exec_request(cap=cap)))
    assert stub.call.cancelled
    assert all(0 <= n <= cap for n in res.out.values())
    assert len(res.exits) <= 1
    assert res.after_exit == 0
    if res.error is not None:
        assert isinstance(res.error, DataLoss | FailedPrecondition), res.error
        assert not res.exits
    else:
        assert len(res.exits) == 1
        sent = dict.fromkeys(res.out, 0)
        for s in specs:
            if s[0] == "exited":
                break
            if s[0] == "output":
                sent[s[1]] += len(s[2])
        status = res.exits[0]
        assert status.stdout_truncated == (sent[common_pb2.OUTPUT_STREAM_STDOUT] > cap)
        assert status.stderr_truncated == (sent[common_pb2.OUTPUT_STREAM_STDERR] > cap)


PATH_PARTS = st.sampled_from(["a", "..", ".", "", "/", "b\x00", "output", "é", "\\", "~"])


@given(paths=st.lists(st.lists(PATH_PARTS, max_size=4).map("/".join) | st.text(max_size=12)))
def test_guest_file_listings_are_checked(paths: list[str]) -> None:
    """A listing is returned only if every path the guest invented is a workspace path."""

    async def body() -> list[common_pb2.FileInfo]:
        return await executor().list_files(sandbox(None, ScriptedStub(files=paths)), "", True)

    try:
        files = run_async(body())
    except InvalidArgument:
        assert any(not _valid_path(p) for p in paths)
        return
    assert [f.path for f in files] == paths
    assert all(_valid_path(p) for p in paths)


def _valid_path(path: str) -> bool:
    try:
        check_path(path)
    except InvalidArgument:
        return False
    return True


@given(
    chunks=st.lists(st.binary(max_size=30), max_size=6),
    claim=st.one_of(st.just(""), st.just("right"), st.text(max_size=70)),
    sizes=st.lists(UINT64, min_size=6, max_size=6),
)
def test_read_file_hash_is_computed_on_the_host(
    chunks: list[bytes], claim: str, sizes: list[int]
) -> None:
    """The content is passed on as sent; the digest is the host's; a wrong claim is DataLoss."""
    content = b"".join(chunks)
    digest = hashlib.sha256(content).hexdigest()
    sha = digest if claim == "right" else claim
    events = [
        guest_agent_pb2.GuestAgentServiceReadFileResponse(chunk=c, size_bytes=n)
        for c, n in zip(chunks, sizes, strict=False)
    ]
    events.append(guest_agent_pb2.GuestAgentServiceReadFileResponse(sha256=sha))
    stub = ScriptedStub(events=events)

    async def body() -> list[tuple[bytes, int, str]]:
        return [item async for item in executor().read_file(sandbox(None, stub), "output/f")]

    try:
        items = run_async(body())
    except DataLoss:
        assert sha not in ("", digest)
        return
    assert sha in ("", digest)
    assert b"".join(data for data, _, _ in items) == content
    assert items[-1] == (b"", 0, digest)
    assert stub.call.cancelled


class RecordingClient:
    """A relay client connection (StreamWriter stand-in) that records what it is sent."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        # The relay asks what is left unsent when it closes a client (nothing here).
        self.transport = SimpleNamespace(get_write_buffer_size=lambda: 0, abort=self.close)

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


FRAMES = st.builds(
    mux.Frame,
    st.sampled_from(list(FrameType)),
    st.sampled_from([0, 1, 2, 3, 5, 0xFFFFFFFF]),
    st.binary(max_size=20),
)


@given(frames=st.lists(FRAMES, max_size=20))
def test_relay_dispatch_of_any_guest_frames(frames: list[mux.Frame]) -> None:
    """Guest frames reach only open streams, in order, nothing after CLOSE; the guest
    may not OPEN or SYNC (ProtocolError); RESET ends the session (SessionError)."""
    relay = relay_for(Path("/nonexistent"))
    clients = {1: RecordingClient(), 3: RecordingClient()}
    session = cast(Any, SimpleNamespace(streams=dict(clients)))
    expected = {1: bytearray(), 3: bytearray()}
    open_ = {1, 3}

    async def body() -> None:
        for f in frames:
            if f.type in (FrameType.OPEN, FrameType.SYNC):
                with pytest.raises(mux.ProtocolError):
                    await relay._dispatch(session, f)
                return
            if f.type is FrameType.RESET:
                with pytest.raises(SessionError, match="restarted"):
                    await relay._dispatch(session, f)
                assert relay.guest_resets == 1
                return
            await relay._dispatch(session, f)
            if f.type is FrameType.DATA and f.stream in open_:
                expected[f.stream] += f.payload
            elif f.type is FrameType.CLOSE:
                open_.discard(f.stream)

    run_async(body())
    for stream, client in clients.items():
        assert bytes(client.data) == bytes(expected[stream])
        assert client.closed == (stream not in open_)
    assert set(session.streams) == open_
