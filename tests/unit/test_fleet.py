"""The fleet of vm-managers (agentvm.common.fleet): health, placement, routing, with fake nodes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from agentvm.common import fleet as fleet_mod
from agentvm.common.fleet import DOWN_AFTER, Fleet, FleetStub
from agentvm.common.nodes import NodeAddress, Static
from agentvm.v1 import common_pb2, vm_manager_pb2


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@contextlib.contextmanager
def refused(code: grpc.StatusCode, match: str) -> Iterator[None]:
    """The stub fails as a real one does: an AioRpcError with this code and words."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        yield
    assert err.value.code() == code, err.value
    assert re.search(match, err.value.details() or ""), err.value.details()


class FakeNode:
    """A vm-manager: capacity, VMs, and failures on demand."""

    def __init__(self, node_id: str, vcpus: int = 8, memory_mib: int = 16384) -> None:
        self.id = node_id
        self.vcpus, self.memory = vcpus, memory_mib
        self.vms: dict[str, common_pb2.VM] = {}
        self.down = False
        self.refuse = False
        self.calls: Counter[str] = Counter()
        self.templates: set[str] = set()
        self.template_fails = False
        self.recovering = False

    def _check(self, method: str) -> None:
        self.calls[method] += 1
        if self.down:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{self.id} is down")

    def committed(self) -> tuple[int, int]:
        return len(self.vms), 1024 * len(self.vms)

    async def GetNode(self, request: Any, timeout: float = 0) -> vm_manager_pb2.GetNodeResponse:
        self._check("GetNode")
        vcpus, memory = self.committed()
        return vm_manager_pb2.GetNodeResponse(
            node=vm_manager_pb2.Node(
                id=self.id,
                allocatable=common_pb2.Resources(
                    vcpus=self.vcpus, memory_mib=self.memory, disk_mib=100_000
                ),
                committed=common_pb2.Resources(vcpus=vcpus, memory_mib=memory),
                cpu_overcommit=1.0,
                memory_overcommit=1.0,
                disk_overcommit=1.0,
                template_keys=sorted(self.templates),
                recovering=self.recovering,
            )
        )

    async def PrepareTemplate(
        self, request: Any, timeout: float = 0
    ) -> vm_manager_pb2.PrepareTemplateResponse:
        self._check("PrepareTemplate")
        if self.template_fails:
            raise rpc_error(grpc.StatusCode.INTERNAL, f"{self.id}: the build VM crashed")
        key = f"tpl-{request.profile}-{request.image}"
        built = key not in self.templates
        self.templates.add(key)
        return vm_manager_pb2.PrepareTemplateResponse(
            template=vm_manager_pb2.Template(key=key), built=built
        )

    async def CreateVM(self, request: Any, timeout: float = 0) -> vm_manager_pb2.CreateVMResponse:
        self._check("CreateVM")
        if self.refuse or len(self.vms) >= self.vcpus:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {self.id}: full")
        vm = common_pb2.VM(name=f"agent-vm-{self.id}-{len(self.vms)}", node_id=self.id)
        self.vms[vm.name] = vm
        return vm_manager_pb2.CreateVMResponse(vm=vm)

    async def ListVMs(self, request: Any, timeout: float = 0) -> vm_manager_pb2.ListVMsResponse:
        self._check("ListVMs")
        return vm_manager_pb2.ListVMsResponse(vms=list(self.vms.values()))

    async def GetVM(self, request: Any, timeout: float = 0) -> vm_manager_pb2.GetVMResponse:
        self._check("GetVM")
        if request.name not in self.vms:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, "no such VM")
        return vm_manager_pb2.GetVMResponse(vm=self.vms[request.name])

    async def DestroyVM(self, request: Any, timeout: float = 0) -> vm_manager_pb2.DestroyVMResponse:
        self._check("DestroyVM")
        del self.vms[request.name]
        return vm_manager_pb2.DestroyVMResponse()

    async def GetHostInfo(self, request: Any, timeout: float = 0) -> Any:
        self._check("GetHostInfo")
        return vm_manager_pb2.GetHostInfoResponse()


class FakeChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    async def close(self, grace: float | None = None) -> None:
        self.closed = True


def make_fleet(
    nodes: list[FakeNode], ids: bool = False, seed: int = 7
) -> tuple[Fleet, dict[str, FakeNode]]:
    by_address = {f"10.0.0.{i}:7001": n for i, n in enumerate(nodes, 1)}
    addresses = tuple(NodeAddress(a, n.id if ids else "") for a, n in by_address.items())
    f = Fleet(
        Static(addresses),
        FakeChannel,  # type: ignore[arg-type]
        rng=random.Random(seed),
        make_stub=lambda channel: by_address[channel.address],  # type: ignore[attr-defined]
    )
    return f, by_address


async def probe_all(f: Fleet) -> None:
    for link in f.links.values():
        link.next_probe = 0
    await f.refresh()


def test_one_node_takes_every_call_unchanged() -> None:
    async def main() -> None:
        node = FakeNode("solo", vcpus=1)
        f, _ = make_fleet([node])
        await f.refresh()
        stub = FleetStub(f)
        req = vm_manager_pb2.CreateVMRequest()
        vm = (await stub.CreateVM(req, timeout=5)).vm
        # Its own refusal is the answer, not the fleet's.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateVM(req, timeout=5)
        assert err.value.details() == "node solo: full"
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=5)
        # Even while it does not answer its health checks, calls still go to it.
        node.down = True
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=5)
        await f.close()

    asyncio.run(main())


def test_vms_spread_over_the_fleet_and_calls_follow_them() -> None:
    async def main() -> None:
        nodes = [FakeNode(f"n{i}") for i in range(6)]
        f, _ = make_fleet(nodes)
        await f.refresh()
        stub = FleetStub(f)
        made = []
        for _ in range(30):
            made.append((await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)).vm)
            await probe_all(f)  # the next placement sees the new load
        counts = sorted(len(n.vms) for n in nodes)
        assert counts[0] >= 3, counts
        assert counts[-1] <= 7, counts
        # Each call about a VM goes to its node only.
        for vm in made:
            await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=5)
        assert all(not n.vms for n in nodes)
        assert sum(n.calls["DestroyVM"] for n in nodes) == 30
        await f.close()

    asyncio.run(main())


def test_a_refusing_node_is_skipped_and_a_full_fleet_says_why() -> None:
    async def main() -> None:
        a, b = FakeNode("a", vcpus=2), FakeNode("b", vcpus=2)
        a.refuse = True  # its GetNode says there is room; its CreateVM says no
        f, _ = make_fleet([a, b])
        await f.refresh()
        stub = FleetStub(f)
        for _ in range(2):
            vm = (await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)).vm
            assert vm.node_id == "b"
            await probe_all(f)
        with refused(grpc.StatusCode.UNAVAILABLE, "no node took the VM: node a"):
            await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)
        a.refuse = False
        a.vcpus = 0
        await probe_all(f)
        with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "no healthy node has room"):
            await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)
        await f.close()

    asyncio.run(main())


