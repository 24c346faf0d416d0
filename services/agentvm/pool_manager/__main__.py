"""pool-manager process: `python -m agentvm.pool_manager` (started by `agent-vm up`)."""

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
from agentvm.pool_manager.backend import VMManagerBackend
from agentvm.pool_manager.manager import PoolManager, parse_pools
from agentvm.pool_manager.servicer import PoolManagerServicer
from agentvm.v1 import pool_manager_pb2, pool_manager_pb2_grpc, vm_manager_pb2_grpc

SERVICE = pool_manager_pb2.DESCRIPTOR.services_by_name["PoolManagerService"].full_name


async def run(settings: Settings) -> None:
    configs = parse_pools(settings.pools)
    telemetry = ServiceTelemetry("pool-manager", settings)
    # The vm-managers (one, at AGENTVM_VM_MANAGER_ADDR, unless AGENTVM_NODES* name a
    # fleet): pools place their VMs over the nodes (common/fleet.py).
    fleet = Fleet(nodes.from_settings(settings), lambda address: aio_channel(address, "vm-manager"))
    backend = VMManagerBackend(
        cast("vm_manager_pb2_grpc.VMManagerServiceAsyncStub", FleetStub(fleet)),
        PoolManager.labels(settings),
        settings.vm_manager_addr,
        fleet=fleet,
    )
    manager = PoolManager(settings, backend, configs, events=telemetry.events)

    def register(server: grpc.aio.Server) -> None:
        pool_manager_pb2_grpc.add_PoolManagerServiceServicer_to_server(
            PoolManagerServicer(manager), server
        )

    async def on_stop() -> None:
        await manager.close()
        await fleet.close()
        await telemetry.close()

    async def ready() -> None:
        await telemetry.start()
        await fleet.start()
        await manager.start()
        # From now on, a node that answers after being away is reconciled.
        fleet.on_up.append(manager.reconcile_node)

    await serve(
        service_name="pool-manager",
        address=settings.pool_manager_addr,
        register=register,
        full_service_names=[SERVICE],
        on_stop=on_stop,
        ready=ready,
        interceptors=telemetry.interceptors(),
        credentials=telemetry.server_credentials,
    )


def main() -> None:
    settings = Settings()
    jsonlog.setup("pool-manager", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
