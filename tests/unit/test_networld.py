"""The network tests' private internet works, and leaves nothing behind."""

from __future__ import annotations

import socket

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.networld import DNS_IP, HOST_IP, NAMES, leftovers, networld


def test_the_world_answers_its_names_and_serves_and_goes_away() -> None:
    with networld() as world:
        # Its resolver knows its names, and only those.
        for name, ip in NAMES.items():
            answer = dns.query.udp(dns.message.make_query(name, "A"), DNS_IP, timeout=5)
            addrs = [r.address for rrset in answer.answer for r in rrset]
            assert addrs == [ip]
        nx = dns.query.udp(dns.message.make_query("pypi.org", "A"), DNS_IP, timeout=5)
        assert not nx.answer
        # Its servers answer from the host over the veth, and see the host's address.
        with socket.create_connection((NAMES["allowed.test"], 80), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.0 200")
        assert f"saw {HOST_IP}" in reply
        with socket.create_connection((NAMES["allowed.test"], 22), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(4096).endswith(b"ping")
        assert world.ns in leftovers()
    assert world.ns not in leftovers()