def test_a_node_that_stops_answering_is_down_then_back() -> None:
    async def main() -> None:
        a, b = FakeNode("a"), FakeNode("b")
        f, _ = make_fleet([a, b])
        await f.refresh()
        stub = FleetStub(f)
        on_a = None
        while on_a is None:
            vm = (await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)).vm
            on_a = vm if vm.node_id == "a" else None
        a.down = True
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        (link_a,) = [link for link in f.links.values() if link.id == "a"]
        assert not link_a.healthy
        with refused(
            grpc.StatusCode.UNAVAILABLE, r"node a \(10\.0\.0\.1:7001\) has not answered since"
        ):
            await stub.GetVM(vm_manager_pb2.GetVMRequest(name=on_a.name), timeout=5)
        before = a.calls["CreateVM"]
        for _ in range(5):
            assert (
                await stub.CreateVM(vm_manager_pb2.CreateVMRequest(), timeout=5)
            ).vm.node_id == "b"
        assert a.calls["CreateVM"] == before, "a down node takes no placements"
        # Probes back off while it is down, and it counts again once it answers.
        assert link_a.next_probe - asyncio.get_running_loop().time() > fleet_mod.PROBE_S
        # A call for its VM asks it first (at most once a REVIVE_S), not only its backoff.
        link_a.last_probe -= fleet_mod.REVIVE_S
        probes = a.calls["GetNode"]
        for _ in range(3):
            with refused(grpc.StatusCode.UNAVAILABLE, "node a .* has not answered since"):
                await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=on_a.name), timeout=5)
        assert a.calls["GetNode"] == probes + 1
        # Back: the next call finds it so at once, long before its next scheduled probe.
        a.down = False
        link_a.last_probe -= fleet_mod.REVIVE_S
        got = await stub.GetVM(vm_manager_pb2.GetVMRequest(name=on_a.name), timeout=5)
        assert got.vm.node_id == "a"
        assert link_a.healthy
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=on_a.name), timeout=5)
        assert on_a.name not in a.vms
        await f.close()

    asyncio.run(main())


def test_discovery_ids_must_match_and_be_unique() -> None:
    async def main() -> None:
        a, b, c = FakeNode("a"), FakeNode("b"), FakeNode("a")  # c claims a's id
        f, by_address = make_fleet([a, b, c])
        f.discovery = Static(
            (
                NodeAddress("10.0.0.1:7001", "a"),
                NodeAddress("10.0.0.2:7001", "zzz"),  # expected another id
                NodeAddress("10.0.0.3:7001"),
            )
        )
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        healthy = {link.address: link.id for link in f.healthy()}
        assert healthy == {"10.0.0.1:7001": "a"}
        errors = {link.address: link.error for link in f.links.values()}
        assert "discovery expected 'zzz'" in errors["10.0.0.2:7001"]
        assert "is 10.0.0.1:7001's already" in errors["10.0.0.3:7001"]
        # A node discovery no longer names is dropped and its channel closed.
        f.discovery = Static((NodeAddress("10.0.0.1:7001"),))
        gone = f.links["10.0.0.2:7001"].channel
        await f.refresh()
        assert list(f.links) == ["10.0.0.1:7001"]
        assert gone.closed  # type: ignore[attr-defined]
        del by_address
        await f.close()

    asyncio.run(main())


def test_listing_merges_nodes_and_an_unseen_vm_is_found() -> None:
    async def main() -> None:
        a, b = FakeNode("a"), FakeNode("b")
        f, _ = make_fleet([a, b])
        await f.refresh()
        vm = (await b.CreateVM(vm_manager_pb2.CreateVMRequest())).vm  # made behind its back
        await a.CreateVM(vm_manager_pb2.CreateVMRequest())
        stub = FleetStub(f)
        # A VM this fleet never saw: every node is asked once, then it is known.
        got = await stub.GetVM(vm_manager_pb2.GetVMRequest(name=vm.name), timeout=5)
        assert got.vm.node_id == "b"
        assert f.where[vm.name] == "b"
        with refused(grpc.StatusCode.NOT_FOUND, "no VM named agent-vm-x on any of the 2 nodes"):
            await stub.GetVM(vm_manager_pb2.GetVMRequest(name="agent-vm-x"), timeout=5)
        listed = await stub.ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=5)
        assert sorted(v.node_id for v in listed.vms) == ["a", "b"]
        # A node down is left out of the list (its VMs are not lost: they are not listed).
        b.down = True
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        listed = await stub.ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=5)
        assert [v.node_id for v in listed.vms] == ["a"]
        await f.close()

    asyncio.run(main())


