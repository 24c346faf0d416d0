"""The boot benchmark runs and prints its figures (no timing assertions here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.vmharness import REPO, ExecutorProcess, VMManagerProcess

pytestmark = pytest.mark.vm


def test_boot_benchmark_prints_figures(vmm: VMManagerProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.performance.bench_boot", "--vms", "2", "--calls", "10"],
        env=vmm.env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    sys.stderr.write(proc.stdout)
    assert figures["cold_create_to_ready_s"]["n"] == 2
    assert figures["exec_true_round_trip_ms"]["n"] == 10
    assert figures["cold_create_to_ready_s"]["p50"] > 0
    assert figures["memory_snapshot_restore_to_ready_s"]["n"] == 2
    assert figures["qemu_rss_per_ready_vm_mib"]["n"] == 2
    assert figures["ratios"]["exec_p50_over_host_true_p50"] > 0


def test_executor_benchmark_prints_figures(executor: ExecutorProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.performance.bench_executor", "--calls", "10", "--mib", "4"],
        env=executor.env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    sys.stderr.write(proc.stdout)
    assert figures["exec_true_round_trip_ms"]["n"] == 10
    for mode in ("shared", "api"):
        assert figures[f"transfer_{mode}_mb_s"]["upload"] > 0
        assert figures[f"transfer_{mode}_mb_s"]["download"] > 0
