"""``AsyncPorts``: reach a TCP service in the sandbox from this host (``sb.ports``).

``forward(guest_port)`` listens on this host (127.0.0.1 and a free port by
default, or a Unix socket) and carries each accepted connection to the
guest's 127.0.0.1:guest_port over the executor (one ForwardPort call per
connection), so it works in every network mode, isolated included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from agent_vm._calls import count, text
from agent_vm.errors import InvalidArgumentError
from agentvm.v1 import executor_pb2

if TYPE_CHECKING:
    from agent_vm._async import AsyncSandbox

log = logging.getLogger("agent_vm.ports")
CHUNK = 64 * 1024


class AsyncPortForward:
    """A listener on this host forwarding to a port in the sandbox.

    ``host``/``port`` (or ``unix_path``) is where to connect; ``close()`` stops
    listening and ends its connections (so does closing the sandbox).
    """

    def __init__(
        self, sandbox: AsyncSandbox, guest_port: int, server: asyncio.Server, unix_path: str
    ) -> None:
        self._sandbox = sandbox
        self.guest_port = guest_port
        self._server = server
        self.unix_path = unix_path
        self.host = ""
        self.port = 0
        if not unix_path:
            self.host, self.port = server.sockets[0].getsockname()[:2]
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``host:port`` (or ``unix:PATH``) of the listener."""
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    @property
    def closed(self) -> bool:
        """True once it stopped listening."""
        return not self._server.is_serving()

    async def close(self) -> None:
        """Stop listening and end the connections it carries. Idempotent."""
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    async def __aenter__(self) -> AsyncPortForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        sb = self._sandbox
        call = None
        try:

            async def requests() -> AsyncIterator[executor_pb2.ForwardPortRequest]:
                yield executor_pb2.ForwardPortRequest(sandbox_id=sb.id, port=self.guest_port)
                while data := await reader.read(CHUNK):
                    yield executor_pb2.ForwardPortRequest(data=data)
                yield executor_pb2.ForwardPortRequest(eof=True)

            call = sb._stub.ForwardPort(requests())
            async for resp in call:
                if resp.data:
                    writer.write(resp.data)
                    await writer.drain()
                if resp.eof and writer.can_write_eof():
                    writer.write_eof()
        except grpc.aio.AioRpcError as exc:
            log.warning("forward to port %d of %s: %s", self.guest_port, sb.id, exc.details())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if call is not None:
                call.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._conns.discard(task)


class AsyncPorts:
    """Ports of the sandbox (``sb.ports``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox
        self._forwards: list[AsyncPortForward] = []

    async def forward(
        self, guest_port: int, *, host: str = "127.0.0.1", port: int = 0, unix_path: str = ""
    ) -> AsyncPortForward:
        """Listen on ``host:port`` of this host (default: loopback, a free port) or on
        the Unix socket ``unix_path``, and forward every connection to the guest's
        127.0.0.1:``guest_port``. A connection to a port nothing listens on in the
        guest is closed at once (and logged)."""
        sb = self._sandbox
        sb._live()
        gport = count("guest_port", guest_port)
        if not 1 <= gport <= 65535:
            raise InvalidArgumentError(f"guest_port must be 1-65535, got {gport}")
        hport = count("port", port)
        if hport > 65535:
            raise InvalidArgumentError(f"port must be 0-65535, got {hport}")
        holder: list[AsyncPortForward] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._serve(reader, writer)

        path = text("unix_path", unix_path)
        if path:
            server = await asyncio.start_unix_server(serve, path=path)
        else:
            server = await asyncio.start_server(serve, host=text("host", host), port=hport)
        fwd = AsyncPortForward(sb, gport, server, path)
        holder.append(fwd)
        self._forwards.append(fwd)
        return fwd

    async def close_all(self) -> None:
        """Close every forward of this sandbox handle (the sandbox's close does this)."""
        for fwd in self._forwards:
            await fwd.close()
        self._forwards.clear()
