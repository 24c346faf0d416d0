"""`agent-vm nodes`: discovery, GetNode on each, the fleet's rules (fake vm-managers)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from agentvm.cli import node_cmds
from agentvm.cli.main import cli
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc


class Down(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def node(node_id: str, **kw: Any) -> vm_manager_pb2.Node:
    return vm_manager_pb2.Node(
        id=node_id,
        allocatable=common_pb2.Resources(vcpus=2, memory_mib=4096),
        committed=common_pb2.Resources(vcpus=1, memory_mib=512),
        cpu_overcommit=2.0,
        memory_overcommit=1.5,
        vm_count=1,
        accelerator=common_pb2.ACCELERATOR_TCG,
        **kw,
    )


def run(monkeypatch: pytest.MonkeyPatch, answers: dict[str, Any], spec: str, *args: str) -> Any:
    class Stub:
        def __init__(self, address: str) -> None:
            self.address = address

        def GetNode(self, request: Any, timeout: float) -> vm_manager_pb2.GetNodeResponse:
            answer = answers[self.address]
            if isinstance(answer, Exception):
                raise answer
            return vm_manager_pb2.GetNodeResponse(node=answer)

    monkeypatch.setattr(node_cmds, "service", lambda address, name: address)
    monkeypatch.setattr(vm_manager_pb2_grpc, "VMManagerServiceStub", Stub)
    monkeypatch.setenv("AGENTVM_NODES", spec)
    return CliRunner().invoke(cli, ["nodes", *args])


def test_every_node_is_shown_with_its_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"10.0.0.1:7001": node("a", labels={"zone": "z1"}), "10.0.0.2:7001": node("b")}
    res = run(monkeypatch, answers, "a=10.0.0.1:7001,b=10.0.0.2:7001")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:4] == ["NODE", "ADDRESS", "STATE", "ACCEL"]
    assert lines[1].split() == [
        "a",
        "10.0.0.1:7001",
        "up",
        "tcg",
        "1/4",
        "512/6144",
        "1",
        "0",
        "zone=z1",
    ]
    assert lines[2].split()[:3] == ["b", "10.0.0.2:7001", "up"]


def test_down_recovering_misnamed_and_twice_claimed_nodes_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {
        "10.0.0.1:7001": Down(),
        "10.0.0.2:7001": node("b", recovering=True),
        "10.0.0.3:7001": node("x"),
        "10.0.0.4:7001": node("d"),
        "10.0.0.5:7001": node("d"),
    }
    spec = "a=10.0.0.1:7001,b=10.0.0.2:7001,c=10.0.0.3:7001,10.0.0.4:7001,10.0.0.5:7001"
    res = run(monkeypatch, answers, spec, "--json")
    assert res.exit_code == 1, res.output
    got = {s["address"]: s for s in json.loads(res.output)}
    assert got["10.0.0.1:7001"]["state"] == "down"
    assert "UNAVAILABLE: connection refused" in got["10.0.0.1:7001"]["problem"]
    assert got["10.0.0.2:7001"]["state"] == "unusable"
    assert "previous run" in got["10.0.0.2:7001"]["problem"]
    assert "discovery expected 'c'" in got["10.0.0.3:7001"]["problem"]
    assert "answered by 10.0.0.5:7001 too" in got["10.0.0.4:7001"]["problem"]
    assert "answered by 10.0.0.4:7001 too" in got["10.0.0.5:7001"]["problem"]
    assert got["10.0.0.4:7001"]["node"]["id"] == "d"


def test_bad_discovery_settings_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    res = run(monkeypatch, {}, "a=not an address")
    assert res.exit_code != 0
    assert "cannot discover the nodes" in res.output
    assert "AGENTVM_NODES" in res.output
