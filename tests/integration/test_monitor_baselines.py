"""One sandbox cannot hide another's anomaly from the monitor (issue 22, item 8), real VMs.

The attack: a guest whose executions creep upward, each just under the z-score threshold
of the baseline it is scored against, with empty runs between to keep the spread wide.
Under one baseline shared by all VMs that raises "normal" until another tenant's spike
no longer stands out. With per-VM baselines (and a prior each VM feeds only a few values)
the spike of a new sandbox is still detected.

A monitor and an executor of this test's own (alert-only responses, a short warm-up),
so the session's monitor and its thresholds are not involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import agent_vm
from agentvm.monitor.baselines import RollingBaseline
from tests.vmharness import ExecutorProcess, MonitorProcess, VMManagerProcess, wait_for

pytestmark = pytest.mark.vm

MiB = 2**20
WINDOW, WARMUP = 20, 3
RULES = f"warmup={WARMUP},window={WINDOW},max_processes=100000,denied_egress=1000000"
RESPONSES = "process_storm=alert,egress_denied=alert,cpu_pegged=alert,disk_full=alert,zscore=alert"
HONEST = 1000  # bytes of output per honest execution
CAP = 6 * MiB  # the flood's largest output
SPIKE = 14 * MiB  # the victim's anomaly


def flood_plan() -> tuple[list[int], float]:
    """The flooder's outputs: each just under what a shared baseline would flag, and the
    threshold such a baseline ends at (computed with the detector's own statistics)."""
    shared = RollingBaseline(window=WINDOW, warmup=WARMUP)
    for _ in range(10):  # the two honest sandboxes' executions
        shared.add(HONEST)
    plan = []
    for i in range(33):
        x = 0 if i % 2 else int(min(shared.mean + max(0.9 * MiB, 3.9 * shared.std), CAP))
        shared.add(x)
        plan.append(x)
    return plan, shared.mean + 4 * shared.std


@pytest.fixture
def own_monitor(vmm: VMManagerProcess) -> Iterator[tuple[MonitorProcess, Path]]:
    audit = vmm.base / "audit-baselines"
    proc = MonitorProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="monitor-baselines",
        extra_env={
            "AGENTVM_ANOMALY_RULES": RULES,
            "AGENTVM_ANOMALY_RESPONSES": RESPONSES,
            "AGENTVM_AUDIT_DIR": str(audit),
        },
    )
    proc.start()
    try:
        yield proc, audit
    finally:
        proc.stop_if_running()


@pytest.fixture
def own_executor(
    vmm: VMManagerProcess, own_monitor: tuple[MonitorProcess, Path]
) -> Iterator[ExecutorProcess]:
    proc = ExecutorProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="executor-baselines",
        extra_env={"AGENTVM_MONITOR_ADDR": own_monitor[0].address},
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()


def records(audit: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in [*sorted(audit.glob("audit-*.log")), audit / "audit.log"]:
        if f.exists():
            out.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    return out


def emit(sandbox: agent_vm.Sandbox, n: int) -> None:
    res = sandbox.run(["head", "-c", str(n), "/dev/zero"], timeout=120)
    assert res.exit_code == 0
    assert len(res.stdout_bytes) == n


def test_a_flooding_sandbox_cannot_hide_a_new_sandboxs_spike(
    own_monitor: tuple[MonitorProcess, Path], own_executor: ExecutorProcess
) -> None:
    plan, shared_limit = flood_plan()
    # Under one shared baseline the spike would pass unnoticed.
    assert shared_limit > SPIKE

    def sandbox(_: int) -> agent_vm.Sandbox:
        return agent_vm.Sandbox.create(
            network="isolated", workspace="api", address=own_executor.address
        )

    with ThreadPoolExecutor(4) as threads:
        honest_a, honest_b, flooder, victim = threads.map(sandbox, range(4))
    try:
        for sb in (honest_a, honest_b):
            for _ in range(5):
                emit(sb, HONEST)
        for n in plan:
            emit(flooder, n)
        emit(victim, SPIKE)
        _, audit = own_monitor

        def spotted() -> list[dict[str, Any]]:
            return [
                r
                for r in records(audit)
                if r["type"] == "anomaly.detected"
                and r["vm"] == victim.vm_name
                and r["attributes"]["rule"] == "zscore_output_bytes"
            ]

        assert wait_for(lambda: bool(spotted()), 30), "the victim's spike was not detected"
        (found,) = spotted()
        assert "across VMs" in found["attributes"]["description"]
        # The flooder itself never crossed its own threshold (it crept below it).
        assert not [
            r
            for r in records(audit)
            if r["type"] == "anomaly.detected" and r["vm"] == flooder.vm_name
        ]
    finally:
        for sb in (honest_a, honest_b, flooder, victim):
            sb.close()
