"""The subnets of the host's own interfaces, kept current.

The NAT resolver must never let a DNS answer open the host's own networks
(its LAN, its gateway, a VPN, a container bridge), and those change while
vm-manager runs (DHCP, a VPN coming up, an interface added). So the list is
watched, not read once:

* a netlink socket subscribed to the IPv4/IPv6 address groups wakes the
  watcher on every RTM_NEWADDR/RTM_DELADDR; it then re-reads the whole list
  (an RTM_GETADDR dump), so coalesced or lost events cost nothing;
* a periodic re-read (``reread_s``) is the backstop (a socket that overflowed,
  ENOBUFS, or a kernel without the groups).

``refresh`` can also be called directly; everything is synchronous and cheap
(one dump is a few kilobytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct

from agentvm.vm_manager.special_ranges import IPAddress, IPNetwork

log = logging.getLogger("agentvm.vm_manager.hostaddrs")

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSG = struct.Struct("=IHHII")
_IFADDR = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addresses(data: bytes) -> tuple[list[IPNetwork], bool]:
    """(networks of the RTM_NEWADDR messages in ``data``, whether NLMSG_DONE was seen)."""
    nets: list[IPNetwork] = []
    done = False
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        body = data[off + _NLMSG.size : off + length]
        off += _align(length)
        if kind == NLMSG_DONE:
            done = True
            continue
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", body) if len(body) >= 4 else (0,)
            if err:
                raise OSError(-err, f"netlink address dump failed: {os.strerror(-err)}")
            continue
        if kind != RTM_NEWADDR or len(body) < _IFADDR.size:
            continue
        family, prefixlen, _f, _scope, _index = _IFADDR.unpack_from(body)
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
        if size is None:
            continue
        attrs: dict[int, bytes] = {}
        a = _IFADDR.size
        while a + _RTA.size <= len(body):
            alen, atype = _RTA.unpack_from(body, a)
            if alen < _RTA.size:
                break
            attrs[atype] = body[a + _RTA.size : a + alen]
            a += _align(alen)
        # IFA_LOCAL is the interface's own address; on point-to-point links
        # IFA_ADDRESS is the peer's. Both belong to the host's networks.
        for key in (IFA_LOCAL, IFA_ADDRESS):
            raw = attrs.get(key)
            if raw is not None and len(raw) == size:
                ip = ipaddress.ip_address(raw)
                nets.append(ipaddress.ip_interface(f"{ip}/{prefixlen}").network)
    return nets, done


def dump() -> tuple[IPNetwork, ...]:
    """The networks of every address on the host's interfaces, now."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(5)
        req = _NLMSG.pack(_NLMSG.size + _IFADDR.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.sendto(req + _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0), (0, 0))
        nets: list[IPNetwork] = []
        done = False
        while not done:
            more, done = parse_addresses(s.recv(1 << 16))
            nets += more
    return tuple(sorted(set(nets), key=lambda n: (n.version, n.prefixlen, n)))


class HostAddresses:
    """The host's interface subnets; ``start`` keeps them current."""

    def __init__(self, reread_s: float = 30.0) -> None:
        self.reread_s = reread_s
        self.networks: tuple[IPNetwork, ...] = ()
        # How often the list was (re)read: for tests and diagnostics.
        self.reads = 0
        self._sock: socket.socket | None = None
        self._timer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def refresh(self) -> None:
        try:
            nets = dump()
        except OSError as exc:
            # Keep the last list: failing open here would let answers through.
            log.warning("cannot read the host's addresses (keeping the last list): %s", exc)
            return
        if nets != self.networks:
            log.info("host interface networks: %s", ", ".join(map(str, nets)) or "none")
        self.networks = nets
        self.reads += 1

    def covering(self, addr: IPAddress) -> IPNetwork | None:
        """The host network ``addr`` is on, or None."""
        for net in self.networks:
            if net.version == addr.version and addr in net:
                return net
        return None

    async def start(self) -> None:
        """Read the list now, and again on every address change (idempotent)."""
        if self._timer is not None:
            return
        self.refresh()
        self._loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_event)
            self._sock = sock
        except OSError as exc:
            log.warning("no address change events (re-reading every %ss): %s", self.reread_s, exc)
        self._timer = asyncio.ensure_future(self._reread())

    def _on_event(self) -> None:
        if self._sock is None:
            return
        changed = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost, so re-read
                changed = True
                continue
            # Only the address groups are subscribed: any message is a change.
            changed = changed or len(data) >= _NLMSG.size
        if changed:
            self.refresh()

    async def _reread(self) -> None:
        while True:
            await asyncio.sleep(self.reread_s)
            self.refresh()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
