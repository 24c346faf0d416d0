"""NatNetwork's pure rules: policies, which answered addresses may open, the egress log."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.v1 import common_pb2
from agentvm.vm_manager import bridged
from agentvm.vm_manager.dnsproxy import (
    MAX_INFLIGHT_PER_SOURCE,
    ClientPolicy,
    DNSProxy,
    DomainAllowlist,
    EgressRecord,
)
from agentvm.vm_manager.hostaddrs import IFA_ADDRESS, IFA_LOCAL, RTM_NEWADDR, parse_addresses
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.network import Attachment, EgressLog, NatNetwork, NetNames, Policy
from agentvm.vm_manager.special_ranges import IPV4_SPECIAL, IPV6_SPECIAL, classify

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
        assert n.bridge_tap("0123abcd").startswith(n.bridged_prefix)
        assert n.bridged_table != n.table


def _net(allow_private: str = "", host: tuple[str, ...] = ()) -> tuple[NatNetwork, Attachment]:
    settings = dataclasses.replace(SETTINGS, nat_dns_allow_private=allow_private)
    net = NatNetwork(settings, LibvirtConnection("test:///default"))
    # The host's interface networks, as the watcher would have read them.
    net.host_addresses.networks = tuple(ipaddress.ip_network(n) for n in host)
    net.host_addresses.reads = 1
    att = Attachment(
        "agent-vm-x", "1234abcd", "10.213.7.2", "52:54:00:00:00:01", 24, "10.213.7.1",
        Policy(("a.test",), ("192.168.5.0/24",), (80,)),
    )  # fmt: skip
    return net, att


@pytest.mark.parametrize(("block", "name", "ref"), IPV4_SPECIAL + IPV6_SPECIAL)
def test_dns_answers_never_open_a_special_purpose_block(block: str, name: str, ref: str) -> None:
    """Every block of the IANA registries (first, middle and last address) is refused,
    naming the block."""
    net, att = _net()
    block_net = ipaddress.ip_network(block)
    for ip in {block_net[0], block_net[block_net.num_addresses // 2], block_net[-1]}:
        why = net._refusal(att, str(ip))
        assert "special-purpose block" in why, (ip, why)
        assert classify(ip) in why


def test_the_registry_tables_hold_the_blocks_the_issue_names() -> None:
    blocks = {b for b, _n, _r in IPV4_SPECIAL + IPV6_SPECIAL}
    named = (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
        "255.255.255.255/32", "224.0.0.0/4", "::/128", "::1/128", "::ffff:0:0/96",
        "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
        "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
    )  # fmt: skip
    assert set(named) <= blocks, set(named) - blocks


def test_ordinary_addresses_pass_and_the_vms_subnet_never_does() -> None:
    net, att = _net(allow_private="10.213.0.0/16")
    for addr in ("1.1.1.1", "151.101.0.223", "2a04:4e42::223"):
        assert net._reachable(att, addr), addr
    # The operator's exception never opens the VMs' own subnet.
    assert "VMs' own subnet" in net._refusal(att, "10.213.7.3")
    assert net._reachable(att, "192.168.5.7")  # named by the policy's allow_cidrs
    assert not net._reachable(att, "192.168.6.7")


def test_the_hosts_own_networks_are_refused_even_when_public() -> None:
    net, att = _net(host=("151.101.0.0/16", "2a04:4e42::/32"))
    assert "host's own network 151.101.0.0/16" in net._refusal(att, "151.101.0.223")
    assert "host's own network 2a04:4e42::/32" in net._refusal(att, "2a04:4e42::223")
    assert net._reachable(att, "151.102.0.1")
    # A change the watcher reads is in force at once.
    net.host_addresses.networks = ()
    assert net._reachable(att, "151.101.0.223")


def test_until_the_hosts_networks_are_read_no_answer_opens_anything() -> None:
    """Fail closed: a host network that was never read could be any address."""
    net, att = _net()
    net.host_addresses.reads = 0
    assert "not known yet" in net._refusal(att, "151.101.0.223")
    net.host_addresses.reads = 1
    assert net._reachable(att, "151.101.0.223")


def test_the_operators_allow_list_lets_a_private_range_through() -> None:
    net, att = _net(allow_private="198.18.0.0/24, fd00:1::/64", host=("198.18.0.0/24",))
    assert net._reachable(att, "198.18.0.10")  # special and on the host's networks
    assert net._reachable(att, "fd00:1::5")
    assert "198.18.0.0/15 Benchmarking" in net._refusal(att, "198.18.1.5")
    assert "fc00::/7" in net._refusal(att, "fd00:2::5")
    for bad in ("198.18.0.1/24", "example.com", "10.0.0.0/33"):
        with pytest.raises(InvalidArgument, match="AGENTVM_NAT_DNS_ALLOW_PRIVATE"):
            _net(allow_private=bad)


def test_refused_answers_are_reported_and_never_opened() -> None:
    async def body() -> None:
        net, att = _net()
        net._atts[att.vm_name] = att
        refused = await net._on_addresses(
            att.vm_name, "a.test", [("198.18.1.5", 60), ("10.0.0.1", 60)]
        )
        assert set(refused) == {"198.18.1.5", "10.0.0.1"}
        assert "Benchmarking" in refused["198.18.1.5"]
        assert net._resolved.get(att.vm_name) is None  # nothing reached the firewall
        gone = await net._on_addresses("agent-vm-gone", "a.test", [("1.1.1.1", 60)])
        assert set(gone) == {"1.1.1.1"}

    asyncio.run(body())


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


WATCH = r"""
import asyncio, ipaddress, json, subprocess, sys
from agentvm.vm_manager.hostaddrs import HostAddresses

