"""HostRelay (host side of the virtio-serial transport) against fake and real guests.

The "real" guest is GuestRelay on one end of a socketpair, carrying streams to the
real GuestAgent gRPC server; FakeChannel plays libvirt's channel socket on the
other end. Scripted guests (plain threads) test the handshake and framing edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agentvm.common.grpc_util import CHANNEL_OPTIONS, aio_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import relay_handshake
from agentvm.vm_manager.relay import HostRelay
from agentvm_guest import __version__, agent, mux
from agentvm_guest.mux import FrameType

from .helpers import (
    FakeChannel,
    GuestSide,
    PortHost,
    accept_until,
    async_wait_until,
    run_async,
)

VM = "agent-vm-relaytest"


class CountingConnect:
    """GuestRelay's connect(): one call per stream opened by the host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls = 0

    def __call__(self) -> socket.socket:
        self.calls += 1
        return agent.connect_unix(str(self.path))


@dataclass
class Stack:
    listen: Path
    channel_path: Path
    channel: FakeChannel
    guest: GuestSide
    connect: CountingConnect

    @property
    def target(self) -> str:
        return f"unix:{self.listen}"

    def relay(self) -> HostRelay:
        return HostRelay(VM, self.listen, channel_path=str(self.channel_path))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    agent_sock = tmp_path / "agent-grpc.sock"
    server = agent.serve(f"unix:{agent_sock}")
    connect = CountingConnect(agent_sock)
    guest = GuestSide(connect)
    channel = FakeChannel(tmp_path / "channel.sock", guest.host_sock)
    try:
        yield Stack(
            tmp_path / "run" / "agent.sock", tmp_path / "channel.sock", channel, guest, connect
        )
    finally:
        channel.close()
        guest.close()
        server.stop(0)


def own_channel(target: str) -> grpc.aio.Channel:
    """A channel with its own connection (channels otherwise share one per target)."""
    return grpc.aio.insecure_channel(
        target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )


def session_open(relay: HostRelay) -> bool:
    session = relay._session
    return session is not None and not session.closed.is_set()


async def get_status(channel: grpc.aio.Channel) -> common_pb2.GuestInfo:
    stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
    resp = await stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=10, wait_for_ready=True)
    return resp.info


async def execute_stdout(channel: grpc.aio.Channel, script: str) -> bytes:
    stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["/bin/sh", "-c", script])),
        cwd="/",
    )
    out = bytearray()
    exit_code = None
    async for r in stub.Execute(req, timeout=15):
        if r.HasField("output"):
            out += r.output.data
        elif r.HasField("exited"):
            exit_code = r.exited.exit_code
    assert exit_code == 0
    return bytes(out)


# -- with the real guest relay and agent ---------------------------------------------------
def test_get_status_through_the_relay(stack: Stack) -> None:
    async def body() -> None:
        relay = stack.relay()
        await relay.start()
        try:
            assert stat.S_IMODE(os.stat(relay.listen_path).st_mode) == 0o600
            async with aio_channel(stack.target, "vm-manager") as ch:
                info = await get_status(ch)
            assert info.agent_version == __version__
            assert info.hostname == os.uname().nodename
            assert relay.sessions_started == 1
            assert relay.protocol_errors == 0
        finally:
            await relay.close()
        assert not relay.listen_path.exists()

    run_async(body())
    assert stack.guest.relay.sessions == 1
    assert stack.channel.accepted == 1
    assert stack.connect.calls == 1


def test_two_concurrent_clients(stack: Stack) -> None:
    expected = b"".join(b"%d\n" % i for i in range(1, 60001))

    async def body() -> None:
        relay = stack.relay()
        await relay.start()
        try:
            async with own_channel(stack.target) as a, own_channel(stack.target) as b:
                results = await asyncio.gather(
                    execute_stdout(a, "seq 1 60000"),
                    execute_stdout(b, "seq 1 60000"),
                    *(get_status(ch) for ch in (a, b) for _ in range(5)),
                )
            assert results[0] == expected
            assert results[1] == expected
            assert all(isinstance(r, common_pb2.GuestInfo) for r in results[2:])
            assert relay.sessions_started == 1
        finally:
            await relay.close()

    run_async(body())
    assert stack.connect.calls == 2  # one stream per client connection
    assert stack.guest.relay.sessions == 1


def test_dial_again_opens_a_new_stream_in_the_same_session(stack: Stack) -> None:
    async def body() -> None:
        relay = stack.relay()
        await relay.start()
        try:
            for _ in range(3):
                async with own_channel(stack.target) as ch:  # a new connection each time
                    await get_status(ch)
            assert relay.sessions_started == 1
        finally:
            await relay.close()

    run_async(body())
    assert stack.connect.calls == 3
    assert stack.guest.relay.sessions == 1
    assert stack.channel.accepted == 1


