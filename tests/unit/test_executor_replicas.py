"""Executor replicas sharing sandboxes through the records kept with their VMs
(executor/replicas.py, docs/SCALE_OUT.md): two AgentExecutors over one in-memory
vm-manager that keeps labels, records (compare-and-set) and suspension as the real
one does. tests/integration/test_executor_replicas.py does it with real VMs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition, NotFound
from agentvm.executor.executor import CREATOR_LABEL, EXECUTOR_LABEL, AgentExecutor
from agentvm.executor.journal import Journal
from agentvm.executor.sandbox import CREATE_GRACE_S, SANDBOX_LABEL
from agentvm.v1 import common_pb2, executor_pb2, pool_manager_pb2, vm_manager_pb2


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=None
    )


class Node:
    """vm-manager as the executor sees it: VMs with labels, records and suspension."""

    def __init__(self) -> None:
        self.vms: dict[str, common_pb2.VM] = {}
        self.destroyed: list[str] = []
        # An answer that left before the last changes, given once by GetVM.
        self.stale: common_pb2.VM | None = None

    def _vm(self, name: str) -> common_pb2.VM:
        if name not in self.vms:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no VM named {name}")
        return self.vms[name]

    async def CreateVM(self, req: Any, timeout: float) -> Any:
        vm = common_pb2.VM(
            name=f"agent-vm-r{len(self.vms) + len(self.destroyed)}",
            labels=req.labels,
            agent_endpoint="unix:/none",
            network_mode=req.network_mode or common_pb2.NETWORK_MODE_ISOLATED,
            state=common_pb2.VM_STATE_READY,
        )
        if vm.network_mode == common_pb2.NETWORK_MODE_NAT_FILTERED:
            vm.network.policy.CopyFrom(req.network_policy)
        vm.created_at.FromSeconds(int(time.time()))
        self.vms[vm.name] = vm
        return vm_manager_pb2.CreateVMResponse(vm=vm)

    async def WaitVM(self, req: Any, timeout: float) -> Any:
        return vm_manager_pb2.WaitVMResponse(vm=self._vm(req.name))

    async def GetVM(self, req: Any, timeout: float) -> Any:
        stale, self.stale = self.stale, None
        return vm_manager_pb2.GetVMResponse(vm=stale or self._vm(req.name))

    async def ListVMs(self, req: Any, timeout: float) -> Any:
        want = dict(req.label_selector).items()
        out = []
        for vm in self.vms.values():
            if all(vm.labels.get(k) == v for k, v in want):
                listed = common_pb2.VM()
                listed.CopyFrom(vm)
                listed.record = b""  # as vm-manager lists them
                out.append(listed)
        return vm_manager_pb2.ListVMsResponse(vms=out)

    async def SetVMRecord(self, req: Any, timeout: float) -> Any:
        vm = self._vm(req.name)
        if vm.record_generation != req.expected_generation:
            raise rpc_error(grpc.StatusCode.ABORTED, f"generation {vm.record_generation}")
        vm.record = req.record
        vm.record_generation += 1
        return vm_manager_pb2.SetVMRecordResponse(vm=vm)

    async def DestroyVM(self, req: Any, timeout: float) -> Any:
        if self.vms.pop(req.name, None) is not None:
            self.destroyed.append(req.name)
        return vm_manager_pb2.DestroyVMResponse()

    async def UpdateNetworkPolicy(self, req: Any, timeout: float) -> Any:
        vm = self._vm(req.name)
        vm.network.policy.CopyFrom(req.policy)
        vm.network.policy.ports[:] = req.policy.ports or [80, 443, 22]  # the defaults
        return vm_manager_pb2.UpdateNetworkPolicyResponse(vm=vm)

    async def SuspendVM(self, req: Any, timeout: float) -> Any:
        vm = self._vm(req.name)
        if vm.suspended:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "suspended already")
        vm.suspended, vm.state = True, common_pb2.VM_STATE_STOPPED
        return vm_manager_pb2.SuspendVMResponse(vm=vm)

    async def ResumeVM(self, req: Any, timeout: float) -> Any:
        vm = self._vm(req.name)
        vm.suspended, vm.state = False, common_pb2.VM_STATE_READY
        return vm_manager_pb2.ResumeVMResponse(vm=vm)


class Pool:
    """pool-manager's leases, as the executor's sweep sees them."""

    def __init__(self) -> None:
        self.leases: list[pool_manager_pb2.Lease] = []
        self.released: list[str] = []

    async def AcquireVM(self, req: Any, timeout: float) -> Any:
        raise rpc_error(grpc.StatusCode.NOT_FOUND, "no pool for this kind")

    async def ListLeases(self, req: Any, timeout: float) -> Any:
        want = dict(req.label_selector).items()
        return pool_manager_pb2.ListLeasesResponse(
            leases=[x for x in self.leases if all(x.labels.get(k) == v for k, v in want)]
        )

    async def ReleaseVM(self, req: Any, timeout: float) -> Any:
        self.released.append(req.lease_id)
        self.leases = [x for x in self.leases if x.lease_id != req.lease_id]
        return pool_manager_pb2.ReleaseVMResponse()


def replica(node: Node, name: str, tmp_path: Path, pool: Pool | None = None) -> AgentExecutor:
    settings = Settings(
        executor_addr=f"unix:/run/{name}.sock",
        executor_group="group-1",
        executor_record_key=str(tmp_path / "record.key"),
        state_dir=tmp_path / name,
        reconcile_interval_s=0,
    )
    return AgentExecutor(settings, cast(Any, node), cast(Any, pool))


SPEC = executor_pb2.SandboxSpec(
    network_mode=common_pb2.NETWORK_MODE_ISOLATED, workspace_mode=common_pb2.WORKSPACE_MODE_API
)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


def test_any_replica_serves_a_sandbox_another_made_and_sees_its_changes(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a, b = replica(node, "a", tmp_path), replica(node, "b", tmp_path)
        sb = await a.create_sandbox(SPEC, metadata={"team": "x"})
        vm = node.vms[sb.vm.name]
        assert vm.labels[EXECUTOR_LABEL] == "group-1"
        assert vm.labels[CREATOR_LABEL] == "unix:/run/a.sock"
        assert vm.record_generation == 1
        assert b"team" not in vm.record  # sealed
        # B has never seen it: found by its label, taken up from its record.
        on_b = await b.find(sb.id)
        assert (on_b.vm.name, on_b.metadata, on_b.slot) == (sb.vm.name, {"team": "x"}, False)
        # A timeout set through B is what A acts on.
        await b.set_timeout(on_b, 3600)
        await a.refresh(sb)
        assert sb.expires_at == pytest.approx(time.time() + 3600, abs=5)
        # Paused through A: B says so, and B resumes it.
        await a.pause_sandbox(sb)
        await b.refresh(on_b)
        assert on_b.paused
        await b.resume_sandbox(on_b)
        await a.refresh(sb)
        assert not sb.paused
        assert not node.vms[sb.vm.name].suspended
        # Closed through B: its record says so first, then the VM goes; A forgets it.
        await b.close_sandbox(on_b.id)
        assert sb.vm.name in node.destroyed
        with pytest.raises(NotFound, match="no sandbox"):
            await a.refresh(sb)
        assert sb.id not in a._sandboxes
        with pytest.raises(NotFound):
            await a.find(sb.id)
        # ListSandboxes on B lists what A made since, and B forgets what A closed.
        other = await a.create_sandbox(SPEC)
        await b.sync()
        assert other.id in b._sandboxes
        await a.close_sandbox(other.id)
        await b.sync()
        assert other.id not in b._sandboxes
        await a.close()
        await b.close()

    run(body)


def test_a_network_policy_set_through_one_replica_is_what_the_others_show(
    tmp_path: Path,
) -> None:
    node = Node()

    async def body() -> None:
        a, b = replica(node, "a", tmp_path), replica(node, "b", tmp_path)
        nat = executor_pb2.SandboxSpec(
            network_mode=common_pb2.NETWORK_MODE_NAT_FILTERED,
            workspace_mode=common_pb2.WORKSPACE_MODE_API,
            network_policy=common_pb2.NetworkPolicy(allow_domains=["a.test"], ports=[80]),
        )
        sb = await a.create_sandbox(nat)
        on_b = await b.find(sb.id)
        assert list(on_b.to_proto().network_policy.allow_domains) == ["a.test"]
        await a.set_network_policy(sb, common_pb2.NetworkPolicy(allow_domains=["b.test"]))
        shown = sb.to_proto()
        assert (list(shown.network_policy.allow_domains), list(shown.network_policy.ports)) == (
            ["b.test"],
            [80, 443, 22],
        )
        assert list(shown.spec.network_policy.allow_domains) == ["a.test"]  # as created
        await b.refresh(on_b)
        assert on_b.to_proto().network_policy == shown.network_policy
        # Only a nat-filtered sandbox has a policy; a paused one is resumed first.
        iso = await a.create_sandbox(SPEC)
        assert not iso.to_proto().HasField("network_policy")
        with pytest.raises(FailedPrecondition, match="isolated: only nat-filtered"):
            await a.set_network_policy(iso, common_pb2.NetworkPolicy())
        await a.pause_sandbox(sb)
        with pytest.raises(FailedPrecondition, match="paused: resume it first"):
            await a.set_network_policy(sb, common_pb2.NetworkPolicy())

    run(body)


def test_a_stale_write_is_redone_on_the_current_record(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a, b = replica(node, "a", tmp_path), replica(node, "b", tmp_path)
        sb = await a.create_sandbox(SPEC)
        on_b = await b.find(sb.id)
        await b.set_timeout(on_b, 1000)
        # A still holds generation 1: its write is refused, it reads 2 and writes 3.
        assert sb.record_generation == 1
        await a.set_timeout(sb, 2000)
        assert node.vms[sb.vm.name].record_generation == 3
        await b.refresh(on_b)
        assert on_b.expires_at == pytest.approx(time.time() + 2000, abs=5)
        for ex in (a, b):
            await ex.close()

    run(body)


def test_an_end_of_life_extended_elsewhere_is_not_an_end(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a, b = replica(node, "a", tmp_path), replica(node, "b", tmp_path)
        sb = await a.create_sandbox(SPEC)
        on_b = await b.find(sb.id)
        await b.set_timeout(on_b, 600)
        sb.expires_at = time.time() - 1  # A's copy says it is over
        await a._expire(sb)
        assert not sb.closing
        assert sb.vm.name in node.vms
        # Over in the record too: closed.
        await b.set_timeout(on_b, 1)
        await asyncio.sleep(1.1)
        sb.expires_at = time.time() - 1
        await a._expire(sb)
        assert sb.expired
        assert sb.vm.name in node.destroyed
        for ex in (a, b):
            await ex.close()

    run(body)


def test_idle_means_idle_on_every_replica(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a, b = replica(node, "a", tmp_path), replica(node, "b", tmp_path)
        sb = await a.create_sandbox(SPEC, auto_pause=40)
        sb.last_active = time.monotonic() - 100  # idle here
        on_b = await b.find(sb.id)
        on_b.last_active = time.monotonic()  # but used on B just now (a call ended)
        await b.touch(on_b)
        await a.pause_sandbox(sb, idle=True)
        assert not sb.paused
        assert not node.vms[sb.vm.name].suspended
        assert time.monotonic() - sb.last_active < 40  # the idle clock starts over
        # Nobody used it for long enough: paused.
        node_vm = node.vms[sb.vm.name]
        rec = a.records.decode(node_vm)
        rec.active_at = time.time() - 100
        node_vm.record = a.records.encode(rec)
        node_vm.record_generation += 1
        sb.last_active, sb.remote_active = time.monotonic() - 100, 0.0  # time went by
        await a.pause_sandbox(sb, idle=True)
        assert sb.paused
        assert node.vms[sb.vm.name].suspended
        for ex in (a, b):
            await ex.close()

    run(body)


def test_a_restarted_replica_takes_the_group_up_and_sweeps_only_what_is_orphaned(
    tmp_path: Path,
) -> None:
    node, pool = Node(), Pool()

    async def body() -> None:
        a = replica(node, "a", tmp_path, pool)
        kept = await a.create_sandbox(SPEC)
        oneshot = await a.create_sandbox(SPEC, oneshot=True)
        closing = await a.create_sandbox(SPEC)
        closing.closing = True
        await a.update(closing, lambda s: None)  # killed right after the record said so

        # VMs without a record: A's own half-made one, and another replica's, young and old.
        def bare(creator: str, age: float) -> str:
            vm = common_pb2.VM(
                name=f"agent-vm-bare{len(node.vms)}",
                labels={
                    "agent-vm/owner": "executor",
                    EXECUTOR_LABEL: "group-1",
                    CREATOR_LABEL: creator,
                    SANDBOX_LABEL: f"sb-00000000000{len(node.vms)}",
                },
            )
            vm.created_at.FromSeconds(int(time.time() - age))
            node.vms[vm.name] = vm
            return vm.name

        mine = bare("unix:/run/a.sock", 1)
        young = bare("unix:/run/c.sock", 10)
        old = bare("unix:/run/c.sock", CREATE_GRACE_S + 10)
        # Leases of the group that no sandbox holds: A's own, another's young one.
        for lease_id, creator in (("L-mine", "unix:/run/a.sock"), ("L-young", "unix:/run/c.sock")):
            lease = pool_manager_pb2.Lease(
                lease_id=lease_id,
                vm_name=f"agent-vm-{lease_id}",
                labels={
                    "agent-vm/owner": "executor",
                    EXECUTOR_LABEL: "group-1",
                    CREATOR_LABEL: creator,
                },
            )
            lease.acquired_at.FromSeconds(int(time.time()))
            pool.leases.append(lease)
        # A dies (no close); its successor at the same address starts.
        a2 = replica(node, "a", tmp_path, pool)
        await a2.start()
        try:
            assert set(a2._sandboxes) == {kept.id}
            assert a2._sandboxes[kept.id].slot  # its own: its slot back
            assert {oneshot.vm.name, closing.vm.name, mine, old} <= set(node.destroyed)
            assert young in node.vms
            assert pool.released == ["L-mine"]
            # Another replica of the group starting now leaves everything alone.
            b = replica(node, "b", tmp_path, pool)
            await b.start()
            assert set(b._sandboxes) == {kept.id}
            assert not b._sandboxes[kept.id].slot
            assert young in node.vms
            assert pool.released == ["L-mine"]
            await b.close()
        finally:
            await a2.close()
        # A group's replica that stops leaves the sandboxes to the others.
        assert kept.vm.name in node.vms

    run(body)


def test_the_journal_of_an_older_executor_moves_onto_the_vms(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a = replica(node, "a", tmp_path)
        sb = await a.create_sandbox(SPEC, metadata={"from": "journal"})
        # As an executor before records moved to the VMs would have left it.
        vm = node.vms[sb.vm.name]
        vm.record, vm.record_generation = b"", 0
        journal = Journal(a.settings.state_dir, a.settings.executor_addr)
        journal.save(sb.record())
        a2 = replica(node, "a", tmp_path)
        await a2.start()
        try:
            assert a2._sandboxes[sb.id].metadata == {"from": "journal"}
            assert node.vms[sb.vm.name].record_generation == 1
            assert journal.load() == []
        finally:
            await a2.close()

    run(body)


def test_a_record_sealed_under_another_key_is_left_alone(tmp_path: Path) -> None:
    node = Node()

    async def body() -> None:
        a = replica(node, "a", tmp_path)
        sb = await a.create_sandbox(SPEC)
        other = tmp_path / "other"
        other.mkdir()
        b = replica(node, "b", other)
        await b.start()
        try:
            assert sb.id not in b._sandboxes
            assert sb.vm.name in node.vms
        finally:
            await b.close()
            await a.close()

    run(body)


def test_an_answer_older_than_this_replicas_own_writes_changes_nothing(tmp_path: Path) -> None:
    """A GetVM answer that left vm-manager before a pause here (READY, the older
    generation) must not make this replica think the sandbox runs again."""
    node = Node()

    async def body() -> None:
        a = replica(node, "a", tmp_path)
        sb = await a.create_sandbox(SPEC)
        before = common_pb2.VM()
        before.CopyFrom(node.vms[sb.vm.name])
        await a.pause_sandbox(sb)
        node.stale = before
        await a.refresh(sb)
        assert sb.paused
        # Nor while a pause or resume here holds the sandbox's lock.
        newer = common_pb2.VM()
        newer.CopyFrom(node.vms[sb.vm.name])
        newer.suspended, newer.state = False, common_pb2.VM_STATE_READY
        newer.record_generation += 1
        node.stale = newer
        async with sb.lock:
            await a.refresh(sb)
        assert sb.paused
        await a.close()

    run(body)
