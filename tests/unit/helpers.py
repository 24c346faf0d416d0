"""Test doubles shared by the unit tests: echo server, fake port host, fake libvirt channel."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from agentvm_guest import mux
from agentvm_guest.relay import GuestRelay

T = TypeVar("T")


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


async def async_wait_until(
    pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """``wait_until`` for coroutines (does not block the event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return pred()


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run ``coro`` in a fresh event loop with an overall timeout (no pytest-asyncio here)."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped, deduplicated); never empty chunks."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def frame(ftype: mux.FrameType, stream: int = 0, payload: bytes = b"") -> bytes:
    return mux.encode(ftype, stream, payload)


def sync(nonce: bytes) -> bytes:
    return mux.encode(mux.FrameType.SYNC, 0, nonce)


# -- local servers -------------------------------------------------------------------------


def accept_until(
    listener: socket.socket, stop: threading.Event, on_conn: Callable[[socket.socket], None]
) -> None:
    """Hand each connection of ``listener`` (a short accept timeout) to ``on_conn``
    until ``stop`` is set or the listener is closed."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        on_conn(conn)


class EchoConn:
    """One connection accepted by :class:`EchoServer`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = threading.Event()
        self.received = bytearray()


class EchoServer:
    """A Unix-socket echo server in threads, standing in for the guest's local gRPC server.

    Commands (sent alone): ``!quit`` closes the connection from the server side,
    ``!spam`` makes the server send data continuously until the connection dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conns: list[EchoConn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = EchoConn(sock)
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _spam(conn: EchoConn) -> None:
        while not conn.closed.is_set():
            try:
                conn.sock.sendall(b"s" * 100)
            except OSError:
                return
            time.sleep(0.001)

    def _serve(self, conn: EchoConn) -> None:
        try:
            while True:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    break
                if not data or data == b"!quit":
                    break
                conn.received += data
                if data == b"!spam":
                    threading.Thread(target=self._spam, args=(conn,), daemon=True).start()
                    continue
                try:
                    conn.sock.sendall(data)
                except OSError:
                    break
        finally:
            conn.closed.set()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.sock.close()

    def snapshot(self) -> list[EchoConn]:
        with self._lock:
            return list(self.conns)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        for conn in self.snapshot():
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


def refuse_connect() -> socket.socket:
    """A ``connect`` for GuestRelay whose local server is down."""
    raise ConnectionRefusedError("no local agent server")


# -- guest side -------------------------------------------------------------------------
class GuestSide:
    """A GuestRelay on one end of a socketpair (the "virtio-serial port").

    ``host_sock`` is the other end: the test (or a FakeChannel) plays the host on it.
    """

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self.host_sock, self._guest_sock = socket.socketpair()
        self.relay = GuestRelay(self._guest_sock.fileno(), connect)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.relay.serve_forever, args=(self.stop,), daemon=True, name="guest-relay"
        )
        self.thread.start()

    def close_host(self) -> None:
        """The host end goes away (the guest then reads 0 bytes)."""
        with contextlib.suppress(OSError):
            self.host_sock.shutdown(socket.SHUT_RDWR)
        self.host_sock.close()

    def close(self) -> None:
        self.stop.set()
        self.close_host()
        self.thread.join(3)
        assert not self.thread.is_alive(), "serve_forever did not stop"
        self._guest_sock.close()


class PortHost:
    """One end of a framed byte stream (the port): writes frames, reads and decodes them.

    Tests use it as the host end of GuestRelay's port, and as a scripted guest.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = mux.FrameDecoder()
        self.pending: list[mux.Frame] = []
        self.seen = bytearray()  # every byte received, for tests of the raw stream

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, ftype: mux.FrameType, stream: int, payload: bytes = b"") -> None:
        self.send(mux.encode(ftype, stream, payload))

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing from the guest in time")
        self.sock.settimeout(remaining)
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("the peer closed its end")
        self.seen += data
        return data

    def handshake(
        self, nonce: bytes | None = None, *, pad: bool = True, timeout: float = 5.0
    ) -> bytes:
        """PAD + SYNC; discard everything up to the matching SYNC_ACK. Returns the nonce."""
        nonce = nonce if nonce is not None else os.urandom(mux.NONCE_SIZE)
        self.send((mux.PAD if pad else b"") + sync(nonce))
        self.expect_sync_ack(nonce, timeout=timeout)
        return nonce

    def expect_sync_ack(self, nonce: bytes, timeout: float = 5.0) -> None:
        scanner = mux.PatternScanner(mux.sync_ack(nonce))
        deadline = time.monotonic() + timeout
        while True:
            rest = scanner.feed(self._recv(deadline))
            if rest is not None:
                self.decoder = mux.FrameDecoder()
                self.pending = self.decoder.feed(rest)
                return

    def expect_sync(self, timeout: float = 5.0) -> bytes:
        """The guest's view: hunt for a SYNC, return its nonce; frames after it follow."""
        scanner = mux.PatternScanner(mux.sync_header())
        deadline = time.monotonic() + timeout
        rest = None
        while rest is None:
            rest = scanner.feed(self._recv(deadline))
        self.decoder = mux.FrameDecoder()
        self.pending = self.decoder.feed(mux.sync_header() + rest)
        first = self.recv_frame(max(0.0, deadline - time.monotonic()))
        assert first.type is mux.FrameType.SYNC
        return first.payload

    def recv_frame(self, timeout: float = 5.0) -> mux.Frame:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.pending = self.decoder.feed(self._recv(deadline))
        return self.pending.pop(0)

    def frames_during(self, seconds: float) -> list[mux.Frame]:
        """Every frame that arrives within ``seconds``."""
        out, self.pending = self.pending, []
        deadline = time.monotonic() + seconds
        while True:
            try:
                out += self.decoder.feed(self._recv(deadline))
            except TimeoutError:
                return out

    def read_stream(self, stream: int, size: int, timeout: float = 5.0) -> bytes:
        """Concatenated DATA payloads of ``stream`` until ``size`` bytes arrived.

        Frames of other streams are kept for later; anything but DATA on ``stream`` fails.
        """
        buf = bytearray()
        others: list[mux.Frame] = []
        deadline = time.monotonic() + timeout
        while len(buf) < size:
            f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if f.stream != stream:
                others.append(f)
                continue
            assert f.type is mux.FrameType.DATA, f
            buf += f.payload
        self.pending = others + self.pending
        return bytes(buf)


