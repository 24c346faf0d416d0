"""A warm pool VM is the pool's alone until it is leased (issue 22, item 9), real VMs.

The attack: an operator or a caller with the client certificate reaches a warm pool VM
through vm-manager (its agent endpoint, the conventional socket path, the RPCs that
change it) and plants a file that the next tenant would receive.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from agentvm.v1 import common_pb2, pool_manager_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from tests.vmharness import REPO, PoolManagerProcess, VMManagerProcess, execute

pytestmark = pytest.mark.vm

KEY = pool_manager_pb2.PoolKey(
    profile=common_pb2.RESOURCE_PROFILE_STANDARD, network_mode=common_pb2.NETWORK_MODE_ISOLATED
)
PLANT = "echo planted > /root/planted"
PROBE = "test -e /root/planted && echo planted || echo clean"


@pytest.fixture
def pm(vmm: VMManagerProcess, template: vm_manager_pb2.Template) -> Iterator[PoolManagerProcess]:
    proc = PoolManagerProcess(
        base=vmm.base, prefix=vmm.prefix, name="pool-access", pools="standard:min=1,max=2,ttl=600"
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()
        if proc.log_path.exists():  # shown when the test failed
            print(proc.log_path.read_text()[-6000:])
        req = vm_manager_pb2.ListVMsRequest(label_selector=proc.labels)
        for vm in vmm.stub().ListVMs(req, timeout=30).vms:
            vmm.stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=60)


def cli(vmm: VMManagerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", *args],
        env=vmm.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


def refused(call: grpc.RpcError) -> str:
    assert call.code() == grpc.StatusCode.FAILED_PRECONDITION, call
    details = call.details() or ""
    assert "warm pool VM" in details
    assert "acquire it from the pool" in details
    return details


def test_a_warm_pool_vm_is_out_of_reach_until_leased(
    vmm: VMManagerProcess, pm: PoolManagerProcess
) -> None:
    pm.wait_status(lambda s: s.ready == 1)
    client = vmm.stub()
    executor = vm_manager_pb2_grpc.VMManagerServiceStub(vmm.channel("executor"))
    (warm,) = client.ListVMs(
        vm_manager_pb2.ListVMsRequest(label_selector=pm.labels), timeout=30
    ).vms
    name = warm.name
    assert warm.pool.pool == "standard/isolated"
    assert warm.pool.state == common_pb2.POOL_VM_STATE_WARM
    assert not warm.pool.lessee

    # The attack through the API: whatever endpoint vm-manager gives out (to the client
    # or the executor), and the conventional socket path next to it.
    conventional = f"unix:{vmm.run_dir}/vms/{name}/agent.sock"
    for stub in (client, executor):
        got = stub.GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm
        for endpoint in {warm.agent_endpoint or conventional, got.agent_endpoint or conventional}:
            with pytest.raises(grpc.RpcError) as err:
                execute(endpoint, PLANT, timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert got.agent_endpoint == ""
        assert got.pool.state == common_pb2.POOL_VM_STATE_WARM

    # The RPCs that would change it or reach its guest: refused, saying what to do.
    for stub in (client, executor):
        with pytest.raises(grpc.RpcError) as err:
            stub.StopVM(vm_manager_pb2.StopVMRequest(name=name), timeout=30)
        assert name in refused(err.value)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateSnapshot(
                vm_manager_pb2.CreateSnapshotRequest(vm_name=name, snapshot_name="plant"),
                timeout=60,
            )
        refused(err.value)
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateNetworkPolicy(
                vm_manager_pb2.UpdateNetworkPolicyRequest(name=name), timeout=30
            )
        refused(err.value)
        # Only pool-manager leases, and only it makes pool VMs.
        with pytest.raises(grpc.RpcError) as err:
            stub.LeasePoolVM(
                vm_manager_pb2.LeasePoolVMRequest(name=name, lessee="client"), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                    labels={"agent-vm/owner": "pool-manager"},
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The real CLI: `vm list` marks it, `vm exec` refuses with the same advice.
    listing = cli(vmm, "vm", "list")
    assert listing.returncode == 0, listing.stderr
    (line,) = [ln for ln in listing.stdout.splitlines() if ln.startswith(name)]
    assert line.endswith("standard/isolated (warm)"), line
    planted = cli(vmm, "vm", "exec", name, "--", "sh", "-c", PLANT)
    assert planted.returncode == 2
    assert "is a warm pool VM of pool standard/isolated and is not leased" in planted.stderr

    # The pool's own health checks kept working: the VM it hands out is that same warm
    # VM (a failed check would have destroyed and replaced it).
    req = pool_manager_pb2.AcquireVMRequest(key=KEY, labels={"owner": "access-test"})
    req.timeout.FromSeconds(120)
    lease = pm.pool_stub().AcquireVM(req, timeout=130)
    assert lease.vm.name == name
    assert lease.from_pool
    assert lease.vm.pool.state == common_pb2.POOL_VM_STATE_LEASED
    assert lease.vm.pool.lessee == "client"
    assert lease.vm.agent_endpoint

    # Nothing ran in the guest before the lease; the lessee can use it now.
    assert execute(lease.vm.agent_endpoint, PROBE).stdout.decode().strip() == "clean"
    got = client.GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm
    assert got.agent_endpoint == lease.vm.agent_endpoint
    assert got.pool.state == common_pb2.POOL_VM_STATE_LEASED
    ran = cli(vmm, "vm", "exec", name, "--", "sh", "-c", "echo lessee > /root/mine")
    assert ran.returncode == 0, ran.stderr
    listing = cli(vmm, "vm", "list")
    (line,) = [ln for ln in listing.stdout.splitlines() if ln.startswith(name)]
    assert line.endswith("standard/isolated (leased to client)"), line

    pm.pool_stub().ReleaseVM(pool_manager_pb2.ReleaseVMRequest(lease_id=lease.lease_id), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        client.GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
