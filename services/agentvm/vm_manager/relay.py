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

The guest is hostile; what it can cost the host is bounded:

* Memory: one partial frame plus asyncio's transport buffers per VM.
* Time: every write to the guest or to a client has a timeout
  (``write_timeout``); a guest that stops reading its port ends its session
  and counts as a failed handshake. The handshake itself (connect, writes,
  answer) is bounded by ``handshake_timeout``.
* Waiting: at most one handshake runs at a time per VM and every client
  that needs a session waits for that same attempt; while waiting, the
  client's socket is read (kept for the stream, at most one frame's worth),
  so a client that hangs up is noticed and closed at once. A client waits
  at most ``client_wait`` seconds (below gRPC's connect timeout in agent-vm's
  channels), then is answered UNAVAILABLE while the handshake goes on.
* Failing fast: after a failed handshake the agent is marked unresponsive
  (:attr:`HostRelay.unresponsive`) and, until a retry delay that doubles with
  each failure in a row has passed, clients are answered at once with gRPC
  status UNAVAILABLE and a message that says so (:mod:`.relay_refuse`).
* Descriptors: at most ``max_clients`` client connections per VM (of which
  ``max_waiting`` wait for a handshake) plus ``max_refusing`` being answered
  UNAVAILABLE, plus the one to the guest's port. Connections are accepted
  one at a time and one past every cap is closed at once, so a burst of
  connects never holds more.

Everything read from the guest is validated by the frame decoder; a protocol
error ends the session (all streams of that VM close) and the next client
starts a new one. So does a RESET, which a restarted guest agent writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agentvm.vm_manager import relay_refuse, relay_vsock
from agentvm.vm_manager.relay_handshake import SessionError, handshake
from agentvm_guest import mux

log = logging.getLogger("agentvm.vm_manager.relay")

HANDSHAKE_TIMEOUT_S = 5.0
# How long a client waits for a handshake in progress before it is answered
# UNAVAILABLE: below the 5 s that agent-vm's gRPC channels allow a connection
# to deliver the server's SETTINGS (grpc.min_reconnect_backoff_ms, grpc_util).
CLIENT_WAIT_S = 3.0
# A peer (the guest's port, or a host client) that takes longer than this to
# accept what was written to it is treated as gone.
WRITE_TIMEOUT_S = 15.0
# Retry delay after the first failed handshake, doubling with each failure in
# a row up to the maximum.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
MAX_CLIENTS = 32
MAX_WAITING = 16
MAX_REFUSING = 16
# How long a refused client has to start its calls and read the answer.
REFUSE_WAIT_S = 2.0
# Connections not accepted yet wait in the kernel, not in vm-manager.
LISTEN_BACKLOG = 64
# Bytes of a waiting client kept for its stream (one DATA frame).
WAIT_BUFFER = mux.MAX_PAYLOAD


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