# -- host side: libvirt's channel socket ------------------------------------------------
class FakeChannel:
    """libvirt's Unix socket for the virtio-serial port, bridged to ``port``.

    Serves one client at a time (a new one replaces the old, like QEMU's chardev).
    Bytes from the guest while no client is connected are kept for the next
    client, like the stale bytes a real port holds across host reconnects.
    """

    def __init__(self, path: Path, port: socket.socket) -> None:
        self.path = path
        self.port = port
        self.accepted = 0
        self._current: socket.socket | None = None
        self._stale = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._threads = [
            threading.Thread(target=self._accept_loop, daemon=True, name="channel-accept"),
            threading.Thread(target=self._from_port, daemon=True, name="channel-from-port"),
        ]
        for t in self._threads:
            t.start()

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._stop, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        with self._lock:
            old, self._current = self._current, conn
            self.accepted += 1
            stale, self._stale = bytes(self._stale), bytearray()
            with contextlib.suppress(OSError):
                if stale:
                    conn.sendall(stale)
        if old is not None:
            self._shutdown(old)
        threading.Thread(target=self._to_port, args=(conn,), daemon=True).start()

    def _to_port(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
                if not data:
                    break
                self.port.sendall(data)
            except OSError:
                break
        with self._lock:
            if self._current is conn:
                self._current = None
        conn.close()

    def _from_port(self) -> None:
        while True:
            try:
                data = self.port.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                if self._current is None:
                    self._stale += data
                    continue
                with contextlib.suppress(OSError):
                    self._current.sendall(data)

    @staticmethod
    def _shutdown(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Close the current client connection (the host's side of the channel goes away)."""
        with self._lock:
            conn, self._current = self._current, None
        if conn is not None:
            self._shutdown(conn)

    def inject(self, data: bytes) -> None:
        """Send ``data`` to the connected host as if the guest had written it."""
        with self._lock:
            assert self._current is not None, "no host connected to the channel"
            self._current.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(2)
        self._listener.close()
        self.drop()
