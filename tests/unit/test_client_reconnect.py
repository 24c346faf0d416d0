"""Calls wait for an executor that is restarting (agentvm.common.reconnect): the
Python client's, and the E2B gateway's (a service channel with wait_for_restart).

Against real gRPC servers on a unix socket: one stopped and a new one started
on the same socket, as the supervisor does after a kill. Most errors of the
60-minute soaks were calls made in that gap, refused by the client itself
("failed to connect to all addresses") although nothing had been sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_vm import _calls
from agentvm.common import grpc_util, reconnect
from agentvm.v1 import executor_pb2, executor_pb2_grpc


class Executor(executor_pb2_grpc.ExecutorServiceServicer):
    """GetSandbox answers after ``delay`` seconds; every call is counted."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0

    async def GetSandbox(
        self, request: executor_pb2.GetSandboxRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.GetSandboxResponse:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return executor_pb2.GetSandboxResponse(sandbox=executor_pb2.Sandbox(id=request.sandbox_id))


async def serve(address: str, servicer: Executor) -> grpc.aio.Server:
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    return server


@pytest.fixture(autouse=True)
def plain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TLS and no token: the channel is the client's own, with its interceptors."""
    monkeypatch.setenv("AGENTVM_TLS", "off")
    monkeypatch.delenv("AGENTVM_TOKEN", raising=False)
    monkeypatch.setenv("AGENTVM_TOKEN_FILE", str(tmp_path / "no-token"))


Make = Callable[[str], grpc.aio.Channel]


@pytest.fixture(params=["client", "e2b-gateway"])
def make(request: pytest.FixtureRequest) -> Make:
    """The channel under test: the Python client's, or a service's to the executor
    with wait_for_restart (the E2B gateway's)."""
    if request.param == "client":
        return _calls.channel
    grpc_util.use_plaintext()
    return lambda address: grpc_util.aio_channel(address, "executor", wait_for_restart=True)


async def stop(server: grpc.aio.Server, chan: grpc.aio.Channel) -> None:
    """Stop ``server`` and wait until ``chan`` has seen its connection go.

    A call made in the instant between the two is written to the dead connection
    and fails with "Stream removed" (a call that was sent is never sent again);
    these tests are about the calls made after the caller knows.
    """
    await server.stop(None)
    while chan.get_state() == grpc.ChannelConnectivity.READY:
        await asyncio.wait_for(chan.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)


async def get(chan: grpc.aio.Channel, timeout: float | None = 20) -> str:
    stub = executor_pb2_grpc.ExecutorServiceStub(chan)
    res = await stub.GetSandbox(executor_pb2.GetSandboxRequest(sandbox_id="sb-1"), timeout=timeout)
    return str(res.sandbox.id)


def test_a_call_made_while_the_executor_restarts_waits_for_it(tmp_path: Path, make: Make) -> None:
    address = f"unix:{tmp_path}/executor.sock"

    async def main() -> None:
        first, second = Executor(), Executor()  # type: ignore[abstract]  # only GetSandbox
        server = await serve(address, first)
        chan = make(address)
        assert await get(chan) == "sb-1"
        await stop(server, chan)  # killed ...
        call = asyncio.create_task(get(chan))
        # A new channel to the same address (a new sandbox's) waits as well.
        fresh = make(address)
        create = asyncio.create_task(get(fresh))
        await asyncio.sleep(1.5)
        assert not call.done()  # waiting, not failed
        assert not create.done()
        server = await serve(address, second)  # ... and started again
        assert await asyncio.wait_for(call, 10) == "sb-1"
        assert await asyncio.wait_for(create, 10) == "sb-1"
        assert (first.calls, second.calls) == (1, 2)  # each sent once, to the new executor
        await chan.close(None)
        await fresh.close(None)
        await server.stop(None)

    asyncio.run(main())


def test_a_first_call_to_an_executor_that_is_not_running_fails_at_once(
    tmp_path: Path, make: Make
) -> None:
    async def main() -> None:
        chan = make(f"unix:{tmp_path}/nothing-listens.sock")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(chan)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to connect" in (err.value.details() or "")
        assert loop.time() - started < 5  # not the reconnect window
        await chan.close(None)

    asyncio.run(main())


def test_the_wait_ends_at_the_window_or_the_calls_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Make
) -> None:
    address = f"unix:{tmp_path}/executor.sock"

    async def main() -> None:
        server = await serve(address, Executor())  # type: ignore[abstract]
        chan = make(address)
        await get(chan)
        await stop(server, chan)  # and never comes back
        loop = asyncio.get_running_loop()
        # The call's deadline is shorter than the window: it is kept, and the
        # call says it found no executor.
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(chan, timeout=1.0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to connect" in (err.value.details() or "")
        assert 0.9 < loop.time() - started < 5
        # No deadline: the window ends the wait.
        monkeypatch.setattr(reconnect, "RECONNECT_S", 1.0)
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get(chan, timeout=None)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 0.9 < loop.time() - started < 5
        await chan.close(None)

    asyncio.run(main())


def test_a_call_that_was_sent_is_never_made_again(tmp_path: Path, make: Make) -> None:
    address = f"unix:{tmp_path}/executor.sock"

    async def main() -> None:
        slow = Executor()  # type: ignore[abstract]
        server = await serve(address, slow)
        chan = make(address)
        await get(chan)  # reached
        slow.delay, slow.calls = 30, 0
        call = asyncio.create_task(get(chan))
        while slow.calls == 0:
            await asyncio.sleep(0.05)
        await server.stop(None)  # killed with the call in it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        again = Executor()  # type: ignore[abstract]
        server = await serve(address, again)
        await asyncio.sleep(1)
        assert again.calls == 0
        await chan.close(None)
        await server.stop(None)

    asyncio.run(main())
