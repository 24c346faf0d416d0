"""``AsyncProcesses``: background processes and terminals of a sandbox (``sb.processes``).

A process started here outlives the call and the client: its output is kept
in the VM (the last 256 KiB), so any client can connect to it later by its
exec id, read from where it left off, feed it input, signal or resize it.
"""

from __future__ import annotations

import builtins
import secrets
import signal as signals
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc

from agent_vm._calls import count, program, seconds, str_map, text, translate
from agent_vm._calls import data as as_bytes
from agent_vm._types import ProcessExit, ProcessInfo, ProcessOutput
from agent_vm.errors import ArgumentTypeError, DataLossError, NotFoundError, from_rpc
from agentvm.v1 import common_pb2, executor_pb2

if TYPE_CHECKING:
    from agent_vm._async import AsyncSandbox


def _size(rows: object, cols: object) -> common_pb2.PtySize:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    return common_pb2.PtySize(rows=count("rows", rows), cols=count("cols", cols))


class AsyncProcess:
    """A background process of a sandbox: its output from any offset, input, signals.

    ``exec_id`` names it for any client (``sb.processes.connect(exec_id)``);
    ``offset`` is where this handle's reading got to; ``exit`` is set once it
    was seen to end.
    """

    def __init__(self, sandbox: AsyncSandbox, exec_id: str, pid: int, pty: bool) -> None:
        self._sandbox = sandbox
        self._address = sandbox._address
        self.exec_id = exec_id
        self.pid = pid
        self.pty = pty
        self.offset = 0
        self.exit: ProcessExit | None = None

    async def output(self, offset: int | None = None) -> AsyncGenerator[ProcessOutput, None]:
        """Its output from ``offset`` (default: where this handle left off) as it comes,
        until it ends (``exit`` is then set). Stop iterating at any time: the process
        goes on. A piece with stream "dropped" marks output the VM no longer held."""
        sb = self._sandbox
        sb._live()
        start = self.offset if offset is None else count("offset", offset)
        call = sb._stub.ConnectProcess(
            executor_pb2.ConnectProcessRequest(sandbox_id=sb.id, exec_id=self.exec_id, offset=start)
        )
        try:
            async for resp in call:
                ev = resp.event
                if ev.WhichOneof("event") == "exited":
                    self.exit = ProcessExit.from_proto(ev.exited)
                    return
                piece = ProcessOutput.from_event(ev)
                self.offset = piece.end
                yield piece
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, self._address) from exc
        finally:
            call.cancel()
        raise DataLossError(f"the stream of process {self.exec_id} ended without its exit status")

    async def wait(self, on_output: Callable[[ProcessOutput], object] | None = None) -> ProcessExit:
        """Read its output (to ``on_output``, if given) until it ends; how it ended."""
        async for piece in self.output():
            if on_output is not None:
                on_output(piece)
        if self.exit is None:  # pragma: no cover - output() sets it or raises
            raise DataLossError(f"process {self.exec_id} ended without an exit status")
        return self.exit

    @translate
    async def send_input(self, data: bytes | str) -> None:
        """Write to its stdin (its keyboard, on a terminal: b"\\x03" is Ctrl-C)."""
        await self._stdin(as_bytes("data", data), False)

    @translate
    async def close_stdin(self) -> None:
        """End its input (on a terminal: Ctrl-D)."""
        await self._stdin(b"", True)

    async def _stdin(self, raw: bytes, eof: bool) -> None:
        sb = self._sandbox
        sb._live()
        await sb._stub.WriteStdin(
            executor_pb2.ExecutorServiceWriteStdinRequest(
                sandbox_id=sb.id, exec_id=self.exec_id, data=raw, eof=eof
            ),
            timeout=60,
        )

    @translate
    async def signal(self, signal: int = signals.SIGTERM) -> None:
        """Send ``signal`` (on a terminal: to its foreground job, as the keyboard would).
        FailedPreconditionError once it ended."""
        sb = self._sandbox
        sb._live()
        await sb._stub.SignalExec(
            executor_pb2.SignalExecRequest(
                sandbox_id=sb.id, exec_id=self.exec_id, signal=count("signal", signal)
            ),
            timeout=60,
        )

    async def kill(self) -> None:
        """SIGKILL the whole process tree."""
        await self.signal(signals.SIGKILL)

    @translate
    async def resize(self, rows: int, cols: int) -> None:
        """Set its terminal's size (FailedPreconditionError without a terminal)."""
        sb = self._sandbox
        sb._live()
        await sb._stub.ResizePty(
            executor_pb2.ResizePtyRequest(
                sandbox_id=sb.id, exec_id=self.exec_id, size=_size(rows, cols)
            ),
            timeout=60,
        )


class AsyncProcesses:
    """Background processes of the sandbox (``sb.processes``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox
        self._address = sandbox._address

    @translate
    async def start(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        pty: tuple[int, int] | None = None,
        term: str = "",
        tag: str = "",
        timeout: float = 0,
        keep_stdin_open: bool = False,
        exec_id: str = "",
    ) -> AsyncProcess:
        """Start a process that outlives this call; returns once it runs.

        ``cmd`` / ``code`` as for ``run``. ``pty=(rows, cols)`` runs it on a
        terminal (TERM ``term``, default xterm-256color); ``tag`` labels it in
        ``list()``; ``timeout`` (seconds, 0: none) kills it after that long.
        """
        sb = self._sandbox
        sb._live()
        req = executor_pb2.StartProcessRequest(
            sandbox_id=sb.id,
            program=program(cmd, code, language, args),
            env=str_map("env", env),
            cwd=text("cwd", cwd),
            tag=text("tag", tag),
            exec_id=text("exec_id", exec_id) or "pr-" + secrets.token_hex(6),
            keep_stdin_open=bool(keep_stdin_open),
        )
        if pty is not None:
            if not isinstance(pty, tuple) or len(pty) != 2:
                raise ArgumentTypeError("pty must be (rows, cols)")
            req.pty.size.CopyFrom(_size(*pty))
            req.pty.term = text("term", term)
        if timeout:
            req.timeout.FromNanoseconds(int(seconds("timeout", timeout) * 1e9))
        call = sb._stub.StartProcess(req)
        try:
            async for resp in call:
                if resp.event.WhichOneof("event") == "started":
                    return AsyncProcess(sb, req.exec_id, resp.event.started.pid, pty is not None)
                break
        finally:
            call.cancel()  # the process goes on; output() reads it
        raise DataLossError(f"the executor did not say process {req.exec_id} started")

    @translate
    async def list(self) -> builtins.list[ProcessInfo]:
        """Its background processes, running and ended (the last 1000), oldest first."""
        sb = self._sandbox
        sb._live()
        resp = await sb._stub.ListProcesses(
            executor_pb2.ListProcessesRequest(sandbox_id=sb.id), timeout=60
        )
        return [ProcessInfo.from_proto(p) for p in resp.processes]

    async def connect(self, exec_id: str) -> AsyncProcess:
        """A handle on a process started earlier (by any client), reading from the start
        of what is held. NotFoundError for an exec id the sandbox does not know."""
        for info in await self.list():
            if info.exec_id == exec_id:
                return AsyncProcess(self._sandbox, exec_id, info.pid, info.pty)
        raise NotFoundError(
            f"sandbox {self._sandbox.id} has no process {exec_id!r} "
            "(processes.list() shows the ones it has)"
        )
