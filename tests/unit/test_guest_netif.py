"""The guest's interface ioctls (agentvm_guest/netif.py) against a real kernel: a
network namespace of the test's own with a veth pair, read back with ``ip``.
Every NAT VM the real-VM tests boot or restore is configured this way too
(test_network, test_templates, test_pool)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)

CONFIGURE = """
import ipaddress as ip, sys
from agentvm_guest import netif
mac, iface, gw = sys.argv[1:4]
netif.set_up("eth0", False)
netif.set_mac("eth0", mac)
netif.set_ipv4("eth0", ip.IPv4Interface(iface))
netif.set_up("eth0")
netif.replace_default_route(ip.IPv4Address(gw))
print(netif.ipv4("eth0"))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = "avtest-netif-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name, "link"]
        subprocess.run([*ip, "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
        subprocess.run([*ip, "set", "peer0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(ns: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'guest'}:{REPO / 'services'}"}
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def show(ns: str, *what: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *what], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out or "[]"))


def test_eth0_gets_its_mac_address_and_default_route_and_a_second_time_new_ones(
    netns: str,
) -> None:
    first = in_netns(netns, CONFIGURE, "52:54:00:aa:bb:cc", "10.213.0.7/24", "10.213.0.1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "10.213.0.7/24"
    (link,) = show(netns, "link", "show", "dev", "eth0")
    assert link["address"] == "52:54:00:aa:bb:cc"
    assert "UP" in link["flags"]  # type: ignore[operator]
    (addr,) = show(netns, "-4", "addr", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.213.0.7", 24)]  # type: ignore[attr-defined]
    assert [r["gateway"] for r in show(netns, "route", "show", "default")] == ["10.213.0.1"]
    # A clone of a template configured again: the old address and route are replaced.
    again = in_netns(netns, CONFIGURE, "52:54:00:aa:bb:dd", "10.214.0.9/16", "10.214.0.1")
    assert again.returncode == 0, again.stderr
    (addr,) = show(netns, "-4", "addr", "show", "dev", "eth0")
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.214.0.9", 16)]  # type: ignore[attr-defined]
    assert [r["gateway"] for r in show(netns, "route", "show", "default")] == ["10.214.0.1"]


def test_errors_name_the_interface_and_what_failed(netns: str) -> None:
    code = """
from agentvm_guest import netif
for call in (lambda: netif.set_mac("nosuch0", "52:54:00:aa:bb:cc"),
             lambda: netif.set_up("eth0-but-far-too-long"),
             lambda: netif.set_mac("eth0", "52:54:00")):
    try:
        call()
    except OSError as exc:
        print(exc)
print(netif.ipv4("eth0"))
"""
    out = in_netns(netns, code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "set the MAC of nosuch0 to 52:54:00:aa:bb:cc: No such device" in lines[0]
    assert "bad interface name 'eth0-but-far-too-long'" in lines[1]
    assert "bad MAC address '52:54:00'" in lines[2]
    assert lines[3] == "None"  # no address yet
