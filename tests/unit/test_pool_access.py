"""Warm pool VMs are the pool's alone until leased (issue 22, item 9): the rules.

The real-VM test is tests/integration/test_pool_access.py; here the access rules, the
caller's name and pool-manager's hand-over at AcquireVM are pinned without VMs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from agentvm.common import identity
from agentvm.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.pool_manager.backend import VMManagerBackend
from agentvm.pool_manager.pool import Lease, PoolKey
from agentvm.pool_manager.servicer import PoolManagerServicer
from agentvm.v1 import common_pb2, pool_manager_pb2, vm_manager_pb2
from agentvm.vm_manager import access
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM

from .helpers import run_async

POOL_LABELS = {
    "agent-vm/owner": "pool-manager",
    "agent-vm/pool-manager": "unix:/run/agent-vm/pool-manager.sock",
    "agent-vm/pool": "standard/isolated",
}


def make_vm(tmp_path: Path, labels: dict[str, str]) -> VM:
    return VM(
        name="agent-vm-1a2b3c4d",
        uuid="1a2b3c4d-0000-0000-0000-000000000000",
        profile=ResourceProfile.STANDARD,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources.for_profile(ResourceProfile.STANDARD),
        accel=Accel.TCG,
        image_id="img",
        vm_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        labels=dict(labels),
        agent_socket_name=access.socket_name(labels),
    )


class Context:
    """Just enough of a grpc.aio.ServicerContext for identity.caller."""

    def __init__(self, cn: str = "", tls: bool = False, user_agent: str = "") -> None:
        self.auth: dict[str, list[bytes]] = {}
        if tls:
            self.auth["transport_security_type"] = [b"ssl"]
        if cn:
            self.auth["x509_common_name"] = [cn.encode()]
        self.metadata = (("user-agent", user_agent),) if user_agent else ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None

    def done(self) -> bool:
        """Whether the call was answered (never, until abort)."""
        return False

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


def test_the_caller_is_the_verified_certificate_or_without_tls_the_user_agent() -> None:
    assert identity.caller(Context("agent-vm-pool-manager", tls=True)) == "pool-manager"
    assert identity.caller(Context("agent-vm-client", tls=True)) == "client"
    # Under TLS a user-agent claim counts for nothing.
    spoof = Context("agent-vm-client", tls=True, user_agent="agent-vm-pool-manager grpc/1")
    assert identity.caller(spoof) == "client"
    assert identity.caller(Context(tls=True, user_agent="agent-vm-pool-manager grpc/1")) == ""
    # TLS off: the claim is all there is.
    assert identity.caller(Context(user_agent="agent-vm-pool-manager grpc-python/1")) == (
        "pool-manager"
    )
    assert identity.caller(Context(user_agent="grpc-python/1.6")) == ""
    assert identity.caller(Context()) == ""


def test_a_warm_pool_vm_is_hidden_and_refused_to_all_but_pool_manager(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, POOL_LABELS)
    # Its relay socket is not the conventional agent.sock, and its name is random.
    assert vm.agent_socket.name != "agent.sock"
    assert vm.agent_socket.name != make_vm(tmp_path, POOL_LABELS).agent_socket.name
    assert access.adopted_socket_name(vm.agent_socket_name) == vm.agent_socket_name
    assert access.is_warm(vm)
    for who in ("client", "executor", "monitor", ""):
        msg = access.view(vm, who)
        assert msg.agent_endpoint == ""
        assert msg.pool == common_pb2.PoolMembership(
            pool="standard/isolated", state=common_pb2.POOL_VM_STATE_WARM
        )
        with pytest.raises(FailedPrecondition) as err:
            access.require_usable(vm, who, "stop it")
        assert str(err.value) == (
            "cannot stop it: VM agent-vm-1a2b3c4d is a warm pool VM of pool standard/isolated "
            "and is not leased: acquire it from the pool (pool-manager's AcquireVM; "
            "`agent-vm pool status` shows the pools) before using it, or destroy it"
        )
        with pytest.raises(PermissionDenied):
            access.check_lease(vm, who, "executor")
    # pool-manager sees the endpoint (its health checks dial it) and may do anything.
    assert access.view(vm, "pool-manager").agent_endpoint == vm.agent_endpoint
    access.require_usable(vm, "pool-manager", "stop it")
    access.check_lease(vm, "pool-manager", "executor")


def test_a_leased_pool_vm_is_used_like_any_vm(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, POOL_LABELS)
    vm.labels.update({access.LESSEE_LABEL: "executor", access.LEASE_LABEL: "abc"})
    assert not access.is_warm(vm)
    msg = access.view(vm, "client")
    assert msg.agent_endpoint == vm.agent_endpoint
    assert msg.pool.state == common_pb2.POOL_VM_STATE_LEASED
    assert msg.pool.lessee == "executor"
    access.require_usable(vm, "executor", "stop it")
    # Leased to one holder: pool-manager cannot hand it to another.
    access.check_lease(vm, "pool-manager", "executor")
    with pytest.raises(FailedPrecondition):
        access.check_lease(vm, "pool-manager", "client")


def test_a_lease_adds_the_lessees_labels_but_never_the_pools_own(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, POOL_LABELS)
    mine = {"agent-vm/executor": "unix:/run/ex.sock", "agent-vm/sandbox": "sb-0123456789ab"}
    access.check_lease(vm, "pool-manager", "executor", mine)
    for key in ("agent-vm/owner", "agent-vm/pool", access.LESSEE_LABEL, access.LEASE_LABEL):
        with pytest.raises(InvalidArgument, match=f"label {key} is the pool's own"):
            access.check_lease(vm, "pool-manager", "executor", {**mine, key: "x"})


def test_ordinary_vms_are_untouched(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, {"agent-vm/owner": "executor"})
    assert vm.agent_socket.name == "agent.sock"
    msg = access.view(vm, "client")
    assert msg.agent_endpoint == f"unix:{tmp_path}/run/agent.sock"
    assert not msg.HasField("pool")
    access.require_usable(vm, "client", "stop it")
    with pytest.raises(FailedPrecondition):
        access.check_lease(vm, "pool-manager", "client")  # nothing to lease


def test_only_pool_manager_makes_pool_vms_and_nobody_sets_the_lease_labels() -> None:
    access.check_create(POOL_LABELS, "pool-manager")
    access.check_create({"owner": "t1"}, "client")
    for who in ("client", "executor", ""):
        with pytest.raises(PermissionDenied):
            access.check_create(POOL_LABELS, who)
    for key in access.RESERVED_LABELS:
        for who in ("pool-manager", "client"):
            with pytest.raises(InvalidArgument):
                access.check_create({key: "client"}, who)


@pytest.mark.parametrize(
    ("recorded", "adopted"),
    [
        ("", "agent.sock"),
        ("agent.sock", "agent.sock"),
        ("agent-0123abcd.sock", "agent-0123abcd.sock"),
        ("../../etc/passwd", "agent.sock"),
        ("agent-../x.sock", "agent.sock"),
        ("agent-" + "a" * 100 + ".sock", "agent.sock"),
    ],
)
def test_an_adopted_socket_name_never_leaves_the_vms_run_dir(recorded: str, adopted: str) -> None:
    assert access.adopted_socket_name(recorded) == adopted


class FakePool:
    def __init__(self) -> None:
        self.key = PoolKey(ResourceProfile.STANDARD)
        self.released: list[str] = []

    async def acquire(self, timeout: float, labels: dict[str, str]) -> Lease:
        vm = common_pb2.VM(name="agent-vm-1a2b3c4d", agent_endpoint="unix:/private.sock")
        return Lease("lease-1", self.key, vm, 0.0, labels)

    async def release(self, lease_id: str) -> None:
        self.released.append(lease_id)


class FakeBackend:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.marked: list[tuple[str, str, str]] = []

    async def mark_leased(
        self, name: str, lessee: str, lease_id: str, labels: object = None
    ) -> common_pb2.VM:
        self.marked.append((name, lessee, lease_id))
        if self.fail:
            raise Unavailable("vm-manager is not reachable")
        return common_pb2.VM(
            name=name,
            agent_endpoint="unix:/private.sock",
            pool=common_pb2.PoolMembership(
                pool="standard/isolated", state=common_pb2.POOL_VM_STATE_LEASED, lessee=lessee
            ),
        )


def servicer(pool: FakePool, backend: FakeBackend) -> PoolManagerServicer:
    manager = SimpleNamespace(
        pool=lambda key: pool, backend=backend, events=SimpleNamespace(emit=lambda *a, **k: None)
    )
    return PoolManagerServicer(cast(Any, manager))


def test_acquire_hands_the_vm_to_its_caller_before_answering() -> None:
    pool, backend = FakePool(), FakeBackend()
    ctx = Context("agent-vm-executor", tls=True)
    resp = run_async(
        servicer(pool, backend).AcquireVM(pool_manager_pb2.AcquireVMRequest(), cast(Any, ctx))
    )
    assert backend.marked == [("agent-vm-1a2b3c4d", "executor", "lease-1")]
    assert resp.vm.pool.state == common_pb2.POOL_VM_STATE_LEASED
    assert resp.vm.pool.lessee == "executor"
    assert pool.released == []


def test_acquire_that_cannot_hand_over_releases_the_vm_and_fails() -> None:
    pool, backend = FakePool(), FakeBackend(fail=True)
    ctx = Context("agent-vm-executor", tls=True)
    with pytest.raises(Aborted) as err:
        run_async(
            servicer(pool, backend).AcquireVM(pool_manager_pb2.AcquireVMRequest(), cast(Any, ctx))
        )
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "not reachable" in err.value.details
    assert pool.released == ["lease-1"]  # destroyed, never handed out unusable


def test_pool_manager_passes_the_lessees_labels_on_without_the_pools_keys() -> None:
    sent: list[vm_manager_pb2.LeasePoolVMRequest] = []

    class VMM:
        async def LeasePoolVM(
            self, req: vm_manager_pb2.LeasePoolVMRequest, timeout: float
        ) -> vm_manager_pb2.LeasePoolVMResponse:
            sent.append(req)
            return vm_manager_pb2.LeasePoolVMResponse(vm=common_pb2.VM(name=req.name))

    backend = VMManagerBackend(VMM(), {})  # type: ignore[arg-type]
    acquired = {
        "agent-vm/owner": "executor",
        "agent-vm/pool-manager": "unix:/x",
        "agent-vm/executor": "unix:/run/ex.sock",
        "agent-vm/sandbox": "sb-0123456789ab",
        "team": "a",
    }
    asyncio.run(backend.mark_leased("agent-vm-1", "executor", "L1", acquired))
    assert dict(sent[0].labels) == {
        "agent-vm/executor": "unix:/run/ex.sock",
        "agent-vm/sandbox": "sb-0123456789ab",
        "team": "a",
    }
