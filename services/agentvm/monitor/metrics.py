"""The Prometheus metrics monitor serves (names and units: docs/MONITOR_DESIGN.md)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentvm.v1 import pool_manager_pb2, vm_manager_pb2

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_BOOT = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120)
_ACQUIRE = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

EXECUTIONS = Counter("agentvm_executions", "Executions finished, by outcome.", ["outcome"])
EXECUTION_SECONDS = Histogram(
    "agentvm_execution_duration_seconds", "Run time of executions.", buckets=_LATENCY
)
BOOT_SECONDS = Histogram(
    "agentvm_vm_boot_duration_seconds",
    "VM start to its agent answering, by kind: cold (boot), restore (from a memory "
    "template), snapshot (reverted to a memory snapshot).",
    ["kind"],
    buckets=_BOOT,
)
ACQUIRE_SECONDS = Histogram(
    "agentvm_pool_acquire_duration_seconds",
    "Time AcquireVM waited, by whether a warm VM was ready.",
    ["warm"],
    buckets=_ACQUIRE,
)
EGRESS = Counter("agentvm_egress", "Egress records (DNS and connections).", ["verdict", "kind"])
ANOMALIES = Counter(
    "agentvm_anomalies", "Anomalies detected, by rule and the response taken.", ["rule", "action"]
)
GRPC_ERRORS = Counter(
    "agentvm_grpc_errors", "Failed gRPC calls the services reported.", ["service", "code"]
)
EVENTS = Counter(
    "agentvm_monitor_events", "Events accepted, by service and type.", ["service", "type"]
)
EVENTS_LOST = Counter(
    "agentvm_monitor_events_lost",
    "Events services dropped before monitor could take them (their buffer was full).",
    ["service"],
)
AUDIT_RECORDS = Counter("agentvm_audit_records", "Records written to the audit log.")


class StateCollector(Collector):
    """Renders the last poll of VMs and pools: series exist only while their VM does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: Sequence[vm_manager_pb2.VMStats] = ()
        self._pools: Sequence[pool_manager_pb2.PoolStatus] = ()
        self._vm_count: int | None = None

    def update_vms(self, stats: Sequence[vm_manager_pb2.VMStats], count: int) -> None:
        with self._lock:
            self._vms = list(stats)
            self._vm_count = count

    def update_pools(self, pools: Sequence[pool_manager_pb2.PoolStatus]) -> None:
        with self._lock:
            self._pools = list(pools)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            vms, pools, count = self._vms, self._pools, self._vm_count
        if count is not None:
            total = GaugeMetricFamily("agentvm_vms", "VMs vm-manager runs.")
            total.add_metric([], count)
            yield total
        cpu = CounterMetricFamily("agentvm_vm_cpu_seconds", "Guest CPU time.", labels=["vm"])
        mem = GaugeMetricFamily(
            "agentvm_vm_memory_bytes",
            "QEMU's resident memory on the host (rss), the guest's total and available memory.",
            labels=["vm", "kind"],
        )
        disk = CounterMetricFamily(
            "agentvm_vm_disk_bytes", "Block I/O.", labels=["vm", "direction"]
        )
        alloc = GaugeMetricFamily(
            "agentvm_vm_disk_allocation_bytes", "Host bytes of the VM's overlay.", labels=["vm"]
        )
        net = CounterMetricFamily(
            "agentvm_vm_network_bytes", "NIC traffic.", labels=["vm", "direction"]
        )
        procs = GaugeMetricFamily("agentvm_vm_processes", "Guest process count.", labels=["vm"])
        for s in vms:
            cpu.add_metric([s.name], s.cpu_time.ToNanoseconds() / 1e9)
            mem.add_metric([s.name, "rss"], s.memory_rss_bytes)
            disk.add_metric([s.name, "read"], s.disk_read_bytes)
            disk.add_metric([s.name, "write"], s.disk_write_bytes)
            alloc.add_metric([s.name], s.disk_allocation_bytes)
            net.add_metric([s.name, "rx"], s.net_rx_bytes)
            net.add_metric([s.name, "tx"], s.net_tx_bytes)
            if s.HasField("guest"):
                mem.add_metric([s.name, "total"], s.guest.memory_total_bytes)
                mem.add_metric([s.name, "available"], s.guest.memory_available_bytes)
                procs.add_metric([s.name], s.guest.process_count)
        yield from (cpu, mem, disk, alloc, net, procs)
        size = GaugeMetricFamily("agentvm_pool_vms", "Pool VMs by state.", labels=["pool", "state"])
        target = GaugeMetricFamily(
            "agentvm_pool_target_vms", "Pool size bounds.", labels=["pool", "bound"]
        )
        for p in pools:
            name = pool_name(p.key)
            size.add_metric([name, "ready"], p.ready)
            size.add_metric([name, "in_use"], p.in_use)
            size.add_metric([name, "warming"], p.warming)
            target.add_metric([name, "min"], p.min_size)
            target.add_metric([name, "max"], p.max_size)
        yield size
        yield target


def pool_name(key: pool_manager_pb2.PoolKey) -> str:
    """A pool's label value as `agent-vm pool status` shows it: ``standard/nat-filtered``
    (``coder/standard/isolated`` for a named image's pool)."""
    from agentvm.v1 import common_pb2

    profile = common_pb2.ResourceProfile.Name(key.profile).removeprefix("RESOURCE_PROFILE_")
    network = common_pb2.NetworkMode.Name(key.network_mode).removeprefix("NETWORK_MODE_")
    word = f"{profile}/{network}".lower().replace("_", "-")
    return f"{key.image}/{word}" if key.image else word
