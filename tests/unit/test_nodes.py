"""Discovery of nodes (agentvm.common.nodes): static lists, DNS, the single-host default."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from agentvm.common import nodes
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument, Unavailable
from agentvm.common.nodes import NodeAddress


def current(d: nodes.Discovery) -> list[NodeAddress]:
    return asyncio.run(d.current())


def test_a_single_host_needs_no_setting() -> None:
    s = dataclasses.replace(Settings(), vm_manager_addr="unix:/run/agent-vm/vm-manager.sock")
    assert current(nodes.from_settings(s)) == [NodeAddress("unix:/run/agent-vm/vm-manager.sock")]


def test_static_lists_with_and_without_ids() -> None:
    s = dataclasses.replace(Settings(), nodes="n1=10.0.0.1:7001, 10.0.0.2:7001,n3=[fd00::3]:7001")
    assert current(nodes.from_settings(s)) == [
        NodeAddress("10.0.0.1:7001", "n1"),
        NodeAddress("10.0.0.2:7001"),
        NodeAddress("[fd00::3]:7001", "n3"),
    ]


@pytest.mark.parametrize(
    ("nodes_", "dns", "message"),
    [
        ("n1=10.0.0.1", "", "'10.0.0.1' is not a vm-manager address"),
        ("N1=10.0.0.1:1", "", "node id 'N1'"),
        ("a:99999", "", "'a:99999' is not a vm-manager address"),
        ("n1=a:1,n1=b:1", "", "n1 named twice"),
        ("a:1,a:1", "", "a:1 named twice"),
        (" , ", "", "AGENTVM_NODES is empty"),
        ("a:1", "b:1", "AGENTVM_NODES and AGENTVM_NODES_DNS are set together"),
        ("", "vm-manager", "AGENTVM_NODES_DNS='vm-manager': use name:port"),
        ("", "bad_name:7001", "use name:port"),
    ],
)
def test_bad_discovery_settings_name_the_variable(nodes_: str, dns: str, message: str) -> None:
    s = dataclasses.replace(Settings(), nodes=nodes_, nodes_dns=dns)
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")):
        nodes.from_settings(s)


def test_dns_gives_one_node_per_address() -> None:
    got = current(nodes.Dns.parse("localhost:7001"))
    assert got
    assert all(n.address.endswith(":7001") and not n.expected_id for n in got)
    assert "127.0.0.1:7001" in [n.address for n in got] or "[::1]:7001" in [n.address for n in got]
    assert got == sorted(set(got))


def test_a_name_that_does_not_resolve_is_unavailable_with_the_fix() -> None:
    with pytest.raises(Unavailable, match=r"cannot resolve nodes\.invalid .*AGENTVM_NODES"):
        current(nodes.Dns.parse("nodes.invalid:7001"))
