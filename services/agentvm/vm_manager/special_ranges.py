"""Address ranges a DNS answer may never open for a VM (unless the operator says so).

The data are the IANA special-purpose address registries, copied as they
stand (IPv4 and IPv6, "Address Block" column; entries nested in a larger one
are kept for their names):

* https://www.iana.org/assignments/iana-ipv4-special-registry (RFC 6890)
* https://www.iana.org/assignments/iana-ipv6-special-registry (RFC 6890)

plus the multicast blocks (224.0.0.0/4, ff00::/8, from the multicast
registries) and IPv6's deprecated site-local fec0::/10 (RFC 3879). Blocks
the registry marks globally reachable (AS112, AMT, the anycast services)
are kept too: no package index or API lives there, and an allowlisted name
answered with one of them is something else.

``classify`` names the block an address falls in, for the egress log;
``AnswerFilter`` adds the host's own networks and the operator's exceptions
(AGENTVM_NAT_DNS_ALLOW_PRIVATE).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from agentvm.common.errors import InvalidArgument

if TYPE_CHECKING:
    from agentvm.vm_manager.hostaddrs import HostAddresses

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (block, name in the registry, reference)
IPV4_SPECIAL: tuple[tuple[str, str, str], ...] = (
    ("0.0.0.0/8", '"This network"', "RFC 791"),
    ("0.0.0.0/32", '"This host on this network"', "RFC 1122"),
    ("10.0.0.0/8", "Private-Use", "RFC 1918"),
    ("100.64.0.0/10", "Shared Address Space", "RFC 6598"),
    ("127.0.0.0/8", "Loopback", "RFC 1122"),
    ("169.254.0.0/16", "Link Local", "RFC 3927"),
    ("172.16.0.0/12", "Private-Use", "RFC 1918"),
    ("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890"),
    ("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335"),
    ("192.0.0.8/32", "IPv4 dummy address", "RFC 7600"),
    ("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723"),
    ("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880"),
    ("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880"),
    ("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737"),
    ("192.31.196.0/24", "AS112-v4", "RFC 7535"),
    ("192.52.193.0/24", "AMT", "RFC 7450"),
    ("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526"),
    ("192.168.0.0/16", "Private-Use", "RFC 1918"),
    ("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534"),
    ("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    ("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737"),
    ("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737"),
    ("224.0.0.0/4", "Multicast", "RFC 5771"),
    ("240.0.0.0/4", "Reserved", "RFC 1112"),
    ("255.255.255.255/32", "Limited Broadcast", "RFC 919"),
)

IPV6_SPECIAL: tuple[tuple[str, str, str], ...] = (
    ("::1/128", "Loopback Address", "RFC 4291"),
    ("::/128", "Unspecified Address", "RFC 4291"),
    ("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291"),
    ("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052"),
    ("64:ff9b:1::/48", "IPv4-IPv6 Translat.", "RFC 8215"),
    ("100::/64", "Discard-Only Address Block", "RFC 6666"),
    ("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780"),
    ("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    ("2001::/32", "TEREDO", "RFC 4380"),
    ("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723"),
    ("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155"),
    ("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665"),
    ("2001:2::/48", "Benchmarking", "RFC 5180"),
    ("2001:3::/32", "AMT", "RFC 7450"),
    ("2001:4:112::/48", "AS112-v6", "RFC 7535"),
    ("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843"),
    ("2001:20::/28", "ORCHIDv2", "RFC 7343"),
    ("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374"),
    ("2001:db8::/32", "Documentation", "RFC 3849"),
    ("2002::/16", "6to4", "RFC 3056"),
    ("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534"),
    ("3fff::/20", "Documentation", "RFC 9637"),
    ("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602"),
    ("fc00::/7", "Unique-Local", "RFC 4193"),
    ("fe80::/10", "Link-Local Unicast", "RFC 4291"),
    ("fec0::/10", "Deprecated site-local", "RFC 3879"),
    ("ff00::/8", "Multicast", "RFC 4291"),
)


def _table(rows: tuple[tuple[str, str, str], ...]) -> tuple[tuple[IPNetwork, str], ...]:
    # Most specific first, so classify() names the narrowest block.
    nets = [(ipaddress.ip_network(b), f"{b} {name} ({ref})") for b, name, ref in rows]
    return tuple(sorted(nets, key=lambda n: -n[0].prefixlen))


SPECIAL: tuple[tuple[IPNetwork, str], ...] = _table(IPV4_SPECIAL) + _table(IPV6_SPECIAL)


def classify(addr: IPAddress) -> str:
    """The special-purpose block ``addr`` is in (``"198.18.0.0/15 Benchmarking (RFC
    2544)"``), or "" for an ordinary address."""
    for net, label in SPECIAL:
        if net.version == addr.version and addr in net:
            return label
    return ""


def parse_allow_private(text: str) -> tuple[IPNetwork, ...]:
    """AGENTVM_NAT_DNS_ALLOW_PRIVATE: comma-separated networks ("198.18.0.0/24,fd00::/64")."""
    nets = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise InvalidArgument(
                f"AGENTVM_NAT_DNS_ALLOW_PRIVATE entry {item!r}: {exc}; give networks like "
                "'192.168.10.0/24', comma-separated, with the host bits zero"
            ) from None
    return tuple(nets)


class AnswerFilter:
    """Which addresses of a DNS answer may be opened for a VM.

    Refused, in this order: the VMs' own subnet; then, unless the operator's
    ``allow_private`` names them, the host's interface subnets (watched) and
    the special-purpose blocks above. A VM policy's own ``allow_cidrs`` open
    their addresses directly anyway, so an address they name always passes.
    """

    def __init__(
        self,
        vm_subnet: ipaddress.IPv4Network,
        host: HostAddresses,
        allow_private: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.vm_subnet = vm_subnet
        self.host = host
        self.allow_private = allow_private

    def refusal(self, addr: str, cidrs: tuple[str, ...] = ()) -> str:
        """Why ``addr`` may not be opened ("" when it may)."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return f"{addr!r} is not an IP address"
        if any(ip in ipaddress.ip_network(c) for c in cidrs):
            return ""
        if ip in self.vm_subnet:
            return f"in the VMs' own subnet {self.vm_subnet}"
        if any(ip.version == n.version and ip in n for n in self.allow_private):
            return ""
        if (net := self.host.covering(ip)) is not None:
            return f"on the host's own network {net}"
        if not self.host.reads:
            # Fail closed: which networks are the host's own is not known yet.
            return "the host's own networks are not known yet (they could not be read)"
        if label := classify(ip):
            return f"in the special-purpose block {label}"
        return ""
