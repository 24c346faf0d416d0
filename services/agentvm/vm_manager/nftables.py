"""The nftables rules of NAT_FILTERED networks, rendered from typed input.

Two tables per vm-manager, both named ``agentvm_<tag>``:

* ``bridge`` family: anti-spoofing at layer 2 (the equivalent of libvirt's
  clean-traffic filter). A frame entering the bridge from one of our taps
  must carry a registered MAC and, for IPv4 and ARP, the address that goes
  with it; everything else (spoofed frames, IPv6, other ethertypes) is
  dropped before the host or its routing sees it.
* ``inet`` family: the egress policy. Per VM an address set filled from DNS
  answers (with timeouts), a static CIDR set, a port set and a chain; a
  verdict map keyed by (address, MAC) sends each new flow from the bridge to
  its VM's chain. Everything not allowed is logged to NFLOG (rate-limited)
  and dropped; nothing reaches the host except DNS to the resolver.

The table is created once (``render_table``) and VMs are added, changed and
removed by small transactions (``render_add``/``render_remove``/
``render_policy``), so one VM's change never flushes another VM's resolved
addresses. Every input is validated before it reaches a script, so a
caller's policy can never inject nft syntax. ``nft -f`` applies a script as
one transaction.
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
# NFLOG prefixes: allowed connection, denied connection, denied to the host,
# unsolicited inbound, spoofed or unknown source.
PREFIX_ALLOWED = "avm a "
PREFIX_DENIED = "avm d "
PREFIX_HOST = "avm h "
PREFIX_INBOUND = "avm i "
PREFIX_SPOOF = "avm s "
# A guest can make the host log at most this much per VM (and per table).
LOG_LIMIT = "limit rate 50/second burst 100 packets"
# DNS queries per second one address may send to the resolver.
DNS_RATE = "20/second burst 40 packets"


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
    # Taps of this network are named <tap_prefix><id>.
    tap_prefix: str
    # Only this interface may carry the VMs' traffic out (None: any).
    uplink: str | None
    vms: tuple[VMRules, ...] = ()
    # NFLOG group of the log rules (one per vm-manager: a group has one reader).
    log_group: int = 7

    def validate(self) -> None:
        if not TABLE_RE.match(self.table):
            raise InvalidArgument(f"table name {self.table!r} must look like agentvm_<tag>")
        if not 0 <= self.log_group <= 65535:
            raise InvalidArgument(f"log group {self.log_group} is not 0-65535")
        for name in (self.bridge, self.uplink, self.tap_prefix):
            if name is not None and not IFNAME_RE.match(name):
                raise InvalidArgument(f"interface name {name!r} is not valid")
        try:
            ipaddress.IPv4Address(self.bridge_ip)
        except ValueError:
            raise InvalidArgument(f"bridge address {self.bridge_ip!r} is not IPv4") from None
        seen: set[str] = set()
        for vm in self.vms:
            self.check_vm(vm)
            if vm.vm_id in seen:
                raise InvalidArgument(f"vm id {vm.vm_id} appears twice")
            seen.add(vm.vm_id)

    def check_vm(self, vm: VMRules) -> None:
        vm.validate()
        if not IFNAME_RE.match(self.tap(vm)):
            raise InvalidArgument(f"tap name {self.tap(vm)!r} is not a valid interface name")

    def tap(self, vm: VMRules) -> str:
        return f"{self.tap_prefix}{vm.vm_id}"


def _elements(items: list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def _log(prefix: str, group: int) -> str:
    return f'{LOG_LIMIT} log group {group} prefix "{prefix}"'


def _vm_objects(rs: Ruleset, vm: VMRules) -> list[str]:
    """The sets and chain of one VM (inside ``table inet``)."""
    via = f' oifname "{rs.uplink}"' if rs.uplink else ""
    i = vm.vm_id
    out = [
        f"  set dns4_{i} {{ type ipv4_addr; flags timeout; }}",
        f"  set cidr4_{i} {{ type ipv4_addr; flags interval;{_elements(list(vm.cidrs))} }}",
        f"  set ports_{i} {{ type inet_service;"
        f"{_elements([str(p) for p in sorted(set(vm.ports))])} }}",
        f"  chain vm_{i} {{",
        f'    oifname "{rs.bridge}" {_log(PREFIX_DENIED, rs.log_group)}',
        f'    oifname "{rs.bridge}" drop',
    ]
    for dest in (f"@dns4_{i}", f"@cidr4_{i}"):
        match = f"   {via} ip daddr {dest} tcp dport @ports_{i}"
        out += [f"{match} {_log(PREFIX_ALLOWED, rs.log_group)}", f"{match} accept"]
    out += [f"    {_log(PREFIX_DENIED, rs.log_group)}", "    drop", "  }"]
    return out


def _vm_elements(vm: VMRules) -> tuple[str, str]:
    """(verdict-map element, pair-set element) of one VM."""
    return f"{vm.ip} . {vm.mac} : jump vm_{vm.vm_id}", f"{vm.ip} . {vm.mac}"


def _l2_elements(rs: Ruleset, vm: VMRules) -> tuple[str, str]:
    """(IPv4, ARP) elements of the bridge table: what may enter by this VM's own tap."""
    tap = f'"{rs.tap(vm)}"'
    return f"{tap} . {vm.mac} . {vm.ip}", f"{tap} . {vm.mac} . {vm.mac} . {vm.ip}"


