"""What a soak checks at its end: leaks of every kind, the audit chain, service memory.

Blocking calls (gRPC, libvirt, ``ip``, ``nft``, files); the runner calls them
from a thread. docs/RELIABILITY.md lists what each check means.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentvm.common.config import Settings
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
)

__all__ = [
    "RssSample",
    "audit_problems",
    "held_vms",
    "leaks",
    "memory_failures",
    "rss_growth",
    "rss_series",
    "service_pids",
]

# A service whose memory grows faster than this per 1 000 operations fails the
# run. Growth is pooled over every process life of the service (a leak shows in
# each life in proportion to the operations it served), each life's first
# WARMUP_OPS operations left out (imports, caches and pools filling are not a
# leak), and judged once the pooled lives served JUDGE_GROWTH_OPS (fewer: too
# small a sample). A long run kills each service every few minutes, so no one
# life lives long enough to be judged alone.
MAX_GROWTH_MIB_PER_1K = 50.0
JUDGE_GROWTH_OPS = 500
WARMUP_OPS = 100


def _domains(settings: Settings) -> dict[str, ET.Element]:
    import libvirt  # the soak's only libvirt use; kept out of `agent-vm --help`

    conn = libvirt.open(settings.libvirt_uri)
    try:
        return {
            d.name(): ET.fromstring(d.XMLDesc(0))  # noqa: S314 - libvirt's XML of our domains
            for d in conn.listAllDomains(0)
            if d.name().startswith(settings.vm_prefix)
        }
    finally:
        conn.close()


def _domain_devices(domains: dict[str, ET.Element]) -> tuple[set[str], set[str]]:
    """The tap names and MAC addresses the domains' XML holds."""
    taps: set[str] = set()
    macs: set[str] = set()
    for xml in domains.values():
        for iface in xml.iterfind("./devices/interface"):
            target = iface.find("target")
            if target is not None and target.get("dev"):
                taps.add(str(target.get("dev")))
            mac = iface.find("mac")
            if mac is not None and mac.get("address"):
                macs.add(str(mac.get("address")).lower())
    return taps, macs


def _host_taps(prefixes: Sequence[str]) -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    names = {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}
    return {n for n in names if n.startswith(tuple(prefixes))}


def _nft_macs(table: str) -> set[str] | None:
    """MACs in the table's ``pairs`` set (None: no such table, e.g. no NAT VM yet)."""
    proc = subprocess.run(
        ["nft", "-j", "list", "set", "inet", table, "pairs"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        return None
    macs: set[str] = set()
    for item in json.loads(proc.stdout).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []) or []:
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if concat is None and isinstance(elem, dict) and "elem" in elem:
                concat = elem["elem"].get("val", {}).get("concat")
            for part in concat or []:
                if isinstance(part, str) and part.count(":") == 5:
                    macs.add(part.lower())
    return macs


def leaks(settings: Settings, run_id: str, label: str) -> list[str]:
    """Everything of the installation that should not be there once the run's
    sandboxes are closed and their teardowns done (empty: nothing leaked)."""
    from agentvm.cli.base import service, vm_stub
    from agentvm.executor.sandbox import SANDBOX_LABEL, orphaned_vms
    from agentvm.vm_manager import workspace
    from agentvm.vm_manager.netpolicy import NetNames

    found: list[str] = []
    stub = executor_pb2_grpc.ExecutorServiceStub(service(settings.executor_addr, "executor"))
    listed = stub.ListSandboxes(executor_pb2.ListSandboxesRequest(), timeout=60).sandboxes
    open_ids = {sb.id for sb in listed}
    found += [f"sandbox {sb.id} of this run still open" for sb in listed
              if sb.metadata.get(label) == run_id]  # fmt: skip
    vms = list(vm_stub().ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=60).vms)
    # An executor's VM, or a pool VM leased to a sandbox (it carries the
    # sandbox's label), whose sandbox is not open.
    orphans = {v.name for v in orphaned_vms(vms, open_ids, now=time.time())}
    orphans |= {
        v.name for v in vms if SANDBOX_LABEL in v.labels and v.labels[SANDBOX_LABEL] not in open_ids
    }
    found += [f"VM {n} of no open sandbox" for n in sorted(orphans)]
    found += _pool_leaks(settings, vms)
    names = {v.name for v in vms}
    domains = _domains(settings)
    found += [f"domain {d} unknown to vm-manager" for d in sorted(set(domains) - names)]
    found += [f"VM {n} without a domain" for n in sorted(names - set(domains))]
    for root in (settings.state_dir / "vms", settings.run_dir / "vms"):
        if root.is_dir():
            found += [f"path {p} of no VM" for p in sorted(root.iterdir()) if p.name not in names]
    vm_dirs = tuple(str(settings.state_dir / "vms" / n) for n in names)
    found += [
        f"mount {m} outside a VM's directory"
        for m in workspace.mounts_under(settings.state_dir)
        # (The state directory may be a file system of its own: state-disk-full.)
        if m != Path(os.path.realpath(settings.state_dir))
        and (not str(m).startswith(vm_dirs) or not vm_dirs)
    ]
    net = NetNames.for_prefix(settings.vm_prefix)
    taps, macs = _domain_devices(domains)
    found += [
        f"tap {t} of no domain"
        for t in sorted(_host_taps([net.tap_prefix, net.bridged_prefix]) - taps)
    ]
    in_nft = _nft_macs(net.table)
    found += [f"nft element for MAC {m} of no domain" for m in sorted((in_nft or set()) - macs)]
    return found


