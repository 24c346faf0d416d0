"""executor process: `python -m agentvm.executor` (started by `agent-vm up`)."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc

from agentvm.common import logging as jsonlog
from agentvm.common import nodes
from agentvm.common.config import Settings
from agentvm.common.fleet import Fleet, FleetStub
from agentvm.common.grpc_util import aio_channel, serve
from agentvm.common.telemetry import ServiceTelemetry
from agentvm.executor.executor import AgentExecutor
from agentvm.executor.servicer import ExecutorServicer
from agentvm.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    pool_manager_pb2_grpc,
    vm_manager_pb2_grpc,
)

SERVICE = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name


async def run(settings: Settings) -> None:
    telemetry = ServiceTelemetry("executor", settings)
    # The vm-managers (one, at AGENTVM_VM_MANAGER_ADDR, unless AGENTVM_NODES* name a
    # fleet): each call goes to the node it concerns (common/fleet.py).
    fleet = Fleet(nodes.from_settings(settings), lambda address: aio_channel(address, "vm-manager"))
    pool_channel = (
        aio_channel(settings.executor_pool, "pool-manager") if settings.executor_pool else None
    )
    executor = AgentExecutor(
        settings,
        cast("vm_manager_pb2_grpc.VMManagerServiceAsyncStub", FleetStub(fleet)),
        pool_manager_pb2_grpc.PoolManagerServiceStub(pool_channel) if pool_channel else None,
        events=telemetry.events,
        fleet=fleet,
    )

    def register(server: grpc.aio.Server) -> None:
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(executor), server)

    async def on_stop() -> None:
        await executor.close()
        await fleet.close()
        if pool_channel is not None:
            await pool_channel.close(grace=None)
        await telemetry.close()

    async def ready() -> None:
        await telemetry.start()
        await fleet.start()
        await executor.start()

    await serve(
        service_name="executor",
        address=settings.executor_addr,
        register=register,
        full_service_names=[SERVICE],
        on_stop=on_stop,
        ready=ready,
        interceptors=telemetry.interceptors(),
        credentials=telemetry.server_credentials,
    )


def main() -> None:
    settings = Settings()
    jsonlog.setup("executor", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
