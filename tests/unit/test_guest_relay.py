"""GuestRelay (guest side of the virtio-serial transport) over a socketpair "port"."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm_guest import mux
from agentvm_guest.mux import FrameType
from agentvm_guest.relay import GuestRelay, find_port

from .helpers import EchoServer, GuestSide, PortHost, refuse_connect, split, sync
from .test_mux import PIECES

NONCE_A = b"A" * mux.NONCE_SIZE
NONCE_B = b"B" * mux.NONCE_SIZE


@pytest.fixture
def host(guest: GuestSide) -> PortHost:
    port = PortHost(guest.host_sock)
    # A starting relay announces itself before it reads the port (RESET, see mux.py).
    assert port.recv_frame() == mux.Frame(FrameType.RESET, 0)
    return port


def open_stream(host: PortHost, echo: EchoServer, stream: int) -> None:
    """OPEN ``stream`` and prove it reaches the echo server."""
    before = len(echo.snapshot())
    host.send_frame(FrameType.OPEN, stream)
    host.send_frame(FrameType.DATA, stream, b"ping %d" % stream)
    assert host.read_stream(stream, len(b"ping %d" % stream)) == b"ping %d" % stream
    assert len(echo.snapshot()) == before + 1


def test_a_starting_relay_writes_reset_before_anything_else(guest: GuestSide) -> None:
    """A new agent process tells a host still holding the old session to end it."""
    guest.host_sock.settimeout(5)
    assert guest.host_sock.recv(100) == mux.reset()
    guest.host_sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        guest.host_sock.recv(100)  # and nothing more until the host starts a session
    assert guest.relay.sessions == 0


def test_sync_is_answered_with_the_same_nonce(guest: GuestSide, host: PortHost) -> None:
    host.send(sync(NONCE_A))
    host.sock.settimeout(5)
    assert host.sock.recv(100) == mux.sync_ack(NONCE_A)
    assert guest.relay.sessions == 1


def test_pad_then_sync_gives_exactly_one_ack(guest: GuestSide, host: PortHost) -> None:
    host.send(mux.PAD + sync(NONCE_A))
    host.sock.settimeout(5)
    assert host.sock.recv(100) == mux.sync_ack(NONCE_A)
    assert host.frames_during(0.1) == []
    assert guest.relay.sessions == 1


def test_frames_before_a_sync_are_ignored(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.send_frame(FrameType.OPEN, 1)
    host.send_frame(FrameType.DATA, 1, b"early")
    assert host.frames_during(0.1) == []
    assert echo_server.snapshot() == []
    assert guest.relay.sessions == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"hello world" * 100,
        b"\xa7\x56\x04\x00\x00\x00\x00\x01\x00\x01\x00\x00",  # a DATA header claiming 64 KiB
        mux.sync_header(),  # a SYNC header with no nonce: the PAD becomes its nonce
        mux.encode(FrameType.OPEN, 1) + b"\xa7",  # a valid frame then half a header
    ],
    ids=["text", "long-header", "bare-sync-header", "open-then-partial"],
)
def test_garbage_before_pad_and_sync_is_discarded(
    guest: GuestSide, host: PortHost, echo_server: EchoServer, garbage: bytes
) -> None:
    host.send(garbage)
    host.handshake(NONCE_A)
    open_stream(host, echo_server, 3)
    assert host.frames_during(0.05) == []


def test_open_and_data_echo_on_the_same_stream(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    host.send_frame(FrameType.OPEN, 1)
    host.send_frame(FrameType.OPEN, 3)
    host.send_frame(FrameType.DATA, 3, b"three")
    host.send_frame(FrameType.DATA, 1, b"one")
    got = {host.recv_frame() for _ in range(2)}
    assert got == {
        mux.Frame(FrameType.DATA, 1, b"one"),
        mux.Frame(FrameType.DATA, 3, b"three"),
    }
    # More than one frame's worth comes back split into DATA frames of this stream.
    big = bytes(i % 251 for i in range(3 * mux.MAX_PAYLOAD + 17))
    for piece in split(big, range(0, len(big), mux.MAX_PAYLOAD)):
        host.send_frame(FrameType.DATA, 1, piece)
    assert host.read_stream(1, len(big)) == big
    assert len(echo_server.snapshot()) == 2


def test_close_from_host_closes_the_local_connection(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 1)
    conn = echo_server.snapshot()[0]
    assert not conn.closed.is_set()
    host.send_frame(FrameType.CLOSE, 1)
    assert conn.closed.wait(3)
    # DATA for the closed stream goes nowhere and nothing answers it.
    host.send_frame(FrameType.DATA, 1, b"late")
    assert host.frames_during(0.1) == []
    assert bytes(conn.received) == b"ping 1"


def test_local_server_closing_sends_close(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 5)
    host.send_frame(FrameType.DATA, 5, b"!quit")
    assert host.recv_frame() == mux.Frame(FrameType.CLOSE, 5)
    # The stream id is free again.
    open_stream(host, echo_server, 5)


def test_second_sync_resets_the_session(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake(NONCE_A)
    open_stream(host, echo_server, 1)
    old = echo_server.snapshot()[0]
    # The local server now streams on stream 1 without pause.
    host.send_frame(FrameType.DATA, 1, b"!spam")
    assert host.recv_frame().stream == 1
    host.send(sync(NONCE_B))
    host.expect_sync_ack(NONCE_B)  # drops everything before the new SYNC_ACK
    assert old.closed.wait(3)
    frames_after = host.frames_during(0.2)
    assert [f for f in frames_after if f.stream == 1] == []
    assert guest.relay.sessions == 2
    # The old stream id means nothing now; a new stream works.
    host.send_frame(FrameType.DATA, 1, b"stale")
    open_stream(host, echo_server, 1)
    assert host.frames_during(0.05) == []


class GatedSocket(socket.socket):
    """A local connection whose reads complete only when the test opens ``gate``."""

    reached = threading.Event()
    gate = threading.Event()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data:
            GatedSocket.reached.set()
            GatedSocket.gate.wait(5)
        return data


def test_data_read_before_a_new_sync_is_never_sent_after_it(echo_server: EchoServer) -> None:
    """Bytes a pump read in the old session must not leak into a reused stream id."""
    GatedSocket.reached.clear()
    GatedSocket.gate.clear()
    calls = 0

    def connect() -> socket.socket:
        nonlocal calls
        calls += 1
        if calls > 1:
            return echo_server.connect()
        sock = GatedSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(echo_server.path))
        return sock

    side = GuestSide(connect)
    try:
        host = PortHost(side.host_sock)
        host.handshake(NONCE_A)
        host.send_frame(FrameType.OPEN, 1)
        host.send_frame(FrameType.DATA, 1, b"old session data")
        assert GatedSocket.reached.wait(5)  # the pump holds the echo, not yet sent
        host.send(sync(NONCE_B))
        host.expect_sync_ack(NONCE_B)
        open_stream(host, echo_server, 1)  # stream id 1 again, in the new session
        GatedSocket.gate.set()
        assert host.frames_during(0.2) == []
    finally:
        GatedSocket.gate.set()
        side.close()


def test_host_disconnected_resets_and_waits_for_a_sync(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 1)
    conn = echo_server.snapshot()[0]
    # serve_forever is blocked reading the port, so this is the only thread feeding.
    guest.relay.host_disconnected()
    assert conn.closed.wait(3)
    # Back to hunting: frames without a SYNC are ignored.
    host.send_frame(FrameType.OPEN, 9)
    assert host.frames_during(0.1) == []
    assert len(echo_server.snapshot()) == 1
    host.handshake(pad=False)
    open_stream(host, echo_server, 9)


def test_host_closing_the_port_closes_local_connections(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 1)
    open_stream(host, echo_server, 3)
    guest.close_host()  # serve_forever reads 0 bytes: host not connected
    for conn in echo_server.snapshot():
        assert conn.closed.wait(3)
    assert guest.thread.is_alive()  # it keeps waiting for the host to come back


def test_open_of_an_existing_stream_answers_close(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 7)
    host.send_frame(FrameType.OPEN, 7)
    assert host.recv_frame() == mux.Frame(FrameType.CLOSE, 7)
    host.send_frame(FrameType.OPEN, 0)  # stream 0 is reserved
    assert host.recv_frame() == mux.Frame(FrameType.CLOSE, 0)
    assert len(echo_server.snapshot()) == 1


def test_connect_failure_answers_close(tmp_path: Path) -> None:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(tmp_path / "missing.sock"))
        except OSError:
            sock.close()
            raise
        return sock

    side = GuestSide(connect)
    try:
        host = PortHost(side.host_sock)
        host.handshake()
        host.send_frame(FrameType.OPEN, 1)
        assert host.recv_frame() == mux.Frame(FrameType.CLOSE, 1)
        host.send_frame(FrameType.DATA, 1, b"nobody")
        assert host.frames_during(0.05) == []
    finally:
        side.close()


def test_data_for_unknown_stream_is_ignored(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    host.send_frame(FrameType.DATA, 11, b"who?")
    host.send_frame(FrameType.CLOSE, 13)
    assert host.frames_during(0.1) == []
    assert echo_server.snapshot() == []


def test_framing_error_in_session_drops_streams_until_next_sync(
    guest: GuestSide, host: PortHost, echo_server: EchoServer
) -> None:
    host.handshake()
    open_stream(host, echo_server, 1)
    host.send(b"\x00" * mux.HEADER_SIZE)
    assert echo_server.snapshot()[0].closed.wait(3)
    host.send_frame(FrameType.OPEN, 3)
    assert host.frames_during(0.1) == []
    host.handshake(pad=False)
    open_stream(host, echo_server, 3)


# -- direct feeding (no threads): hostile input -----------------------------------------
def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


@given(garbage=PIECES, in_session=st.booleans(), cuts=st.lists(st.integers(0, 70_000), max_size=10))
def test_relay_recovers_from_any_stale_bytes(
    garbage: list[bytes], in_session: bool, cuts: list[int]
) -> None:
    host_end, guest_end = socket.socketpair()
    try:
        relay = GuestRelay(guest_end.fileno(), refuse_connect)
        if in_session:
            relay.feed(sync(NONCE_A))
        data = b"".join(garbage) + mux.PAD + sync(NONCE_B) + mux.encode(FrameType.OPEN, 7)
        for chunk in split(data, cuts):
            relay.feed(chunk)
        out = drain(host_end)
        ack = mux.sync_ack(NONCE_B)
        assert ack in out
        after = out[out.rindex(ack) + len(ack) :]
        # The OPEN of the new session reaches connect(), which fails: CLOSE.
        assert mux.FrameDecoder().feed(after) == [mux.Frame(FrameType.CLOSE, 7)]
    finally:
        host_end.close()
        guest_end.close()


def test_sync_right_after_pad_tail_is_not_lost() -> None:
    host_end, guest_end = socket.socketpair()
    try:
        relay = GuestRelay(guest_end.fileno(), refuse_connect)
        relay.feed(sync(NONCE_A))
        # The old host died 10 bytes into the header of a 64 KiB DATA frame; the PAD
        # completes that frame and leaves 11 zero bytes in the decoder.
        relay.feed(mux.HEADER.pack(mux.MAGIC, FrameType.DATA, 0, 1, mux.MAX_PAYLOAD)[:10])
        relay.feed(mux.PAD)
        relay.feed(sync(NONCE_B))  # arrives in its own read
        assert mux.sync_ack(NONCE_B) in drain(host_end)
    finally:
        host_end.close()
        guest_end.close()


def test_find_port(tmp_path: Path) -> None:
    for dev, name in [("vport0p1", "org.qemu.guest_agent.0"), ("vport1p2", mux.PORT_NAME)]:
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "name").write_text(name + "\n")
    assert find_port(sysfs=str(tmp_path)) == "/dev/vport1p2"
    assert find_port("org.other", sysfs=str(tmp_path)) is None
