"""`agent-vm bench`: the fast-start figures, each beside a baseline from the same run.

Measures, against the running services (vm-manager, pool-manager, executor):

* cold create-to-ready: CreateVM(start) + WaitVM(READY), a full boot;
* restore-to-ready: CreateVM(from_template), a memory-template clone;
* pool acquire: AcquireVM over gRPC while the pool has a ready VM, p50/p99;
* acquire + first command: AcquireVM, then Execute(['true']) on a new channel;
* N concurrent executions: ``agent_vm.run`` through the executor, wall time;
* what a caller feels (bench_latency.py): one-shot run, close, a warm command,
  the CLI's start-up, against the guest's (or host's) own time;
* QEMU resident memory per idle VM (cold-booted and template clones).

Machines differ and are noisy, so the baseline is a host
``subprocess.run(['true'])`` timed in the same run, and the ratios
(cold/restore, cold/acquire) are what to compare between runs.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agentvm.cli import bench_latency
from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition
from agentvm.common.grpc_util import Caller, sync_channel
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

PROFILE = common_pb2.RESOURCE_PROFILE_STANDARD
# What users get by default: NAT_FILTERED VMs (a NIC, an address, firewall entries).
NETWORK = common_pb2.NETWORK_MODE_NAT_FILTERED
POOL_KEY = pool_manager_pb2.PoolKey(profile=PROFILE, network_mode=NETWORK)
LABELS = {"agent-vm/owner": "bench"}


@dataclass(frozen=True)
class BenchConfig:
    cold: int = 3
    restores: int = 5
    acquires: int = 200
    first_commands: int = 10
    concurrent: int = 10
    oneshots: int = 5
    commands: int = 50


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(values: list[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    v = [x * scale for x in values]
    return {
        "n": len(v),
        "p50": round(statistics.median(v), digits),
        "p99": round(pct(v, 0.99), digits),
        "min": round(min(v), digits),
        "max": round(max(v), digits),
    }


def _qemu_proc(name: str) -> Path:
    """/proc/<pid> of the VM's QEMU process, from libvirt's pid file (OSError, ValueError)."""
    return Path(f"/proc/{int(Path(f'/run/libvirt/qemu/{name}.pid').read_text().strip())}")


def qemu_rss_mib(name: str) -> float | None:
    """Resident memory of the VM's QEMU process."""
    try:
        for line in (_qemu_proc(name) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


# QEMU's TCG code buffer: one executable anonymous mapping of this size or more
# (1 GiB by default); guest RAM is the mapping exactly the VM's memory size.
TCG_BUFFER_MIN_KIB = 256 * 1024


def qemu_rss_parts(name: str, memory_mib: int) -> dict[str, float]:
    """The VM's QEMU RSS split (MiB): see :func:`rss_parts`; {} when not readable."""
    try:
        return rss_parts((_qemu_proc(name) / "smaps").read_text(), memory_mib)
    except (OSError, ValueError):
        return {}


def rss_parts(smaps: str, memory_mib: int) -> dict[str, float]:
    """A QEMU process's RSS (from its smaps) as guest RAM resident, TCG's
    translated-code cache (none under KVM) and QEMU's own, in MiB."""
    parts = {"guest_ram": 0, "tcg_code_cache": 0, "qemu_own": 0}
    size, perms = 0, ""
    for line in smaps.splitlines():
        key, _, rest = line.partition(":")
        if " " in key:  # a mapping's header: "start-end perms offset dev inode [path]"
            perms = key.split()[1] if len(key.split()) > 1 else ""
            continue
        if key == "Size":
            size = int(rest.split()[0])
        elif key == "Rss":
            rss = int(rest.split()[0])
            if size == memory_mib * 1024 and "x" not in perms:
                parts["guest_ram"] += rss
            elif size >= TCG_BUFFER_MIN_KIB and "x" in perms:
                parts["tcg_code_cache"] += rss
            else:
                parts["qemu_own"] += rss
    return {k: round(v / 1024, 1) for k, v in parts.items()}


def ksm_state(ksm: Path = Path("/sys/kernel/mm/ksm")) -> dict[str, Any]:
    """Whether kernel same-page merging runs, and how much it merges now (MiB)."""
    try:
        run = int((ksm / "run").read_text())
        sharing = int((ksm / "pages_sharing").read_text())
    except (OSError, ValueError):
        return {"available": False}
    return {"available": True, "on": run == 1, "merged_mib": round(sharing * 4096 / 2**20, 1)}


def host_true_ms(n: int = 30) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["true"], check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


class Bench:
    def __init__(self, settings: Settings, progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.progress = progress
        caller = Caller.of(settings)
        self.vmm = vm_manager_pb2_grpc.VMManagerServiceStub(
            caller.channel(settings.vm_manager_addr, "vm-manager")
        )
        self.pool = pool_manager_pb2_grpc.PoolManagerServiceStub(
            caller.channel(settings.pool_manager_addr, "pool-manager")
        )

    def destroy(self, name: str) -> None:
        self.vmm.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=name), timeout=120)

    @contextlib.contextmanager
    def _cleanup(self) -> Iterator[list[str]]:
        names: list[str] = []
        try:
            yield names
        finally:
            for name in names:
                with contextlib.suppress(grpc.RpcError):
                    self.destroy(name)

    def _time_creates(
        self, n: int, what: str, from_template: bool
    ) -> tuple[list[float], list[float]]:
        """Seconds from CreateVM to READY for ``n`` VMs made one at a time, and their RSS.

        A cold boot is READY once WaitVM says so; a template clone is READY
        when CreateVM returns.
        """
        times, rss = [], []
        with self._cleanup() as names:
            for i in range(n):
                self.progress(f"{what} {i + 1}/{n}")
                t = time.perf_counter()
                req = vm_manager_pb2.CreateVMRequest(
                    profile=PROFILE,
                    network_mode=NETWORK,
                    start=not from_template,
                    labels=LABELS,
                    from_template=from_template,
                )
                vm = self.vmm.CreateVM(req, timeout=300).vm
                names.append(vm.name)
                if not from_template:
                    wait = vm_manager_pb2.WaitVMRequest(
                        name=vm.name, state=common_pb2.VM_STATE_READY
                    )
                    wait.timeout.FromSeconds(300)
                    self.vmm.WaitVM(wait, timeout=310)
                times.append(time.perf_counter() - t)
                if (r := qemu_rss_mib(vm.name)) is not None:
                    rss.append(r)
                self.destroy(vm.name)
                names.remove(vm.name)
        return times, rss

    def cold(self, n: int) -> tuple[list[float], list[float]]:
        return self._time_creates(n, "cold boot", from_template=False)

    def restores(self, n: int) -> tuple[list[float], list[float], vm_manager_pb2.Template]:
        self.progress("preparing the memory template")
        tpl = self.vmm.PrepareTemplate(
            vm_manager_pb2.PrepareTemplateRequest(profile=PROFILE, network_mode=NETWORK),
            timeout=900,
        ).template
        times, rss = self._time_creates(n, "template restore", from_template=True)
        return times, rss, tpl

    def _pool_status(self) -> pool_manager_pb2.PoolStatus:
        resp = self.pool.GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=10)
        for st in resp.pools:
            if st.key.profile == PROFILE and st.key.network_mode == NETWORK:
                return st
        raise FailedPrecondition(
            "pool-manager has no standard NAT pool: set "
            "AGENTVM_POOLS=standard:min=2,max=10,network=nat-filtered "
            "and restart it (agent-vm down; agent-vm up)"
        )

    def wait_ready(self, timeout: float = 300.0, full: bool = False) -> pool_manager_pb2.PoolStatus:
        """Wait for a ready VM (``full``: for the pool to be refilled and quiet)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._pool_status()
            enough = st.ready >= max(1, st.min_size) and st.warming == 0 if full else st.ready >= 1
            if enough and st.template_ready:
                return st
            if time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"the pool had no ready template VM within {timeout:.0f} s: see "
                    "`agent-vm pool status` and the pool-manager log"
                )
            time.sleep(0.02)

    def acquires(self, n: int, first_commands: int) -> dict[str, Any]:
        """Acquire (timed) from a refilled pool; release (untimed) so it refills.

        Each acquire waits until the pool is back at its minimum with nothing
        being made: the steady state of a pool sized ahead of demand. (While
        VMs are being restored they keep host cores busy, and under TCG on a
        small host that shows up as scheduling noise in every process.)
        """
        acquire_ms, first_ms, policy_ms, idle_rss = [], [], [], []
        idle_parts: list[dict[str, float]] = []
        st = self.wait_ready(full=True)
        for i in range(n):
            if i % 20 == 0:
                self.progress(f"pool acquire {i + 1}/{n}")
            self.wait_ready(full=True)
            if i == 0:
                for vm in self.vmm.ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=30).vms:
                    r = qemu_rss_mib(vm.name)
                    if vm.labels.get("agent-vm/owner") == "pool-manager" and r is not None:
                        idle_rss.append(r)
                        parts = qemu_rss_parts(vm.name, vm.resources.memory_mib)
                        if parts:
                            idle_parts.append(parts)
            req = pool_manager_pb2.AcquireVMRequest(key=POOL_KEY, labels=LABELS)
            req.timeout.FromSeconds(300)
            t = time.perf_counter()
            got = self.pool.AcquireVM(req, timeout=310)
            acquire_ms.append((time.perf_counter() - t) * 1000)
            try:
                if i < first_commands:
                    # What the executor does next with a pooled NAT VM: its policy.
                    p = time.perf_counter()
                    self.vmm.UpdateNetworkPolicy(
                        vm_manager_pb2.UpdateNetworkPolicyRequest(
                            name=got.vm.name,
                            policy=common_pb2.NetworkPolicy(allow_domains=["pypi.org"]),
                        ),
                        timeout=60,
                    )
                    policy_ms.append((time.perf_counter() - p) * 1000)
                    with sync_channel(got.vm.agent_endpoint) as ch:
                        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
                        ex = guest_agent_pb2.ExecuteRequest(
                            program=common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
                        )
                        for _ in stub.Execute(ex, timeout=60):
                            pass
                    first_ms.append((time.perf_counter() - t) * 1000)
            finally:
                self.pool.ReleaseVM(
                    pool_manager_pb2.ReleaseVMRequest(lease_id=got.lease_id), timeout=120
                )
        return {
            "acquire_ms": acquire_ms,
            "first_ms": first_ms,
            "policy_ms": policy_ms,
            "idle_rss": idle_rss,
            "idle_parts": idle_parts,
            "pool": {"min": st.min_size, "max": st.max_size},
        }

    def concurrent(self, n: int) -> dict[str, Any]:
        """``n`` one-shot runs at once: wall time, each run's time, and how many
        came from the pool (its acquire counters before and after)."""
        import agent_vm  # the public client, as a caller would use it

        self.progress(f"{n} concurrent executions through the executor")
        self.wait_ready(full=True)
        before = self._pool_status()

        def one(i: int) -> tuple[str, float]:
            t = time.perf_counter()
            res = agent_vm.run(
                code=f"print({i} * {i})", address=self.settings.executor_addr, timeout=300
            )
            if res.exit_code != 0 or res.stdout.strip() != str(i * i):
                raise FailedPrecondition(f"run {i} returned {res.exit_code}: {res.stderr}")
            return res.vm_name, time.perf_counter() - t

        t = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            runs = list(ex.map(one, range(n)))
        wall = time.perf_counter() - t
        after = self._pool_status()
        acquired = after.acquired_total - before.acquired_total
        on_demand = after.on_demand_total - before.on_demand_total
        return {
            "n": n,
            "wall_s": round(wall, 2),
            "distinct_vms": len({name for name, _ in runs}),
            "per_run_s": summary([took for _, took in runs], digits=2),
            "from_pool_ready": acquired - on_demand,
            "from_pool_made_on_demand": on_demand,
            "made_by_the_executor": n - acquired,
        }


def run(settings: Settings, cfg: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    bench = Bench(settings, progress)
    host = bench.vmm.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=30)
    base = host_true_ms()
    cold, cold_rss = bench.cold(cfg.cold)
    restores, clone_rss, tpl = bench.restores(cfg.restores)
    pool = bench.acquires(cfg.acquires, cfg.first_commands)
    concurrent = bench.concurrent(cfg.concurrent)
    latency = bench_latency.figures(bench, cfg.oneshots, cfg.commands, progress)
    base_after = host_true_ms()
    cold_p50 = statistics.median(cold)
    restore_p50 = statistics.median(restores)
    acquire_p50_s = statistics.median(pool["acquire_ms"]) / 1000
    return {
        "machine": {
            "accelerator": common_pb2.Accelerator.Name(host.accelerator).removeprefix(
                "ACCELERATOR_"
            ),
            "accelerator_reason": host.accelerator_reason,
            "qemu": host.qemu_version,
            "libvirt": host.libvirt_version,
            "host_kernel": platform.release(),
            "profile": "standard",
        },
        "baseline_host_true_ms": summary(base + base_after),
        "cold_create_to_ready_s": summary(cold),
        "restore_to_ready_s": summary(restores),
        "template": {
            "key": tpl.key,
            "memory_state_mib": round(tpl.memory_state_bytes / 2**20, 1),
            "build_s": round(tpl.build_duration.ToNanoseconds() / 1e9, 2),
        },
        "pool_acquire_ms": summary(pool["acquire_ms"], digits=2),
        "acquire_and_first_command_ms": summary(pool["first_ms"], digits=1),
        "network_policy_update_ms": summary(pool["policy_ms"], digits=1),
        "pool_size": pool["pool"],
        "concurrent_executions": concurrent,
        "latency": latency,
        "host_ksm": ksm_state(),
        "qemu_rss_mib": {
            "cold_booted_ready_vm": round(statistics.median(cold_rss), 1) if cold_rss else None,
            "template_clone": round(statistics.median(clone_rss), 1) if clone_rss else None,
            "idle_pool_vm": round(statistics.median(pool["idle_rss"]), 1)
            if pool["idle_rss"]
            else None,
            # Of which (medians): guest RAM resident, TCG's code cache, QEMU's own.
            "idle_pool_vm_parts": {
                k: round(statistics.median(p[k] for p in pool["idle_parts"]), 1)
                for k in ("guest_ram", "tcg_code_cache", "qemu_own")
            }
            if pool["idle_parts"]
            else None,
        },
        "ratios": {
            "cold_over_restore": round(cold_p50 / restore_p50, 2),
            "cold_over_acquire": round(cold_p50 / acquire_p50_s, 1),
            "acquire_p50_over_host_true_p50": round(
                statistics.median(pool["acquire_ms"]) / statistics.median(base + base_after), 2
            ),
        },
    }


def render(fig: dict[str, Any]) -> str:
    """A plain-text report of ``run``'s figures."""
    m = fig["machine"]
    lines = [
        f"machine: {m['accelerator']} ({m['accelerator_reason']}), QEMU {m['qemu']}, "
        f"libvirt {m['libvirt']}, host kernel {m['host_kernel']}, profile {m['profile']}",
        f"baseline host `true`: p50 {fig['baseline_host_true_ms']['p50']} ms",
    ]

    def row(label: str, key: str, unit: str) -> None:
        s = fig[key]
        lines.append(
            f"{label}: p50 {s['p50']} {unit}, p99 {s['p99']} {unit} "
            f"(min {s['min']}, max {s['max']}, n={s['n']})"
        )

    row("cold create-to-ready", "cold_create_to_ready_s", "s")
    row("restore-to-ready (template clone)", "restore_to_ready_s", "s")
    row("pool acquire", "pool_acquire_ms", "ms")
    row("acquire + first command", "acquire_and_first_command_ms", "ms")
    row("network policy update (pooled NAT VM)", "network_policy_update_ms", "ms")
    c = fig["concurrent_executions"]
    p = c["per_run_s"]
    lines.append(
        f"{c['n']} concurrent executions: {c['wall_s']} s wall, {c['distinct_vms']} distinct "
        f"VMs; each p50 {p['p50']} s, p99 {p['p99']} s; {c['from_pool_ready']} from ready "
        f"pool VMs, {c['from_pool_made_on_demand']} made on demand by the pool, "
        f"{c['made_by_the_executor']} made by the executor"
    )
    lines += bench_latency.render(fig["latency"])
    r = fig["qemu_rss_mib"]
    lines.append(
        f"QEMU RSS: cold-booted {r['cold_booted_ready_vm']} MiB, clone {r['template_clone']} "
        f"MiB, idle pool VM {r['idle_pool_vm']} MiB"
    )
    if parts := r.get("idle_pool_vm_parts"):
        lines.append(
            f"  idle pool VM: guest RAM {parts['guest_ram']} MiB, TCG code cache "
            f"{parts['tcg_code_cache']} MiB (none under KVM), QEMU {parts['qemu_own']} MiB"
        )
    k = fig["host_ksm"]
    lines.append(
        "KSM: "
        + (
            "not in this kernel"
            if not k["available"]
            else f"{'on' if k['on'] else 'off'}, {k['merged_mib']} MiB merged"
        )
    )
    q = fig["ratios"]
    lines.append(
        f"ratios: cold/restore {q['cold_over_restore']}x, cold/acquire "
        f"{q['cold_over_acquire']}x, acquire/host-true {q['acquire_p50_over_host_true_p50']}x"
    )
    return "\n".join(lines)
