"""The state directory's file system full, on a real VM (docs/RELIABILITY.md,
"State disk full"; vm_manager/diskfull.py).

A vm-manager of its own whose STATE_DIR is a small file system: the guest writes
more than the host has room for, QEMU pauses the VM (nothing in the guest
fails), vm-manager says why and refuses new VMs; once room is made, the VM
goes on by itself and the guest's file is whole.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2
from agentvm.vm_manager.diskfull import free_mib
from tests.vmharness import (
    ExecResult,
    VMFactory,
    VMManagerProcess,
    execute,
    leftovers,
    new_vmm,
    remove_vmm_dirs,
    wait_for,
)

pytestmark = pytest.mark.vm

FS_MIB = 256
MIN_FREE_MIB = 32


@pytest.fixture
def small_vmm(guest_image: Path) -> Iterator[VMManagerProcess]:
    """A vm-manager whose STATE_DIR is a 256 MiB ext4 of its own (a loop device: QEMU
    opens overlays with O_DIRECT, which tmpfs refuses)."""
    vmm = new_vmm()
    vmm.state_dir.mkdir(parents=True)
    disk = vmm.base / "state.ext4"
    with disk.open("wb") as f:
        f.truncate(FS_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(disk)], check=True)
    subprocess.run(["mount", "-o", "loop", str(disk), str(vmm.state_dir)], check=True)
    vmm.state_dir.chmod(0o755)
    vmm.extra_env["AGENTVM_MIN_FREE_DISK_MIB"] = str(MIN_FREE_MIB)
    # The node's disk capacity comes from this file system's size: room for a VM's
    # 4 GiB thin disk (what it may grow to, not what it takes).
    vmm.extra_env["AGENTVM_NODE_RESERVE"] = "disk=0"
    vmm.extra_env["AGENTVM_NODE_OVERCOMMIT"] = "disk=64"
    try:
        vmm.start()
        yield vmm
    finally:
        vmm.stop_if_running()
        left = [x for x in leftovers(vmm) if x != f"mount {vmm.state_dir}"]
        subprocess.run(["umount", str(vmm.state_dir)], check=False)
        remove_vmm_dirs(vmm)
        assert not left, f"left behind: {left}"


def get(vmm: VMManagerProcess, name: str) -> common_pb2.VM:
    return vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=30).vm


def test_a_full_state_disk_pauses_the_vm_refuses_new_ones_and_loses_nothing(
    small_vmm: VMManagerProcess,
) -> None:
    factory = VMFactory(small_vmm)
    try:
        vm = factory.booted()
        # Leave less than the floor: a few MiB for the overlay to grow into.
        filler = small_vmm.state_dir / "filler"
        with filler.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, (free_mib(small_vmm.state_dir) - 8) << 20)
        with pytest.raises(grpc.RpcError) as err:
            factory.create()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(small_vmm.state_dir) in (err.value.details() or "")
        # A suspend (a sandbox's pause) would write its memory there: refused the
        # same way, and the VM runs on.
        with pytest.raises(grpc.RpcError) as err:
            small_vmm.stub().SuspendVM(vm_manager_pb2.SuspendVMRequest(name=vm.name), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(small_vmm.state_dir) in (err.value.details() or "")
        assert get(small_vmm, vm.name).state == common_pb2.VM_STATE_READY
        assert execute(vm.agent_endpoint, "echo up").stdout == b"up\n"

        # 64 MiB written and synced in the guest: more than the host has room for.
        script = (
            "head -c 67108864 /dev/urandom > /workspace/big && sync && "
            "sha256sum /workspace/big | cut -d' ' -f1 && sha256sum /workspace/big | cut -d' ' -f1"
        )
        done: list[ExecResult] = []
        writer = threading.Thread(
            target=lambda: done.append(execute(vm.agent_endpoint, script, timeout=600))
        )
        writer.start()
        assert wait_for(lambda: "is full" in get(small_vmm, vm.name).error, 120, interval=0.5), (
            "vm-manager never said the VM's disk was full"
        )
        held = get(small_vmm, vm.name)
        assert held.state == common_pb2.VM_STATE_READY
        assert str(small_vmm.state_dir) in held.error
        assert "resumes by itself" in held.error
        assert not done  # the guest waits; nothing in it failed

        filler.unlink()
        writer.join(300)
        assert done, "the guest's write did not finish after room was made"
        res = done[0]
        assert res.status.exit_code == 0, res.stderr
        first, second = res.stdout.decode().split()
        assert first == second  # the file reads back the same, whole
        assert get(small_vmm, vm.name).error == ""
        assert execute(vm.agent_endpoint, "stat -c %s /workspace/big").stdout == b"67108864\n"
        # And there is room for new VMs again.
        assert factory.create(start=False).state == common_pb2.VM_STATE_DEFINED
        logged = small_vmm.log_path.read_text()
        assert f"VM {vm.name} paused: its disk is full" in logged
        assert f"VM {vm.name} resumed: " in logged
    finally:
        factory.cleanup()