def render_table(rs: Ruleset) -> str:
    """Both tables with the VMs of ``rs``, replacing any previous ones."""
    rs.validate()
    br = f'"{rs.bridge}"'
    taps = f'"{rs.tap_prefix}*"'
    out = [
        f"table bridge {rs.table} {{}}",
        f"delete table bridge {rs.table}",
        f"table inet {rs.table} {{}}",
        f"delete table inet {rs.table}",
        f"table bridge {rs.table} {{",
        # Keyed by the tap a frame came in on: a VM can only ever speak as
        # itself, even if it guesses another VM's MAC and address. ARP's
        # sender MAC must also be the frame's (no bridge-table poisoning).
        "  set ip4 { type ifname . ether_addr . ipv4_addr; "
        + _elements([_l2_elements(rs, vm)[0] for vm in rs.vms]).strip()
        + " }",
        "  set arp4 { type ifname . ether_addr . ether_addr . ipv4_addr; "
        + _elements([_l2_elements(rs, vm)[1] for vm in rs.vms]).strip()
        + " }",
        "  chain pre {",
        "    type filter hook prerouting priority filter; policy accept;",
        f"    iifname {taps} ether type arp "
        "iifname . ether saddr . arp saddr ether . arp saddr ip @arp4 accept",
        f"    iifname {taps} ether type ip iifname . ether saddr . ip saddr @ip4 accept",
        f"    iifname {taps} {_log(PREFIX_SPOOF, rs.log_group)}",
        f"    iifname {taps} drop",
        "  }",
        "}",
        f"table inet {rs.table} {{",
        "  map vms { type ipv4_addr . ether_addr : verdict; "
        + _elements([_vm_elements(vm)[0] for vm in rs.vms]).strip()
        + " }",
        "  set pairs { type ipv4_addr . ether_addr; "
        + _elements([_vm_elements(vm)[1] for vm in rs.vms]).strip()
        + " }",
    ]
    for vm in rs.vms:
        out += _vm_objects(rs, vm)
    out += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    oifname {br} ct state established,related accept",
        f"    oifname {br} iifname != {br} {_log(PREFIX_INBOUND, rs.log_group)}",
        f"    oifname {br} iifname != {br} drop",
        f"    iifname {br} ct state established,related accept",
        f"    iifname {br} ip saddr . ether saddr vmap @vms",
        f"    iifname {br} {_log(PREFIX_SPOOF, rs.log_group)}",
        f"    iifname {br} drop",
        "  }",
        "  set dnsrate { type ipv4_addr; flags dynamic,timeout; timeout 1m; size 4096; }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        # A guest cannot make the resolver work harder than this.
        f"    iifname {br} udp dport 53 "
        f"add @dnsrate {{ ip saddr limit rate over {DNS_RATE} }} drop",
        f"    iifname {br} ip daddr {rs.bridge_ip} udp dport 53 "
        "ip saddr . ether saddr @pairs accept",
        f"    iifname {br} ct state established,related accept",
        f"    iifname {br} {_log(PREFIX_HOST, rs.log_group)}",
        f"    iifname {br} drop",
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def render_add(rs: Ruleset, vm: VMRules) -> str:
    """Add one VM (its sets, chain and map entries) to the existing tables."""
    rs.validate()
    rs.check_vm(vm)
    vmap, pair = _vm_elements(vm)
    ip4, arp4 = _l2_elements(rs, vm)
    return (
        "\n".join(
            [
                f"table inet {rs.table} {{",
                *_vm_objects(rs, vm),
                "}",
                f"add element inet {rs.table} vms {{ {vmap} }}",
                f"add element inet {rs.table} pairs {{ {pair} }}",
                f"add element bridge {rs.table} ip4 {{ {ip4} }}",
                f"add element bridge {rs.table} arp4 {{ {arp4} }}",
            ]
        )
        + "\n"
    )


