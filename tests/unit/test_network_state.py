"""NatNetwork's pure rules: policies, which answered addresses may open, the egress log."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.v1 import common_pb2
from agentvm.vm_manager.dnsproxy import (
    MAX_INFLIGHT_PER_SOURCE,
    ClientPolicy,
    DNSProxy,
    DomainAllowlist,
    EgressRecord,
)
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.network import Attachment, EgressLog, NatNetwork, NetNames, Policy

SETTINGS = Settings(
    nat_subnet="10.213.7.0/24",
    nat_default_domains="pypi.org,*.github.com",
    nat_default_ports="443,80",
    nat_dns_upstream="192.0.2.53",
)


def test_empty_policy_fields_take_the_defaults_and_input_is_validated() -> None:
    p = Policy.from_proto(common_pb2.NetworkPolicy(), SETTINGS)
    assert p == Policy(("pypi.org", "*.github.com"), (), (80, 443))
    mine = common_pb2.NetworkPolicy(
        allow_domains=["A.test.", "a.test"], allow_cidrs=["203.0.113.0/24"], ports=[22]
    )
    assert Policy.from_proto(mine, SETTINGS) == Policy(("a.test",), ("203.0.113.0/24",), (22,))
    assert Policy.from_json(p.to_json()) == p
    for bad, word in (
        (common_pb2.NetworkPolicy(allow_domains=["x; flush ruleset"]), "allow_domains"),
        (common_pb2.NetworkPolicy(allow_cidrs=["10.0.0.1/8"]), "allow_cidrs"),
        (common_pb2.NetworkPolicy(ports=[70000]), "ports"),
        (common_pb2.NetworkPolicy(allow_domains=[f"n{i}.test" for i in range(300)]), "too large"),
    ):
        with pytest.raises(InvalidArgument, match=word):
            Policy.from_proto(bad, SETTINGS)


def test_names_fit_interface_limits_and_differ_per_installation() -> None:
    a, b = NetNames.for_prefix("agent-vm-"), NetNames.for_prefix("agent-vm-test1-")
    assert a.bridge != b.bridge
    assert a.table != b.table
    assert a.log_group != b.log_group
    for n in (a, b):
        assert len(n.tap("0123abcd")) <= 15
        assert len(n.bridge_tap("0123abcd")) <= 15
        assert not n.bridge_tap("0123abcd").startswith(n.tap_prefix)


def test_dns_answers_never_open_private_link_local_or_the_vms_subnet() -> None:
    net = NatNetwork(SETTINGS, LibvirtConnection("test:///default"))
    att = Attachment(
        "agent-vm-x", "1234abcd", "10.213.7.2", "52:54:00:00:00:01", 24, "10.213.7.1",
        Policy(("a.test",), ("192.168.5.0/24",), (80,)),
    )  # fmt: skip
    assert net._reachable(att, "203.0.113.9")
    assert net._reachable(att, "198.18.0.10")
    for addr in ("169.254.169.254", "10.213.7.3", "127.0.0.1", "172.16.1.1", "100.64.0.1"):
        assert not net._reachable(att, addr), addr
    assert net._reachable(att, "192.168.5.7")  # named by allow_cidrs
    assert not net._reachable(att, "192.168.6.7")


def test_forget_ends_a_lagging_follower() -> None:
    async def body() -> None:
        log = EgressLog()
        got: list[EgressRecord] = []

        async def follow() -> None:
            async for rec in log.follow("vm1"):
                got.append(rec)
                await asyncio.sleep(3600)  # never keeps up

        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0)
        for i in range(5000):
            log.add(EgressRecord(time.time(), "vm1", "dns", f"n{i}.test", "", 53, "denied"))
        log.forget("vm1")
        task.cancel()
        assert log.dropped > 0
        assert log.records("vm1") == []

    asyncio.run(body())


def test_a_flooding_guest_is_shed_not_served() -> None:
    async def body() -> None:
        started = asyncio.Event()

        class Slow(DNSProxy):
            async def handle(self, data: bytes, addr: tuple[str, int]) -> None:
                started.set()
                await asyncio.sleep(3600)

        async def noop(vm: str, name: str, addrs: list[tuple[str, int]]) -> None:
            return None

        proxy = Slow(
            upstream=("192.0.2.1", 53),
            policy_for=lambda src: ClientPolicy("vm1", DomainAllowlist(["a.test"])),
            on_addresses=noop,
            on_record=lambda rec: None,
        )
        for _ in range(100):
            proxy.datagram_received(b"q", ("10.213.7.2", 5353))
        proxy.datagram_received(b"q", ("10.213.7.3", 5353))  # another VM still gets in
        await started.wait()
        assert proxy.shed == 100 - MAX_INFLIGHT_PER_SOURCE
        assert len(proxy._tasks) == MAX_INFLIGHT_PER_SOURCE + 1
        await proxy.close()

    asyncio.run(body())