def _pool_leaks(settings: Settings, vms: Sequence[common_pb2.VM]) -> list[str]:
    """More VMs of this installation's pool-manager than its pools hold (ready, in use
    or warming): one its pools lost track of."""
    from agentvm.cli.base import service

    mine = [
        v for v in vms
        if v.labels.get("agent-vm/owner") == "pool-manager"
        and v.labels.get("agent-vm/pool-manager") == settings.pool_manager_addr
    ]  # fmt: skip
    if not mine:
        return []
    stub = pool_manager_pb2_grpc.PoolManagerServiceStub(
        service(settings.pool_manager_addr, "pool-manager")
    )
    pools = stub.GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=60).pools
    held = sum(p.ready + p.in_use + p.warming for p in pools)
    if len(mine) <= held:
        return []
    names = ", ".join(sorted(v.name for v in mine))
    return [f"{len(mine)} pool VMs ({names}) but the pools hold {held}"]


def audit_problems(
    audit_dir: Path,
    since: float,
    kills: dict[str, int],
    panicked: Sequence[str] = (),
    libvirtd_restarts: int = 0,
) -> list[str]:
    """The chain's problems, events logged more than once (ids are unique: a batch
    reported again must be taken once), and each fault without its record: a service
    kill without ``service.restarted``, a panicked guest's VM without ``vm.failed``,
    a libvirtd restart without vm-manager's ``libvirt.reconnected``."""
    from agentvm.monitor import audit as audit_log

    files = audit_log.log_files(audit_dir)
    if not files:
        return [f"no audit log in {audit_dir}"]
    head = audit_dir / audit_log.HEAD_NAME
    result = audit_log.verify(files, head if head.exists() else None)
    problems = [f"audit chain: {p}" for p in result.problems]
    restarted: dict[str, int] = {}
    seen: dict[str, int] = {}
    failed_vms: set[str] = set()
    reconnects = 0
    for path in files:
        with path.open("rb") as f:
            for line in f:
                try:
                    rec: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue  # a torn last line: the chain check names it
                when = audit_log.parse_time(str(rec.get("time", "")))
                if when is None or when < since:
                    continue
                event_id = str(rec.get("event_id", ""))
                if event_id:
                    seen[event_id] = seen.get(event_id, 0) + 1
                if rec.get("type") == "service.restarted":
                    svc = str(rec.get("service", ""))
                    restarted[svc] = restarted.get(svc, 0) + 1
                elif rec.get("type") == "vm.failed":
                    failed_vms.add(str(rec.get("vm", "")))
                elif rec.get("type") == "libvirt.reconnected":
                    reconnects += 1
    twice = sorted(i for i, n in seen.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} events logged more than once, e.g. {', '.join(twice[:3])}")
    for svc, n in sorted(kills.items()):
        if restarted.get(svc, 0) < n:
            problems.append(
                f"{svc} was killed {n} times; the audit log has "
                f"{restarted.get(svc, 0)} service.restarted records for it"
            )
    problems += [
        f"the guest of {vm} panicked; the audit log has no vm.failed record of it"
        for vm in panicked
        if vm not in failed_vms
    ]
    if reconnects < libvirtd_restarts:
        problems.append(
            f"libvirtd was restarted {libvirtd_restarts} times; the audit log has "
            f"{reconnects} libvirt.reconnected records"
        )
    return problems


