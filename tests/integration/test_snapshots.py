"""Snapshots on real VMs: restore returns to the exact state, memory included."""

from __future__ import annotations

import sys
import time

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import VMFactory, VMManagerProcess, execute

pytestmark = pytest.mark.vm

AGENT_PID = "import os; print(os.getppid())"


def sh(vm: common_pb2.VM, cmd: str) -> str:
    res = execute(vm.agent_endpoint, cmd)
    assert res.status.exit_code == 0, res.stderr
    return res.stdout.decode()


def agent_pid(vm: common_pb2.VM) -> str:
    code = common_pb2.Program(
        code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=AGENT_PID)
    )
    return execute(vm.agent_endpoint, code).stdout.decode().strip()


def test_memory_and_disk_snapshots_restore_the_exact_state(
    factory: VMFactory, vmm: VMManagerProcess
) -> None:
    stub = vmm.stub()
    vm = factory.booted()
    sh(vm, "echo in-memory > /dev/shm/mark && echo on-disk > /root/disk.txt && sync")
    pid_before = agent_pid(vm)
    boot_id = sh(vm, "cat /proc/sys/kernel/random/boot_id")

    with pytest.raises(grpc.RpcError) as err:
        stub.CreateSnapshot(
            vm_manager_pb2.CreateSnapshotRequest(vm_name=vm.name, snapshot_name="d"), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "include_memory" in (err.value.details() or "")

    snap = stub.CreateSnapshot(
        vm_manager_pb2.CreateSnapshotRequest(
            vm_name=vm.name, snapshot_name="s1", include_memory=True, description="before"
        ),
        timeout=300,
    ).snapshot
    assert (snap.name, snap.includes_memory, snap.description) == ("s1", True, "before")
    assert snap.size_bytes > 0
    assert snap.created_at.seconds > 0

    # Change memory and disk after the snapshot.
    sh(vm, "echo changed > /dev/shm/mark && echo new > /root/after.txt && sync")

    start = time.monotonic()
    restored = stub.RestoreSnapshot(
        vm_manager_pb2.RestoreSnapshotRequest(vm_name=vm.name, snapshot_name="s1"), timeout=300
    ).vm
    assert restored.state == common_pb2.VM_STATE_BOOTING
    vm = factory.wait_ready(vm.name)
    sys.stderr.write(f"restore-to-ready {time.monotonic() - start:.2f} s\n")

    assert sh(vm, "cat /dev/shm/mark") == "in-memory\n"  # memory is back
    assert sh(vm, "cat /root/disk.txt; test ! -e /root/after.txt && echo gone") == "on-disk\ngone\n"
    assert agent_pid(vm) == pid_before  # a process from before the snapshot still runs
    assert sh(vm, "cat /proc/sys/kernel/random/boot_id") == boot_id  # same boot, not a reboot

    listed = stub.ListSnapshots(
        vm_manager_pb2.ListSnapshotsRequest(vm_name=vm.name), timeout=60
    ).snapshots
    assert [s.name for s in listed] == ["s1"]
    stub.DeleteSnapshot(
        vm_manager_pb2.DeleteSnapshotRequest(vm_name=vm.name, snapshot_name="s1"), timeout=120
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.RestoreSnapshot(
            vm_manager_pb2.RestoreSnapshotRequest(vm_name=vm.name, snapshot_name="s1"), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Disk-only snapshot of the stopped VM.
    stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name), timeout=120)
    stub.CreateSnapshot(
        vm_manager_pb2.CreateSnapshotRequest(vm_name=vm.name, snapshot_name="cold"), timeout=120
    )
    stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60)
    vm = factory.wait_ready(vm.name)
    sh(vm, "echo later > /root/later.txt && sync")
    stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name), timeout=120)
    restored = stub.RestoreSnapshot(
        vm_manager_pb2.RestoreSnapshotRequest(vm_name=vm.name, snapshot_name="cold"), timeout=120
    ).vm
    assert restored.state == common_pb2.VM_STATE_STOPPED
    stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60)
    vm = factory.wait_ready(vm.name)
    assert sh(vm, "test ! -e /root/later.txt && cat /root/disk.txt") == "on-disk\n"
    [cold] = stub.ListSnapshots(
        vm_manager_pb2.ListSnapshotsRequest(vm_name=vm.name), timeout=60
    ).snapshots
    assert not cold.includes_memory
    # Destroying the VM removes its snapshots with it (checked by the leak check).


def test_snapshot_names_are_validated(factory: VMFactory, vmm: VMManagerProcess) -> None:
    vm = factory.create(start=False)
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().CreateSnapshot(
            vm_manager_pb2.CreateSnapshotRequest(vm_name=vm.name, snapshot_name="../x"),
            timeout=60,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().CreateSnapshot(
            vm_manager_pb2.CreateSnapshotRequest(
                vm_name=vm.name, snapshot_name="m", include_memory=True
            ),
            timeout=60,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
