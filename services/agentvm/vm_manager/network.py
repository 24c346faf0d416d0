"""NAT_FILTERED networking: the libvirt network, addresses, firewall, resolver, egress log.

One ``NatNetwork`` per vm-manager (see docs/NETWORK_DESIGN.md). It owns,
all named after the vm-manager's prefix so several can share a host:

* the libvirt NAT network ``<prefix>nat`` (bridge ``avb<tag>``, isolated
  ports, libvirt's DNS and DHCP off; ``forward dev`` pins it to
  AGENTVM_NAT_UPLINK when set);
* the address plan: vm-manager assigns each VM an address and a MAC itself
  and tells the guest agent (ConfigureNetwork); the pair is pinned in the
  host's neighbour table and in the firewall's anti-spoofing sets;
* the nftables tables ``agentvm_<tag>`` (``nftables.py``);
* the resolver on the bridge address (``dnsproxy.py``): only allowlisted
  names are answered, and their addresses are added to the VM's firewall set
  before the guest sees the answer;
* the NFLOG reader turning logged packets into connection records, and the
  per-VM egress log (bounded) with live subscribers.

Everything is created with the first NAT VM and removed with the last, and a
restarted vm-manager re-creates its state from the VMs it adopts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from agentvm.v1 import common_pb2
from agentvm.vm_manager import nftables as nft
from agentvm.vm_manager.dnsproxy import (
    ClientPolicy,
    DNSProxy,
    DomainAllowlist,
    EgressRecord,
    check_pattern,
)
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, libvirt_errors
from agentvm.vm_manager.nflog import LoggedPacket, NflogReader
from agentvm.vm_manager.templates import random_mac

log = logging.getLogger("agentvm.vm_manager.network")

MAX_DOMAINS = 256
MAX_CIDRS = 64
MAX_PORTS = 32
RING_SIZE = 2000
# Addresses a DNS answer never opens unless allow_cidrs names them.
NEVER_FROM_DNS = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    )
)  # fmt: skip
SUBSCRIBER_QUEUE = 4096


def check_bridge(name: str) -> None:
    """``name`` must be an existing Linux bridge of this host (NETWORK_MODE_BRIDGE)."""
    if not name:
        raise InvalidArgument(
            "NETWORK_MODE_BRIDGE needs bridge: the name of an existing host bridge"
        )
    if not nft.IFNAME_RE.match(name):
        raise InvalidArgument(f"bridge {name!r} is not an interface name")
    if not Path(f"/sys/class/net/{name}/bridge").is_dir():
        raise FailedPrecondition(
            f"there is no bridge named {name} on this host: create it (ip link add {name} "
            "type bridge) or name an existing one (ip -br link show type bridge)"
        )


@dataclass(frozen=True)
class NetNames:
    """Names of one vm-manager's network objects (interface names are <= 15 chars)."""

    network: str
    bridge: str
    tap_prefix: str
    table: str
    log_group: int

    @classmethod
    def for_prefix(cls, prefix: str) -> NetNames:
        tag = hashlib.sha256(prefix.encode()).hexdigest()[:4]
        return cls(
            network=f"{prefix}nat",
            bridge=f"avb{tag}",
            tap_prefix=f"avt{tag}",
            table=f"agentvm_{tag}",
            log_group=100 + int(tag, 16) % 60000,
        )

    def tap(self, vm_id: str) -> str:
        return f"{self.tap_prefix}{vm_id}"

    def bridge_tap(self, vm_id: str) -> str:
        """Tap of a BRIDGE-mode VM: outside ``tap_prefix``, so the NAT rules never see it."""
        return f"avu{self.tap_prefix[3:]}{vm_id}"


