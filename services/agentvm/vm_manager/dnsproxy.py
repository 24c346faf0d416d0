"""The NAT_FILTERED resolver: answers only allowlisted names, records every query.

Groundwork for docs/NETWORK_DESIGN.md (issue 5): nothing starts it yet.
A guest's only resolver is this proxy on its bridge address. For each query
it finds the VM by source address; a name outside that VM's allowlist gets
REFUSED and never leaves the host (so a guest cannot leak data through
queries for names in a zone it controls); an allowed A query goes to the
upstream resolver, and the addresses of the answer are handed to
``on_addresses`` (which fills the VM's nftables set) with their TTL clamped
to [MIN_TTL, MAX_TTL]; the addresses it refuses (private, special-purpose,
the host's own networks) are cut from the guest's answer and recorded as
denied. AAAA gets an empty answer (IPv6 is off), every other
type REFUSED. Everything the guest sends is parsed defensively: malformed
packets are dropped and recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from agentvm.common.errors import InvalidArgument

log = logging.getLogger("agentvm.vm_manager.dnsproxy")

MIN_TTL = 30
MAX_TTL = 3600
UPSTREAM_TIMEOUT_S = 3.0
MAX_INFLIGHT_PER_SOURCE = 8
MAX_INFLIGHT = 256
MAX_QUERY_BYTES = 512
LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def check_pattern(pattern: str) -> str:
    """A normalized allowlist entry ("pypi.org", "*.github.com"); InvalidArgument if bad."""
    p = normalize(pattern)
    labels = p.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if len(p) > 253 or len(labels) < 2 or not all(LABEL_RE.match(x) for x in labels):
        raise InvalidArgument(
            f"allow_domains entry {pattern!r} is not a domain name or a '*.' wildcard of one"
        )
    return p


class DomainAllowlist:
    """Exact names, and "*.suffix" wildcards matching one or more labels below suffix."""

    def __init__(self, patterns: list[str]) -> None:
        self.exact: set[str] = set()
        self.suffixes: set[str] = set()
        for p in map(check_pattern, patterns):
            if p.startswith("*."):
                self.suffixes.add(p[1:])  # ".github.com"
            else:
                self.exact.add(p)

    def allows(self, name: str) -> bool:
        n = normalize(name)
        return n in self.exact or any(n.endswith(s) for s in self.suffixes)


@dataclass(frozen=True)
class ClientPolicy:
    vm: str
    allowlist: DomainAllowlist


@dataclass(frozen=True)
class EgressRecord:
    """One DNS query or connection attempt of one VM, with its verdict."""

    time: float
    vm: str
    kind: str  # "dns" | "connect"
    name: str
    address: str
    port: int
    verdict: str  # "allowed" | "denied"
    detail: str = ""
    # "tcp"/"udp"/... for connections; the query type for DNS.
    protocol: str = ""


FIT_ADDRESSES = 8


def fit(msg: dns.message.Message) -> bytes:
    """``msg`` in at most MAX_QUERY_BYTES (UDP, no TCP fallback here).

    An answer too large keeps only its address records, at most
    FIT_ADDRESSES per name (the guest needs one); if even that does not fit,
    the guest gets SERVFAIL rather than nothing.
    """
    try:
        return msg.to_wire(max_size=MAX_QUERY_BYTES)
    except dns.exception.TooBig:
        pass
    msg.answer = [
        dns.rrset.from_rdata_list(rr.name, rr.ttl, list(rr)[:FIT_ADDRESSES])
        for rr in msg.answer
        if rr.rdtype == dns.rdatatype.A
    ]
    msg.authority, msg.additional = [], []
    try:
        return msg.to_wire(max_size=MAX_QUERY_BYTES)
    except dns.exception.TooBig:
        msg.answer = []
        msg.set_rcode(dns.rcode.SERVFAIL)
        return msg.to_wire(max_size=MAX_QUERY_BYTES)


class DNSProxy(asyncio.DatagramProtocol):
    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        policy_for: Callable[[str], ClientPolicy | None],
        # Returns the addresses it refused, each with the reason (None: none).
        on_addresses: Callable[
            [str, str, list[tuple[str, int]]], Awaitable[Mapping[str, str] | None]
        ],
        on_record: Callable[[EgressRecord], None],
    ) -> None:
        self.upstream = upstream
        self.policy_for = policy_for
        self.on_addresses = on_addresses
        self.on_record = on_record
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, int] = {}
        # Queries dropped because their sender (or everyone) had too many in flight.
        self.shed = 0

    # -- asyncio protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        src = str(addr[0])
        # Bounded work: a guest flooding the resolver loses its own queries,
        # never the host's descriptors or the other VMs' answers.
        busy = self._inflight.get(src, 0)
        if busy >= MAX_INFLIGHT_PER_SOURCE or len(self._tasks) >= MAX_INFLIGHT:
            self.shed += 1
            return
        self._inflight[src] = busy + 1
        task = asyncio.ensure_future(self.handle(data, (src, int(str(addr[1])))))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, src))

    def _done(self, src: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        left = self._inflight.pop(src, 1) - 1
        if left > 0:
            self._inflight[src] = left

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for task in list(self._tasks):
            task.cancel()

    # -- one query -----------------------------------------------------------
    def _record(
        self, vm: str, name: str, verdict: str, detail: str, *, address: str = "", qtype: str = ""
    ) -> None:
        self.on_record(
            EgressRecord(time.time(), vm, "dns", name, address, 53, verdict, detail, qtype)
        )

    def _send(self, msg: dns.message.Message, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(fit(msg), addr)

    async def handle(self, data: bytes, addr: tuple[str, int]) -> None:
        src = addr[0]
        policy = self.policy_for(src)
        vm = policy.vm if policy else ""
        if len(data) > MAX_QUERY_BYTES:
            self._record(vm, "", "denied", f"oversized query from {src} dropped")
            return
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException as exc:
            self._record(vm, "", "denied", f"malformed query dropped: {type(exc).__name__}")
            return
        if query.flags & dns.flags.QR or len(query.question) != 1:
            self._record(vm, "", "denied", "not a single-question query; dropped")
            return
        q = query.question[0]
        name = normalize(q.name.to_text())
        qtype = dns.rdatatype.to_text(q.rdtype)
        reply = dns.message.make_response(query)
        if policy is None:
            reply.set_rcode(dns.rcode.REFUSED)
            self._record("", name, "denied", f"query from {src}, which is no VM", qtype=qtype)
            self._send(reply, addr)
            return
        if not policy.allowlist.allows(name):
            reply.set_rcode(dns.rcode.REFUSED)
            self._record(vm, name, "denied", "name not in allow_domains", qtype=qtype)
            self._send(reply, addr)
            return
        if q.rdtype == dns.rdatatype.AAAA:
            self._record(vm, name, "allowed", "empty answer (IPv6 is off)", qtype=qtype)
            self._send(reply, addr)
            return
        if q.rdtype != dns.rdatatype.A:
            reply.set_rcode(dns.rcode.REFUSED)
            self._record(vm, name, "denied", "only A and AAAA queries are answered", qtype=qtype)
            self._send(reply, addr)
            return
        await self._forward(query, name, policy, addr)

    async def _forward(
        self, query: dns.message.Message, name: str, policy: ClientPolicy, addr: tuple[str, int]
    ) -> None:
        upstream_q = dns.message.make_query(name, dns.rdatatype.A)
        try:
            answer = await dns.asyncquery.udp(
                upstream_q, self.upstream[0], port=self.upstream[1], timeout=UPSTREAM_TIMEOUT_S
            )
        except (dns.exception.DNSException, OSError) as exc:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
            self._record(policy.vm, name, "allowed", f"upstream failed: {exc}", qtype="A")
            self._send(reply, addr)
            return
        reply = dns.message.make_response(query)
        reply.set_rcode(answer.rcode())
        found: list[tuple[str, int]] = []
        for rrset in answer.answer:
            # Only the A records (CNAME chains included in the answer are kept
            # for the guest; their targets' addresses are what gets allowed).
            reply.answer.append(rrset)
            if rrset.rdtype == dns.rdatatype.A:
                ttl = min(max(int(rrset.ttl), MIN_TTL), MAX_TTL)
                found += [(r.address, ttl) for r in rrset]
        refused: Mapping[str, str] = {}
        if found:
            try:
                refused = await self.on_addresses(policy.vm, name, found) or {}
            except Exception as exc:  # noqa: BLE001 - no address the guest cannot use
                log.warning("cannot allow the addresses of %s: %s", name, exc)
                reply = dns.message.make_response(query)
                reply.set_rcode(dns.rcode.SERVFAIL)
                self._record(policy.vm, name, "denied", f"firewall update failed: {exc}", qtype="A")
                self._send(reply, addr)
                return
        if refused:
            strip_refused(reply, refused)
            why = "; ".join(f"{a} {r}" for a, r in refused.items())
            usable = [a for a, _ in found if a not in refused]
            if not usable:
                self._record(
                    policy.vm, name, "denied", f"answer refused: {why}",
                    address=next(iter(refused)), qtype="A",
                )  # fmt: skip
                self._send(reply, addr)
                return
            detail = f"answered {', '.join(usable)}; refused {why}"
            self._record(policy.vm, name, "allowed", detail, address=usable[0], qtype="A")
            self._send(reply, addr)
            return
        addrs = ", ".join(a for a, _ in found) or "no address"
        self._record(
            policy.vm, name, "allowed", f"answered {addrs}",
            address=found[0][0] if found else "", qtype="A",
        )  # fmt: skip
        self._send(reply, addr)


def strip_refused(reply: dns.message.Message, refused: Mapping[str, str]) -> None:
    """Cut the refused addresses out of ``reply`` (the guest never learns them)."""
    kept = []
    for rrset in reply.answer:
        if rrset.rdtype == dns.rdatatype.A:
            left = [r for r in rrset if r.address not in refused]
            if left:
                kept.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, left))
        else:
            kept.append(rrset)
    reply.answer = kept


async def serve(
    proxy: DNSProxy, host: str, port: int
) -> tuple[asyncio.DatagramTransport, DNSProxy]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: proxy, local_addr=(host, port)
    )
    return transport, protocol
