"""The nftables ruleset of NAT_FILTERED networks, rendered from typed input.

Groundwork for docs/NETWORK_DESIGN.md (issue 5): nothing applies this yet.
One table per vm-manager; per VM an address set filled from DNS answers
(with timeouts), a static CIDR set and a port set. Every input is validated
before it reaches the script, so a caller's policy can never inject nft
syntax. ``render`` produces a script that replaces the whole table
atomically (``nft -f`` applies a file as one transaction).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agentvm.common.errors import InvalidArgument

IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
TABLE_RE = re.compile(r"^agentvm_[a-z0-9_]{1,40}$")
VM_ID_RE = re.compile(r"^[a-z0-9]{1,16}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
LOG_GROUP = 7


@dataclass(frozen=True)
class VMRules:
    """What one VM may do: its identity on the bridge and its policy."""

    vm_id: str
    ip: str
    mac: str
    ports: tuple[int, ...] = (80, 443, 22)
    cidrs: tuple[str, ...] = ()

    def validate(self) -> None:
        if not VM_ID_RE.match(self.vm_id):
            raise InvalidArgument(f"vm id {self.vm_id!r}: 1-16 lowercase letters or digits")
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError:
            raise InvalidArgument(f"{self.ip!r} is not an IPv4 address") from None
        if not MAC_RE.match(self.mac):
            raise InvalidArgument(f"{self.mac!r} is not a lowercase MAC address")
        if not self.ports or any(not 1 <= p <= 65535 for p in self.ports):
            raise InvalidArgument(f"ports {self.ports!r}: give 1-65535")
        for cidr in self.cidrs:
            try:
                ipaddress.IPv4Network(cidr, strict=True)
            except ValueError as exc:
                raise InvalidArgument(f"allow_cidrs entry {cidr!r}: {exc}") from None


@dataclass(frozen=True)
class Ruleset:
    table: str
    bridge: str
    bridge_ip: str
    # Only this interface may carry the VMs' traffic out (None: any).
    uplink: str | None
    vms: tuple[VMRules, ...]

    def validate(self) -> None:
        if not TABLE_RE.match(self.table):
            raise InvalidArgument(f"table name {self.table!r} must look like agentvm_<tag>")
        for name in (self.bridge, self.uplink):
            if name is not None and not IFNAME_RE.match(name):
                raise InvalidArgument(f"interface name {name!r} is not valid")
        try:
            ipaddress.IPv4Address(self.bridge_ip)
        except ValueError:
            raise InvalidArgument(f"bridge address {self.bridge_ip!r} is not IPv4") from None
        seen: set[str] = set()
        for vm in self.vms:
            vm.validate()
            if vm.vm_id in seen:
                raise InvalidArgument(f"vm id {vm.vm_id} appears twice")
            seen.add(vm.vm_id)


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def render(rs: Ruleset) -> str:
    """The nft script for ``rs`` (replaces the table in one transaction)."""
    rs.validate()
    br = f'"{rs.bridge}"'
    out = [
        f"table inet {rs.table} {{}}",
        f"delete table inet {rs.table}",
        f"table inet {rs.table} {{",
    ]
    for vm in rs.vms:
        out += [
            f"  set dns4_{vm.vm_id} {{ type ipv4_addr; flags timeout; }}",
            f"  set cidr4_{vm.vm_id} {{ type ipv4_addr; flags interval;"
            f"{_elements(list(vm.cidrs))} }}",
            f"  set ports_{vm.vm_id} {{ type inet_service;"
            f"{_elements([str(p) for p in sorted(set(vm.ports))])} }}",
        ]
    out += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    iifname {br} oifname {br} drop",
        f"    oifname {br} ct state established,related accept",
        f"    oifname {br} drop",
        f"    iifname {br} ct state established,related accept",
        f"    iifname {br} meta nfproto ipv6 drop",
    ]
    via = f' oifname "{rs.uplink}"' if rs.uplink else ""
    for vm in rs.vms:
        match = (
            f"    iifname {br}{via} ether saddr {vm.mac} ip saddr {vm.ip} ct state new "
            f"tcp dport @ports_{vm.vm_id}"
        )
        verdict = f'log group {LOG_GROUP} prefix "avm a {vm.vm_id} " accept'
        out += [
            f"{match} ip daddr @dns4_{vm.vm_id} {verdict}",
            f"{match} ip daddr @cidr4_{vm.vm_id} {verdict}",
        ]
    out += [
        f'    iifname {br} log group {LOG_GROUP} prefix "avm d " drop',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    iifname {br} ip daddr {rs.bridge_ip} udp dport 53 accept",
        f"    iifname {br} ip daddr {rs.bridge_ip} tcp dport 53 accept",
        f"    iifname {br} ct state established,related accept",
        f'    iifname {br} log group {LOG_GROUP} prefix "avm h " drop',
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"
