"""The NAT_FILTERED resolver against a real upstream (the tests' private internet)."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentvm.common.errors import InvalidArgument
from agentvm.vm_manager.dnsproxy import (
    FIT_ADDRESSES,
    MIN_TTL,
    ClientPolicy,
    DNSProxy,
    DomainAllowlist,
    EgressRecord,
    fit,
    serve,
    strip_refused,
)
from tests.networld import DNS_IP, NAMES, NetWorld, networld


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(scope="module")
def world() -> Iterator[NetWorld]:
    with networld() as w:
        yield w


def test_allowlist_matching() -> None:
    allow = DomainAllowlist(["PyPI.org.", "*.github.com"])
    assert allow.allows("pypi.org")
    assert allow.allows("pypi.org.")
    assert allow.allows("api.github.com")
    assert allow.allows("a.b.github.com")
    assert not allow.allows("github.com")
    assert not allow.allows("evilgithub.com")
    assert not allow.allows("pypi.org.evil.com")
    assert not allow.allows("files.pythonhosted.org")
    for bad in ["", "com", "*", "*.com", "a..b", "-a.com", "a b.com", "x" * 64 + ".com"]:
        with pytest.raises(InvalidArgument, match="allow_domains"):
            DomainAllowlist([bad])


async def ask(port: int, name: str, rdtype: str, source: str = "127.0.0.1") -> dns.message.Message:
    return await dns.asyncquery.udp(
        dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=5, source=source
    )


@aio
async def test_only_allowlisted_names_resolve_and_their_addresses_are_handed_on(
    world: NetWorld,
) -> None:
    records: list[EgressRecord] = []
    added: list[tuple[str, list[tuple[str, int]]]] = []

    async def on_addresses(vm: str, name: str, addrs: list[tuple[str, int]]) -> None:
        assert name == "allowed.test"
        added.append((vm, addrs))

    policies = {"127.0.0.1": ClientPolicy("vm1", DomainAllowlist(["allowed.test"]))}
    proxy = DNSProxy(
        upstream=(DNS_IP, 53),
        policy_for=policies.get,
        on_addresses=on_addresses,
        on_record=records.append,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport, _ = await serve(proxy, "127.0.0.1", port)
    try:
        ok = await ask(port, "allowed.test", "A")
        assert ok.rcode() == dns.rcode.NOERROR
        assert [r.address for rrset in ok.answer for r in rrset] == [NAMES["allowed.test"]]
        assert added == [("vm1", [(NAMES["allowed.test"], MIN_TTL)])]  # dnsmasq's TTL 0 clamped

        for name, rdtype in [("other.test", "A"), ("allowed.test", "TXT"), ("x.allowed.test", "A")]:
            refused = await ask(port, name, rdtype)
            assert refused.rcode() == dns.rcode.REFUSED
        v6 = await ask(port, "allowed.test", "AAAA")
        assert v6.rcode() == dns.rcode.NOERROR
        assert not v6.answer
        stranger = await ask(port, "allowed.test", "A", source="127.0.0.2")
        assert stranger.rcode() == dns.rcode.REFUSED
        assert len(added) == 1  # nothing but the one allowed answer reached the filter

        # Garbage from a guest is dropped and recorded, the proxy keeps going.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as g:
            g.sendto(b"\x00\x01garbage", ("127.0.0.1", port))
            g.sendto(b"x" * 2000, ("127.0.0.1", port))
        await asyncio.sleep(0.2)
        assert (await ask(port, "allowed.test", "A")).rcode() == dns.rcode.NOERROR
    finally:
        transport.close()
    verdicts = [(r.vm, r.name, r.verdict) for r in records]
    assert ("vm1", "allowed.test", "allowed") in verdicts
    assert ("vm1", "other.test", "denied") in verdicts
    assert ("", "allowed.test", "denied") in verdicts
    assert any("malformed" in r.detail for r in records)
    assert any("oversized" in r.detail for r in records)
    assert all(r.kind == "dns" for r in records)


class _Sink:
    """Stands in for the UDP transport: keeps what the proxy would send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_any_bytes_from_a_guest_are_answered_or_dropped_never_raised(data: bytes) -> None:
    """Hostile input: no exception, no upstream query, every packet recorded."""
    records: list[EgressRecord] = []

    async def never(vm: str, name: str, addrs: list[tuple[str, int]]) -> None:
        raise AssertionError("no address may be allowed from garbage")

    proxy = DNSProxy(
        upstream=("192.0.2.1", 9),  # TEST-NET-1, never contacted: no name here is allowed
        policy_for=lambda src: ClientPolicy("vm1", DomainAllowlist(["allowed.test"])),
        on_addresses=never,
        on_record=records.append,
    )
    sink = _Sink()
    proxy.transport = sink  # type: ignore[assignment]
    # A valid query for a non-allowlisted name, then the random bytes.
    for packet in (dns.message.make_query("x.example", "A").to_wire(), data):
        if b"allowed" in packet.lower():
            continue  # the one name that would be forwarded
        asyncio.run(proxy.handle(packet, ("10.0.0.2", 5353)))
    assert records
    assert all(r.verdict == "denied" or r.detail.startswith("empty answer") for r in records)
    for reply in sink.sent:
        msg = dns.message.from_wire(reply)
        assert msg.rcode() in (dns.rcode.REFUSED, dns.rcode.NOERROR)


