"""envd's process service (``process.Process``) onto the executor's background processes.

E2B picks a process by pid or tag; the executor by exec id: a selector is
resolved through ListProcesses (running processes first). Start and Connect
forward the executor's event stream (start, output, end) and add keepalives
while a process is quiet, as envd does.
"""

from __future__ import annotations

import secrets
import shlex
import signal as signals
from collections.abc import AsyncIterator
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from agentvm.e2b_gateway.backend import (
    CALL_TIMEOUT,
    SANDBOX_ID_HEADER,
    Backend,
    call,
    signal_process,
    with_keepalive,
    write_stdin,
)
from agentvm.e2b_gateway.envd.process import process_pb2 as pb
from agentvm.e2b_gateway.errors import from_rpc
from agentvm.v1 import common_pb2, executor_pb2

KEEPALIVE_S = 30.0
_SIGNAL_NAMES: dict[int, str] = {
    signals.SIGKILL: "killed",
    signals.SIGTERM: "terminated",
    signals.SIGINT: "interrupt",
    signals.SIGHUP: "hangup",
    signals.SIGQUIT: "quit",
    signals.SIGPIPE: "broken pipe",
    signals.SIGSEGV: "segmentation fault",
    signals.SIGABRT: "aborted",
}
_STREAMS = {
    common_pb2.OUTPUT_STREAM_STDOUT: "stdout",
    common_pb2.OUTPUT_STREAM_STDERR: "stderr",
    common_pb2.OUTPUT_STREAM_PTY: "pty",
}


def sandbox_of(ctx: RequestContext[Any, Any]) -> str:
    """The (authenticated) sandbox id of an envd call."""
    sandbox_id = ctx.request_headers.get(SANDBOX_ID_HEADER, "")
    if not sandbox_id:
        raise ConnectError(Code.INVALID_ARGUMENT, "missing header E2b-Sandbox-Id")
    return sandbox_id


def end_event(status: common_pb2.ExitStatus) -> pb.ProcessEvent:
    """An executor exit status as envd's end event (Go's ProcessState wording)."""
    end = pb.ProcessEvent.EndEvent()
    if status.signal:
        end.exit_code = -1
        end.exited = False
        name = _SIGNAL_NAMES.get(status.signal, f"signal {status.signal}")
        end.status = f"signal: {name}"
    else:
        end.exit_code = status.exit_code
        end.exited = True
        end.status = f"exit status {status.exit_code}"
    if status.timed_out:
        end.error = "the process ran out of time and was killed"
    return pb.ProcessEvent(end=end)


def convert(event: common_pb2.ProcessEvent) -> pb.ProcessEvent | None:
    """One executor process event as envd's (None: nothing envd says, a drop mark)."""
    kind = event.WhichOneof("event")
    if kind == "started":
        return pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=max(event.started.pid, 0)))
    if kind == "output":
        stream = _STREAMS.get(event.output.stream)
        if stream is None:
            return None
        return pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(**{stream: event.output.data}))
    if kind == "exited":
        return end_event(event.exited)
    return None