def next_call_after(
    stack: Stack, end: Callable[[], None], ended: Callable[[HostRelay], bool]
) -> HostRelay:
    """A call, then ``end()`` ends the session (``ended`` says when); the same gRPC
    channel's next call is served by a new session. The closed relay, for its counters."""
    relay = stack.relay()

    async def body() -> None:
        await relay.start()
        try:
            async with aio_channel(stack.target, "vm-manager") as ch:
                await get_status(ch)
                end()
                assert await async_wait_until(lambda: ended(relay))
                assert not session_open(relay)
                info = await get_status(ch)  # a new session serves the next call
                assert info.agent_version == __version__
        finally:
            await relay.close()

    run_async(body())
    assert relay.sessions_started == 2
    assert stack.guest.relay.sessions == 2  # the PAD + SYNC reset the guest's session
    return relay


def test_channel_reconnect_starts_a_new_session(stack: Stack) -> None:
    # libvirt's channel connection goes away; the relay dials the channel again.
    relay = next_call_after(stack, stack.channel.drop, lambda r: not session_open(r))
    assert relay.protocol_errors == 0
    assert stack.channel.accepted == 2


def test_garbage_from_the_guest_ends_the_session(stack: Stack) -> None:
    next_call_after(
        stack,
        lambda: stack.channel.inject(b"this is not a frame"),
        lambda r: r.protocol_errors == 1,
    )


def test_a_restarted_guest_agent_ends_the_session(stack: Stack) -> None:
    """RESET, which a respawned agent writes first, ends the session: the next call
    starts a new one instead of going into streams that no agent serves."""
    relay = next_call_after(
        stack, lambda: stack.channel.inject(mux.reset()), lambda r: r.guest_resets == 1
    )
    assert relay.protocol_errors == 0
    assert relay.handshake_failures == 0


def test_guest_may_not_open_streams(stack: Stack) -> None:
    async def body() -> None:
        relay = stack.relay()
        await relay.start()
        try:
            async with aio_channel(stack.target, "vm-manager") as ch:
                await get_status(ch)
                stack.channel.inject(mux.encode(FrameType.OPEN, 2))
                assert await async_wait_until(lambda: relay.protocol_errors == 1)
                await get_status(ch)
        finally:
            await relay.close()

    run_async(body())


def test_relay_needs_exactly_one_transport(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        HostRelay(VM, tmp_path / "a.sock")
    with pytest.raises(ValueError):
        HostRelay(VM, tmp_path / "a.sock", channel_path="/x", vsock_cid=3)


# -- scripted guests ---------------------------------------------------------------------------
class ScriptedGuest:
    """A Unix server at the channel path running ``script`` on each accepted connection."""

    def __init__(self, path: Path, script: Callable[[PortHost, int], None]) -> None:
        self.script = script
        self.errors: list[BaseException] = []
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._stop, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        self.accepted += 1
        self._conns.append(conn)
        threading.Thread(target=self._run, args=(conn, self.accepted), daemon=True).start()

    def _run(self, conn: socket.socket, n: int) -> None:
        try:
            self.script(PortHost(conn), n)
        except EOFError:
            pass  # the host hung up: fine for every script here
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        assert self.errors == [], self.errors


@contextlib.contextmanager
def scripted(tmp_path: Path, script: Callable[[PortHost, int], None]) -> Iterator[ScriptedGuest]:
    guest = ScriptedGuest(tmp_path / "channel.sock", script)
    try:
        yield guest
    finally:
        guest.close()


def wait_for_hangup(port: PortHost, timeout: float = 10.0) -> None:
    """Read (and ignore) everything until the host closes the connection."""
    port.sock.settimeout(timeout)
    while port.sock.recv(65536):
        pass


async def raw_client(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


def test_handshake_framing_and_stream_lifecycle(tmp_path: Path) -> None:
    """PAD then SYNC; OPEN/DATA/CLOSE with odd stream ids; guest DATA and CLOSE reach clients."""
    seen: dict[str, object] = {}
    done = threading.Event()

    def script(port: PortHost, n: int) -> None:
        nonce = port.expect_sync()
        seen["prefix_ok"] = bytes(port.seen).startswith(mux.PAD + mux.sync_header())
        port.send(b"stale bytes before the answer" + mux.sync_ack(nonce))
        seen["open1"] = port.recv_frame()
        seen["data1"] = port.recv_frame()
        port.send_frame(FrameType.DATA, 1, b"reply to one")
        seen["open3"] = port.recv_frame()
        port.send_frame(FrameType.CLOSE, 3)  # the guest ends stream 3
        seen["close1"] = port.recv_frame()  # the client of stream 1 hangs up
        done.set()
        wait_for_hangup(port)

    async def body() -> None:
        relay = HostRelay(VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "channel.sock"))
        await relay.start()
        try:
            r1, w1 = await raw_client(relay.listen_path)
            w1.write(b"hello from one")
            assert await asyncio.wait_for(r1.readexactly(12), 5) == b"reply to one"
            r3, w3 = await raw_client(relay.listen_path)
            assert await read_to_eof(r3) == b""  # closed by the guest's CLOSE
            w3.close()
            w1.close()
            assert await async_wait_until(done.is_set)
            assert relay.sessions_started == 1
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        run_async(body())
    assert seen["prefix_ok"] is True
    assert seen["open1"] == mux.Frame(FrameType.OPEN, 1)
    assert seen["data1"] == mux.Frame(FrameType.DATA, 1, b"hello from one")
    assert seen["open3"] == mux.Frame(FrameType.OPEN, 3)
    assert seen["close1"] == mux.Frame(FrameType.CLOSE, 1)


def test_garbage_right_after_the_ack_is_a_protocol_error(tmp_path: Path) -> None:
    def script(port: PortHost, n: int) -> None:
        nonce = port.expect_sync()
        if n == 1:
            port.send(mux.sync_ack(nonce) + b"\x00" * 40)  # same write as the answer
        else:
            port.send(mux.sync_ack(nonce))
            assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
            port.send_frame(FrameType.DATA, 1, b"fine")
        wait_for_hangup(port)

    async def body() -> None:
        relay = HostRelay(VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "channel.sock"))
        await relay.start()
        try:
            r, w = await raw_client(relay.listen_path)
            assert await read_to_eof(r) == b""  # the session ended under this client
            w.close()
            assert relay.protocol_errors == 1
            r, w = await raw_client(relay.listen_path)
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"fine"
            w.close()
            assert relay.sessions_started == 2
        finally:
            await relay.close()

    with scripted(tmp_path, script) as guest:
        run_async(body())
    assert guest.accepted == 2


