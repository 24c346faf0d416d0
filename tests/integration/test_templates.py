"""Memory templates on real VMs: clones restore in about a second, each its own VM."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import time

import grpc
import pytest

from agentvm.cli.bench import qemu_rss_parts
from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2
from tests.vmharness import REPO, VMFactory, VMManagerProcess, execute, wait_for

pytestmark = pytest.mark.vm


def sh(vm: common_pb2.VM, cmd: str) -> str:
    res = execute(vm.agent_endpoint, cmd)
    assert res.status.exit_code == 0, res.stderr
    return res.stdout.decode()


def test_prepare_is_idempotent_and_keyed_by_image_and_profile(
    vmm: VMManagerProcess, template: vm_manager_pb2.Template
) -> None:
    stub = vmm.stub()
    again = stub.PrepareTemplate(
        vm_manager_pb2.PrepareTemplateRequest(profile=common_pb2.RESOURCE_PROFILE_STANDARD),
        timeout=60,
    )
    assert not again.built
    assert again.template.key == template.key
    image = stub.GetImage(vm_manager_pb2.GetImageRequest(), timeout=10).image
    assert template.key.startswith(f"{image.id}-standard-1c-512m-")
    assert template.memory_state_bytes > 16 << 20
    keys = [t.key for t in stub.ListTemplates(vm_manager_pb2.ListTemplatesRequest()).templates]
    assert template.key in keys


def test_template_prepare_takes_the_network_mode_of_the_pool_it_serves(
    vmm: VMManagerProcess, template: vm_manager_pb2.Template
) -> None:
    """`agent-vm template prepare --network isolated` finds the isolated template (the
    session's), not the NAT one the command builds by default."""
    proc = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "template", "prepare", "--network", "isolated"],
        env=vmm.env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["template"]["key"] == template.key
    assert got["template"]["network_mode"] == "NETWORK_MODE_ISOLATED"
    assert not got.get("built")
    bridge = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "template", "prepare", "--network", "bridge"],
        env=vmm.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert bridge.returncode == 2
    assert "'bridge' is not one of 'nat-filtered', 'isolated'" in bridge.stderr


def test_clones_are_restored_not_booted_and_each_is_its_own_vm(
    factory: VMFactory, vmm: VMManagerProcess, template: vm_manager_pb2.Template
) -> None:
    a = factory.clone()
    b = factory.clone()
    for vm in (a, b):
        assert vm.state == common_pb2.VM_STATE_READY
        assert vm.from_template
        # Hostname and machine id are the VM's own, not the template's.
        assert vm.guest.hostname == vm.name
        assert vm.guest.machine_id == vm.uuid.replace("-", "")
        assert sh(vm, "hostname").strip() == vm.name
        assert sh(vm, "cat /etc/machine-id").strip() == vm.uuid.replace("-", "")
        # The kernel kept running from the template's memory: it has been up
        # longer than this VM has existed (a fresh boot would be younger).
        uptime = float(sh(vm, "cut -d' ' -f1 /proc/uptime"))
        assert uptime > vm.boot_duration.ToNanoseconds() / 1e9
        # The guest clock was set to the host's, not left at the save time.
        assert abs(int(sh(vm, "date +%s")) - time.time()) < 30
    # Same kernel boot (the template's), different entropy after the reseed.
    assert sh(a, "cat /proc/sys/kernel/random/boot_id") == sh(
        b, "cat /proc/sys/kernel/random/boot_id"
    )
    draw = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    assert sh(a, draw) != sh(b, draw)
    # Separate disks: a file written in one clone is not in the other.
    sh(a, "echo only-in-a > /root/a.txt && sync")
    assert execute(b.agent_endpoint, "cat /root/a.txt").status.exit_code != 0
    # Destroying a clone leaves the template and its sibling alone.
    factory.destroy(a.name)
    assert sh(b, "echo alive").strip() == "alive"
    keys = [
        t.key for t in vmm.stub().ListTemplates(vm_manager_pb2.ListTemplatesRequest()).templates
    ]
    assert template.key in keys


# Writes 160 MiB, then prints its peak resident KiB (VmHWM).
FILL_160_MIB = """
b = bytearray(b"\\x01") * (160 << 20)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(line.split()[1])
"""


def _guest_ram_mib(vm: common_pb2.VM) -> float:
    parts = qemu_rss_parts(vm.name, vm.resources.memory_mib)
    assert parts, f"cannot read {vm.name}'s QEMU memory map"
    return parts["guest_ram"]


