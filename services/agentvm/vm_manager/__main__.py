"""vm-manager process: `python -m agentvm.vm_manager` (started by `agent-vm up`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from agentvm.common import logging as jsonlog
from agentvm.common.config import Settings
from agentvm.common.grpc_util import serve, translate_unexpected
from agentvm.common.telemetry import ServiceTelemetry
from agentvm.v1 import vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager.accel import detect
from agentvm.vm_manager.agent_proxy import SERVICE as AGENT_SERVICE
from agentvm.vm_manager.agent_proxy import AgentProxy
from agentvm.vm_manager.hostcaps import can_raise_memlock
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, connection_lost
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.servicer import VMManagerServicer

SERVICE = vm_manager_pb2.DESCRIPTOR.services_by_name["VMManagerService"].full_name
log = logging.getLogger("agentvm.vm_manager")


async def run(settings: Settings) -> None:
    accel = detect(settings.accel)
    log.info("accelerator %s: %s", accel.accel.value, accel.reason)
    memlock = can_raise_memlock()
    if not memlock:
        log.warning(
            "cannot raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE): VMs run without a memory hard "
            "limit and CPU/IO cgroup tuning still applies"
        )
    conn = LibvirtConnection(settings.libvirt_uri)
    # A libvirtd restart under a read not translated where it happens is still
    # UNAVAILABLE "try again", not INTERNAL (logged as the bug it is).
    translate_unexpected(connection_lost)
    images = ImageStore(settings.cache_dir)
    telemetry = ServiceTelemetry("vm-manager", settings)
    manager = VMManager(
        settings, conn, images, accel, memory_limit=memlock, events=telemetry.events
    )

    proxy = AgentProxy(manager)

    def register(server: grpc.aio.Server) -> None:
        vm_manager_pb2_grpc.add_VMManagerServiceServicer_to_server(
            VMManagerServicer(manager, images), server
        )
        # GuestAgentService, forwarded to the named VM's agent (agent_proxy.py).
        server.add_generic_rpc_handlers((proxy,))

    async def ready() -> None:
        await telemetry.start()
        try:
            await manager.recover()
        except Exception:  # libvirt down at start: serve anyway, calls report it
            log.exception("recovery of existing VMs failed")
        manager.recovered = True  # GetNode says so: fleets may place here now
        manager.watch()

    async def on_stop() -> None:
        await proxy.close()
        await manager.close()
        conn.close()
        await telemetry.close()

    await serve(
        service_name="vm-manager",
        address=settings.vm_manager_addr,
        register=register,
        full_service_names=[SERVICE, AGENT_SERVICE.full_name],
        on_stop=on_stop,
        ready=ready,
        interceptors=telemetry.interceptors(),
        credentials=telemetry.server_credentials,
    )


def main() -> None:
    settings = Settings()
    jsonlog.setup("vm-manager", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