def render_remove(rs: Ruleset, vm: VMRules) -> str:
    """Remove one VM from the tables (map entries first, then what they pointed to)."""
    rs.validate()
    rs.check_vm(vm)
    vmap, pair = _vm_elements(vm)
    ip4, arp4 = _l2_elements(rs, vm)
    i = vm.vm_id
    return (
        "\n".join(
            [
                f"delete element inet {rs.table} vms {{ {vmap} }}",
                f"delete element inet {rs.table} pairs {{ {pair} }}",
                f"delete element bridge {rs.table} ip4 {{ {ip4} }}",
                f"delete element bridge {rs.table} arp4 {{ {arp4} }}",
                f"delete chain inet {rs.table} vm_{i}",
                f"delete set inet {rs.table} dns4_{i}",
                f"delete set inet {rs.table} cidr4_{i}",
                f"delete set inet {rs.table} ports_{i}",
            ]
        )
        + "\n"
    )


def render_policy(rs: Ruleset, vm: VMRules) -> str:
    """Replace one VM's policy: its CIDRs and ports, and forget its resolved addresses."""
    rs.validate()
    vm.validate()
    i = vm.vm_id
    out = [
        f"flush set inet {rs.table} dns4_{i}",
        f"flush set inet {rs.table} cidr4_{i}",
        f"flush set inet {rs.table} ports_{i}",
        f"add element inet {rs.table} ports_{i} {{ {', '.join(map(str, sorted(set(vm.ports))))} }}",
    ]
    if vm.cidrs:
        out.append(f"add element inet {rs.table} cidr4_{i} {{ {', '.join(vm.cidrs)} }}")
    return "\n".join(out) + "\n"


def render_resolved(table: str, vm_id: str, addresses: list[tuple[str, int]]) -> str:
    """Allow ``vm_id`` to reach addresses a DNS answer gave it, for their TTL (seconds)."""
    if not TABLE_RE.match(table) or not VM_ID_RE.match(vm_id):
        raise InvalidArgument("bad table or vm id")
    lines = []
    for addr, ttl in addresses:
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise InvalidArgument(f"{addr!r} is not an IPv4 address") from None
        # add (so it exists), delete, add with the new timeout: one transaction
        # that also refreshes the timeout of an address already present.
        elem = f"inet {table} dns4_{vm_id} {{ {addr} }}"
        lines += [
            f"add element {elem}",
            f"delete element {elem}",
            f"add element inet {table} dns4_{vm_id} {{ {addr} timeout {int(ttl)}s }}",
        ]
    return "\n".join(lines) + "\n"


def render_delete(table: str) -> str:
    """Remove both tables (nothing of this network left in the kernel)."""
    if not TABLE_RE.match(table):
        raise InvalidArgument(f"table name {table!r} must look like agentvm_<tag>")
    return (
        f"table bridge {table} {{}}\ndelete table bridge {table}\n"
        f"table inet {table} {{}}\ndelete table inet {table}\n"
    )


@dataclass(frozen=True)
class BridgedTaps:
    """The taps of one vm-manager's NETWORK_MODE_BRIDGE VMs on users' bridges.

    A bridged VM is on a LAN agent-vm does not own: its address comes from
    that LAN's DHCP server. The table pins each tap, whichever bridge it is
    on, the way the NAT table pins NAT taps:

    * a frame from the tap must carry the VM's own MAC (ARP also as sender
      hardware address); only IPv4 and ARP pass;
    * its IPv4 source (and ARP sender address) must be one the LAN's DHCP
      server gave this MAC: DHCP answers on their way to the tap are read
      (``yiaddr`` for the ``chaddr`` of this tap's VM) into the ``leases``
      set, refreshed by every renewal (LEASE_TIMEOUT after the last one);
      before that only DHCP from 0.0.0.0 and ARP probes pass;
    * no frame goes from one agent-vm bridged tap to another (of any
      vm-manager): port isolation, and a VM cannot answer another's DHCP.

    libvirt's clean-traffic filter on the same tap (DHCP learning) enforces
    the same independently.
    """

    table: str
    tap_prefix: str
    # (tap, MAC) of each VM.
    taps: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        if not TABLE_RE.match(self.table):
            raise InvalidArgument(f"table name {self.table!r} must look like agentvm_<tag>")
        if not IFNAME_RE.match(self.tap_prefix):
            raise InvalidArgument(f"interface name {self.tap_prefix!r} is not valid")
        for tap, mac in self.taps:
            if not IFNAME_RE.match(tap) or not tap.startswith(self.tap_prefix):
                raise InvalidArgument(f"tap {tap!r} is not a {self.tap_prefix}* interface")
            if not MAC_RE.match(mac):
                raise InvalidArgument(f"{mac!r} is not a lowercase MAC address")


