"""vm-manager as a real process over real libvirt: lifecycle, errors, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import libvirt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import VMFactory, VMManagerProcess, execute, libvirt_domains

pytestmark = pytest.mark.vm


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()


def _details(exc: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return exc.value.details() or ""


def test_health_and_reflection(vmm: VMManagerProcess) -> None:
    with vmm.channel() as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="agentvm.v1.VMManagerService"), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        services = {
            s.name
            for r in stub.ServerReflectionInfo(reqs, timeout=5)
            for s in r.list_services_response.service
        }
    assert {"agentvm.v1.VMManagerService", "grpc.health.v1.Health"} <= services


def test_lifecycle_states_graceful_and_forced_stop(
    factory: VMFactory, vmm: VMManagerProcess
) -> None:
    stub = vmm.stub()
    vm = factory.create(start=False)
    assert vm.state == common_pb2.VM_STATE_DEFINED
    assert vm.name.startswith(vmm.prefix)
    overlay = vmm.state_dir / "vms" / vm.name / "overlay.qcow2"
    assert overlay.exists()
    info = subprocess.run(
        ["qemu-img", "info", str(overlay)], capture_output=True, text=True, check=True
    )
    assert "backing file:" in info.stdout

    vm = stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60).vm
    assert vm.state == common_pb2.VM_STATE_BOOTING
    vm = factory.wait_ready(vm.name)
    assert vm.state == common_pb2.VM_STATE_READY
    assert vm.boot_duration.ToNanoseconds() > 0
    assert vm.guest.kernel_release

    # A file written before a graceful stop survives it (the guest synced its disk).
    assert execute(vm.agent_endpoint, "echo kept > /root/marker").status.exit_code == 0
    resp = stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name), timeout=60)
    assert resp.vm.state == common_pb2.VM_STATE_STOPPED
    assert not resp.forced

    stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60)
    vm = factory.wait_ready(vm.name)
    assert execute(vm.agent_endpoint, ["cat", "/root/marker"]).stdout == b"kept\n"

    resp = stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name, force=True), timeout=60)
    assert resp.forced
    assert resp.vm.state == common_pb2.VM_STATE_STOPPED

    stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetVM(vm_manager_pb2.GetVMRequest(name=vm.name), timeout=10)
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    assert not overlay.parent.exists()
    assert vm.name not in libvirt_domains(vmm.prefix)
    # Destroy is idempotent.
    stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)


def test_grace_period_runs_out_then_forced(factory: VMFactory, vmm: VMManagerProcess) -> None:
    # Still booting: no agent to ask, and the guest ignores ACPI, so only the
    # forced power-off after the grace period can stop it.
    vm = factory.create()
    req = vm_manager_pb2.StopVMRequest(name=vm.name)
    req.grace_period.FromNanoseconds(500_000_000)
    start = time.monotonic()
    resp = vmm.stub().StopVM(req, timeout=60)
    assert resp.forced
    assert resp.vm.state == common_pb2.VM_STATE_STOPPED
    assert time.monotonic() - start < 20


def test_vm_killed_behind_our_back_is_reported_failed(
    factory: VMFactory, vmm: VMManagerProcess
) -> None:
    vm = factory.booted()
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(vm.name).destroy()
    finally:
        conn.close()
    got = vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=vm.name), timeout=10).vm
    assert got.state == common_pb2.VM_STATE_FAILED
    assert "console log" in got.error
    req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().WaitVM(req, timeout=10)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION


def test_agent_survives_vm_manager_restart(shared_vm: common_pb2.VM, vmm: VMManagerProcess) -> None:
    """The host side reconnects to the port: a fresh session, no stale bytes."""
    before = execute(shared_vm.agent_endpoint, "cat /proc/sys/kernel/random/boot_id").stdout
    for sig in (signal.SIGTERM, signal.SIGKILL):
        vmm.stop(sig)
        vmm.start()
        vm = vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=shared_vm.name), timeout=10).vm
        assert vm.state in (common_pb2.VM_STATE_BOOTING, common_pb2.VM_STATE_READY)
        req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
        req.timeout.FromNanoseconds(60 * 10**9)
        vm = vmm.stub().WaitVM(req, timeout=70).vm
        assert vm.state == common_pb2.VM_STATE_READY
        after = execute(vm.agent_endpoint, "cat /proc/sys/kernel/random/boot_id").stdout
        assert after == before, "the VM must be the same one, not rebooted"
        assert execute(vm.agent_endpoint, ["echo", "again"]).stdout == b"again\n"


def test_bad_input_gets_clear_status_codes(vmm: VMManagerProcess) -> None:
    stub = vmm.stub()
    cases: list[tuple[object, str, grpc.StatusCode, str]] = [
        (
            vm_manager_pb2.CreateVMRequest(
                profile=42,  # type: ignore[arg-type]
                network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "profile",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_mode=17,  # type: ignore[arg-type]
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "network mode",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                network_policy=common_pb2.NetworkPolicy(allow_domains=["allowed.test"]),
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "network_policy is only valid with NETWORK_MODE_NAT_FILTERED",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_policy=common_pb2.NetworkPolicy(allow_domains=["bad name;"])
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "allow_domains",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_policy=common_pb2.NetworkPolicy(allow_cidrs=["10.0.0.1/8"])
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "allow_cidrs",
        ),
        (
            vm_manager_pb2.CreateVMRequest(network_policy=common_pb2.NetworkPolicy(ports=[0])),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "ports",
        ),
        (
            vm_manager_pb2.UpdateNetworkPolicyRequest(name="agent-vm-nosuchvm"),
            "UpdateNetworkPolicy",
            grpc.StatusCode.NOT_FOUND,
            "ListVMs",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                resources=common_pb2.Resources(vcpus=99),
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "vcpus",
        ),
        (
            vm_manager_pb2.CreateVMRequest(
                network_mode=common_pb2.NETWORK_MODE_ISOLATED, labels={"bad key!": "x"}
            ),
            "CreateVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "label",
        ),
        (
            vm_manager_pb2.GetVMRequest(name="agent-vm-nosuchvm"),
            "GetVM",
            grpc.StatusCode.NOT_FOUND,
            "ListVMs",
        ),
        (
            vm_manager_pb2.GetVMRequest(name="../etc/passwd"),
            "GetVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "name",
        ),
        (
            vm_manager_pb2.WaitVMRequest(name="agent-vm-x"),
            "WaitVM",
            grpc.StatusCode.INVALID_ARGUMENT,
            "state",
        ),
        (
            vm_manager_pb2.CreateSnapshotRequest(vm_name="agent-vm-x"),
            "CreateSnapshot",
            grpc.StatusCode.NOT_FOUND,
            "ListVMs",
        ),
    ]
    for request, method, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(request, timeout=10)
        assert _code(err) == code, (method, request, _details(err))
        assert needle.lower() in _details(err).lower(), _details(err)
    # Nothing was half-created by the failed calls.
    assert not (vmm.state_dir / "vms").exists() or not any(
        p.name not in libvirt_domains(vmm.prefix) for p in (vmm.state_dir / "vms").iterdir()
    )


def test_wait_honours_the_caller_deadline(factory: VMFactory, vmm: VMManagerProcess) -> None:
    vm = factory.create(start=False)
    req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_STOPPED)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().WaitVM(req, timeout=1.0)
    assert _code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5


def test_list_filters_by_labels_and_host_info(factory: VMFactory, vmm: VMManagerProcess) -> None:
    vm = factory.create(start=False)
    stub = vmm.stub()
    listed = stub.ListVMs(
        vm_manager_pb2.ListVMsRequest(label_selector={"test": "1"}), timeout=10
    ).vms
    assert vm.name in [v.name for v in listed]
    none = stub.ListVMs(vm_manager_pb2.ListVMsRequest(label_selector={"test": "2"}), timeout=10).vms
    assert vm.name not in [v.name for v in none]
    host = stub.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=10)
    assert host.libvirt_version.count(".") == 2
    assert host.accelerator in (common_pb2.ACCELERATOR_KVM, common_pb2.ACCELERATOR_TCG)
    assert host.accelerator_reason
    image = stub.GetImage(vm_manager_pb2.GetImageRequest(), timeout=10)
    assert image.present
    assert any(p.startswith("python3=") for p in image.image.packages)


def test_get_node_counts_the_running_vm_and_the_vm_names_its_node(
    shared_vm: common_pb2.VM, vmm: VMManagerProcess
) -> None:
    """GetNode against the real host: libvirt's CPUs and memory, this vm-manager's VMs."""
    node = vmm.stub().GetNode(vm_manager_pb2.GetNodeRequest(), timeout=10).node
    assert node.id
    assert shared_vm.node_id == node.id
    cpus = os.cpu_count() or 1
    assert node.allocatable.vcpus == cpus
    with open("/proc/meminfo") as fh:
        total_mib = int(fh.readline().split()[1]) // 1024
    # libvirt's figure, less the default 1024 MiB reserve (libvirt rounds its own).
    assert abs(node.allocatable.memory_mib + 1024 - total_mib) < 64
    assert node.committed.vcpus >= shared_vm.resources.vcpus
    assert node.committed.memory_mib >= shared_vm.resources.memory_mib
    assert node.vm_count >= 1
    assert (node.cpu_overcommit, node.memory_overcommit) == (16, 1.5)


def test_domain_xml_is_schema_valid(
    factory: VMFactory, vmm: VMManagerProcess, tmp_path: object
) -> None:
    from pathlib import Path

    vm = factory.create(start=False)
    conn = libvirt.open("qemu:///system")
    try:
        xml = conn.lookupByName(vm.name).XMLDesc(0)
    finally:
        conn.close()
    path = Path(str(tmp_path)) / "dom.xml"
    path.write_text(xml)
    proc = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_the_profiles_cgroup_limits_reach_qemu(shared_vm: common_pb2.VM) -> None:
    """libvirt reads these back from QEMU's cgroups: the limits are applied, not just written."""
    from agentvm.common.profiles import ResourceProfile
    from agentvm.vm_manager.hostcaps import io_weight_supported

    profile = ResourceProfile.from_proto(shared_vm.profile)
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(shared_vm.name)
        sched = dom.schedulerParameters()
        xml = dom.XMLDesc(0)
        blkio = dom.blkioParameters() if io_weight_supported() else {}
    finally:
        conn.close()
    assert sched["vcpu_quota"] == sched["vcpu_period"] * profile.cpu_quota_pct // 100
    if io_weight_supported():
        assert blkio["weight"] == profile.blkio_weight
    else:
        # No weight can be applied on this host (mq-deadline under cgroup v1):
        # the domain carries none rather than failing to start.
        assert "<blkiotune>" not in xml
