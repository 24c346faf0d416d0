"""close() of a sandbox handle against a real gRPC server whose CloseSandbox fails.

The 60-minute soak (docs/RELIABILITY.md) left a sandbox open: its close came
while the executor restarted, failed with UNAVAILABLE, and the handle called
itself closed, so the soak's second close() at the end was a no-op.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

import agent_vm
from agent_vm import _async
from agentvm.v1 import executor_pb2, executor_pb2_grpc


class Executor(executor_pb2_grpc.ExecutorServiceServicer):
    """CloseSandbox answers the codes in ``fail`` first, then OK."""

    def __init__(self, fail: list[grpc.StatusCode]) -> None:
        self.fail = fail
        self.calls: list[str] = []

    async def CloseSandbox(
        self, request: executor_pb2.CloseSandboxRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.CloseSandboxResponse:
        self.calls.append(request.sandbox_id)
        if self.fail:
            await context.abort(self.fail.pop(0), "the executor is restarting")
        return executor_pb2.CloseSandboxResponse()


@asynccontextmanager
async def served(tmp_path: Path, servicer: Executor) -> AsyncIterator[str]:
    server = grpc.aio.server()
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    address = f"unix:{tmp_path}/executor.sock"
    server.add_insecure_port(address)
    await server.start()
    try:
        yield address
    finally:
        await server.stop(None)


def handle(address: str) -> _async.AsyncSandbox:
    channel = grpc.aio.insecure_channel(address)
    return _async.AsyncSandbox(address, channel, executor_pb2.Sandbox(id="sb-1"))


def test_close_is_made_again_while_the_executor_is_unavailable(tmp_path: Path) -> None:
    servicer = Executor([grpc.StatusCode.UNAVAILABLE] * 3)  # type: ignore[abstract]  # only CloseSandbox is called

    async def main() -> None:
        async with served(tmp_path, servicer) as address:
            sb = handle(address)
            await sb.close()
            assert sb.closed
            assert servicer.calls == ["sb-1"] * 4
            await sb.close()  # idempotent: no further call
            assert len(servicer.calls) == 4

    asyncio.run(main())


def test_a_failed_close_leaves_the_handle_open_to_close_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_async, "CLOSE_RETRY_S", 0.0)  # give up at the first failure
    servicer = Executor([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])  # type: ignore[abstract]  # only CloseSandbox is called

    async def main() -> None:
        async with served(tmp_path, servicer) as address:
            sb = handle(address)
            with pytest.raises(agent_vm.UnavailableError):
                await sb.close()
            assert not sb.closed
            with pytest.raises(agent_vm.AgentVMError):
                await sb.close()  # INTERNAL: not retried, raised
            assert not sb.closed
            await sb.close()
            assert sb.closed
            assert servicer.calls == ["sb-1"] * 3

    asyncio.run(main())


def test_a_close_of_an_unreachable_executor_gives_up_after_the_retry_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_async, "CLOSE_RETRY_S", 1.0)

    async def main() -> None:
        sb = handle(f"unix:{tmp_path}/nothing-listens.sock")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(agent_vm.UnavailableError, match="executor"):
            await sb.close()
        assert loop.time() - started < 30  # the retry window, not a call's 120 s timeout
        assert not sb.closed

    asyncio.run(main())