def test_a_clone_gives_memory_its_guest_frees_back_to_the_host(
    factory: VMFactory, template: vm_manager_pb2.Template
) -> None:
    """Free page reporting through the VM's virtio balloon: memory a program used
    is no longer resident in QEMU once the program exits. (How much a template
    clone is resident for at restore is a figure: `agent-vm bench`.)"""
    vm = factory.clone()
    drivers = sh(vm, "ls /sys/bus/virtio/drivers/virtio_balloon/")
    assert "virtio" in drivers, f"no balloon device bound in the guest: {drivers!r}"
    restored = _guest_ram_mib(vm)
    # At run time: 160 MiB written by a program come back once it exits (without
    # reporting they would stay resident: QEMU cannot know the guest freed them).
    hwm = sh(vm, f"python3 -c {shlex.quote(FILL_160_MIB)}")
    assert int(hwm) > 160 * 1024, hwm
    assert wait_for(lambda: _guest_ram_mib(vm) < restored + 48, 60, interval=1), (
        f"guest RAM {_guest_ram_mib(vm)} MiB resident, {restored} after the restore"
    )


def test_reidentify_validates_its_input(
    factory: VMFactory, template: vm_manager_pb2.Template
) -> None:
    vm = factory.clone()
    with sync_channel(vm.agent_endpoint) as channel:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
        bad = [
            guest_agent_pb2.ReidentifyRequest(
                hostname="bad name", machine_id="0" * 32, seed=b"x" * 32
            ),
            guest_agent_pb2.ReidentifyRequest(hostname="ok", machine_id="XYZ", seed=b"x" * 32),
            guest_agent_pb2.ReidentifyRequest(hostname="ok", machine_id="0" * 32, seed=b"short"),
        ]
        for req in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.Reidentify(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sh(vm, "hostname").strip() == vm.name


def test_from_template_refuses_what_a_template_cannot_carry(
    vmm: VMManagerProcess, factory: VMFactory, template: vm_manager_pb2.Template
) -> None:
    stub = vmm.stub()
    req = vm_manager_pb2.CreateVMRequest(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        from_template=True,
        shared_workspace=True,
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVM(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared_workspace" in (err.value.details() or "")
    # No template for the intensive profile: a clear precondition error.
    req = vm_manager_pb2.CreateVMRequest(
        profile=common_pb2.RESOURCE_PROFILE_INTENSIVE,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        from_template=True,
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVM(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PrepareTemplate" in (err.value.details() or "")
    # A template in use by a clone cannot be deleted.
    vm = factory.clone()
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=template.key), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert vm.name in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key="no-such-key"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# Pids of the guest agent's processes (not of this command: the pattern does not match itself).
AGENT_PIDS = (
    "for p in $(ls /proc | grep -E '^[0-9]+$'); do "
    "grep -qs 'agentvm_gues[t]' /proc/$p/cmdline && echo $p; done; true"
)


def test_a_respawned_guest_agent_is_reachable_and_keeps_the_clones_identity(
    factory: VMFactory, template: vm_manager_pb2.Template
) -> None:
    """Agent code kills the agent (it keeps CAP_KILL), init respawns it: the host's
    session with the dead agent ends (RESET) and the VM answers again, as itself."""
    vm = factory.clone()
    before = sh(vm, AGENT_PIDS).split()
    assert before
    with contextlib.suppress(grpc.RpcError):  # the call dies with the agent
        execute(vm.agent_endpoint, f"kill -9 {' '.join(before)}", timeout=10)

    def answers() -> bool:
        try:
            return execute(vm.agent_endpoint, "echo up", timeout=10).stdout == b"up\n"
        except grpc.RpcError:
            return False

    assert wait_for(answers, 60, interval=1)
    after = sh(vm, AGENT_PIDS).split()
    assert after
    assert not set(after) & set(before)
    # The new agent did not set the guest up again (once per boot): still the clone.
    assert sh(vm, "hostname").strip() == vm.name
    assert sh(vm, "cat /etc/machine-id").strip() == vm.uuid.replace("-", "")


def test_a_stopped_clone_boots_cold_from_its_own_disk(
    factory: VMFactory, vmm: VMManagerProcess, template: vm_manager_pb2.Template
) -> None:
    vm = factory.clone()
    sh(vm, "echo kept > /root/kept.txt && sync")
    stub = vmm.stub()
    stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name), timeout=60)
    stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60)
    again = factory.wait_ready(vm.name)
    assert sh(again, "cat /root/kept.txt").strip() == "kept"
    assert again.guest.boot_id != vm.guest.boot_id
