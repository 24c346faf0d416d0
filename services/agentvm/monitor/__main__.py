"""monitor process: `python -m agentvm.monitor` (started by `agent-vm up`)."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import REGISTRY

from agentvm.common import logging as jsonlog
from agentvm.common.config import Settings
from agentvm.common.grpc_util import aio_channel, serve
from agentvm.common.telemetry import ServiceTelemetry
from agentvm.monitor.anomaly import Detector, Responses, Thresholds
from agentvm.monitor.metrics import StateCollector
from agentvm.monitor.monitor import Monitor, audit_from_settings
from agentvm.monitor.servicer import MonitorServicer
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc, pool_manager_pb2_grpc, vm_manager_pb2_grpc

SERVICE = monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name


async def run(settings: Settings) -> None:
    detector = Detector(
        Thresholds.parse(settings.anomaly_rules), Responses.parse(settings.anomaly_responses)
    )
    telemetry = ServiceTelemetry("monitor", settings, report_events=False)
    vmm_channel = (
        aio_channel(settings.vm_manager_addr, "vm-manager") if settings.vm_manager_addr else None
    )
    pool_channel = (
        aio_channel(settings.pool_manager_addr, "pool-manager")
        if settings.pool_manager_addr
        else None
    )
    collector = StateCollector()
    REGISTRY.register(collector)
    monitor = Monitor(
        settings,
        audit_from_settings(settings),
        detector,
        vm_manager_pb2_grpc.VMManagerServiceStub(vmm_channel) if vmm_channel else None,
        pool_manager_pb2_grpc.PoolManagerServiceStub(pool_channel) if pool_channel else None,
        collector,
    )

    def register(server: grpc.aio.Server) -> None:
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(monitor), server)

    async def on_stop() -> None:
        await monitor.close()
        for channel in (vmm_channel, pool_channel):
            if channel is not None:
                await channel.close(grace=None)
        await telemetry.close()

    await serve(
        service_name="monitor",
        address=settings.monitor_addr,
        register=register,
        full_service_names=[SERVICE],
        on_stop=on_stop,
        ready=monitor.start,
        interceptors=telemetry.interceptors(monitor),
        credentials=telemetry.server_credentials,
    )


def main() -> None:
    settings = Settings()
    jsonlog.setup("monitor", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
