"""Benchmark: pause and resume of a sandbox, against a template restore of the same size.

Run: flock /tmp/vmtests.lock .venv/bin/python -m tests.performance.bench_pause --rounds 5
(with a vm-manager and an executor of its own). Prints one JSON object. The
baseline, from the same run on the same machine, is a memory-template
restore of a VM of the same profile (standard, isolated): CreateVM
(from_template) to READY. The goal (issue 16) is resume faster than that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import agent_vm
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import BOOT_TIMEOUT_S, ExecutorProcess, VMManagerProcess, lone_vmm_process


def p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def template_restores(vmm: VMManagerProcess, n: int) -> list[float]:
    stub = vmm.stub()
    profile = common_pb2.RESOURCE_PROFILE_STANDARD
    network = common_pb2.NETWORK_MODE_ISOLATED
    key = stub.PrepareTemplate(
        vm_manager_pb2.PrepareTemplateRequest(profile=profile, network_mode=network),
        timeout=BOOT_TIMEOUT_S * 2,
    ).template.key
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            vm = stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    from_template=True,
                    labels={"bench": "pause"},
                    profile=profile,
                    network_mode=network,
                ),
                timeout=BOOT_TIMEOUT_S,
            ).vm
            out.append(time.perf_counter() - t0)
            stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)
    finally:
        stub.DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=key), timeout=60)
    return out


def pauses(n: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"pause_s": [], "resume_s": [], "first_exec_s": []}
    with agent_vm.Sandbox.create(network="isolated", workspace="api", lifetime=3600) as sb:
        sb.processes.start(["python3", "-c", "import time\nwhile True: time.sleep(1)"])
        sb.run("true").check()
        for _ in range(n):
            t0 = time.perf_counter()
            sb.pause()
            figures["pause_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sb.resume()
            figures["resume_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sb.run("true").check()
            figures["first_exec_s"].append(time.perf_counter() - t0)
    return figures


def run(vmm: VMManagerProcess, rounds: int) -> dict[str, Any]:
    ex = ExecutorProcess(base=vmm.base, prefix=vmm.prefix, name="executor-bench")
    ex.start()
    try:
        os.environ["AGENTVM_EXECUTOR_ADDR"] = ex.address
        # Interleaved: template restores, then pause/resume rounds, then restores again.
        restore = template_restores(vmm, (rounds + 1) // 2)
        paused = pauses(rounds)
        restore += template_restores(vmm, rounds // 2 or 1)
    finally:
        ex.stop()
    out: dict[str, Any] = {k + "_p50": p50(v) for k, v in paused.items()}
    out.update({k: [round(x, 3) for x in v] for k, v in paused.items()})
    out["template_restore_s_p50"] = p50(restore)
    out["template_restore_s"] = [round(x, 3) for x in restore]
    out["resume_over_template_restore_p50"] = round(
        out["resume_s_p50"] / out["template_restore_s_p50"], 2
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="pause/resume rounds")
    args = parser.parse_args()
    with lone_vmm_process() as vmm:
        os.environ["AGENTVM_TOKEN_FILE"] = str(vmm.token_file)
        os.environ["AGENTVM_TLS_DIR"] = str(vmm.tls_dir)
        figures = run(vmm, args.rounds)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
