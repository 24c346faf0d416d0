"""kill -9 of vm-manager in the middle of creating VMs: after a restart nothing is half-made.

Each create is either finished (the VM is adopted, found by its labels, and
destroyed cleanly) or never happened (no domain, no overlay, no directory).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import (
    VMManagerProcess,
    leftovers,
    libvirt_domains,
    lone_vmm_process,
    wait_for,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def lone_vmm(guest_image: Path) -> Iterator[VMManagerProcess]:
    with lone_vmm_process() as proc:
        yield proc


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.5])
def test_kill_9_mid_create_leaves_nothing_half_made(
    lone_vmm: VMManagerProcess, delay: float
) -> None:
    labels = {"crash-test": f"d{int(delay * 1000)}"}
    errors: list[grpc.StatusCode] = []

    def create() -> None:
        req = vm_manager_pb2.CreateVMRequest(
            profile=common_pb2.RESOURCE_PROFILE_STANDARD,
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            start=True,
            labels=labels,
        )
        try:
            lone_vmm.stub().CreateVM(req, timeout=120)
        except grpc.RpcError as exc:
            errors.append(exc.code())

    creators = [threading.Thread(target=create) for _ in range(2)]
    for t in creators:
        t.start()
    time.sleep(delay)
    lone_vmm.stop(signal.SIGKILL)
    for t in creators:
        t.join(30)
    lone_vmm.start()
    stub = lone_vmm.stub()
    vms = stub.ListVMs(vm_manager_pb2.ListVMsRequest(label_selector=labels), timeout=30).vms
    # Whatever exists is a whole VM vm-manager knows about (adopted from libvirt) ...
    assert {v.name for v in vms} == set(libvirt_domains(lone_vmm.prefix))
    dirs = lone_vmm.state_dir / "vms"
    on_disk = {p.name for p in dirs.iterdir()} if dirs.exists() else set()
    assert on_disk <= {v.name for v in vms}, "a VM directory without its domain survived"
    # ... and its creator can find it by its labels and destroy it.
    for v in vms:
        stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=v.name), timeout=60)
    assert wait_for(lambda: not leftovers(lone_vmm), 30), leftovers(lone_vmm)
