"""NETWORK_MODE_BRIDGE: which host bridges a VM may join, and the filter on its tap.

A bridged VM joins a LAN the operator manages (a bridge with the host's
uplink in it). It must never join agent-vm's own networks: on a NAT
network's bridge (``avb<tag>``) it would sit outside that network's
anti-spoofing sets and could speak as another tenant to the resolver, write
that VM's egress log or ARP-spoof the gateway. So ``check_bridge`` refuses

* any bridge named like a vm-manager's NAT bridge (``avb`` + 4 hex digits:
  every vm-manager on the host, whatever its prefix);
* any bridge with an agent-vm NAT tap (``avt*``) in it;
* the bridge of any libvirt network agent-vm defined (every vm-manager's
  prefix starts with ``agent-vm-``, and its network is ``<prefix>nat``),
  whatever that bridge is called (``virbr*`` included).

The tap of every bridged VM is filtered by the table ``agentvm_<tag>_u``
(``nftables.render_bridged``): the VM's own MAC only (also as ARP sender),
IPv4 and ARP only, and isolated from every other agent-vm bridged tap.
libvirt's clean-traffic filter on the same tap pins the IPv4 address to the
one the LAN's DHCP server leased (CTRL_IP_LEARNING=dhcp).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.vm_manager import nftables as nft

# NetNames.for_prefix: bridge avb<4 hex>, NAT taps avt<4 hex><id>.
NAT_BRIDGE_RE = re.compile(r"^avb[0-9a-f]{4}$")
NAT_TAP_PREFIX = "avt"
# Settings refuses any AGENTVM_VM_PREFIX not starting with this.
OWN_NETWORK_PREFIX = "agent-vm-"
SYS_NET = Path("/sys/class/net")

_REFUSAL = (
    "NETWORK_MODE_BRIDGE joins a VM to a LAN bridge you manage, never to agent-vm's own "
    "networks (a VM there could speak as the other VMs on it). Create a bridge for the "
    "purpose (ip link add br-agents type bridge; ip link set UPLINK master br-agents; "
    "ip link set br-agents up) and name it, or use NETWORK_MODE_NAT_FILTERED for filtered "
    "internet access"
)


def own_network_bridges(conn: libvirt.virConnect) -> dict[str, str]:
    """Bridge name -> libvirt network, for the networks of every vm-manager here."""
    found: dict[str, str] = {}
    for net in conn.listAllNetworks(0):
        name = net.name()
        if not name.startswith(OWN_NETWORK_PREFIX):
            continue
        try:
            br = ET.fromstring(net.XMLDesc(0)).find("bridge")  # noqa: S314 - from libvirt
        except (libvirt.libvirtError, ET.ParseError):
            continue
        if br is not None and br.get("name"):
            found[str(br.get("name"))] = name
    return found


def check_bridge(name: str, own: dict[str, str] | None = None) -> None:
    """``name`` must be an existing Linux bridge of this host that agent-vm does
    not manage (``own``: ``own_network_bridges``)."""
    if not name:
        raise InvalidArgument(
            "NETWORK_MODE_BRIDGE needs bridge: the name of an existing host bridge"
        )
    if not nft.IFNAME_RE.match(name):
        raise InvalidArgument(f"bridge {name!r} is not an interface name")
    if NAT_BRIDGE_RE.match(name):
        raise InvalidArgument(
            f"bridge {name} is (named as) the bridge of an agent-vm NAT network. {_REFUSAL}"
        )
    if own and name in own:
        raise InvalidArgument(
            f"bridge {name} belongs to agent-vm's libvirt network {own[name]}. {_REFUSAL}"
        )
    if not (SYS_NET / name / "bridge").is_dir():
        raise FailedPrecondition(
            f"there is no bridge named {name} on this host: create it (ip link add {name} "
            "type bridge) or name an existing one (ip -br link show type bridge)"
        )
    try:
        ports = [p.name for p in (SYS_NET / name / "brif").iterdir()]
    except OSError:
        ports = []
    taps = sorted(p for p in ports if p.startswith(NAT_TAP_PREFIX))
    if taps:
        raise InvalidArgument(
            f"bridge {name} carries agent-vm NAT VMs ({', '.join(taps[:3])}). {_REFUSAL}"
        )