def test_templates_are_built_on_every_node_and_restores_prefer_them() -> None:
    async def main() -> None:
        nodes = [FakeNode(f"n{i}") for i in range(4)]
        nodes[3].down = True
        f, _ = make_fleet(nodes)
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        stub = FleetStub(f)
        req = vm_manager_pb2.PrepareTemplateRequest(profile=common_pb2.RESOURCE_PROFILE_LIGHT)
        resp = await stub.PrepareTemplate(req, timeout=5)
        assert resp.template.key == "tpl-1-"
        # Every healthy node built its own; the down one was not asked.
        assert [n.calls["PrepareTemplate"] for n in nodes] == [1, 1, 1, 0]
        # One node failing to build is logged; the others' template is the answer.
        nodes[0].template_fails = True
        await stub.PrepareTemplate(req, timeout=5)
        nodes[1].template_fails = nodes[2].template_fails = True
        with refused(grpc.StatusCode.INTERNAL, "the build VM crashed"):
            await stub.PrepareTemplate(req, timeout=5)
        # A restore goes to a node that holds the template over an emptier one without.
        nodes[0].templates.clear()
        nodes[1].templates.clear()
        nodes[2].vms = {f"x{i}": common_pb2.VM(name=f"x{i}") for i in range(2)}
        await probe_all(f)
        create = vm_manager_pb2.CreateVMRequest(
            profile=common_pb2.RESOURCE_PROFILE_LIGHT, from_template=True
        )
        assert (await stub.CreateVM(create, timeout=5)).vm.node_id == "n2"
        # A cold boot goes by load alone.
        create.from_template = False
        assert (await stub.CreateVM(create, timeout=5)).vm.node_id in ("n0", "n1")
        await f.close()

    asyncio.run(main())


def test_a_node_seen_again_is_handed_to_the_reconcile_hooks() -> None:
    async def main() -> None:
        a, b = FakeNode("a"), FakeNode("b")
        f, _ = make_fleet([a, b])
        await f.refresh()
        seen: list[str] = []

        async def hook(link: fleet_mod.NodeLink) -> None:
            seen.append(link.id)
            if link.id == "b":
                raise RuntimeError("a hook's failure stays its own")

        f.on_up.append(hook)
        await probe_all(f)
        await asyncio.sleep(0)
        assert seen == [], "nodes that stay up are not reconciled"
        a.down = b.down = True
        for _ in range(DOWN_AFTER + 1):
            await probe_all(f)
        # a answers again but is still taking up its VMs: not used, not reconciled.
        a.down = b.down = False
        a.recovering = True
        await probe_all(f)
        await asyncio.sleep(0.01)
        assert seen == ["b"]
        (link_a,) = [link for link in f.links.values() if link.id == "a"]
        assert not link_a.healthy
        assert "previous run" in link_a.error
        a.recovering = False
        await probe_all(f)
        await asyncio.sleep(0.01)
        assert sorted(seen) == ["a", "b"]
        assert all(link.healthy for link in f.links.values())
        # A restart between two probes (one miss, never down) is reconciled too.
        a.down = True
        await probe_all(f)
        a.down = False
        await probe_all(f)
        await asyncio.sleep(0.01)
        assert sorted(seen) == ["a", "a", "b"]
        await f.close()

    asyncio.run(main())


def test_every_call_about_one_vm_is_routed_to_its_node() -> None:
    """A new VMManagerService RPC whose request names a VM must be in VM_METHODS, or the
    fleet would send it to whichever node came first. Image RPCs name an image."""
    images = {"GetImage", "BuildImage", "ImportImage", "DeleteImage", "TagImage"}
    service = vm_manager_pb2.DESCRIPTOR.services_by_name["VMManagerService"]
    by_name = {
        m.name
        for m in service.methods
        if "name" in m.input_type.fields_by_name and m.name not in images
    }
    assert by_name == fleet_mod.VM_METHODS
