"""Benchmark: cold create-to-agent-ready, and a command round trip in a warm VM.

Run: .venv/bin/python -m tests.performance.bench_boot [--vms 5] [--calls 50]
(against the services started by `agent-vm up`, or AGENTVM_VM_MANAGER_ADDR).
Prints one JSON object. Every figure comes with a baseline measured in the
same run on the same machine (a host `subprocess.run(['true'])`), because
these machines are noisy; the ratios are what to compare between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any

import grpc

from agentvm.cli.bench import qemu_rss_mib
from agentvm.common.config import Settings
from agentvm.common.grpc_util import Caller, sync_channel
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from tests.vmharness import execute


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def status(channel: grpc.Channel) -> None:
    stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
    stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=10)


def snapshot_restores(
    stub: vm_manager_pb2_grpc.VMManagerServiceStub, name: str, n: int
) -> list[float]:
    """Seconds from RestoreSnapshot (memory) to the agent answering, ``n`` times."""
    stub.CreateSnapshot(
        vm_manager_pb2.CreateSnapshotRequest(
            vm_name=name, snapshot_name="bench", include_memory=True
        ),
        timeout=600,
    )
    out = []
    for _ in range(n):
        t = time.perf_counter()
        stub.RestoreSnapshot(
            vm_manager_pb2.RestoreSnapshotRequest(vm_name=name, snapshot_name="bench"), timeout=600
        )
        req = vm_manager_pb2.WaitVMRequest(name=name, state=common_pb2.VM_STATE_READY)
        stub.WaitVM(req, timeout=300)
        out.append(time.perf_counter() - t)
    return out


def host_true(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(["true"], check=True)
        out.append(time.perf_counter() - t)
    return out


def run(address: str, vms: int, calls: int) -> dict[str, Any]:
    caller = Caller.of(Settings())
    stub = vm_manager_pb2_grpc.VMManagerServiceStub(caller.channel(address, "vm-manager"))
    host = stub.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=10)
    boots: list[float] = []
    rtts: list[float] = []
    status_rtts: list[float] = []
    restores: list[float] = []
    rss_mib: list[float] = []
    for i in range(vms):
        t0 = time.perf_counter()
        vm = stub.CreateVM(
            vm_manager_pb2.CreateVMRequest(
                profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                start=True,
                labels={"bench": "boot"},
            ),
            timeout=60,
        ).vm
        try:
            req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
            vm = stub.WaitVM(req, timeout=300).vm
            boots.append(time.perf_counter() - t0)
            rss = qemu_rss_mib(vm.name)
            if rss is not None:
                rss_mib.append(rss)
            if i == 0:
                # A warm sandbox: one persistent channel, session already up.
                with sync_channel(vm.agent_endpoint) as channel:
                    execute(vm.agent_endpoint, ["true"], channel=channel)
                    for _ in range(calls):
                        t = time.perf_counter()
                        execute(vm.agent_endpoint, ["true"], channel=channel)
                        rtts.append(time.perf_counter() - t)
                    for _ in range(calls):
                        t = time.perf_counter()
                        status(channel)
                        status_rtts.append(time.perf_counter() - t)
                restores = snapshot_restores(stub, vm.name, max(2, vms))
        finally:
            stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)
    base = host_true(max(calls, 20))
    base_p50 = statistics.median(base)
    return {
        "machine": {
            "accelerator": common_pb2.Accelerator.Name(host.accelerator),
            "accelerator_reason": host.accelerator_reason,
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "libvirt": host.libvirt_version,
            "qemu": host.qemu_version,
        },
        "cold_create_to_ready_s": {
            "n": len(boots),
            "p50": round(statistics.median(boots), 3),
            "p95": round(pct(boots, 0.95), 3),
            "min": round(min(boots), 3),
        },
        "memory_snapshot_restore_to_ready_s": {
            "n": len(restores),
            "p50": round(statistics.median(restores), 3) if restores else None,
            "p95": round(pct(restores, 0.95), 3) if restores else None,
        },
        "exec_true_round_trip_ms": {
            "n": len(rtts),
            "p50": round(statistics.median(rtts) * 1000, 2) if rtts else None,
            "p99": round(pct(rtts, 0.99) * 1000, 2) if rtts else None,
        },
        "get_status_round_trip_ms": {
            "n": len(status_rtts),
            "p50": round(statistics.median(status_rtts) * 1000, 2) if status_rtts else None,
            "p99": round(pct(status_rtts, 0.99) * 1000, 2) if status_rtts else None,
        },
        "host_subprocess_true_ms": {"p50": round(base_p50 * 1000, 3)},
        "qemu_rss_per_ready_vm_mib": {
            "n": len(rss_mib),
            "p50": round(statistics.median(rss_mib), 1) if rss_mib else None,
            "guest_memory_mib": 512,
        },
        "ratios": {
            "exec_p50_over_host_true_p50": round(statistics.median(rtts) / base_p50, 1)
            if rtts
            else None,
            "cold_boot_p50_over_host_true_p50": round(statistics.median(boots) / base_p50, 0),
            "cold_over_restore_p50": (
                round(statistics.median(boots) / statistics.median(restores), 2)
                if restores
                else None
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument(
        "--own-vm-manager",
        action="store_true",
        help="start a vm-manager of its own (test dirs and prefix) instead of `agent-vm up`'s",
    )
    args = parser.parse_args()
    if not args.own_vm_manager:
        print(json.dumps(run(Settings().vm_manager_addr, args.vms, args.calls), indent=2))
        return
    from tests.vmharness import lone_vmm_process

    with lone_vmm_process() as vmm:
        os.environ["AGENTVM_TOKEN_FILE"] = str(vmm.token_file)
        os.environ["AGENTVM_TLS_DIR"] = str(vmm.tls_dir)
        print(json.dumps(run(vmm.address, args.vms, args.calls), indent=2))


if __name__ == "__main__":
    main()