@dataclass(frozen=True)
class Policy:
    """A VM's egress policy with the server defaults filled in."""

    domains: tuple[str, ...]
    cidrs: tuple[str, ...]
    ports: tuple[int, ...]

    @classmethod
    def from_proto(cls, p: common_pb2.NetworkPolicy, settings: Settings) -> Policy:
        """Validated; each empty field takes its default (AGENTVM_NAT_DEFAULT_*)."""
        domains = list(p.allow_domains) or [
            d for d in settings.nat_default_domains.split(",") if d.strip()
        ]
        ports = list(p.ports) or [int(x) for x in settings.nat_default_ports.split(",") if x]
        if len(domains) > MAX_DOMAINS or len(p.allow_cidrs) > MAX_CIDRS or len(ports) > MAX_PORTS:
            raise InvalidArgument(
                f"network policy too large: at most {MAX_DOMAINS} domains, {MAX_CIDRS} CIDRs "
                f"and {MAX_PORTS} ports (use '*.' wildcards for many names of one zone)"
            )
        cidrs = []
        for c in p.allow_cidrs:
            try:
                net = ipaddress.IPv4Network(c.strip(), strict=True)
            except ValueError as exc:
                raise InvalidArgument(
                    f"allow_cidrs entry {c!r} is not an IPv4 network ({exc}); write it like "
                    "'203.0.113.0/24' with the host bits zero"
                ) from None
            cidrs.append(str(net))
        for port in ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"ports entry {port} is not a TCP port (1-65535)")
        return cls(
            tuple(dict.fromkeys(check_pattern(d) for d in domains)),
            tuple(dict.fromkeys(cidrs)),
            tuple(sorted(set(ports))),
        )

    def to_proto(self) -> common_pb2.NetworkPolicy:
        return common_pb2.NetworkPolicy(
            allow_domains=self.domains, allow_cidrs=self.cidrs, ports=self.ports
        )

    def to_json(self) -> str:
        return json.dumps({"d": self.domains, "c": self.cidrs, "p": self.ports})

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        return cls(tuple(data["d"]), tuple(data["c"]), tuple(int(p) for p in data["p"]))


@dataclass
class Attachment:
    """One VM on the network."""

    vm_name: str
    vm_id: str
    ip: str
    mac: str
    prefixlen: int
    gateway: str
    policy: Policy
    allowlist: DomainAllowlist = field(init=False)

    def __post_init__(self) -> None:
        self.allowlist = DomainAllowlist(list(self.policy.domains))

    @property
    def rules(self) -> nft.VMRules:
        return nft.VMRules(self.vm_id, self.ip, self.mac, self.policy.ports, self.policy.cidrs)

    def to_proto(self, bridge: str) -> common_pb2.NetworkAttachment:
        return common_pb2.NetworkAttachment(
            address=f"{self.ip}/{self.prefixlen}",
            mac=self.mac,
            gateway=self.gateway,
            policy=self.policy.to_proto(),
            bridge=bridge,
        )


