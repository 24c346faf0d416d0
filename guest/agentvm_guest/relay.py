"""Guest side of the virtio-serial transport: port <-> local gRPC server.

Reads frames from the virtio-serial port, opens one local Unix connection to
the agent's gRPC server per host stream, and pumps bytes both ways. A SYNC
from the host (or the host disconnecting) ends the session: every local
connection of it is closed, and nothing of it is written after the SYNC_ACK.
It starts by writing RESET, so a host still holding a session with a
previous agent process (crashed, killed, respawned by init) starts a new one.
Runs with the standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from agentvm_guest import mux

log = logging.getLogger("agentvm_guest.relay")


def find_port(name: str = mux.PORT_NAME, sysfs: str = "/sys/class/virtio-ports") -> str | None:
    """Device path of the virtio-serial port called ``name`` (no udev needed)."""
    for entry in sorted(glob.glob(os.path.join(sysfs, "*", "name"))):
        try:
            with open(entry, encoding="ascii") as fh:
                if fh.read().strip() == name:
                    return "/dev/" + os.path.basename(os.path.dirname(entry))
        except OSError:
            continue
    return None


class GuestRelay:
    """Multiplexes host streams onto connections to the local gRPC server."""

    def __init__(self, port_fd: int, connect: Callable[[], socket.socket]) -> None:
        self._fd = port_fd
        self._connect = connect
        self._wlock = threading.Lock()
        self._generation = 0
        self._streams: dict[int, socket.socket] = {}
        self._decoder = mux.FrameDecoder()
        self._scanner: mux.PatternScanner | None = mux.PatternScanner(mux.sync_header())
        self.sessions = 0

    # -- writing -------------------------------------------------------
    def _write_locked(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    time.sleep(0.005)
                    continue
                # Host not connected (EPIPE and friends): the session is gone.
                log.debug("port write failed: %s", exc)
                return
            view = view[n:]

    def _send(self, generation: int, ftype: mux.FrameType, stream: int, payload: bytes) -> bool:
        with self._wlock:
            if generation != self._generation or stream not in self._streams:
                return False
            self._write_locked(mux.encode(ftype, stream, payload))
            return True

    # -- session -------------------------------------------------------
    def _reset(self) -> None:
        """Drop every stream of the current session (caller holds _wlock)."""
        self._generation += 1
        streams, self._streams = self._streams, {}
        for sock in streams.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def host_disconnected(self) -> None:
        """The host closed its end: forget the session and hunt for a new SYNC."""
        with self._wlock:
            self._reset()
        self._decoder = mux.FrameDecoder()
        self._scanner = mux.PatternScanner(mux.sync_header())

    def feed(self, data: bytes) -> None:
        """Process bytes read from the port."""
        while data:
            from_hunt = False
            if self._scanner is not None:
                rest = self._scanner.feed(data)
                if rest is None:
                    return
                self._scanner = None
                self._decoder = mux.FrameDecoder()
                data = mux.sync_header() + rest
                from_hunt = True
            try:
                frames = self._decoder.feed(data)
            except mux.ProtocolError as exc:
                log.info("framing error, waiting for a new session: %s", exc)
                self._scanner = mux.PatternScanner(mux.sync_header())
                with self._wlock:
                    self._reset()
                # Hunt for a SYNC in this chunk. When the decoder started from
                # a SYNC found by the hunt in this call and still failed, skip
                # a byte of it so the loop advances; a chunk that merely starts
                # with a SYNC (after stale bytes held by the decoder) is kept.
                if from_hunt:
                    data = data[1:]
                continue
            data = b""
            for frame in frames:
                self._dispatch(frame)

    def _dispatch(self, frame: mux.Frame) -> None:
        if frame.type is mux.FrameType.SYNC:
            with self._wlock:
                self._reset()
                self.sessions += 1
                self._write_locked(mux.sync_ack(frame.payload))
            return
        if frame.type is mux.FrameType.OPEN:
            self._open(frame.stream)
        elif frame.type is mux.FrameType.DATA:
            sock = self._streams.get(frame.stream)
            if sock is None:
                return
            try:
                sock.sendall(frame.payload)
            except OSError:
                self._close_stream(frame.stream, notify=True)
        elif frame.type is mux.FrameType.CLOSE:
            self._close_stream(frame.stream, notify=False)

    def _open(self, stream: int) -> None:
        with self._wlock:
            generation = self._generation
            if stream in self._streams or stream == 0:
                self._write_locked(mux.encode(mux.FrameType.CLOSE, stream))
                return
        try:
            sock = self._connect()
        except OSError as exc:
            log.warning("cannot reach the local agent server: %s", exc)
            with self._wlock:
                self._write_locked(mux.encode(mux.FrameType.CLOSE, stream))
            return
        with self._wlock:
            if generation != self._generation:
                sock.close()
                return
            self._streams[stream] = sock
        threading.Thread(
            target=self._pump, args=(generation, stream, sock), daemon=True, name=f"pump-{stream}"
        ).start()

    def _close_stream(self, stream: int, *, notify: bool) -> None:
        with self._wlock:
            sock = self._streams.pop(stream, None)
            if sock is None:
                return
            if notify:
                self._write_locked(mux.encode(mux.FrameType.CLOSE, stream))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _pump(self, generation: int, stream: int, sock: socket.socket) -> None:
        """Local server -> host."""
        while True:
            try:
                data = sock.recv(mux.MAX_PAYLOAD)
            except OSError:
                data = b""
            if not data:
                break
            if not self._send(generation, mux.FrameType.DATA, stream, data):
                return
        with self._wlock:
            if generation == self._generation and self._streams.get(stream) is sock:
                del self._streams[stream]
                self._write_locked(mux.encode(mux.FrameType.CLOSE, stream))
        sock.close()

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Read the port until ``stop`` is set. Read of 0 bytes = host not connected.

        Starts with RESET: a host still holding the previous agent's session
        ends it and handshakes again (see mux.py).
        """
        with self._wlock:
            self._write_locked(mux.reset())
        connected = False
        while stop is None or not stop.is_set():
            try:
                data = os.read(self._fd, mux.MAX_PAYLOAD)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    time.sleep(0.01)
                    continue
                raise
            if not data:
                if connected:
                    self.host_disconnected()
                    connected = False
                time.sleep(0.02)
                continue
            connected = True
            self.feed(data)