def test_sync_is_retried_until_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_handshake, "SYNC_RETRY_S", 0.05)
    syncs: list[bytes] = []

    def script(port: PortHost, n: int) -> None:
        syncs.append(port.expect_sync())  # ignored
        retry = port.recv_frame()  # after the first SYNC the host sends only SYNCs
        assert retry.type is FrameType.SYNC
        nonce = retry.payload
        syncs.append(nonce)
        port.send(mux.sync_ack(nonce) + mux.sync_ack(nonce))  # duplicate answers are fine
        assert port.recv_frame() == mux.Frame(FrameType.OPEN, 1)
        port.send_frame(FrameType.DATA, 1, b"ok")
        wait_for_hangup(port)

    async def body() -> None:
        relay = HostRelay(VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "channel.sock"))
        await relay.start()
        try:
            r, w = await raw_client(relay.listen_path)
            assert await asyncio.wait_for(r.readexactly(2), 5) == b"ok"
            w.close()
            assert relay.protocol_errors == 0
        finally:
            await relay.close()

    with scripted(tmp_path, script):
        run_async(body())
    assert len(syncs) == 2
    assert syncs[0] == syncs[1]  # one nonce per handshake, repeated on retry


def test_handshake_timeout_closes_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_handshake, "SYNC_RETRY_S", 0.05)

    def silent(port: PortHost, n: int) -> None:
        wait_for_hangup(port)

    async def body() -> None:
        relay = HostRelay(
            VM,
            tmp_path / "agent.sock",
            channel_path=str(tmp_path / "channel.sock"),
            handshake_timeout=0.3,
        )
        await relay.start()
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            r, w = await raw_client(relay.listen_path)
            w.write(b"anyone?")
            # Not an HTTP/2 client: hung up on without an answer.
            assert await read_to_eof(r) == b""
            assert 0.25 < loop.time() - start < 3
            w.close()
            assert relay.sessions_started == 0
            assert relay.handshake_failures == 1
        finally:
            await relay.close()

    with scripted(tmp_path, silent):
        run_async(body())


def test_missing_channel_socket_closes_the_client(tmp_path: Path) -> None:
    async def body() -> None:
        relay = HostRelay(VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "nothing.sock"))
        await relay.start()
        try:
            r, w = await raw_client(relay.listen_path)
            w.write(b"anyone?")
            assert await read_to_eof(r, timeout=3) == b""
            w.close()
            assert relay.sessions_started == 0
            assert "cannot open its agent channel" in relay.unresponsive
        finally:
            await relay.close()

    run_async(body())


def test_guest_hanging_up_closes_every_client(tmp_path: Path) -> None:
    def script(port: PortHost, n: int) -> None:
        nonce = port.expect_sync()
        port.send(mux.sync_ack(nonce))
        opens = [port.recv_frame() for _ in range(2)]
        assert opens == [mux.Frame(FrameType.OPEN, 1), mux.Frame(FrameType.OPEN, 3)]
        port.sock.shutdown(socket.SHUT_RDWR)

    async def body() -> None:
        relay = HostRelay(VM, tmp_path / "agent.sock", channel_path=str(tmp_path / "channel.sock"))
        await relay.start()
        try:
            clients = [await raw_client(relay.listen_path) for _ in range(2)]
            for r, w in clients:
                assert await read_to_eof(r) == b""
                w.close()
            assert relay.protocol_errors == 0
            assert not session_open(relay)
        finally:
            await relay.close()

    with scripted(tmp_path, script) as guest:
        run_async(body())
    assert guest.accepted == 1
