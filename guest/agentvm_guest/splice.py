"""Byte pumps between two sockets (vsock transport, one connection per stream)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


def splice(a: socket.socket, b: socket.socket, chunk: int = 64 * 1024) -> None:
    """Copy bytes both ways until either side closes; closes both."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(chunk):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=pump, args=(b, a), daemon=True)
    t.start()
    pump(a, b)
    t.join()
    a.close()
    b.close()


def serve_accepted(listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
    """Accept connections forever and splice each to a fresh ``connect()``."""
    while True:
        conn, _ = listener.accept()
        try:
            upstream = connect()
        except OSError:
            conn.close()
            continue
        threading.Thread(target=splice, args=(conn, upstream), daemon=True).start()
