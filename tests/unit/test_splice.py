"""splice/serve_accepted (the vsock transport's byte pumps), on Unix sockets."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from agentvm_guest.splice import serve_accepted, splice


def test_splice_copies_both_ways_and_closes_both() -> None:
    a_outer, a_inner = socket.socketpair()
    b_inner, b_outer = socket.socketpair()
    t = threading.Thread(target=splice, args=(a_inner, b_inner), daemon=True)
    t.start()
    a_outer.sendall(b"ping" * 50_000)
    got = bytearray()
    while len(got) < 200_000:
        got += b_outer.recv(65536)
    assert bytes(got) == b"ping" * 50_000
    b_outer.sendall(b"pong")
    assert a_outer.recv(16) == b"pong"
    a_outer.close()
    t.join(5)
    assert not t.is_alive()
    assert b_outer.recv(16) == b""  # the other side was closed too
    b_outer.close()


def test_serve_accepted_connects_each_client_to_a_fresh_upstream(tmp_path: Path) -> None:
    upstream_path = str(tmp_path / "up.sock")
    upstream = socket.socket(socket.AF_UNIX)
    upstream.bind(upstream_path)
    upstream.listen(8)

    def echo() -> None:
        while True:
            conn, _ = upstream.accept()
            threading.Thread(
                target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                daemon=True,
            ).start()

    threading.Thread(target=echo, daemon=True).start()
    front = socket.socket(socket.AF_UNIX)
    front.bind(str(tmp_path / "front.sock"))
    front.listen(8)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(upstream_path)
        return s

    threading.Thread(target=serve_accepted, args=(front, connect), daemon=True).start()
    for i in range(3):
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(str(tmp_path / "front.sock"))
        c.sendall(f"hello {i}".encode())
        assert c.recv(64) == f"hello {i}".encode()
        c.close()
