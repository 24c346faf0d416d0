"""Host side of the guest-agent transport: one Unix socket per VM for gRPC clients.

Any number of gRPC clients (vm-manager's own readiness checks, the executor,
the CLI) dial ``unix:<vm run dir>/agent.sock``. Each accepted connection
becomes one stream:

* virtio-serial (these hosts): streams are multiplexed over the single port
  socket that libvirt exposes, with the session handshake of
  :mod:`agentvm_guest.mux`. The relay holds that socket for the VM's life and
  starts a fresh session whenever it (re)connects.
* vsock (KVM hosts with /dev/vhost-vsock): each stream is its own AF_VSOCK
  connection to the guest's port, no multiplexing needed.

Everything read from the guest is validated by the frame decoder; a protocol
error ends the session (all streams of that VM close) and the next client
starts a new one. Memory per VM is bounded: one partial frame plus asyncio's
transport buffers, with backpressure (drain) on every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agentvm_guest import mux

log = logging.getLogger("agentvm.vm_manager.relay")

SYNC_RETRY_S = 0.5


class SessionError(Exception):
    """No session with the guest could be established."""


class _Session:
    """One handshaked connection to the guest's virtio-serial port."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: bytes = b""
    ) -> None:
        self.reader = reader
        # Bytes read after the SYNC_ACK during the handshake.
        self.pending = pending
        self.writer = writer
        self.streams: dict[int, asyncio.StreamWriter] = {}
        self.next_id = 1
        self.closed = asyncio.Event()
        self.write_lock = asyncio.Lock()

    async def send(self, ftype: mux.FrameType, stream: int, payload: bytes = b"") -> None:
        async with self.write_lock:
            self.writer.write(mux.encode(ftype, stream, payload))
            await self.writer.drain()


class HostRelay:
    """Serves ``listen_path`` and carries each client connection to the guest agent."""

    def __init__(
        self,
        vm_name: str,
        listen_path: Path,
        *,
        channel_path: str | None = None,
        vsock_cid: int | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        if (channel_path is None) == (vsock_cid is None):
            raise ValueError("give exactly one of channel_path and vsock_cid")
        self.vm_name = vm_name
        self.listen_path = listen_path
        self.channel_path = channel_path
        self.vsock_cid = vsock_cid
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._session: _Session | None = None
        self._session_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions_started = 0
        self.protocol_errors = 0

    async def start(self) -> None:
        self.listen_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle_client, path=str(self.listen_path)
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        if self._session is not None:
            await self._end_session(self._session)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- session -------------------------------------------------------
    async def _get_session(self) -> _Session:
        async with self._session_lock:
            if self._session is not None and not self._session.closed.is_set():
                return self._session
            self._session = await self._handshake()
            self.sessions_started += 1
            self._spawn(self._read_loop(self._session))
            return self._session

    async def _handshake(self) -> _Session:
        if self.channel_path is None:
            raise SessionError(f"{self.vm_name} has no virtio-serial agent channel")
        try:
            reader, writer = await asyncio.open_unix_connection(self.channel_path)
        except OSError as exc:
            raise SessionError(f"cannot open the agent channel of {self.vm_name}: {exc}") from exc
        nonce = secrets.token_bytes(mux.NONCE_SIZE)
        scanner = mux.PatternScanner(mux.sync_ack(nonce))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        try:
            writer.write(mux.PAD)
            while True:
                writer.write(mux.encode(mux.FrameType.SYNC, 0, nonce))
                await writer.drain()
                retry_at = min(deadline, loop.time() + SYNC_RETRY_S)
                while (remaining := retry_at - loop.time()) > 0:
                    try:
                        data = await asyncio.wait_for(reader.read(mux.MAX_PAYLOAD), remaining)
                    except TimeoutError:
                        break
                    if not data:
                        raise SessionError(f"the agent channel of {self.vm_name} closed")
                    rest = scanner.feed(data)
                    if rest is not None:
                        return _Session(reader, writer, pending=rest)
                if loop.time() >= deadline:
                    raise SessionError(
                        f"the guest agent of {self.vm_name} did not answer the session "
                        f"handshake within {self.handshake_timeout:.0f} s"
                    )
        except BaseException:
            writer.close()
            raise

    async def _read_loop(self, session: _Session) -> None:
        decoder = mux.FrameDecoder()
        pending, session.pending = session.pending, b""
        try:
            while True:
                data = pending or await session.reader.read(mux.MAX_PAYLOAD)
                pending = b""
                if not data:
                    log.info("agent channel of %s closed", self.vm_name)
                    return
                for frame in decoder.feed(data):
                    await self._dispatch(session, frame)
        except mux.ProtocolError as exc:
            self.protocol_errors += 1
            log.warning(
                "protocol error from the guest of %s, ending session: %s", self.vm_name, exc
            )
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("agent channel of %s failed: %s", self.vm_name, exc)
        finally:
            await self._end_session(session)

    async def _dispatch(self, session: _Session, frame: mux.Frame) -> None:
        if frame.type is mux.FrameType.DATA:
            client = session.streams.get(frame.stream)
            if client is None:
                return  # a stream we already closed; the guest may still be sending
            try:
                client.write(frame.payload)
                await client.drain()
            except (OSError, RuntimeError):
                session.streams.pop(frame.stream, None)
                client.close()
                await session.send(mux.FrameType.CLOSE, frame.stream)
        elif frame.type is mux.FrameType.CLOSE:
            client = session.streams.pop(frame.stream, None)
            if client is not None:
                client.close()
        elif frame.type is mux.FrameType.SYNC_ACK:
            return  # a duplicate answer to one of our retried SYNCs
        else:
            raise mux.ProtocolError(f"the guest may not send {frame.type.name} frames")

    async def _end_session(self, session: _Session) -> None:
        if session.closed.is_set():
            return
        session.closed.set()
        for client in session.streams.values():
            client.close()
        session.streams.clear()
        session.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await session.writer.wait_closed()

    # -- clients -------------------------------------------------------
    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self.vsock_cid is not None:
                await self._vsock_client(reader, writer)
            else:
                await self._serial_client(reader, writer)
        except SessionError as exc:
            log.info("%s", exc)
        except (OSError, ConnectionError) as exc:
            log.debug("client of %s: %s", self.vm_name, exc)
        finally:
            writer.close()

    async def _serial_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        session = await self._get_session()
        stream = session.next_id
        session.next_id += 2
        session.streams[stream] = writer
        await session.send(mux.FrameType.OPEN, stream)
        try:
            while not session.closed.is_set():
                data = await reader.read(mux.MAX_PAYLOAD)
                if not data:
                    break
                if stream not in session.streams:
                    return
                await session.send(mux.FrameType.DATA, stream, data)
        finally:
            if session.streams.pop(stream, None) is not None and not session.closed.is_set():
                with contextlib.suppress(OSError, ConnectionError):
                    await session.send(mux.FrameType.CLOSE, stream)

    async def _vsock_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One AF_VSOCK connection per client (KVM hosts with vhost-vsock)."""
        if self.vsock_cid is None:
            raise SessionError(f"{self.vm_name} has no vsock device")
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (self.vsock_cid, mux.VSOCK_PORT))
        g_reader, g_writer = await asyncio.open_connection(sock=sock)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(mux.MAX_PAYLOAD):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, g_writer), pump(g_reader, writer), return_exceptions=True)