# Every agent-vm bridged tap (all vm-managers) starts with this.
BRIDGED_TAPS = "avu"
# A learnt lease outlives the LAN's lease time (renewals refresh it at half of
# it): long enough for the usual 1-8 day leases.
LEASE_TIMEOUT = "10d"
# In a DHCP (BOOTP) message after the UDP header: yiaddr at byte 16, chaddr at 28.
_YIADDR = "@th,192,32"
_CHADDR = "@th,288,48"
# The set holds raw 32-bit keys, so the sources are matched as raw fields too:
# the IPv4 source address, the ARP sender protocol address.
_IP_SADDR = "@nh,96,32"
_ARP_SPA = "@nh,112,32"


def render_bridged(bt: BridgedTaps) -> str:
    """Create or update the bridge table of ``bt`` in one transaction.

    The VMs' sets and the rules are replaced; the learnt leases stay (a VM
    joining or leaving never costs another its address).
    """
    bt.validate()
    t = f"bridge {bt.table}"
    taps = f'"{bt.tap_prefix}*"'
    every = f'"{BRIDGED_TAPS}*"'
    chaddr = [f'"{tap}" . 0x{mac.replace(":", "")}' for tap, mac in bt.taps]
    out = [
        f"table {t} {{",
        "  set macs { type ifname . ether_addr; }",
        "  set arps { type ifname . ether_addr . ether_addr; }",
        f"  set chaddr {{ typeof oifname . {_CHADDR}; }}",
        f"  set leases {{ typeof iifname . {_YIADDR}; flags dynamic,timeout; "
        f"timeout {LEASE_TIMEOUT}; size 4096; }}",
        "  chain pre { type filter hook prerouting priority filter; policy accept; }",
        "  chain isolate { type filter hook forward priority filter; policy accept; }",
        "  chain learn { type filter hook forward priority 10; policy accept; }",
        "}",
        *(f"flush chain {t} {c}" for c in ("pre", "isolate", "learn")),
        *(f"flush set {t} {name}" for name in ("macs", "arps", "chaddr")),
        f"table {t} {{",
        "  chain pre {",
        f"    iifname {taps} ether type arp "
        f"iifname . ether saddr . arp saddr ether @arps iifname . {_ARP_SPA} @leases accept",
        # ARP probes (RFC 5227) before the address is in use.
        f"    iifname {taps} ether type arp "
        "iifname . ether saddr . arp saddr ether @arps arp saddr ip 0.0.0.0 accept",
        f"    iifname {taps} ether type ip iifname . ether saddr @macs "
        f"iifname . {_IP_SADDR} @leases accept",
        f"    iifname {taps} ether type ip iifname . ether saddr @macs "
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
        f"    iifname {taps} counter drop",
        "  }",
        "  chain isolate {",
        f"    iifname {every} oifname {every} counter drop",
        "  }",
        "  chain learn {",
        f"    iifname != {every} oifname {taps} ether type ip udp sport 67 udp dport 68 "
        f"oifname . {_CHADDR} @chaddr update @leases {{ oifname . {_YIADDR} }}",
        "  }",
        "}",
    ]
    for name, items in (
        ("macs", [f'"{tap}" . {mac}' for tap, mac in bt.taps]),
        ("arps", [f'"{tap}" . {mac} . {mac}' for tap, mac in bt.taps]),
        ("chaddr", chaddr),
    ):
        if items:
            out.append(f"add element {t} {name} {{ {', '.join(items)} }}")
    return "\n".join(out) + "\n"


def render_bridged_delete(table: str) -> str:
    if not TABLE_RE.match(table):
        raise InvalidArgument(f"table name {table!r} must look like agentvm_<tag>")
    return f"table bridge {table} {{}}\ndelete table bridge {table}\n"