class EgressLog:
    """A bounded ring of records per VM, and live subscribers (one VM or all)."""

    def __init__(self) -> None:
        self._rings: dict[str, collections.deque[EgressRecord]] = {}
        self._subs: list[tuple[str, asyncio.Queue[EgressRecord | None]]] = []
        self.dropped = 0

    def add(self, rec: EgressRecord) -> None:
        if not rec.vm:
            return
        self._rings.setdefault(rec.vm, collections.deque(maxlen=RING_SIZE)).append(rec)
        for name, queue in self._subs:
            if name in ("", rec.vm):
                try:
                    queue.put_nowait(rec)
                except asyncio.QueueFull:
                    self.dropped += 1

    def records(self, vm: str) -> list[EgressRecord]:
        if vm:
            return list(self._rings.get(vm, ()))
        return sorted((r for ring in self._rings.values() for r in ring), key=lambda r: r.time)

    def forget(self, vm: str) -> None:
        self._rings.pop(vm, None)
        for name, queue in self._subs:
            if name == vm:
                # The end marker must arrive even when the subscriber lags.
                while queue.full():
                    queue.get_nowait()
                    self.dropped += 1
                queue.put_nowait(None)

    async def follow(self, vm: str) -> AsyncIterator[EgressRecord]:
        """Records kept so far, then new ones until the VM is forgotten."""
        queue: asyncio.Queue[EgressRecord | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        entry = (vm, queue)
        self._subs.append(entry)
        try:
            for rec in self.records(vm):
                yield rec
            while (rec2 := await queue.get()) is not None:
                yield rec2
        finally:
            self._subs.remove(entry)


def _host_resolver() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    return str(ipaddress.IPv4Address(parts[1]))
    return ""


async def _run(*argv: str, stdin: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode or 0, out.decode(errors="replace").strip()


class NatNetwork:
    """The NAT_FILTERED network of one vm-manager."""

    def __init__(self, settings: Settings, conn: LibvirtConnection) -> None:
        self.settings = settings
        self.conn = conn
        self.names = NetNames.for_prefix(settings.vm_prefix)
        try:
            self.subnet = ipaddress.IPv4Network(settings.nat_subnet, strict=True)
        except ValueError as exc:
            raise InvalidArgument(
                f"AGENTVM_NAT_SUBNET={settings.nat_subnet!r}: {exc}; give a network like "
                "10.213.0.0/24"
            ) from None
        if not 16 <= self.subnet.prefixlen <= 28:
            raise InvalidArgument("AGENTVM_NAT_SUBNET must be a /16 to /28 network")
        self.gateway = str(self.subnet.network_address + 1)
        self.uplink = settings.nat_uplink or None
        self.upstream = settings.nat_dns_upstream or _host_resolver()
        self.egress = EgressLog()
        self._atts: dict[str, Attachment] = {}
        self._by_ip: dict[str, Attachment] = {}
        # Per VM: address -> name it was resolved from (for connection records).
        self._resolved: dict[str, dict[str, str]] = {}
        self._lock = asyncio.Lock()
        self._up = False
        self._proxy: DNSProxy | None = None
        self._nflog: NflogReader | None = None
        self._next = 2
        self._pending: set[asyncio.Future[None]] = set()
        # Frames dropped for a forged source (not charged to any VM's log).
        self.spoofed = 0

    # -- names and state -------------------------------------------------------
    def _ruleset(self) -> nft.Ruleset:
        return nft.Ruleset(
            table=self.names.table,
            bridge=self.names.bridge,
            bridge_ip=self.gateway,
            tap_prefix=self.names.tap_prefix,
            uplink=self.uplink,
            vms=tuple(a.rules for a in self._atts.values()),
            log_group=self.names.log_group,
        )

    def attachment(self, vm_name: str) -> Attachment | None:
        return self._atts.get(vm_name)

    def _network_xml(self) -> str:
        net = ET.Element("network")
        ET.SubElement(net, "name").text = self.names.network
        fwd = ET.SubElement(net, "forward", mode="nat")
        if self.uplink:
            fwd.set("dev", self.uplink)
            ET.SubElement(fwd, "interface", dev=self.uplink)
        ET.SubElement(net, "bridge", name=self.names.bridge, stp="off", delay="0")
        ET.SubElement(net, "port", isolated="yes")
        ET.SubElement(net, "dns", enable="no")
        ET.SubElement(net, "ip", address=self.gateway, netmask=str(self.subnet.netmask))
        return ET.tostring(net, encoding="unicode")

    @staticmethod
    def _shape(xml: str) -> tuple[str | None, ...]:
        root = ET.fromstring(xml)
        fwd, br, ip = root.find("forward"), root.find("bridge"), root.find("ip")
        return (
            fwd.get("mode") if fwd is not None else None,
            fwd.get("dev") if fwd is not None else None,
            br.get("name") if br is not None else None,
            ip.get("address") if ip is not None else None,
            ip.get("netmask") if ip is not None else None,
        )

    def _ensure_libvirt_network(self) -> None:
        """Define and start ``<prefix>nat``; a definition of another shape is replaced."""
        conn = self.conn.checked()
        want = self._network_xml()
        try:
            net: libvirt.virNetwork | None = conn.networkLookupByName(self.names.network)
        except libvirt.libvirtError:
            net = None
        with libvirt_errors(f"setting up the libvirt network {self.names.network}"):
            if net is not None and self._shape(net.XMLDesc(0)) != self._shape(want):
                log.info("replacing network %s (settings changed)", self.names.network)
                if net.isActive():
                    net.destroy()
                net.undefine()
                net = None
            if net is None:
                net = conn.networkDefineXML(want)
            if not net.isActive():
                net.create()

    def _remove_libvirt_network(self) -> None:
        conn = self.conn.checked()
        try:
            net = conn.networkLookupByName(self.names.network)
        except libvirt.libvirtError:
            return
        with libvirt_errors(f"removing the libvirt network {self.names.network}"):
            if net.isActive():
                net.destroy()
            net.undefine()

    async def _nft(self, script: str, what: str) -> None:
        code, out = await _run("nft", "-f", "-", stdin=script)
        if code != 0:
            raise FailedPrecondition(f"nftables refused {what}: {out}")

    # -- bring up / tear down --------------------------------------------------
    async def _ensure_up(self) -> None:
        if self._up:
            return
        if not self.upstream:
            raise FailedPrecondition(
                "NAT_FILTERED needs an upstream resolver: the host's /etc/resolv.conf names "
                "none; set AGENTVM_NAT_DNS_UPSTREAM to a resolver's IPv4 address"
            )
        await self._in_thread(self._ensure_libvirt_network)
        # Frames to link-local groups are learnt before any filter sees them:
        # without this a guest could poison the bridge's MAC table.
        code, out = await _run(
            "ip", "link", "set", "dev", self.names.bridge,
            "type", "bridge", "no_linklocal_learn", "1",
        )  # fmt: skip
        if code != 0:
            log.warning("cannot turn off link-local learning on %s: %s", self.names.bridge, out)
        await self._nft(nft.render_table(self._ruleset()), "the network's tables")
        for att in self._atts.values():
            await self._pin_neighbour(att)
        proxy = DNSProxy(
            upstream=(self.upstream, 53),
            policy_for=self._policy_for,
            on_addresses=self._on_addresses,
            on_record=self._on_dns_record,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: proxy, local_addr=(self.gateway, 53))
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot serve DNS on {self.gateway}:53 for the NAT network: {exc} (another "
                "resolver bound to all addresses? bind it to specific ones)"
            ) from exc
        self._proxy = proxy
        reader = NflogReader(self.names.log_group, self._on_packet)
        try:
            await reader.start()
            self._nflog = reader
        except OSError as exc:
            log.warning("connection records are off: %s", exc)
        self._up = True
        log.info(
            "NAT network %s up (bridge %s, %s, resolver upstream %s)",
            self.names.network,
            self.names.bridge,
            self.subnet,
            self.upstream,
        )

    async def _stop_listeners(self) -> None:
        if self._proxy is not None:
            await self._proxy.close()
            self._proxy = None
        if self._nflog is not None:
            await self._nflog.close()
            self._nflog = None

    async def _tear_down(self) -> None:
        try:
            await self._stop_listeners()
            with contextlib.suppress(FailedPrecondition):
                await self._nft(nft.render_delete(self.names.table), "removing the tables")
            await self._in_thread(self._remove_libvirt_network)
        finally:
            self._up = False
        log.info("NAT network %s removed (no VM uses it)", self.names.network)

    async def _in_thread(self, fn: Callable[[], None]) -> None:
        """Run a libvirt call to its end even if the caller is cancelled
        (a shutdown must not stop between destroying and undefining)."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        await asyncio.shield(fut)

    async def close(self) -> None:
        """Stop listening (VMs keep running; a restarted vm-manager resumes)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        async with self._lock:
            await self._stop_listeners()
            self._up = False

    async def finish_recovery(self) -> None:
        """After adopting VMs: bring the network up for them, or remove leftovers."""
        async with self._lock:
            if self._atts:
                await self._ensure_up()
            else:
                await self._tear_down()

    # -- VMs ------------------------------------------------------------------
    def _allocate_ip(self) -> str:
        hosts = self.subnet.num_addresses - 2
        used = set(self._by_ip)
        # Round robin, so an address is not reused at once (its conntrack
        # entries and the guests' caches age out first).
        for i in range(hosts - 1):
            cand = str(self.subnet.network_address + 2 + (self._next - 2 + i) % (hosts - 1))
            if cand not in used:
                self._next = int(ipaddress.IPv4Address(cand)) - int(self.subnet.network_address)
                self._next += 1
                return cand
        raise ResourceExhausted(
            f"no free address in AGENTVM_NAT_SUBNET {self.subnet}: destroy VMs or use a "
            "larger subnet"
        )

    async def _pin_neighbour(self, att: Attachment) -> None:
        code, out = await _run(
            "ip", "neigh", "replace", att.ip, "lladdr", att.mac,
            "dev", self.names.bridge, "nud", "permanent",
        )  # fmt: skip
        if code != 0:
            log.warning("cannot pin %s to %s: %s", att.ip, att.mac, out)

    async def attach(self, vm_name: str, vm_id: str, policy: Policy) -> Attachment:
        """Give a new VM an address, MAC and firewall entries (network up if needed)."""
        async with self._lock:
            await self._ensure_up()
            mac = random_mac()
            att = Attachment(
                vm_name, vm_id, self._allocate_ip(), mac, self.subnet.prefixlen, self.gateway,
                policy,
            )  # fmt: skip
            await self._nft(nft.render_add(self._ruleset(), att.rules), f"adding {vm_name}")
            self._atts[vm_name] = att
            self._by_ip[att.ip] = att
            await self._pin_neighbour(att)
            return att

    def adopt(self, vm_name: str, vm_id: str, address: str, mac: str, policy: Policy) -> None:
        """Record a VM found at start; ``finish_recovery`` applies them all."""
        iface = ipaddress.IPv4Interface(address)
        att = Attachment(
            vm_name, vm_id, str(iface.ip), mac, iface.network.prefixlen, self.gateway, policy
        )
        self._atts[vm_name] = att
        self._by_ip[att.ip] = att

    async def update_policy(self, vm_name: str, policy: Policy) -> Attachment:
        async with self._lock:
            old = self._atts[vm_name]
            att = Attachment(
                vm_name, old.vm_id, old.ip, old.mac, old.prefixlen, old.gateway, policy
            )
            await self._nft(
                nft.render_policy(self._ruleset(), att.rules), f"the policy of {vm_name}"
            )
            self._atts[vm_name] = att
            self._by_ip[att.ip] = att
            self._resolved.pop(vm_name, None)
            # Connections opened under the old policy end with it.
            await self._forget_connections(att.ip)
            return att

    async def _forget_connections(self, ip: str) -> None:
        code, out = await _run("conntrack", "-D", "-s", ip)
        # conntrack exits 1 when there was nothing to delete.
        if code not in (0, 1):
            log.warning("cannot drop the tracked connections of %s: %s", ip, out)

    async def detach(self, vm_name: str) -> None:
        """Remove a VM's entries; the network goes with its last VM."""
        async with self._lock:
            att = self._atts.pop(vm_name, None)
            if att is None:
                return
            self._by_ip.pop(att.ip, None)
            self._resolved.pop(vm_name, None)
            self.egress.forget(vm_name)
            if not self._atts:
                await self._tear_down()
                return
            if self._up:
                try:
                    await self._nft(
                        nft.render_remove(self._ruleset(), att.rules), f"removing {vm_name}"
                    )
                except FailedPrecondition as exc:
                    # Never leave a gone VM's entries behind: rebuild without it.
                    log.warning("%s; rebuilding the tables", exc)
                    await self._nft(nft.render_table(self._ruleset()), "rebuilding the tables")
                await _run("ip", "neigh", "del", att.ip, "dev", self.names.bridge)
                await self._forget_connections(att.ip)

    # -- resolver and log callbacks ------------------------------------------------
    def _policy_for(self, src: str) -> ClientPolicy | None:
        att = self._by_ip.get(src)
        return ClientPolicy(att.vm_name, att.allowlist) if att else None

    def _reachable(self, att: Attachment, addr: str) -> bool:
        """Whether a DNS answer may open ``addr``: never the host's own ranges,
        link-local (metadata services), private or special ranges, or the VMs'
        subnet, unless the policy's CIDRs name them."""
        ip = ipaddress.IPv4Address(addr)
        if any(ip in ipaddress.IPv4Network(c) for c in att.policy.cidrs):
            return True
        return ip not in self.subnet and not any(ip in net for net in NEVER_FROM_DNS)

    async def _on_addresses(self, vm_name: str, name: str, found: list[tuple[str, int]]) -> None:
        async with self._lock:
            att = self._atts.get(vm_name)
            # The policy may have changed while the query was upstream.
            if att is None or not att.allowlist.allows(name):
                return
            usable = [(a, ttl) for a, ttl in found if self._reachable(att, a)]
            if len(usable) < len(found):
                log.info("%s answered addresses %s may not reach; not allowed", name, vm_name)
            if not usable:
                return
            await self._nft(
                nft.render_resolved(self.names.table, att.vm_id, usable), f"addresses for {name}"
            )
            names = self._resolved.setdefault(vm_name, {})
            for addr, _ttl in usable:
                names[addr] = name

    def _on_dns_record(self, rec: EgressRecord) -> None:
        if rec.vm in self._atts:  # not for VMs gone while their query was upstream
            self.egress.add(rec)

    def _on_packet(self, pkt: LoggedPacket) -> None:
        kind = pkt.prefix[:6]
        att = self._by_ip.get(pkt.dst if kind == nft.PREFIX_INBOUND else pkt.src)
        if att is None:
            return
        name = self._resolved.get(att.vm_name, {}).get(pkt.dst, "")
        verdict, reason = "denied", ""
        if kind == nft.PREFIX_ALLOWED:
            verdict = "allowed"
        elif kind == nft.PREFIX_HOST:
            reason = "the host is closed to VMs (only DNS to the gateway)"
        elif kind == nft.PREFIX_INBOUND:
            reason = f"unsolicited inbound connection from {pkt.src}"
        elif kind == nft.PREFIX_SPOOF:
            # The source is forged: charging it to the VM it names would let
            # one VM write another's log.
            self.spoofed += 1
            return
        else:
            reason = self._deny_reason(att, pkt)
        self.egress.add(
            EgressRecord(
                pkt.time, att.vm_name, "connect", name, pkt.dst, pkt.dport, verdict, reason,
                protocol=pkt.protocol,
            )
        )  # fmt: skip

    def _deny_reason(self, att: Attachment, pkt: LoggedPacket) -> str:
        dst = ipaddress.IPv4Address(pkt.dst)
        if dst in self.subnet:
            return "other VMs are unreachable"
        known = pkt.dst in self._resolved.get(att.vm_name, {}) or any(
            dst in ipaddress.IPv4Network(c) for c in att.policy.cidrs
        )
        if not known:
            return "address not resolved from an allowed name nor in allow_cidrs"
        if pkt.protocol != "tcp":
            return f"only TCP is allowed, not {pkt.protocol}"
        if pkt.dport not in att.policy.ports:
            return f"port {pkt.dport} not in ports"
        return "not allowed by the policy"

    async def watch(self, vm: str, follow: bool, since: float = 0.0) -> AsyncIterator[EgressRecord]:
        if not follow:
            for rec in self.egress.records(vm):
                if rec.time > since:
                    yield rec
            return
        async for rec in self.egress.follow(vm):
            if rec.time > since:
                yield rec
