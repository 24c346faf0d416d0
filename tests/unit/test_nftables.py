"""The NAT_FILTERED nftables ruleset: valid for the kernel, closed to injection.

Loaded for real into a private network namespace (never the host's ruleset).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agentvm.common.errors import InvalidArgument
from agentvm.vm_manager.nftables import Ruleset, VMRules, render

VM1 = VMRules("vm1", "10.213.0.2", "52:54:00:aa:bb:cc", (443, 80), ("198.18.0.0/24",))
VM2 = VMRules("vm2", "10.213.0.3", "52:54:00:aa:bb:cd")
MAC = "52:54:00:aa:bb:cc"


def ruleset(*vms: VMRules, uplink: str | None = "avmw-h") -> Ruleset:
    return Ruleset(
        table="agentvm_t1", bridge="avm-t1", bridge_ip="10.213.0.1", uplink=uplink, vms=vms
    )


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"avm-nft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(ns: str, *args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_ruleset_loads_into_a_real_kernel_and_replaces_itself(netns: str) -> None:
    script = render(ruleset(VM1, VM2))
    for _ in range(2):  # applying twice replaces the table (idempotent)
        proc = nft(netns, "-f", "-", script=script)
        assert proc.returncode == 0, proc.stderr
    listed = nft(netns, "list", "table", "inet", "agentvm_t1").stdout
    assert "set dns4_vm1" in listed
    assert "198.18.0.0/24" in listed
    assert 'oifname "avmw-h"' in listed
    # DNS answers go into the per-VM set with their TTL.
    add = nft(
        netns, "add", "element", "inet", "agentvm_t1", "dns4_vm1", "{ 198.18.0.10 timeout 30s }"
    )
    assert add.returncode == 0, add.stderr
    assert "198.18.0.10" in nft(netns, "list", "set", "inet", "agentvm_t1", "dns4_vm1").stdout
    # One VM gone: the next render drops its sets and rules.
    assert nft(netns, "-f", "-", script=render(ruleset(VM2))).returncode == 0
    assert "vm1" not in nft(netns, "list", "table", "inet", "agentvm_t1").stdout


def test_rule_order_ends_in_drop_and_pins_address_and_mac() -> None:
    lines = [line.strip() for line in render(ruleset(VM1)).splitlines()]
    fwd = lines[lines.index("chain forward {") : lines.index("chain input {")]
    accepts = [line for line in fwd if line.endswith("accept") and "@" in line]
    assert accepts
    assert all("ether saddr 52:54:00:aa:bb:cc ip saddr 10.213.0.2" in a for a in accepts)
    assert fwd[-2].endswith("drop")
    assert "ipv6 drop" in " ".join(fwd)
    assert 'oifname "avmw-h"' not in render(ruleset(VM1, uplink=None))


@pytest.mark.parametrize(
    ("vm", "word"),
    [
        (
            VMRules(
                "vm1", "10.0.0.2", "52:54:00:aa:bb:cc", (443,), ("1.2.3.0/24 }; flush ruleset",)
            ),
            "allow_cidrs",
        ),
        (VMRules("vm1", "10.0.0.2", "52:54:00:aa:bb:cc", (443,), ("10.0.0.1/8",)), "allow_cidrs"),
        (VMRules("vm1", "10.0.0.2", "52:54:00:aa:bb:cc", (0,)), "ports"),
        (VMRules("vm1", "10.0.0.2", "52:54:00:aa:bb:cc", ()), "ports"),
        (VMRules("vm1", "10.0.0.2; flush ruleset", "52:54:00:aa:bb:cc"), "IPv4"),
        (VMRules("vm1", "10.0.0.2", "52:54:00:AA:bb:cc"), "MAC"),
        (VMRules("VM 1", "10.0.0.2", "52:54:00:aa:bb:cc"), "vm id"),
    ],
)
def test_bad_input_never_reaches_the_script(vm: VMRules, word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        render(ruleset(vm))


def test_bad_names_and_duplicates_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        render(ruleset(VM1, VM1))
    with pytest.raises(InvalidArgument, match="interface"):
        render(ruleset(VM1, uplink='x" accept'))
    with pytest.raises(InvalidArgument, match="table"):
        render(Ruleset("filter", "avm-t1", "10.213.0.1", None, (VM1,)))