class HostRelay:
    """Serves ``listen_path`` and carries each client connection to the guest agent."""

    def __init__(
        self,
        vm_name: str,
        listen_path: Path,
        *,
        channel_path: str | None = None,
        vsock_cid: int | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        client_wait: float = CLIENT_WAIT_S,
        write_timeout: float = WRITE_TIMEOUT_S,
        max_clients: int = MAX_CLIENTS,
        max_waiting: int = MAX_WAITING,
        max_refusing: int = MAX_REFUSING,
    ) -> None:
        if (channel_path is None) == (vsock_cid is None):
            raise ValueError("give exactly one of channel_path and vsock_cid")
        self.vm_name = vm_name
        self.listen_path = listen_path
        self.channel_path = channel_path
        self.vsock_cid = vsock_cid
        self.handshake_timeout = handshake_timeout
        self.client_wait = client_wait
        self.write_timeout = write_timeout
        self.max_clients = max_clients
        self.max_waiting = max_waiting
        self.max_refusing = max_refusing
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._open = 0  # accepted client connections whose descriptor is not yet closed
        self._session: _Session | None = None
        self._attempt: asyncio.Task[_Session] | None = None
        self._failures = 0  # failed handshakes (or sessions) in a row
        self._retry_at = 0.0
        self._last_error = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self.clients = 0  # client connections being carried or waiting
        self.waiting = 0  # of which waiting for a handshake
        self.refusing = 0  # connections being answered UNAVAILABLE
        self.sessions_started = 0
        self.protocol_errors = 0
        self.handshake_failures = 0
        self.refused = 0
        self.guest_resets = 0  # sessions ended by a restarted agent (RESET)

    async def start(self) -> None:
        self.listen_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.listen_path))
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old)
        self._listener = listener
        self._accept_task = asyncio.ensure_future(self._accept_loop(listener))

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        if self._attempt is not None:
            self._attempt.cancel()
        if self._session is not None:
            await self._end_session(self._session)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Client connections still open (waiting, refused, carried): hang up on them.
        for writer in list(self._conns):
            writer.transport.abort()
        if self._conn_tasks:
            await asyncio.wait(set(self._conn_tasks), timeout=self.write_timeout)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- health --------------------------------------------------------
    @property
    def unresponsive(self) -> str:
        """Why the guest agent is considered unresponsive ("" while it is not)."""
        if not self._failures:
            return ""
        wait = max(0.0, self._retry_at - time.monotonic())
        again = f"the next in {wait:.0f} s" if wait >= 0.5 else "the next now"
        return (
            f"the guest agent of VM {self.vm_name} is not answering: {self._last_error} "
            f"({self._failures} failed attempt{'s' if self._failures > 1 else ''} in a row; "
            f"{again}). A guest that keeps failing is broken or hostile: destroy the VM "
            f"(or close its sandbox)"
        )

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self.handshake_failures += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(self._failures - 1, 16))
        self._retry_at = time.monotonic() + delay
        self._last_error = reason
        log.warning(
            "guest agent of %s not answering (%d in a row, retry in %.0f s): %s",
            self.vm_name,
            self._failures,
            delay,
            reason,
        )

    # -- session -------------------------------------------------------
    def _live_session(self) -> _Session | None:
        if self._session is not None and not self._session.closed.is_set():
            return self._session
        return None

    def _session_attempt(self) -> asyncio.Task[_Session] | None:
        """The handshake every waiting client shares; None while backing off."""
        if self._attempt is None:
            if self._failures and time.monotonic() < self._retry_at:
                return None
            self._attempt = asyncio.ensure_future(self._connect())
            self._attempt.add_done_callback(self._attempt_done)
        return self._attempt

    def _attempt_done(self, task: asyncio.Task[_Session]) -> None:
        if self._attempt is task:
            self._attempt = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have hung up

    async def _connect(self) -> _Session:
        try:
            deadline = asyncio.get_running_loop().time() + self.handshake_timeout
            async with asyncio.timeout_at(deadline):
                session = await self._handshake(deadline)
        except TimeoutError:
            self._failed(
                f"it did not answer the session handshake within {self.handshake_timeout:g} s"
            )
            raise SessionError(self.unresponsive) from None
        except SessionError as exc:
            self._failed(str(exc))
            raise SessionError(self.unresponsive) from None
        self._failures = 0
        self._last_error = ""
        self._session = session
        self.sessions_started += 1
        self._spawn(self._read_loop(session))
        return session

    async def _handshake(self, deadline: float) -> _Session:
        if self.channel_path is None:
            raise SessionError(f"{self.vm_name} has no virtio-serial agent channel")
        reader, writer, pending = await handshake(self.channel_path, deadline)
        return _Session(reader, writer, pending=pending)

    async def _send(
        self, session: _Session, ftype: mux.FrameType, stream: int, payload: bytes = b""
    ) -> None:
        """Write one frame to the guest, waiting at most ``write_timeout`` for room."""
        async with session.write_lock:
            if session.closed.is_set():
                raise SessionError(f"the session with the guest of {self.vm_name} ended")
            session.writer.write(mux.encode(ftype, stream, payload))
            try:
                async with asyncio.timeout(self.write_timeout):
                    await session.writer.drain()
            except TimeoutError:
                self._failed(f"it read nothing from its port for {self.write_timeout:g} s")
                await self._end_session(session)
                raise SessionError(self.unresponsive) from None

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
        except SessionError as exc:
            log.info("%s", exc)
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
                async with asyncio.timeout(self.write_timeout):
                    await client.drain()
            except (OSError, RuntimeError, TimeoutError):
                # The client hung up, or reads nothing: its stream ends.
                session.streams.pop(frame.stream, None)
                client.transport.abort()
                await self._send(session, mux.FrameType.CLOSE, frame.stream)
        elif frame.type is mux.FrameType.CLOSE:
            client = session.streams.pop(frame.stream, None)
            if client is not None:
                self._close_writer(client)
        elif frame.type is mux.FrameType.SYNC_ACK:
            return  # a duplicate answer to one of our retried SYNCs
        elif frame.type is mux.FrameType.RESET:
            # A new agent process: the streams of this session died with the old one.
            self.guest_resets += 1
            raise SessionError(
                f"the guest agent of {self.vm_name} restarted: its session ended, the next "
                "client starts a new one"
            )
        else:
            raise mux.ProtocolError(f"the guest may not send {frame.type.name} frames")

    async def _end_session(self, session: _Session) -> None:
        if session.closed.is_set():
            return
        session.closed.set()
        for client in session.streams.values():
            self._close_writer(client)
        session.streams.clear()
        # Abort: bytes the guest has not read must not keep the channel open.
        session.writer.transport.abort()
        with contextlib.suppress(OSError, ConnectionError):
            await session.writer.wait_closed()

    def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        """Close a client connection; abort it if its peer does not read what is left."""
        writer.close()
        if writer.transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self.write_timeout, writer.transport.abort)

    # -- clients -------------------------------------------------------
    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept one connection at a time; past every cap, close it at once.

        (asyncio's own server accepts a whole backlog before any handler runs:
        a burst of connects would hold that many descriptors at once.)
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return  # closed
                # EMFILE and friends: the relay must outlive them (and not spin).
                log.warning("cannot accept clients of %s: %s", self.vm_name, exc)
                await asyncio.sleep(0.1)
                continue
            if self._open >= self.max_clients + self.max_refusing:
                self.refused += 1
                sock.close()
                continue
            self._open += 1
            task = asyncio.ensure_future(self._serve_conn(sock))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def _serve_conn(self, sock: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
            task = asyncio.current_task()
            if task is not None:
                self._conns[writer] = task
            try:
                await self._handle_client(reader, writer)
            finally:
                self._conns.pop(writer, None)
                self._close_writer(writer)
                # Closed within write_timeout (see _close_writer): then the descriptor is free.
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
        finally:
            self._open -= 1

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self.clients >= self.max_clients:
                await self._refuse(
                    reader,
                    writer,
                    f"VM {self.vm_name} already has {self.clients} connections to its guest "
                    "agent, the most it takes: close some (one connection carries any number "
                    "of calls) or retry later",
                )
                return
            self.clients += 1
            try:
                if self.vsock_cid is not None:
                    await self._vsock_client(reader, writer)
                else:
                    await self._serial_client(reader, writer)
            finally:
                self.clients -= 1
        except SessionError as exc:
            log.info("%s", exc)
        except (OSError, ConnectionError) as exc:
            log.debug("client of %s: %s", self.vm_name, exc)

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        message: str,
        prefix: bytes = b"",
        *,
        wait: float = REFUSE_WAIT_S,
    ) -> None:
        """Answer the calls the client starts within ``wait`` seconds with UNAVAILABLE
        and ``message`` (or just hang up)."""
        self.refused += 1
        if self.refusing >= self.max_refusing:
            writer.transport.abort()
            return
        self.refusing += 1
        try:
            await relay_refuse.answer(reader, writer, message, prefix=prefix, wait=wait)
        finally:
            self.refusing -= 1

    async def _serial_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        accepted = asyncio.get_running_loop().time()
        early = bytearray()
        session = self._live_session()
        if session is None:
            attempt = self._session_attempt()
            if attempt is None:
                await self._refuse(reader, writer, self.unresponsive)
                return
            if self.waiting >= self.max_waiting:
                await self._refuse(
                    reader,
                    writer,
                    f"{self.waiting} connections are already waiting for the guest agent of "
                    f"VM {self.vm_name} to answer; retry later (destroy the VM if its agent "
                    "never answers)",
                )
                return
            self.waiting += 1
            try:
                outcome = await self._wait_for(attempt, reader, early)
            finally:
                self.waiting -= 1
            if outcome is None:
                return  # the client hung up while waiting
            if isinstance(outcome, str):
                # An HTTP/2 client sends its preface at once: one that has sent
                # nothing gets what is left of REFUSE_WAIT_S since it connected.
                wait = REFUSE_WAIT_S
                if not early:
                    wait = max(0.0, wait - (asyncio.get_running_loop().time() - accepted))
                await self._refuse(reader, writer, outcome, bytes(early), wait=wait)
                return
            session = outcome
        stream = session.next_id
        session.next_id += 2
        session.streams[stream] = writer
        try:
            await self._send(session, mux.FrameType.OPEN, stream)
            if early:
                await self._send(session, mux.FrameType.DATA, stream, bytes(early))
            while not session.closed.is_set():
                data = await reader.read(mux.MAX_PAYLOAD)
                if not data:
                    break
                if stream not in session.streams:
                    return
                await self._send(session, mux.FrameType.DATA, stream, data)
        finally:
            if session.streams.pop(stream, None) is not None and not session.closed.is_set():
                with contextlib.suppress(OSError, ConnectionError, SessionError):
                    await self._send(session, mux.FrameType.CLOSE, stream)

    async def _wait_for(
        self, attempt: asyncio.Task[_Session], reader: asyncio.StreamReader, early: bytearray
    ) -> _Session | str | None:
        """Wait for the shared handshake while reading the client into ``early``.

        Returns the session, the reason there is none, or None when the client
        hung up (or the relay is closing). A client waits at most
        ``client_wait`` seconds (the handshake goes on for the next ones).
        """
        read: asyncio.Task[bytes] | None = None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.client_wait
        try:
            while True:
                if read is None and len(early) < WAIT_BUFFER:
                    read = asyncio.ensure_future(reader.read(WAIT_BUFFER - len(early)))
                waits: set[asyncio.Future[Any]] = {attempt}
                if read is not None:
                    waits.add(read)
                done, _ = await asyncio.wait(
                    waits,
                    timeout=max(0.0, give_up - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    return (
                        f"the guest agent of VM {self.vm_name} is not answering: no answer to "
                        f"the session handshake after {self.client_wait:g} s (still trying); "
                        "retry, and destroy the VM (or close its sandbox) if this persists"
                    )
                if read is not None and read in done:
                    task, read = read, None
                    try:
                        data = task.result()
                    except (OSError, ConnectionError):
                        return None
                    if not data:
                        return None
                    early += data
                    continue
                if attempt.cancelled():
                    return None
                try:
                    return attempt.result()
                except SessionError as exc:
                    return str(exc)
        finally:
            if read is not None:
                read.cancel()
                await asyncio.wait({read})
                if not read.cancelled() and read.exception() is None:
                    early += read.result()

    async def _vsock_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One AF_VSOCK connection per client (KVM hosts with vhost-vsock)."""
        if self.vsock_cid is None:
            raise SessionError(f"{self.vm_name} has no vsock device")
        await relay_vsock.carry(
            self.vsock_cid,
            reader,
            writer,
            connect_timeout=self.handshake_timeout,
            write_timeout=self.write_timeout,
        )