def test_answers_too_large_for_udp_keep_a_few_addresses() -> None:
    query = dns.message.make_query("many.allowed.test", "A")
    reply = dns.message.make_response(query)
    addrs = [f"198.18.1.{i}" for i in range(1, 101)]
    reply.answer.append(dns.rrset.from_text_list("many.allowed.test.", 60, "IN", "A", addrs))
    reply.answer.append(
        dns.rrset.from_text("many.allowed.test.", 60, "IN", "TXT", '"' + "x" * 200 + '"')
    )
    wire = fit(reply)
    assert len(wire) <= 512
    got = dns.message.from_wire(wire)
    assert got.rcode() == dns.rcode.NOERROR
    kept = [r.address for rr in got.answer for r in rr]
    assert len(kept) == FIT_ADDRESSES
    assert set(kept) <= set(addrs)
    small = dns.message.make_response(query)
    assert fit(small) == small.to_wire()


@aio
async def test_refused_addresses_are_cut_from_the_answer_and_recorded(world: NetWorld) -> None:
    """An allowlisted name answered with an address the filter refuses: the guest
    never sees the address, and the query is recorded as denied with the reason."""
    records: list[EgressRecord] = []

    async def refuse(vm: str, name: str, addrs: list[tuple[str, int]]) -> dict[str, str]:
        return {a: "on the host's own network 198.18.0.0/24" for a, _ in addrs}

    proxy = DNSProxy(
        upstream=(DNS_IP, 53),
        policy_for=lambda src: ClientPolicy("vm1", DomainAllowlist(["allowed.test"])),
        on_addresses=refuse,
        on_record=records.append,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport, _ = await serve(proxy, "127.0.0.1", port)
    try:
        got = await ask(port, "allowed.test", "A")
    finally:
        transport.close()
    assert got.rcode() == dns.rcode.NOERROR
    assert [r for rrset in got.answer for r in rrset] == []
    (rec,) = records
    assert (rec.vm, rec.name, rec.verdict, rec.address) == (
        "vm1", "allowed.test", "denied", NAMES["allowed.test"],
    )  # fmt: skip
    assert "answer refused" in rec.detail
    assert "host's own network" in rec.detail


def test_a_partly_refused_answer_keeps_only_the_usable_addresses() -> None:
    query = dns.message.make_query("mixed.allowed.test", "A")
    reply = dns.message.make_response(query)
    reply.answer.append(
        dns.rrset.from_text("mixed.allowed.test.", 60, "IN", "CNAME", "cdn.allowed.test.")
    )
    reply.answer.append(
        dns.rrset.from_text_list(
            "cdn.allowed.test.", 60, "IN", "A", ["151.101.0.223", "10.0.0.5", "192.168.1.1"]
        )
    )
    strip_refused(reply, {"10.0.0.5": "private", "192.168.1.1": "private"})
    assert [rr.rdtype for rr in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert [r.address for r in reply.answer[1]] == ["151.101.0.223"]
    strip_refused(reply, {"151.101.0.223": "host"})
    assert [rr.rdtype for rr in reply.answer] == [dns.rdatatype.CNAME]