class ProcessService:
    """``process.Process`` for the sandbox named by the request's headers."""

    def __init__(self, backend: Backend) -> None:
        self._stub = backend.stub

    async def _processes(self, sandbox_id: str) -> list[common_pb2.ProcessInfo]:
        resp = await call(
            "list processes",
            self._stub.ListProcesses(
                executor_pb2.ListProcessesRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
            ),
        )
        return list(resp.processes)

    async def _resolve(self, sandbox_id: str, selector: pb.ProcessSelector) -> str:
        """The exec id of the process ``selector`` names (running ones first)."""
        return (await self._find(sandbox_id, selector)).exec_id

    async def _find(self, sandbox_id: str, selector: pb.ProcessSelector) -> common_pb2.ProcessInfo:
        """The process ``selector`` names (running ones first)."""
        kind = selector.WhichOneof("selector")
        if kind is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "process selector: give a pid or a tag")
        procs = await self._processes(sandbox_id)
        procs.sort(key=lambda p: not p.running)
        for proc in procs:
            if (kind == "pid" and proc.pid == selector.pid) or (
                kind == "tag" and proc.tag and proc.tag == selector.tag
            ):
                return proc
        what = f"pid {selector.pid}" if kind == "pid" else f"tag {selector.tag!r}"
        raise ConnectError(Code.NOT_FOUND, f"process with {what} not found")

    async def list(
        self, request: pb.ListRequest, ctx: RequestContext[pb.ListRequest, pb.ListResponse]
    ) -> pb.ListResponse:
        procs = await self._processes(sandbox_of(ctx))
        out = pb.ListResponse()
        for proc in procs:
            if not proc.running:
                continue
            try:
                argv = shlex.split(proc.command)
            except ValueError:
                argv = [proc.command]
            info = out.processes.add(pid=max(proc.pid, 0))
            info.config.cmd = argv[0] if argv else ""
            info.config.args.extend(argv[1:])
            if proc.tag:
                info.tag = proc.tag
        return out

    async def _follow(
        self, events: AsyncIterator[pb.ProcessEvent]
    ) -> AsyncIterator[pb.ProcessEvent]:
        async for event in with_keepalive(
            events, KEEPALIVE_S, pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())
        ):
            yield event

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[pb.StartRequest, pb.StartResponse]
    ) -> AsyncIterator[pb.StartResponse]:
        sandbox_id = sandbox_of(ctx)
        cfg = request.process
        if not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is empty: give a command")
        req = executor_pb2.StartProcessRequest(
            sandbox_id=sandbox_id,
            program=common_pb2.Program(argv=common_pb2.Argv(args=[cfg.cmd, *cfg.args])),
            cwd=cfg.cwd,
            env=dict(cfg.envs),
            tag=request.tag,
            exec_id="e2b-" + secrets.token_hex(6),
            keep_stdin_open=request.stdin if request.HasField("stdin") else True,  # envd's default
        )
        if request.HasField("pty"):
            req.pty.size.rows = request.pty.size.rows or 24
            req.pty.size.cols = request.pty.size.cols or 80
            req.pty.term = "xterm-256color"
        timeout_ms = ctx.timeout_ms
        if timeout_ms:
            # The caller's deadline ends the process too, as envd's does.
            req.timeout.FromMilliseconds(int(timeout_ms))
        stream = self._stub.StartProcess(req)
        async for event in self._follow(self._events(stream)):
            yield pb.StartResponse(event=event)

    async def _events(
        self,
        stream: grpc.aio.UnaryStreamCall[Any, executor_pb2.StartProcessResponse]
        | grpc.aio.UnaryStreamCall[Any, executor_pb2.ConnectProcessResponse],
    ) -> AsyncIterator[pb.ProcessEvent]:
        try:
            async for resp in stream:
                event = convert(resp.event)
                if event is None:
                    continue
                yield event
                if event.HasField("end"):
                    if resp.event.exited.timed_out:
                        raise ConnectError(
                            Code.DEADLINE_EXCEEDED,
                            "the command ran past its timeout and was killed: "
                            "raise the timeout (commands.run(..., timeout=SECONDS))",
                        )
                    return
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, "process") from exc
        finally:
            stream.cancel()

    async def connect(
        self, request: pb.ConnectRequest, ctx: RequestContext[pb.ConnectRequest, pb.ConnectResponse]
    ) -> AsyncIterator[pb.ConnectResponse]:
        sandbox_id = sandbox_of(ctx)
        proc = await self._find(sandbox_id, request.process)
        # envd's Connect opens with the start event, as Start does.
        yield pb.ConnectResponse(
            event=pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=max(proc.pid, 0)))
        )
        stream = self._stub.ConnectProcess(
            executor_pb2.ConnectProcessRequest(
                sandbox_id=sandbox_id, exec_id=proc.exec_id, offset=0
            )
        )
        async for event in self._follow(self._events(stream)):
            if not event.HasField("start"):
                yield pb.ConnectResponse(event=event)

    async def _stdin(self, sandbox_id: str, exec_id: str, data: bytes, eof: bool) -> None:
        await write_stdin(self._stub, sandbox_id, exec_id, data, eof)

    @staticmethod
    def _input(item: pb.ProcessInput) -> bytes:
        kind = item.WhichOneof("input")
        return getattr(item, kind) if kind else b""

    async def send_input(
        self,
        request: pb.SendInputRequest,
        ctx: RequestContext[pb.SendInputRequest, pb.SendInputResponse],
    ) -> pb.SendInputResponse:
        sandbox_id = sandbox_of(ctx)
        exec_id = await self._resolve(sandbox_id, request.process)
        await self._stdin(sandbox_id, exec_id, self._input(request.input), False)
        return pb.SendInputResponse()

    async def stream_input(
        self,
        request: AsyncIterator[pb.StreamInputRequest],
        ctx: RequestContext[pb.StreamInputRequest, pb.StreamInputResponse],
    ) -> pb.StreamInputResponse:
        sandbox_id = sandbox_of(ctx)
        exec_id = ""
        async for item in request:
            kind = item.WhichOneof("event")
            if kind == "start":
                exec_id = await self._resolve(sandbox_id, item.start.process)
            elif kind == "data":
                if not exec_id:
                    raise ConnectError(
                        Code.INVALID_ARGUMENT, "input before the start event naming the process"
                    )
                await self._stdin(sandbox_id, exec_id, self._input(item.data.input), False)
        return pb.StreamInputResponse()

    async def send_signal(
        self,
        request: pb.SendSignalRequest,
        ctx: RequestContext[pb.SendSignalRequest, pb.SendSignalResponse],
    ) -> pb.SendSignalResponse:
        sandbox_id = sandbox_of(ctx)
        if request.signal not in (pb.SIGNAL_SIGKILL, pb.SIGNAL_SIGTERM):
            raise ConnectError(
                Code.INVALID_ARGUMENT, "signal: use SIGNAL_SIGTERM or SIGNAL_SIGKILL"
            )
        exec_id = await self._resolve(sandbox_id, request.process)
        await signal_process(self._stub, sandbox_id, exec_id, int(request.signal))
        return pb.SendSignalResponse()

    async def update(
        self, request: pb.UpdateRequest, ctx: RequestContext[pb.UpdateRequest, pb.UpdateResponse]
    ) -> pb.UpdateResponse:
        sandbox_id = sandbox_of(ctx)
        exec_id = await self._resolve(sandbox_id, request.process)
        if request.HasField("pty"):
            size = common_pb2.PtySize(rows=request.pty.size.rows, cols=request.pty.size.cols)
            await call(
                "resize",
                self._stub.ResizePty(
                    executor_pb2.ResizePtyRequest(
                        sandbox_id=sandbox_id, exec_id=exec_id, size=size
                    ),
                    timeout=CALL_TIMEOUT,
                ),
            )
        return pb.UpdateResponse()

    async def close_stdin(
        self,
        request: pb.CloseStdinRequest,
        ctx: RequestContext[pb.CloseStdinRequest, pb.CloseStdinResponse],
    ) -> pb.CloseStdinResponse:
        sandbox_id = sandbox_of(ctx)
        exec_id = await self._resolve(sandbox_id, request.process)
        await self._stdin(sandbox_id, exec_id, b"", True)
        return pb.CloseStdinResponse()
