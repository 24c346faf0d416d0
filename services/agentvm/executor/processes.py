"""Background processes of a sandbox: start, reconnect, list, resize (docs/SANDBOXES.md, 3).

The guest agent owns the processes (their table and output buffers live in
the VM, so they outlive any call and any client); the executor checks what
callers ask and everything the guest answers: offsets that only go
forward, known streams, bounded sizes, an exit status with believable
figures, nothing after it. A mixin of AgentExecutor.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from agentvm.common.errors import DataLoss, InvalidArgument, RemoteError
from agentvm.common.events import EventSink
from agentvm.common.guest_figures import Bounds, clamp_exit_status
from agentvm.executor.sandbox import MAX_TIMEOUT_S, SandboxState, default_cwd, describe_program
from agentvm.v1 import common_pb2, executor_pb2, guest_agent_pb2

EXEC_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_TAG = 128
MAX_PTY_CELLS = 1000
# What a guest may send: at most this much per chunk, this many processes listed.
MAX_CHUNK = 64 * 1024
MAX_LISTED = 64 + 1000
MAX_COMMAND = 1024
STREAMS = (
    common_pb2.OUTPUT_STREAM_STDOUT,
    common_pb2.OUTPUT_STREAM_STDERR,
    common_pb2.OUTPUT_STREAM_PTY,
)


def check_pty_size(size: common_pb2.PtySize) -> None:
    if not (1 <= size.rows <= MAX_PTY_CELLS and 1 <= size.cols <= MAX_PTY_CELLS):
        raise InvalidArgument(
            f"pty size must be 1-{MAX_PTY_CELLS} rows and columns, got {size.rows}x{size.cols}"
        )


def check_exec_id(exec_id: str) -> None:
    if not EXEC_ID.fullmatch(exec_id):
        raise InvalidArgument(f"exec_id must be 1-64 of [A-Za-z0-9._-], got {exec_id[:80]!r}")


def check_listed(info: common_pb2.ProcessInfo) -> None:
    """A ProcessInfo from the guest is within what the agent can send."""
    if not EXEC_ID.fullmatch(info.exec_id):
        raise DataLoss("the guest listed a process with an invalid exec_id")
    if len(info.tag.encode()) > MAX_TAG or len(info.command.encode()) > 4 * MAX_COMMAND:
        raise DataLoss(f"the guest listed process {info.exec_id!r} with an oversized field")
    if info.pid < 0:
        raise DataLoss(f"the guest listed process {info.exec_id!r} with pid {info.pid}")


class ProcessStream:
    """Checks one guest stream of ProcessEvents, in order."""

    def __init__(self, sb: SandboxState, exec_id: str, offset: int) -> None:
        self.sb = sb
        self.exec_id = exec_id
        self.pos = offset
        self.ended = False

    def check(self, ev: common_pb2.ProcessEvent) -> common_pb2.ProcessEvent:
        where = f"the guest of {self.sb.vm.name}, process {self.exec_id!r}"
        if self.ended:
            raise DataLoss(f"{where} sent events after the exit status")
        kind = ev.WhichOneof("event")
        if kind == "output":
            out = ev.output
            if out.stream not in STREAMS:
                raise DataLoss(f"{where} sent output on an unknown stream {out.stream}")
            if out.offset != self.pos:
                raise DataLoss(f"{where} sent output at offset {out.offset}, expected {self.pos}")
            if not out.data or len(out.data) > MAX_CHUNK:
                raise DataLoss(f"{where} sent a chunk of {len(out.data)} bytes")
            self.pos += len(out.data)
        elif kind == "dropped":
            d = ev.dropped
            if d.from_offset != self.pos or d.to_offset <= d.from_offset:
                raise DataLoss(
                    f"{where} reported dropped output {d.from_offset}-{d.to_offset} "
                    f"at offset {self.pos}"
                )
            self.pos = d.to_offset
        elif kind == "exited":
            self.ended = True
            elapsed = time.time() - self.sb.created_at
            clamp_exit_status(ev.exited, Bounds.of_vm(self.sb.vm, elapsed))
        else:
            raise DataLoss(f"{where} sent an empty or unexpected event ({kind})")
        return ev


class Processes:
    """Background processes in sandboxes."""

    events: EventSink

    async def start_process(
        self, sb: SandboxState, req: executor_pb2.StartProcessRequest
    ) -> AsyncIterator[executor_pb2.StartProcessResponse]:
        """Start a process that outlives this stream; streams started, output, exit."""
        if not req.program.WhichOneof("kind"):
            raise InvalidArgument("program is empty: set program.argv or program.code")
        exec_id = req.exec_id or "pr-" + secrets.token_hex(6)
        check_exec_id(exec_id)
        if len(req.tag.encode()) > MAX_TAG:
            raise InvalidArgument(f"tag is longer than {MAX_TAG} bytes")
        greq = guest_agent_pb2.GuestAgentServiceStartProcessRequest(
            exec_id=exec_id,
            program=req.program,
            cwd=req.cwd or default_cwd(sb.spec),
            env=sb.env.for_exec(req.env),
            tag=req.tag,
            keep_stdin_open=req.keep_stdin_open,
        )
        if req.HasField("pty"):
            check_pty_size(req.pty.size)
            greq.pty.CopyFrom(req.pty)
        if req.HasField("timeout"):
            timeout = req.timeout.ToNanoseconds() / 1e9
            if not 0 <= timeout <= MAX_TIMEOUT_S:
                raise InvalidArgument(
                    f"timeout must be between 0 and {MAX_TIMEOUT_S:.0f} seconds, got {timeout}"
                )
            greq.timeout.CopyFrom(req.timeout)
        try:
            started = await sb.agent.StartProcess(greq, timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
        if started.pid <= 0:
            raise DataLoss(f"the guest of {sb.vm.name} started {exec_id!r} with pid {started.pid}")
        command, command_sha = describe_program(req.program)
        self.events.emit(
            "execution.started",
            vm=sb.vm.name,
            sandbox=sb.id,
            exec_id=exec_id,
            command=sb.env.redact(command),
            command_sha256=command_sha,
            background=True,
            pty=req.HasField("pty"),
        )
        yield executor_pb2.StartProcessResponse(
            exec_id=exec_id,
            event=common_pb2.ProcessEvent(started=common_pb2.ProcessStarted(pid=started.pid)),
        )
        async for ev in self.connect_process(sb, exec_id, 0):
            yield executor_pb2.StartProcessResponse(event=ev)

    async def connect_process(
        self, sb: SandboxState, exec_id: str, offset: int
    ) -> AsyncIterator[common_pb2.ProcessEvent]:
        """The process's output from ``offset``, then its exit status (checked)."""
        check_exec_id(exec_id)
        checker = ProcessStream(sb, exec_id, offset)
        call = sb.agent.ConnectProcess(
            guest_agent_pb2.GuestAgentServiceConnectProcessRequest(exec_id=exec_id, offset=offset)
        )
        try:
            async for resp in call:
                yield checker.check(resp.event)
                if checker.ended:
                    return
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
        finally:
            call.cancel()
        raise DataLoss(
            f"the guest of {sb.vm.name} ended process {exec_id!r}'s stream without its exit status"
        )

    async def list_processes(self, sb: SandboxState) -> list[common_pb2.ProcessInfo]:
        try:
            resp = await sb.agent.ListProcesses(
                guest_agent_pb2.GuestAgentServiceListProcessesRequest(), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
        if len(resp.processes) > MAX_LISTED:
            raise DataLoss(f"the guest of {sb.vm.name} listed {len(resp.processes)} processes")
        elapsed = time.time() - sb.created_at
        for info in resp.processes:
            check_listed(info)
            if info.HasField("exit_status"):
                clamp_exit_status(info.exit_status, Bounds.of_vm(sb.vm, elapsed))
            info.command = sb.env.redact(info.command)
        return list(resp.processes)

    async def resize_pty(self, sb: SandboxState, exec_id: str, size: common_pb2.PtySize) -> None:
        check_exec_id(exec_id)
        check_pty_size(size)
        try:
            await sb.agent.ResizePty(
                guest_agent_pb2.GuestAgentServiceResizePtyRequest(exec_id=exec_id, size=size),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
