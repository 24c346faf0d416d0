"""The NAT_FILTERED nftables ruleset: valid for the kernel, closed to injection.

Loaded for real into a private network namespace (never the host's ruleset).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agentvm.common.errors import InvalidArgument
from agentvm.vm_manager.nftables import (
    BridgedTaps,
    Ruleset,
    VMRules,
    render_add,
    render_bridged,
    render_bridged_delete,
    render_delete,
    render_policy,
    render_remove,
    render_resolved,
    render_table,
)

VM1 = VMRules("vm1", "10.213.0.2", "52:54:00:aa:bb:cc", (443, 80), ("198.18.0.0/24",))
VM2 = VMRules("vm2", "10.213.0.3", "52:54:00:aa:bb:cd")
MAC = "52:54:00:aa:bb:cc"


def ruleset(*vms: VMRules, uplink: str | None = "avmw-h") -> Ruleset:
    return Ruleset(
        table="agentvm_t1",
        bridge="avbt1",
        bridge_ip="10.213.0.1",
        tap_prefix="avtt1",
        uplink=uplink,
        vms=vms,
        log_group=4242,
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


def test_the_tables_load_into_a_real_kernel_and_vms_come_and_go(netns: str) -> None:
    rs = ruleset(VM1)
    for _ in range(2):  # applying twice replaces the tables (idempotent)
        proc = nft(netns, "-f", "-", script=render_table(rs))
        assert proc.returncode == 0, proc.stderr
    listed = nft(netns, "list", "table", "inet", "agentvm_t1").stdout
    assert "set dns4_vm1" in listed
    assert "198.18.0.0/24" in listed
    assert 'oifname "avmw-h"' in listed
    assert "group 4242" in listed
    assert (
        '"avtt1vm1" . 52:54:00:aa:bb:cc . 52:54:00:aa:bb:cc . 10.213.0.2'
        in nft(netns, "list", "table", "bridge", "agentvm_t1").stdout
    )
    # A second VM joins without touching the first one's resolved addresses.
    resolved = render_resolved("agentvm_t1", "vm1", [("198.18.0.10", 30)])
    assert nft(netns, "-f", "-", script=resolved).returncode == 0
    proc = nft(netns, "-f", "-", script=render_add(rs, VM2))
    assert proc.returncode == 0, proc.stderr
    # The same address again refreshes its timeout instead of failing.
    again = render_resolved("agentvm_t1", "vm1", [("198.18.0.10", 3000)])
    assert nft(netns, "-f", "-", script=again).returncode == 0
    dns4 = nft(netns, "list", "set", "inet", "agentvm_t1", "dns4_vm1").stdout
    assert "198.18.0.10" in dns4
    assert "timeout 50m" in dns4
    # A new policy replaces ports and CIDRs and forgets resolved addresses.
    narrowed = VMRules("vm1", VM1.ip, VM1.mac, (8080,), ())
    proc = nft(netns, "-f", "-", script=render_policy(rs, narrowed))
    assert proc.returncode == 0, proc.stderr
    assert "198.18.0.10" not in nft(netns, "list", "set", "inet", "agentvm_t1", "dns4_vm1").stdout
    assert "8080" in nft(netns, "list", "set", "inet", "agentvm_t1", "ports_vm1").stdout
    # One VM gone: its chain and sets go, the other's stay.
    proc = nft(netns, "-f", "-", script=render_remove(rs, VM1))
    assert proc.returncode == 0, proc.stderr
    listed = nft(netns, "list", "table", "inet", "agentvm_t1").stdout
    assert "vm1" not in listed
    assert "vm_vm2" in listed
    assert nft(netns, "-f", "-", script=render_delete("agentvm_t1")).returncode == 0
    assert "agentvm_t1" not in nft(netns, "list", "tables").stdout


def test_rule_order_ends_in_drop_and_pins_address_and_mac() -> None:
    lines = [line.strip() for line in render_table(ruleset(VM1)).splitlines()]
    end = next(i for i, line in enumerate(lines) if line.startswith("set dnsrate"))
    fwd = lines[lines.index("chain forward {") : end]
    assert "ip saddr . ether saddr vmap @vms" in " ".join(fwd)
    assert fwd[-2].endswith("drop")
    vm_chain = lines[lines.index("chain vm_vm1 {") : lines.index("chain forward {")]
    accepts = [line for line in vm_chain if line.endswith("accept")]
    assert len(accepts) == 2
    assert vm_chain[-2] == "drop"
    # A log rule never carries the verdict (over its rate limit it would not match).
    assert all(not (" log " in line and line.endswith(("accept", "drop"))) for line in lines)
    assert 'oifname "avmw-h"' not in render_table(ruleset(VM1, uplink=None))


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
        render_table(ruleset(vm))


def test_bad_names_and_duplicates_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        render_table(ruleset(VM1, VM1))
    with pytest.raises(InvalidArgument, match="interface"):
        render_table(ruleset(VM1, uplink='x" accept'))
    with pytest.raises(InvalidArgument, match="table"):
        render_table(Ruleset("filter", "avbt1", "10.213.0.1", "avtt1", None, (VM1,)))
    with pytest.raises(InvalidArgument, match="IPv4"):
        render_resolved("agentvm_t1", "vm1", [("1.2.3.4 }; flush ruleset", 30)])


def test_the_bridged_taps_table_loads_and_keeps_learnt_leases(netns: str) -> None:
    one = BridgedTaps("agentvm_t1_u", "avut1", (("avut1vm1", MAC),))
    two = BridgedTaps("agentvm_t1_u", "avut1", (("avut1vm1", MAC), ("avut1vm2", VM2.mac)))
    proc = nft(netns, "-f", "-", script=render_bridged(one))
    assert proc.returncode == 0, proc.stderr
    # A lease learnt from a DHCP answer (198.19.0.112 for vm1's tap) ...
    lease = 'add element bridge agentvm_t1_u leases { "avut1vm1" . 0xc6130070 }'
    assert nft(netns, "-f", "-", script=lease).returncode == 0
    for bt in (two, one, two):  # ... survives other VMs coming and going
        proc = nft(netns, "-f", "-", script=render_bridged(bt))
        assert proc.returncode == 0, proc.stderr
    listed = nft(netns, "list", "table", "bridge", "agentvm_t1_u").stdout
    assert '"avut1vm1" . 0xc6130070' in listed
    assert f'"avut1vm1" . {MAC} . {MAC}' in listed
    assert '"avut1vm2" . 0x525400aabbcd' in listed  # its DHCP answers are read
    assert 'iifname "avu*" oifname "avu*"' in listed  # isolation from every bridged tap
    proc = nft(netns, "-f", "-", script=render_bridged(one))
    assert VM2.mac not in nft(netns, "list", "table", "bridge", "agentvm_t1_u").stdout
    lines = [line.strip() for line in render_bridged(one).splitlines()]
    pre = lines[lines.index("chain pre {", 12) : lines.index("chain isolate {", 12)]
    assert pre[-2] == 'iifname "avut1*" counter drop'  # everything else from a tap
    assert all("@macs" in r or "@arps" in r for r in pre[1:-2])  # own MAC only
    assert nft(netns, "-f", "-", script=render_bridged_delete("agentvm_t1_u")).returncode == 0
    assert "agentvm_t1_u" not in nft(netns, "list", "tables").stdout


@pytest.mark.parametrize(
    ("bt", "word"),
    [
        (BridgedTaps("agentvm_t1_u", "avut1", (("avut1a", '52:54:00:aa:bb:cc"; flush'),)), "MAC"),
        (BridgedTaps("agentvm_t1_u", "avut1", (("eth0", MAC),)), "avut1"),
        (BridgedTaps("agentvm_t1_u", 'avu" accept', ()), "interface"),
        (BridgedTaps("filter", "avut1", ()), "table"),
    ],
)
def test_bad_bridged_input_never_reaches_the_script(bt: BridgedTaps, word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        render_bridged(bt)
