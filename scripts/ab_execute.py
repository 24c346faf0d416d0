"""A/B of the per-command cost of two guest images, alternated on VMs side by side.

Under TCG one VM can be 20% faster than the next (where its vCPU threads land)
and the machine drifts within minutes, so a figure from one image's VM and
another from a later VM compare poorly. This keeps one ISOLATED VM per image
running and alternates rounds between them: per round, the guest's own
``posix_spawn`` + wait of ``/bin/true`` (agentvm.cli.bench_latency.GUEST_TIMER)
then ``PER`` timed ``Execute(["/bin/true"])`` straight to the agent.

Against the running installation (``agent-vm up``)::

    .venv/bin/python scripts/ab_execute.py create        # prints a VM name (image A)
    git checkout <other> -- guest && .venv/bin/agent-vm image build
    .venv/bin/python scripts/ab_execute.py create        # image B
    .venv/bin/python scripts/ab_execute.py run --gap 0.2 VM_A VM_B
    .venv/bin/python scripts/ab_execute.py destroy VM_A VM_B

The image cache keeps the last two built images: destroy a VM before a third
build replaces its image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import grpc

from agentvm.cli.bench_latency import GUEST_TIMER
from agentvm.common.config import Settings
from agentvm.common.grpc_util import Caller, sync_channel
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)


def _vmm() -> vm_manager_pb2_grpc.VMManagerServiceStub:
    settings = Settings()
    channel = Caller.of(settings).channel(settings.vm_manager_addr, "vm-manager")
    return vm_manager_pb2_grpc.VMManagerServiceStub(channel)


def create() -> str:
    vmm = _vmm()
    req = vm_manager_pb2.CreateVMRequest(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        start=True,
        labels={"bench": "ab-execute"},
    )
    vm = vmm.CreateVM(req, timeout=300).vm
    wait = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
    wait.timeout.FromSeconds(300)
    vmm.WaitVM(wait, timeout=310)
    return vm.name


def _program(argv: list[str]) -> common_pb2.Program:
    return common_pb2.Program(argv=common_pb2.Argv(args=argv))


def _one(stub: guest_agent_pb2_grpc.GuestAgentServiceStub) -> dict[str, float]:
    """Seconds from the call to ProcessStarted, the exit status and the stream's end."""
    req = guest_agent_pb2.ExecuteRequest(program=_program(["/bin/true"]))
    req.timeout.FromSeconds(30)
    t = time.perf_counter()
    got: dict[str, float] = {}
    for ev in stub.Execute(req, timeout=60):
        got.setdefault(ev.WhichOneof("event") or "", time.perf_counter() - t)
    got["end"] = time.perf_counter() - t
    return got


def _baseline(stub: guest_agent_pb2_grpc.GuestAgentServiceStub, n: int) -> list[float]:
    req = guest_agent_pb2.ExecuteRequest(program=_program(["python3", "-c", GUEST_TIMER, str(n)]))
    req.timeout.FromSeconds(120)
    out = bytearray()
    for ev in stub.Execute(req, timeout=150):
        if ev.HasField("output") and ev.output.stream == common_pb2.OUTPUT_STREAM_STDOUT:
            out += ev.output.data
    return [float(x) for x in json.loads(bytes(out))["spawn_true"]]


def _ms(values: list[float], q: float = 0.5) -> float:
    s = sorted(values)
    return round(s[int(q * (len(s) - 1))] * 1000, 1)


def run(names: list[str], rounds: int, per: int, gap: float) -> None:
    vmm = _vmm()
    channels: dict[str, grpc.Channel] = {}
    for name in names:
        endpoint = vmm.GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm.agent_endpoint
        channels[name] = sync_channel(endpoint)
    stubs = {n: guest_agent_pb2_grpc.GuestAgentServiceStub(ch) for n, ch in channels.items()}
    figs: dict[str, dict[str, list[float]]] = {
        n: {"base": [], "started": [], "exited": [], "end": []} for n in names
    }
    for stub in stubs.values():
        for _ in range(10):  # warm-up
            _one(stub)
    for _ in range(rounds):
        for name, stub in stubs.items():
            figs[name]["base"] += _baseline(stub, per)
            for _ in range(per):
                time.sleep(gap)
                for key, value in _one(stub).items():
                    if key in figs[name]:
                        figs[name][key].append(value)
    for name, f in figs.items():
        ratio = statistics.median(f["end"]) / statistics.median(f["base"])
        print(
            f"{name}: guest posix_spawn {_ms(f['base'])} ms, ProcessStarted {_ms(f['started'])}, "
            f"exit status {_ms(f['exited'])}, stream end p50 {_ms(f['end'])} "
            f"p99 {_ms(f['end'], 0.99)}, ratio {ratio:.2f}x"
        )
    for ch in channels.values():
        ch.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("create", help="boot an ISOLATED VM from the current image; print its name")
    r = sub.add_parser("run", help="alternate timed rounds between the VMs")
    r.add_argument("--rounds", type=int, default=4)
    r.add_argument("--per", type=int, default=25, help="timed commands per round")
    r.add_argument("--gap", type=float, default=0.0, help="seconds between commands")
    r.add_argument("names", nargs="+")
    d = sub.add_parser("destroy", help="destroy the VMs")
    d.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.cmd == "create":
        print(create())
    elif args.cmd == "run":
        run(args.names, args.rounds, args.per, args.gap)
    else:
        vmm = _vmm()
        for name in args.names:
            vmm.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=name), timeout=120)


if __name__ == "__main__":
    main()
