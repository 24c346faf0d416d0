"""HostRelay against hostile guests: what one VM's guest can cost vm-manager is bounded.

Issue 22, item 2. A fake guest end (a Unix server at the channel path, like
libvirt's socket for the virtio-serial port) plays a guest whose root replaced
the agent: it reads and drops everything and never answers SYNC_ACK, or never
reads at all, or answers the handshake and then stops reading. Host clients
connect in numbers. The tests count this process's open descriptors
(/proc/self/fd), the relay's waiting clients and handshakes, and check that
callers get a clear UNAVAILABLE instead of waiting, and that another VM's
relay in the same event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.common.grpc_util import CHANNEL_OPTIONS
from agentvm.v1 import guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import relay as relay_mod
from agentvm.vm_manager import relay_handshake, relay_refuse
from agentvm.vm_manager.relay import HostRelay
from agentvm_guest import __version__, agent, mux

from .helpers import FakeChannel, GuestSide, accept_until, async_wait_until, run_async

VM = "agent-vm-hostile"
FLOOD = 300
MAX_WAITING = 16
MAX_REFUSING = 16


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HostileGuest:
    """A Unix server at the channel path playing a guest whose agent was replaced.

    ``mode``: "silent" reads and drops everything, never answers; "deaf" never
    reads; "ack_then_deaf" answers the handshake, then never reads again.
    """

    def __init__(self, path: Path, mode: str) -> None:
        self.mode = mode
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._stop, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        self.accepted += 1
        self.conns.append(conn)
        t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
        self._threads.append(t)
        t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        scanner = mux.PatternScanner(mux.sync_header())
        while not self._stop.is_set():
            if self.mode == "deaf":
                self._stop.wait(0.05)
                continue
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if self.mode == "ack_then_deaf":
                rest = scanner.feed(data)
                if rest is not None:
                    nonce = (mux.sync_header() + rest)[mux.HEADER_SIZE :][: mux.NONCE_SIZE]
                    conn.sendall(mux.sync_ack(nonce))
                    self.mode = "deaf"

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(2)
        for conn in self.conns:
            conn.close()


@contextlib.contextmanager
def hostile(tmp_path: Path, mode: str) -> Iterator[HostileGuest]:
    guest = HostileGuest(tmp_path / "channel.sock", mode)
    try:
        yield guest
    finally:
        guest.close()


def make_relay(tmp_path: Path, **kw: Any) -> HostRelay:
    """A relay whose waiting clients outwait the handshake (unless told otherwise)."""
    kw.setdefault("client_wait", kw.get("handshake_timeout", relay_mod.HANDSHAKE_TIMEOUT_S) + 5)
    return HostRelay(
        VM,
        tmp_path / "run" / "agent.sock",
        channel_path=str(tmp_path / "channel.sock"),
        max_waiting=MAX_WAITING,
        max_refusing=MAX_REFUSING,
        **kw,
    )


def own_channel(target: str) -> grpc.aio.Channel:
    """A channel with its own connection (channels otherwise share one per target)."""
    return grpc.aio.insecure_channel(
        target, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )


async def call_status(target: str, timeout: float = 30) -> grpc.aio.AioRpcError | str:
    """GetStatus on a connection of its own: the agent's version, or the error."""
    async with own_channel(target) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        try:
            resp = await stub.GetStatus(
                guest_agent_pb2.GetStatusRequest(), timeout=timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            return exc
        return resp.info.agent_version


def unavailable(result: grpc.aio.AioRpcError | str) -> str:
    """The details of an UNAVAILABLE answer (fails on anything else)."""
    assert isinstance(result, grpc.aio.AioRpcError), result
    assert result.code() is grpc.StatusCode.UNAVAILABLE, (result.code(), result.details())
    return result.details() or ""


class Flood:
    """``n`` raw connections to the relay, each sending the HTTP/2 preface, held open.

    Connecting runs in a thread: connect() blocks while the listen backlog is full.
    """

    def __init__(self, path: Path, n: int) -> None:
        self.socks: list[socket.socket] = []
        self.errors: list[OSError] = []
        self._thread = threading.Thread(target=self._run, args=(path, n), daemon=True)
        self._thread.start()

    def _run(self, path: Path, n: int) -> None:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socks.append(s)
            try:
                s.connect(str(path))
            except OSError as exc:
                self.errors.append(exc)
                continue
            # Past the caps the relay hangs up at once: then this write fails.
            with contextlib.suppress(OSError):
                s.sendall(relay_refuse.PREFACE)

    async def connected(self) -> None:
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive()

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture(autouse=True)
def no_retry_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed handshake the next is far away (tests that want one sooner say so)."""
    monkeypatch.setattr(relay_mod, "BACKOFF_FIRST_S", 600.0)
    monkeypatch.setattr(relay_mod, "BACKOFF_MAX_S", 600.0)
    monkeypatch.setattr(relay_handshake, "SYNC_RETRY_S", 0.05)


# -- fail fast ------------------------------------------------------------------------------
def test_after_a_failed_handshake_callers_get_unavailable_without_a_new_one(
    tmp_path: Path,
) -> None:
    """The first caller waits for one handshake; the next ones are answered at once."""

    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=0.5)
        await relay.start()
        target = f"unix:{relay.listen_path}"
        try:
            first = unavailable(await call_status(target))
            assert "did not answer the session handshake within 0.5 s" in first
            assert f"guest agent of VM {VM} is not answering" in first
            assert "destroy the VM" in first
            # wait_for_ready callers too: each gets its answer without a handshake.
            for _ in range(20):
                details = unavailable(await call_status(target))
                assert "(1 failed attempt in a row; the next in 600 s)" in details.replace(
                    "599 s", "600 s"
                )
            assert relay.handshake_failures == 1
            assert relay.unresponsive.startswith(f"the guest agent of VM {VM} is not answering")
        finally:
            await relay.close()

    with hostile(tmp_path, "silent") as guest:
        run_async(body(), timeout=30)
    assert guest.accepted == 1  # one handshake for 21 callers


def test_the_retry_delay_doubles_and_a_good_handshake_clears_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_mod, "BACKOFF_FIRST_S", 0.0)

    async def body() -> None:
        relay = make_relay(tmp_path)
        await relay.start()
        target = f"unix:{relay.listen_path}"
        try:
            for n in (1, 2, 3):
                details = unavailable(await call_status(target))
                assert "cannot open its agent channel" in details
                assert f"({n} failed attempt" in details
            assert relay.handshake_failures == 3
            # The guest comes back: the next handshake succeeds and the mark goes.
            sock = tmp_path / "agent-grpc.sock"
            server = agent.serve(f"unix:{sock}")
            guest = GuestSide(lambda: agent.connect_unix(str(sock)))
            channel = FakeChannel(tmp_path / "channel.sock", guest.host_sock)
            try:
                assert await call_status(target) == __version__
                assert relay.unresponsive == ""
            finally:
                channel.close()
                guest.close()
                server.stop(0)
        finally:
            await relay.close()

    run_async(body(), timeout=30)


# -- waiting clients ------------------------------------------------------------------------
def test_waiting_clients_share_one_handshake_and_are_capped(tmp_path: Path) -> None:
    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=600)
        await relay.start()
        target = f"unix:{relay.listen_path}"
        calls = [asyncio.ensure_future(call_status(target)) for _ in range(40)]
        try:
            assert await async_wait_until(
                lambda: relay.waiting == MAX_WAITING and sum(c.done() for c in calls) == 24,
                timeout=15,
            ), (relay.waiting, sum(c.done() for c in calls))
            for c in calls:
                if c.done():
                    assert "connections are already waiting for the guest agent" in unavailable(
                        c.result()
                    )
        finally:
            for c in calls:
                c.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await relay.close()

    with hostile(tmp_path, "silent") as guest:
        run_async(body(), timeout=30)
    assert guest.accepted == 1


def test_a_waiting_client_is_answered_before_its_connect_timeout(tmp_path: Path) -> None:
    """gRPC gives a connection 5 s to deliver SETTINGS (grpc_util): a client waits for
    a handshake in progress only ``client_wait`` seconds, and the handshake goes on."""

    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=600, client_wait=0.3)
        await relay.start()
        try:
            details = unavailable(await call_status(f"unix:{relay.listen_path}"))
            assert "no answer to the session handshake after 0.3 s (still trying)" in details
            assert relay.handshake_failures == 0
            assert relay.unresponsive == ""
        finally:
            await relay.close()

    with hostile(tmp_path, "silent") as guest:
        run_async(body(), timeout=30)
    assert guest.accepted == 1


def test_a_waiting_client_that_hangs_up_is_closed_at_once(tmp_path: Path) -> None:
    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=600)
        await relay.start()
        try:
            base = open_fds()
            clients = [
                await asyncio.open_unix_connection(str(relay.listen_path)) for _ in range(10)
            ]
            for _r, w in clients:
                w.write(relay_refuse.PREFACE)
            assert await async_wait_until(lambda: relay.waiting == 10)
            for _r, w in clients:
                w.close()
            # The handshake is still running: only the hang-ups end the waits.
            assert await async_wait_until(lambda: relay.waiting == 0 and relay.clients == 0)
            assert relay.sessions_started == 0
            assert relay.handshake_failures == 0
            # Left: the handshake's connection to the guest (both ends live in this process).
            assert await async_wait_until(lambda: open_fds() <= base + 2), (open_fds(), base)
        finally:
            await relay.close()

    with hostile(tmp_path, "silent"):
        run_async(body(), timeout=30)


def test_a_connect_flood_costs_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """300 connections held open: the relay keeps at most the waiting and refusing ones."""

    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=600)
        await relay.start()
        flood: Flood | None = None
        try:
            base = open_fds()
            flood = Flood(relay.listen_path, FLOOD)
            await flood.connected()
            assert flood.errors == []
            # Every connection was accepted and either waits or was refused.
            # ... and the connections hung up on at once are closed (an aborted transport
            # lets go of its descriptor on the next loop turn: count only once settled).
            assert await async_wait_until(
                lambda: (
                    relay.waiting + relay.refused == FLOOD
                    and relay._open == relay.waiting + relay.refusing
                ),
                timeout=15,
            ), (relay.waiting, relay.refused, relay.refusing, relay._open)
            # Ours: FLOOD client sockets and the handshake's two ends. The relay's:
            # the waiting clients and those being answered UNAVAILABLE, no more.
            relay_side = open_fds() - base - FLOOD - 2
            assert relay_side <= MAX_WAITING + MAX_REFUSING, relay_side
            assert relay.waiting == MAX_WAITING
            flood.close()
            assert await async_wait_until(
                lambda: relay.clients == 0 and relay.refusing == 0, timeout=15
            )
            assert await async_wait_until(lambda: open_fds() <= base + 2), (open_fds(), base)
        finally:
            if flood is not None:
                flood.close()
            await relay.close()
        # The relay's listener and channel end are gone; the fake guest still holds its end.
        assert await async_wait_until(lambda: open_fds() <= base), (open_fds(), base)

    with hostile(tmp_path, "silent") as guest:
        run_async(body(), timeout=60)
    assert guest.accepted == 1


# -- a guest that does not read ---------------------------------------------------------------
def test_a_guest_that_never_reads_cannot_stall_the_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port's buffers are full (a tiny send buffer stands for them): every handshake
    still ends within its timeout and every client gets an answer."""
    monkeypatch.setattr(relay_mod, "BACKOFF_FIRST_S", 0.0)
    channel = str(tmp_path / "channel.sock")
    real_open = asyncio.open_unix_connection

    async def small_buffer(path: str | None = None, **kw: Any) -> Any:
        if path != channel:
            return await real_open(path, **kw)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return await real_open(sock=sock, **kw)

    monkeypatch.setattr(asyncio, "open_unix_connection", small_buffer)

    async def body() -> None:
        relay = make_relay(tmp_path, handshake_timeout=0.3)
        await relay.start()
        try:
            for n in range(1, 6):
                r, w = await real_open(str(relay.listen_path))
                w.write(b"not http/2")
                assert await asyncio.wait_for(r.read(), 10) == b""  # not HTTP/2: no answer
                w.close()
                assert relay.handshake_failures == n
        finally:
            await relay.close()

    with hostile(tmp_path, "deaf") as guest:
        run_async(body(), timeout=60)
    assert guest.accepted == 5


def test_a_guest_that_stops_reading_ends_its_session(tmp_path: Path) -> None:
    """Writes to the guest have a timeout: the stuck stream ends, the agent is marked
    unresponsive, and the next caller is answered at once."""

    async def body() -> None:
        relay = make_relay(tmp_path, write_timeout=0.5)
        await relay.start()
        try:
            r, w = await asyncio.open_unix_connection(str(relay.listen_path))
            w.write(b"x" * (8 << 20))  # far more than the port's buffers take
            # Its stream ends (with unread bytes left a hang-up is a reset).
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert relay.sessions_started == 1
            assert "it read nothing from its port for 0.5 s" in relay.unresponsive
            details = unavailable(await call_status(f"unix:{relay.listen_path}"))
            assert "it read nothing from its port" in details
        finally:
            await relay.close()

    with hostile(tmp_path, "ack_then_deaf") as guest:
        run_async(body(), timeout=30)
    assert guest.accepted == 1


# -- other VMs --------------------------------------------------------------------------------
def test_another_relay_in_the_same_process_keeps_answering(tmp_path: Path) -> None:
    """While one VM's relay is flooded and its handshake hangs, another VM's relay in the
    same event loop serves calls (each on a new connection, so each is a new stream)."""
    bad_dir = tmp_path / "bad"
    good_dir = tmp_path / "good"
    bad_dir.mkdir()
    good_dir.mkdir()
    sock = good_dir / "agent-grpc.sock"
    server = agent.serve(f"unix:{sock}")
    guest = GuestSide(lambda: agent.connect_unix(str(sock)))
    channel = FakeChannel(good_dir / "channel.sock", guest.host_sock)

    async def body() -> None:
        bad = make_relay(bad_dir, handshake_timeout=600)
        good = make_relay(good_dir)
        await bad.start()
        await good.start()
        flood: Flood | None = None
        try:
            flood = Flood(bad.listen_path, FLOOD)
            await flood.connected()
            assert await async_wait_until(lambda: bad.waiting + bad.refused == FLOOD, timeout=15)
            results = [await call_status(f"unix:{good.listen_path}") for _ in range(20)]
            assert results == [__version__] * 20
            # All of that happened while the bad VM's handshake was still hanging.
            assert bad.waiting == MAX_WAITING
            assert bad.sessions_started == 0
            assert good.sessions_started == 1
            assert good.handshake_failures == 0
        finally:
            if flood is not None:
                flood.close()
            await bad.close()
            await good.close()

    try:
        with hostile(bad_dir, "silent"):
            run_async(body(), timeout=60)
    finally:
        channel.close()
        guest.close()
        server.stop(0)
