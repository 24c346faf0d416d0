"""What vm-manager tells the monitor: per-VM resource figures and forensic evidence.

Figures come from libvirt's bulk domain stats (host-side, trustworthy) and,
optionally, from each guest agent's GetStatus (guest-side, hostile: every
number is clamped to what the VM could possibly have, every string cut short).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import libvirt

from agentvm.common.errors import FailedPrecondition
from agentvm.v1 import common_pb2, vm_manager_pb2
from agentvm.vm_manager.dnsproxy import EgressRecord
from agentvm.vm_manager.libvirt_conn import libvirt_errors

log = logging.getLogger("agentvm.vm_manager.observe")

STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
MAX_PROCESSES = 4_194_304  # the kernel's pid_max ceiling
MAX_TEXT = 256
MAX_UPTIME_S = 315_576_000_000  # the largest google.protobuf.Duration (10,000 years)


def _int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    return int(value) if isinstance(value, int) and value > 0 else 0


def bulk_stats(
    conn: libvirt.virConnect, doms: list[libvirt.virDomain]
) -> dict[str, dict[str, Any]]:
    """libvirt's stats of ``doms`` (running ones), by domain name."""
    if not doms:
        return {}
    with libvirt_errors("reading domain statistics"):
        pairs = conn.domainListGetStats(doms, STATS, 0)
    return {dom.name(): dict(raw) for dom, raw in pairs}


def stats_proto(
    name: str,
    labels: Mapping[str, str],
    raw: Mapping[str, Any],
    memory_max_bytes: int,
) -> vm_manager_pb2.VMStats:
    """One VM's libvirt figures as a VMStats (guest part left unset)."""
    msg = vm_manager_pb2.VMStats(
        name=name,
        labels=dict(labels),
        vcpus=_int(raw, "vcpu.current"),
        memory_rss_bytes=_int(raw, "balloon.rss") * 1024,
        memory_max_bytes=memory_max_bytes,
    )
    msg.time.FromNanoseconds(time.time_ns())
    msg.cpu_time.FromNanoseconds(_int(raw, "cpu.time"))
    for i in range(_int(raw, "block.count")):
        msg.disk_read_bytes += _int(raw, f"block.{i}.rd.bytes")
        msg.disk_write_bytes += _int(raw, f"block.{i}.wr.bytes")
        msg.disk_allocation_bytes += _int(raw, f"block.{i}.physical") or _int(
            raw, f"block.{i}.allocation"
        )
    for i in range(_int(raw, "net.count")):
        msg.net_rx_bytes += _int(raw, f"net.{i}.rx.bytes")
        msg.net_tx_bytes += _int(raw, f"net.{i}.tx.bytes")
    return msg


def sanitize_guest(info: common_pb2.GuestInfo, memory_max_bytes: int) -> common_pb2.GuestInfo:
    """A copy of what a guest said, bounded to what its VM could have."""
    mem_cap = max(memory_max_bytes, 1) * 2
    disk_cap = 1 << 50

    def text(value: str) -> str:
        return value[:MAX_TEXT]

    def load(value: float) -> float:
        return value if 0.0 <= value <= 1e6 else 0.0

    out = common_pb2.GuestInfo(
        agent_version=text(info.agent_version),
        kernel_release=text(info.kernel_release),
        hostname=text(info.hostname),
        load1=load(info.load1),
        load5=load(info.load5),
        load15=load(info.load15),
        memory_total_bytes=min(info.memory_total_bytes, mem_cap),
        memory_available_bytes=min(info.memory_available_bytes, info.memory_total_bytes, mem_cap),
        disk_total_bytes=min(info.disk_total_bytes, disk_cap),
        disk_free_bytes=min(info.disk_free_bytes, info.disk_total_bytes, disk_cap),
        process_count=min(info.process_count, MAX_PROCESSES),
        boot_id=text(info.boot_id),
        machine_id=text(info.machine_id),
    )
    up = info.uptime
    # Only a valid, non-negative Duration: anything else would make every later
    # JSON rendering of the message (CLI, evidence metadata) fail.
    if info.HasField("uptime") and 0 <= up.seconds <= MAX_UPTIME_S and 0 <= up.nanos < 10**9:
        out.uptime.CopyFrom(up)
    return out


@dataclasses.dataclass(frozen=True)
class Evidence:
    path: Path
    memory_bytes: int
    disk_bytes: int


def capture(
    dom: libvirt.virDomain,
    *,
    directory: Path,
    overlay: Path,
    metadata: Mapping[str, Any],
    egress: list[EgressRecord],
    include_memory: bool,
) -> Evidence:
    """Pause ``dom`` and preserve it under ``directory`` (which must not exist)."""
    directory.mkdir(parents=True, mode=0o700)
    with libvirt_errors(f"pausing {dom.name()} for evidence"):
        if not dom.isActive():
            raise FailedPrecondition(f"VM {dom.name()} is not running: nothing to capture")
        state, _ = dom.state()
        if state != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()
    memory_bytes = 0
    if include_memory:
        dump = directory / "memory.elf"
        with libvirt_errors(f"dumping the memory of {dom.name()}"):
            dom.coreDumpWithFormat(
                str(dump),
                libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                libvirt.VIR_DUMP_MEMORY_ONLY,
            )
        memory_bytes = dump.stat().st_size
    disk = directory / "overlay.qcow2"
    disk_bytes = 0
    if overlay.exists():
        shutil.copyfile(overlay, disk)
        disk_bytes = disk.stat().st_size
    (directory / "domain.xml").write_text(dom.XMLDesc(0))
    (directory / "metadata.json").write_text(
        json.dumps({**metadata, "captured_at": time.time()}, indent=2, sort_keys=True)
    )
    with open(directory / "egress.jsonl", "w", encoding="utf-8") as fh:
        for rec in egress:
            fh.write(json.dumps(dataclasses.asdict(rec), sort_keys=True) + "\n")
    for entry in directory.iterdir():
        os.chmod(entry, 0o600)
    log.warning(
        "evidence of %s captured in %s",
        dom.name(),
        directory,
        extra={"vm": dom.name(), "memory_bytes": memory_bytes, "disk_bytes": disk_bytes},
    )
    return Evidence(directory, memory_bytes, disk_bytes)