def held_vms() -> list[str]:
    """The VMs vm-manager holds for a full disk (QEMU paused them: diskfull.py)."""
    from agentvm.cli.base import vm_stub
    from agentvm.vm_manager.diskfull import HELD

    vms = vm_stub().ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=60).vms
    ready = common_pb2.VM_STATE_READY
    return [v.name for v in vms if v.state == ready and v.error.startswith(HELD)]


def service_pids(settings: Settings) -> dict[str, tuple[int | None, str]]:
    """Each service's pid (from the supervisor) and health."""
    from agentvm.cli.bringup_cmds import status_rows

    _sup, rows = status_rows(settings)
    return {r["service"]: (r["pid"], r["status"]) for r in rows}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class RssSample:
    at_s: float
    service: str
    pid: int
    rss_kib: int
    ops: int


def _per_1k(growth_mib: float, ops: int) -> float | None:
    return round(growth_mib * 1000 / ops, 1) if ops else None


def _after_warmup(life: list[RssSample]) -> tuple[int, float]:
    """Operations served and MiB grown by one process after its warm-up."""
    warm = [s for s in life if s.ops - life[0].ops >= WARMUP_OPS]
    if not warm:
        return 0, 0.0
    return warm[-1].ops - warm[0].ops, (warm[-1].rss_kib - warm[0].rss_kib) / 1024


def rss_growth(samples: Sequence[RssSample]) -> dict[str, dict[str, Any]]:
    """Per service: first and last RSS; the growth per 1 000 operations over the
    process (pid) that lived through the most operations; and the growth pooled
    over every life after its warm-up (what :func:`memory_failures` judges)."""
    out: dict[str, dict[str, Any]] = {}
    for svc in sorted({s.service for s in samples}):
        mine = [s for s in samples if s.service == svc]
        by_pid: dict[int, list[RssSample]] = {}
        for s in mine:
            by_pid.setdefault(s.pid, []).append(s)
        life = max(by_pid.values(), key=lambda ss: (ss[-1].ops - ss[0].ops, len(ss)))
        ops = life[-1].ops - life[0].ops
        warm = [_after_warmup(ss) for ss in by_pid.values()]
        pooled_ops = sum(n for n, _ in warm)
        out[svc] = {
            "first_rss_mib": round(mine[0].rss_kib / 1024, 1),
            "last_rss_mib": round(mine[-1].rss_kib / 1024, 1),
            "max_rss_mib": round(max(s.rss_kib for s in mine) / 1024, 1),
            "processes": len(by_pid),
            "longest_life_ops": ops,
            "growth_mib_per_1k_ops": _per_1k((life[-1].rss_kib - life[0].rss_kib) / 1024, ops),
            "pooled_ops": pooled_ops,
            "pooled_growth_mib_per_1k_ops": _per_1k(sum(g for _, g in warm), pooled_ops),
        }
    return out


def memory_failures(growth: dict[str, dict[str, Any]]) -> list[str]:
    """The services of :func:`rss_growth` whose pooled growth is past the bound."""
    return [
        f"{svc} grew {v['pooled_growth_mib_per_1k_ops']} MiB per 1 000 operations over "
        f"{v['pooled_ops']} served after warm-up by {v['processes']} process(es) "
        f"(bound {MAX_GROWTH_MIB_PER_1K:g})"
        for svc, v in growth.items()
        if v["pooled_ops"] >= JUDGE_GROWTH_OPS
        and (v["pooled_growth_mib_per_1k_ops"] or 0) > MAX_GROWTH_MIB_PER_1K
    ]


def rss_series(samples: Sequence[RssSample]) -> dict[str, list[list[float]]]:
    """Per service, [seconds, RSS MiB, pid] of every sample, for the report and its plot."""
    out: dict[str, list[list[float]]] = {}
    for x in samples:
        out.setdefault(x.service, []).append([round(x.at_s, 1), round(x.rss_kib / 1024, 1), x.pid])
    return dict(sorted(out.items()))