async def changed(watch, before, limit=30.0):
    # Bounded wait for the watcher's own re-read (its timer is an hour away).
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while watch.reads == before and loop.time() < end:
        await asyncio.sleep(0.01)

async def main():
    watch = HostAddresses(reread_s=3600)
    await watch.start()
    out = {"start": [str(n) for n in watch.networks]}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for step, cmd in (("added", "add"), ("removed", "del")):
        before = watch.reads
        subprocess.run(["ip", "addr", cmd, "203.0.113.7/24", "dev", "lo"], check=True)
        await changed(watch, before)
        out[step] = [str(n) for n in watch.networks]
    out["covering"] = str(watch.covering(ipaddress.ip_address("203.0.113.9")))
    await watch.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_the_host_address_watcher_picks_up_added_and_removed_addresses() -> None:
    """In a network namespace of its own (never the host's interfaces): an address
    added to an interface is in the list through the netlink event, without waiting
    for the periodic re-read, and gone again when it is removed."""
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", WATCH],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert "203.0.113.0/24" not in got["start"]
    assert "203.0.113.0/24" in got["added"]
    assert "203.0.113.0/24" not in got["removed"]
    assert got["covering"] == "None"


def test_the_address_dump_parser_reads_local_and_peer_networks() -> None:
    def attr(kind: int, data: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)

    body = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2)
    body += attr(IFA_ADDRESS, socket.inet_aton("192.0.2.7")) + attr(
        IFA_LOCAL, socket.inet_aton("192.0.2.7")
    )
    msg = struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, 0, 1, 0) + body
    v6 = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2) + attr(
        IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd00:5::1")
    )
    msg += struct.pack("=IHHII", 16 + len(v6), RTM_NEWADDR, 0, 1, 0) + v6
    done = struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 4
    nets, finished = parse_addresses(msg + done)
    assert [str(n) for n in nets] == ["192.0.2.0/24", "192.0.2.0/24", "fd00:5::/64"]
    assert finished
    # Truncated or garbage input never raises.
    assert parse_addresses(msg[:30]) == ([], False)
    assert parse_addresses(b"\xff" * 64)[1] is False


def test_a_network_that_fails_to_come_up_leaves_no_tables_behind(tmp_path: Path) -> None:
    """The DNS proxy cannot bind (its address is on no interface): the tables and the
    libvirt network made before that are removed, and the error says what failed."""
    prefix = f"agent-vm-upfail{os.getpid()}-"
    settings = dataclasses.replace(
        SETTINGS, vm_prefix=prefix, nat_subnet="198.18.213.0/24", state_dir=tmp_path
    )
    net = NatNetwork(settings, LibvirtConnection("test:///default"))

    def tables() -> list[str]:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line.endswith(net.names.table)]

    assert tables() == []
    try:
        with pytest.raises(FailedPrecondition, match=r"cannot serve DNS on 198\.18\.213\.1:53"):
            asyncio.run(net._ensure_up())
        assert tables() == []
        assert net.names.network not in net.conn.checked().listNetworks()
    finally:
        for line in tables():
            subprocess.run(["nft", "delete", *line.split()], check=False)


def test_check_bridge_refuses_every_bridge_agent_vm_manages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By name (any vm-manager's NAT bridge), by libvirt network ownership (any
    bridge name, virbr* included), by an agent-vm NAT tap in it; a user's bridge passes."""
    for name, ports in (("br-lan", ["eth0"]), ("virbr7", []), ("br-odd", ["avt1a2b3c4d5e6f"])):
        (tmp_path / name / "bridge").mkdir(parents=True)
        (tmp_path / name / "brif").mkdir()
        for port in ports:
            (tmp_path / name / "brif" / port).mkdir()
    monkeypatch.setattr(bridged, "SYS_NET", tmp_path)
    conn = LibvirtConnection("test:///default").checked()
    xml = (
        "<network><name>agent-vm-other-nat</name><bridge name='virbr7'/>"
        "<ip address='10.9.0.1' netmask='255.255.255.0'/></network>"
    )
    net = conn.networkDefineXML(xml)
    try:
        own = bridged.own_network_bridges(conn)
    finally:
        net.undefine()
    assert own == {"virbr7": "agent-vm-other-nat"}  # libvirt's own "default" is not ours
    for name, words in (
        ("avb1f2e", "bridge of an agent-vm NAT network"),
        ("virbr7", "agent-vm's libvirt network agent-vm-other-nat"),
        ("br-odd", "carries agent-vm NAT VMs (avt1a2b3c4d5e6f)"),
    ):
        with pytest.raises(InvalidArgument, match=re.escape(words)) as err:
            bridged.check_bridge(name, own)
        assert "NETWORK_MODE_NAT_FILTERED" in str(err.value)
        assert "ip link add br-agents type bridge" in str(err.value)
    bridged.check_bridge("br-lan", own)
    with pytest.raises(FailedPrecondition, match="no bridge named br-none"):
        bridged.check_bridge("br-none", own)
