"""The boot benchmark runs and prints its figures (no timing assertions here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentvm.v1 import vm_manager_pb2
from tests.vmharness import REPO, ExecutorProcess, PoolManagerProcess, VMManagerProcess

pytestmark = pytest.mark.vm


def run_figures(argv: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Run a benchmark that prints JSON; (its figures, its stderr). Fails on a non-zero exit."""
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, cwd=REPO, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr
    sys.stderr.write(proc.stdout)
    return json.loads(proc.stdout), proc.stderr


def test_boot_benchmark_prints_figures(vmm: VMManagerProcess) -> None:
    figures, _ = run_figures(
        [sys.executable, "-m", "tests.performance.bench_boot", "--vms", "1", "--calls", "10"],
        vmm.env,
    )
    assert figures["cold_create_to_ready_s"]["n"] == 1
    assert figures["exec_true_round_trip_ms"]["n"] == 10
    assert figures["cold_create_to_ready_s"]["p50"] > 0
    assert figures["memory_snapshot_restore_to_ready_s"]["n"] == 2
    assert figures["qemu_rss_per_ready_vm_mib"]["n"] == 1
    assert figures["ratios"]["exec_p50_over_host_true_p50"] > 0


def test_executor_benchmark_prints_figures(executor: ExecutorProcess) -> None:
    figures, _ = run_figures(
        [sys.executable, "-m", "tests.performance.bench_executor", "--calls", "10", "--mib", "4"],
        executor.env,
    )
    assert figures["exec_true_round_trip_ms"]["n"] == 10
    for mode in ("shared", "api"):
        assert figures[f"transfer_{mode}_mb_s"]["upload"] > 0
        assert figures[f"transfer_{mode}_mb_s"]["download"] > 0


def test_agent_vm_bench_prints_every_figure(
    vmm: VMManagerProcess, template: vm_manager_pb2.Template
) -> None:
    pm = PoolManagerProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="pool-bench",
        pools="standard:min=1,max=3,network=nat-filtered",
    )
    pm.start()
    ex = ExecutorProcess(base=vmm.base, prefix=vmm.prefix, name="executor-bench", pool=pm.address)
    ex.start()
    env = {
        **vmm.env,
        "AGENTVM_POOL_MANAGER_ADDR": pm.address,
        "AGENTVM_EXECUTOR_ADDR": ex.address,
    }
    try:
        args = ["--json", "--cold", "1", "--restores", "1", "--acquires", "3", "--concurrent", "2"]
        args += ["--oneshots", "2", "--commands", "10"]
        fig, stderr = run_figures([str(REPO / ".venv/bin/agent-vm"), "bench", *args], env)
    finally:
        ex.stop()
        pm.stop()
    assert fig["machine"]["accelerator"] in ("TCG", "KVM")
    assert fig["cold_create_to_ready_s"]["n"] == 1
    assert fig["restore_to_ready_s"]["n"] == 1
    assert fig["pool_acquire_ms"]["n"] == 3
    assert fig["acquire_and_first_command_ms"]["n"] == 3
    assert fig["network_policy_update_ms"]["n"] == 3
    conc = fig["concurrent_executions"]
    assert (conc["n"], conc["distinct_vms"], conc["per_run_s"]["n"]) == (2, 2, 2)
    made = ("from_pool_ready", "from_pool_made_on_demand", "made_by_the_executor")
    assert sum(conc[k] for k in made) == 2
    assert fig["qemu_rss_mib"]["template_clone"] > 0
    parts = fig["qemu_rss_mib"]["idle_pool_vm_parts"]
    assert parts["guest_ram"] > 0
    assert parts["qemu_own"] > 0
    # The parts add up to the whole (within rounding and the moments between reads).
    assert abs(sum(parts.values()) - fig["qemu_rss_mib"]["idle_pool_vm"]) < 16
    assert fig["ratios"]["cold_over_restore"] > 0
    assert fig["ratios"]["cold_over_acquire"] > 0
    assert fig["host_ksm"]["available"] == Path("/sys/kernel/mm/ksm/run").exists()
    lat = fig["latency"]
    assert lat["oneshot_python_pass_ms"]["n"] == 2
    assert lat["oneshot_vm_gone_after_result_ms"]["n"] == 2
    assert lat["guest_python_pass_ms"]["p50"] > 0
    assert lat["command_true_ms"]["n"] == 10
    assert lat["guest_spawn_true_ms"]["n"] == 20
    assert lat["sandbox_create_and_first_command_ms"]["n"] == 3
    assert lat["close_ms"]["n"] == 2
    assert lat["close_vm_gone_after_ms"]["n"] == 2
    assert lat["cli_help_ms"]["n"] == 5
    assert lat["cli_run_first_rpc_ms"]["n"] == 5
    assert all(v > 0 for v in lat["ratios"].values())
    assert "pool acquire" in stderr


def test_telemetry_benchmark_prints_figures(vmm: VMManagerProcess) -> None:
    figures, _ = run_figures(
        [
            sys.executable,
            "-m",
            "tests.performance.bench_telemetry",
            "--calls",
            "200",
            "--events",
            "2000",
        ],
        vmm.env,
    )
    for key in (
        "bare",
        "call_observer",
        "observer_and_token_auth",
        "observer_token_and_mutual_tls",
        "observer_and_tracing",
    ):
        assert figures[f"unary_call_ms_{key}"]["n"] == 200
        assert figures[f"unary_call_ms_{key}"]["p50_over_bare"] > 0
    assert figures["new_channel_first_call_ms"]["mutual_tls_p50"] > 0
    assert figures["monitor_ingest"]["events_per_s_to_disk"] > 0
    # What the wire guards cost: the service chain against the same protobuf method bare.
    assert figures["protobuf_unary_ms_service_chain"]["n"] == 200
    assert figures["protobuf_unary_chain_over_its_bare"] > 0
    assert figures["stream_ms_per_message_service_chain"]["p50"] > 0
    assert figures["stream_chain_over_its_bare"] > 0
