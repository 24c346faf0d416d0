"""A vm-manager as a node (vm_manager/node.py, GetNode): its settings, its capacity on
libvirt's test driver (16 CPUs, 3072 MiB), refusal beyond it, VMs naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument, ResourceExhausted
from agentvm.common.placement import Amount
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager.node import NodeConfig, NodeState, default_node_id
from agentvm.vm_manager.templates import Resources

from .test_servicers import fake_image, run_servicer_test, unit_settings

__all__ = ["fake_image"]  # the fixture, used by name


def test_node_settings_default_and_parse() -> None:
    cfg = NodeConfig.from_settings(Settings())
    assert cfg.id == default_node_id()
    assert (cfg.cpu_overcommit, cfg.memory_overcommit, cfg.disk_overcommit) == (16, 1.5, 4)
    assert (cfg.reserve_memory_mib, cfg.reserve_disk_mib) == (1024, 4096)
    cfg = NodeConfig.from_settings(
        Settings(
            node_id="n1",
            node_labels="zone=a, agent-vm.io/kvm=true",
            node_overcommit="cpu=2",
            node_reserve="memory=0",
        )
    )
    assert cfg.labels == {"zone": "a", "agent-vm.io/kvm": "true"}
    assert (cfg.cpu_overcommit, cfg.memory_overcommit) == (2, 1.5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("node_id", "Node_1", "AGENTVM_NODE_ID='Node_1': use 1-32 lowercase"),
        ("node_id", "-n", "AGENTVM_NODE_ID"),
        ("node_labels", "zone", "AGENTVM_NODE_LABELS: 'zone' is not one of key=value"),
        ("node_labels", "zo ne=a", "AGENTVM_NODE_LABELS: zo ne='a'"),
        ("node_overcommit", "gpu=2", "AGENTVM_NODE_OVERCOMMIT: 'gpu=2' is not one of keys cpu"),
        ("node_overcommit", "cpu=nan", "cpu='nan' must be a number of at least 0.1"),
        ("node_overcommit", "memory=0", "memory='0' must be a number"),
        ("node_reserve", "memory=-1", "AGENTVM_NODE_RESERVE: memory='-1'"),
        ("node_reserve", "disk=lots", "AGENTVM_NODE_RESERVE: disk='lots'"),
    ],
)
def test_bad_node_settings_name_the_variable(field: str, value: str, message: str) -> None:
    change: dict[str, Any] = {field: value}
    settings = dataclasses.replace(Settings(), **change)
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        NodeConfig.from_settings(settings)


def test_room_is_checked_per_resource_with_overcommit() -> None:
    node = NodeState(
        NodeConfig(id="n1", cpu_overcommit=2, memory_overcommit=1, reserve_memory_mib=1024),
        Amount(2, 3072, 100_000),
    )
    assert node.allocatable == Amount(2, 2048, 100_000 - 4096)
    four = [Resources(1, 512, 4096)] * 4
    with pytest.raises(ResourceExhausted, match=r"node n1: vCPUs 4 of 4 committed"):
        node.check_room(four, Resources(1, 256, 2048))
    with pytest.raises(ResourceExhausted, match=r"memory 1536 MiB of 2048 MiB committed"):
        node.check_room(four[:3], Resources(1, 1024, 2048))
    node.check_room(four[:3], Resources(1, 512, 2048))  # exactly full is allowed
    with pytest.raises(ResourceExhausted, match="AGENTVM_NODE_OVERCOMMIT"):
        node.check_room([], Resources(1, 512, 10**7))


def test_get_node_and_refusal_beyond_capacity_on_the_test_driver(
    tmp_path: Path, fake_image: Path
) -> None:
    settings = dataclasses.replace(
        unit_settings(tmp_path, fake_image),
        node_id="unit-node",
        node_labels="zone=a",
        node_overcommit="cpu=1,memory=1,disk=100",
        node_reserve="memory=0,disk=0",
    )
    intensive = vm_manager_pb2.CreateVMRequest(
        profile=common_pb2.RESOURCE_PROFILE_INTENSIVE,  # 2 vCPUs, 1024 MiB
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
    )

    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        node = (await stub.GetNode(vm_manager_pb2.GetNodeRequest())).node
        assert (node.id, dict(node.labels), node.vm_count) == ("unit-node", {"zone": "a"}, 0)
        assert (node.allocatable.vcpus, node.allocatable.memory_mib) == (16, 3072)
        assert node.allocatable.disk_mib > 0
        assert node.committed.memory_mib == 0
        assert node.accelerator == common_pb2.ACCELERATOR_TCG
        made = [(await stub.CreateVM(intensive)).vm for _ in range(3)]
        assert {vm.node_id for vm in made} == {"unit-node"}
        got = (await stub.GetVM(vm_manager_pb2.GetVMRequest(name=made[0].name))).vm
        assert got.node_id == "unit-node"
        node = (await stub.GetNode(vm_manager_pb2.GetNodeRequest())).node
        assert (node.committed.vcpus, node.committed.memory_mib, node.vm_count) == (6, 3072, 3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateVM(intensive)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "node unit-node: memory 3072 MiB of 3072 MiB committed" in (
            err.value.details() or ""
        )
        listed = (await stub.ListVMs(vm_manager_pb2.ListVMsRequest())).vms
        assert len(listed) == 3  # the refused VM left nothing
        # Room again once a VM goes.
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=made[0].name))
        made.append((await stub.CreateVM(intensive)).vm)
        for vm in made[1:]:
            await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name))

    run_servicer_test(tmp_path, fake_image, body, settings)
