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
  before the guest sees the answer, except those ``special_ranges.AnswerFilter``
  refuses (the IANA special-purpose blocks and the host's own interface
  networks, watched by ``hostaddrs.py``, unless AGENTVM_NAT_DNS_ALLOW_PRIVATE
  names them), which the guest never sees;
* the NFLOG reader turning logged packets into connection records, and the
  per-VM egress log (``egresslog.py``) with live subscribers;
* the filter table of its BRIDGE-mode VMs' taps (``agentvm_<tag>_u``, see
  ``bridged.py``), and the refusal of agent-vm's own bridges for them.

Names, policies and attachments are in ``netpolicy.py``. Everything is
created with the first VM that needs it and removed with the last, and a
restarted vm-manager re-creates its state from the VMs it adopts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import libvirt

from agentvm.common.config import Settings
from agentvm.common.errors import (
    AgentVMError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from agentvm.vm_manager import nftables as nft
from agentvm.vm_manager.bridged import check_bridge, own_network_bridges
from agentvm.vm_manager.dnsproxy import ClientPolicy, DNSProxy, EgressRecord
from agentvm.vm_manager.egresslog import EgressLog
from agentvm.vm_manager.hostaddrs import HostAddresses
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, libvirt_errors
from agentvm.vm_manager.netpolicy import Attachment, NetNames, Policy
from agentvm.vm_manager.nflog import LoggedPacket, NflogReader
from agentvm.vm_manager.special_ranges import AnswerFilter, parse_allow_private
from agentvm.vm_manager.templates import random_mac

log = logging.getLogger("agentvm.vm_manager.network")

__all__ = ["Attachment", "EgressLog", "NatNetwork", "NetNames", "Policy", "check_bridge"]


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
        self.host_addresses = HostAddresses()
        self.answers = AnswerFilter(
            self.subnet, self.host_addresses, parse_allow_private(settings.nat_dns_allow_private)
        )
        # BRIDGE-mode VMs: name -> (tap, MAC), filtered by names.bridged_table.
        self._bridged: dict[str, tuple[str, str]] = {}
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
            defined = net is None
            if net is None:
                net = conn.networkDefineXML(want)
            if not net.isActive():
                try:
                    net.create()
                except libvirt.libvirtError:
                    # (e.g. "Network is already in use": its subnet is another's.)
                    # A definition this call made goes with it, or it outlives us.
                    if defined:
                        net.undefine()
                    raise

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
        try:
            await self._bring_up()
        except BaseException:
            if not self._atts:
                # Nothing uses what was made before the failure (the libvirt
                # network, the tables): none of it is left behind. With VMs
                # (adopted at a restart) it stays: their traffic stays filtered.
                try:
                    await self._tear_down()
                except (AgentVMError, OSError, libvirt.libvirtError) as exc:
                    # The original error is the one to report.
                    log.warning("cleaning up after a failed network start: %s", exc)
            raise

    async def _bring_up(self) -> None:
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
        # Known before the first answer is filtered (the filter refuses all until then).
        await self.host_addresses.start()
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: proxy, local_addr=(self.gateway, 53))
        except OSError as exc:
            await self.host_addresses.close()
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
        await self.host_addresses.close()
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
            await self._apply_bridged()

    # -- BRIDGE-mode VMs -------------------------------------------------------
    async def check_bridge(self, name: str) -> None:
        """``bridged.check_bridge`` with the bridges of agent-vm's libvirt networks."""
        own = await asyncio.to_thread(lambda: own_network_bridges(self.conn.checked()))
        check_bridge(name, own)

    async def _apply_bridged(self) -> None:
        if self._bridged:
            bt = nft.BridgedTaps(
                self.names.bridged_table,
                self.names.bridged_prefix,
                tuple(sorted(self._bridged.values())),
            )
            await self._nft(nft.render_bridged(bt), "the bridged taps' table")
        else:
            with contextlib.suppress(FailedPrecondition):
                await self._nft(
                    nft.render_bridged_delete(self.names.bridged_table), "removing a table"
                )

    async def attach_bridged(self, vm_name: str, vm_id: str, mac: str) -> None:
        """Filter the tap of a new BRIDGE-mode VM (before its domain exists)."""
        async with self._lock:
            self._bridged[vm_name] = (self.names.bridge_tap(vm_id), mac)
            try:
                await self._apply_bridged()
            except BaseException:
                self._bridged.pop(vm_name, None)
                raise

    def adopt_bridged(self, vm_name: str, vm_id: str, mac: str) -> None:
        """Record a BRIDGE-mode VM found at start; ``finish_recovery`` applies them."""
        self._bridged[vm_name] = (self.names.bridge_tap(vm_id), mac)

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
            if self._bridged.pop(vm_name, None) is not None:
                try:
                    await self._apply_bridged()
                except FailedPrecondition as exc:
                    # Its tap is gone with the domain; what is left matches nothing.
                    log.warning("%s (after removing %s)", exc, vm_name)
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

    def _refusal(self, att: Attachment, addr: str) -> str:
        """Why a DNS answer may not open ``addr`` ("" if it may): the VMs' subnet,
        the host's own networks, special-purpose blocks, unless the operator
        (AGENTVM_NAT_DNS_ALLOW_PRIVATE) or the policy's CIDRs name them."""
        return self.answers.refusal(addr, att.policy.cidrs)

    def _reachable(self, att: Attachment, addr: str) -> bool:
        return not self._refusal(att, addr)

    async def _on_addresses(
        self, vm_name: str, name: str, found: list[tuple[str, int]]
    ) -> dict[str, str]:
        """Open the usable addresses of an answer; return the refused ones with why."""
        async with self._lock:
            att = self._atts.get(vm_name)
            # The policy may have changed while the query was upstream.
            if att is None or not att.allowlist.allows(name):
                return {a: "(the VM's policy changed meanwhile)" for a, _ in found}
            refused = {a: why for a, _ in found if (why := self._refusal(att, a))}
            usable = [(a, ttl) for a, ttl in found if a not in refused]
            if refused:
                log.info("%s answered %s addresses it may not reach: %s", name, vm_name, refused)
            if not usable:
                return refused
            await self._nft(
                nft.render_resolved(self.names.table, att.vm_id, usable), f"addresses for {name}"
            )
            names = self._resolved.setdefault(vm_name, {})
            for addr, _ttl in usable:
                names[addr] = name
            return refused

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
