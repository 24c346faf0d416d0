"""The NFLOG reader: hand-built messages, hostile input, and the real kernel.

The kernel tests run the reader in a private network namespace (``avmt-<hex>``)
the test creates and deletes; their only traffic goes to its loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm.vm_manager.nflog import LoggedPacket, NflogReader, parse_messages

PACKET_TYPE = (4 << 8) | 0
CONFIG_TYPE = (4 << 8) | 1
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NFULA_PACKET_HDR, NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX = 1, 4, 9, 10
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 1 << 15, 1 << 14
TCP, UDP, ICMP, GRE = 6, 17, 1, 47
GUEST, SITE = "10.0.0.2", "93.184.216.34"
NFT = "/usr/sbin/nft"


# -- building messages by hand ----------------------------------------------------------
def nlattr(attr_type: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), attr_type) + value
    return raw + bytes(-len(raw) % 4)


def nlmsg(msg_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A netlink message; ``length`` overrides nlmsg_len to lie about the size."""
    size = 16 + len(body) if length is None else length
    raw = struct.pack("=IHHII", size, msg_type, 0, 1, 0) + body
    return raw + bytes(-len(raw) % 4)


def nflog(
    payload: bytes | None, prefix: bytes | None = b"avm a web1 \0", extra: bytes = b""
) -> bytes:
    """An NFULNL_MSG_PACKET message of group 7 as the kernel lays it out."""
    body = struct.pack("!BBH", socket.AF_INET, 0, 7)
    body += nlattr(NFULA_PACKET_HDR, struct.pack("!HBB", 0x0800, 3, 0))
    if prefix is not None:
        body += nlattr(NFULA_PREFIX, prefix)
    body += extra
    if payload is not None:
        body += nlattr(NFULA_PAYLOAD, payload)
    return nlmsg(PACKET_TYPE, body)


def ipv4(
    proto: int,
    transport: bytes,
    *,
    ihl: int = 5,
    version: int = 4,
    frag: int = 0x4000,  # don't fragment, offset 0
    src: str = GUEST,
    dst: str = SITE,
) -> bytes:
    options = b"\x01" * (ihl * 4 - 20)  # NOPs
    header = struct.pack(
        "!BBHHHBBH4s4s",
        version << 4 | ihl,
        0,
        20 + len(options) + len(transport),
        0x1234,
        frag,
        64,
        proto,
        0xBEEF,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + transport


def tcp_syn(dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 64240, 0xBEEF, 0)


def udp(dport: int) -> bytes:
    return struct.pack("!HHHH", 5353, dport, 12, 0xBEEF) + b"data"


def icmp_echo() -> bytes:
    # Bytes 2-3 (where a port would be) hold a checksum that is not 0.
    return struct.pack("!BBHHH", 8, 0, 0xBEEF, 1, 1) + b"ping"


def ack(seq: int) -> bytes:
    return nlmsg(
        NLMSG_ERROR, struct.pack("=i", 0) + struct.pack("=IHHII", 28, CONFIG_TYPE, 5, seq, 0)
    )


def only(data: bytes) -> LoggedPacket:
    packets, malformed = parse_messages(data)
    assert malformed == 0
    assert len(packets) == 1
    return packets[0]


# -- parsing ------------------------------------------------------------------------------
def test_a_tcp_syn_becomes_a_record_with_prefix_addresses_and_port() -> None:
    before = time.time()
    packet = only(nflog(ipv4(TCP, tcp_syn(443))))
    assert packet == LoggedPacket("avm a web1 ", GUEST, SITE, "tcp", 443, packet.time)
    assert before <= packet.time <= time.time()


@pytest.mark.parametrize(
    ("proto", "transport", "protocol", "dport"),
    [
        (UDP, udp(53), "udp", 53),
        (ICMP, icmp_echo(), "icmp", 0),
        (GRE, tcp_syn(8080), "47", 0),
    ],
)
def test_udp_icmp_and_other_protocols(
    proto: int, transport: bytes, protocol: str, dport: int
) -> None:
    packet = only(nflog(ipv4(proto, transport, src="192.168.122.5", dst="1.1.1.1")))
    assert (packet.src, packet.dst, packet.protocol, packet.dport) == (
        "192.168.122.5",
        "1.1.1.1",
        protocol,
        dport,
    )


def test_several_messages_in_one_buffer_in_order_and_other_messages_ignored() -> None:
    data = b"".join(
        [
            ack(1),
            nflog(ipv4(TCP, tcp_syn(22)), prefix=b"avm a x \0"),
            nlmsg(NLMSG_NOOP, b""),
            nflog(ipv4(UDP, udp(123)), prefix=b"avm d\0"),  # odd length: padding follows
            nlmsg(CONFIG_TYPE, struct.pack("!BBH", 0, 0, 7)),
            nflog(ipv4(ICMP, icmp_echo()), prefix=b"avm h \0"),
            nlmsg(NLMSG_DONE, struct.pack("=i", 0)),
        ]
    )
    packets, malformed = parse_messages(data)
    assert malformed == 0
    assert [(p.prefix, p.protocol, p.dport) for p in packets] == [
        ("avm a x ", "tcp", 22),
        ("avm d", "udp", 123),
        ("avm h ", "icmp", 0),
    ]
    assert len({p.time for p in packets}) == 1


def test_ip_options_move_the_port() -> None:
    assert only(nflog(ipv4(TCP, tcp_syn(8443), ihl=6))).dport == 8443
    # The longest header (60 bytes) plus the ports is exactly the default copy of 64 bytes.
    longest = ipv4(TCP, tcp_syn(993), ihl=15)[:64]
    assert only(nflog(longest)).dport == 993


def test_port_outside_the_copied_bytes_or_in_a_later_fragment_is_0() -> None:
    assert only(nflog(ipv4(TCP, tcp_syn(443))[:23])).dport == 0
    assert only(nflog(ipv4(UDP, udp(53))[:24])).dport == 53
    later_fragment = ipv4(UDP, udp(53), frag=0x2000 | 185)  # more fragments, offset 1480
    assert only(nflog(later_fragment)).dport == 0


def test_attribute_flags_are_masked_and_the_prefix_ends_at_nul() -> None:
    payload = nlattr(NFULA_PAYLOAD | NLA_F_NET_BYTEORDER, ipv4(TCP, tcp_syn(80)))
    prefix = nlattr(NFULA_PREFIX | NLA_F_NESTED, b"avm d \0junk")
    packet = only(nflog(None, prefix=None, extra=prefix + payload))
    assert (packet.prefix, packet.dport) == ("avm d ", 80)


def test_prefix_without_nul_or_missing() -> None:
    assert only(nflog(ipv4(TCP, tcp_syn(80)), prefix=b"avm a")).prefix == "avm a"
    assert only(nflog(ipv4(TCP, tcp_syn(80)), prefix=None)).prefix == ""


def test_unknown_attributes_are_skipped() -> None:
    stamp = nlattr(NFULA_TIMESTAMP, struct.pack("!QQ", 1, 2))
    assert only(nflog(ipv4(TCP, tcp_syn(80)), extra=stamp + nlattr(99, b"\xff" * 7))).dport == 80


GOOD = nflog(ipv4(TCP, tcp_syn(443)))
NFGEN = struct.pack("!BBH", socket.AF_INET, 0, 7)


def raw_packet(attrs: bytes) -> bytes:
    """A packet message with ``attrs`` as they are after the nfgenmsg."""
    return nlmsg(PACKET_TYPE, NFGEN + attrs)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(nflog(ipv4(TCP, tcp_syn(443), ihl=15)[:40]), id="ihl-past-payload"),
        pytest.param(nflog(ipv4(TCP, tcp_syn(443), ihl=4)), id="ihl-below-5"),
        pytest.param(nflog(ipv4(TCP, tcp_syn(443), version=6)), id="not-ipv4"),
        pytest.param(nflog(ipv4(TCP, b"")[:19]), id="payload-shorter-than-ip-header"),
        pytest.param(nflog(None), id="no-payload"),
        pytest.param(raw_packet(struct.pack("=HH", 200, 9) + bytes(8)), id="attr-len-past-end"),
        pytest.param(raw_packet(struct.pack("=HH", 2, 9) + bytes(8)), id="attr-len-below-4"),
        pytest.param(raw_packet(b"\x08\x00"), id="truncated-attr-header"),
        pytest.param(nlmsg(PACKET_TYPE, NFGEN[:2]), id="no-room-for-nfgenmsg"),
    ],
)
def test_malformed_messages_are_counted_and_do_not_stop_the_next(message: bytes) -> None:
    packets, malformed = parse_messages(message + GOOD)
    assert malformed == 1
    assert [p.dport for p in packets] == [443]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(GOOD[:15], id="truncated-netlink-header"),
        pytest.param(GOOD[:-1], id="message-longer-than-buffer"),
        pytest.param(nlmsg(PACKET_TYPE, b"", length=0) + GOOD, id="length-0"),
        pytest.param(nlmsg(PACKET_TYPE, b"", length=15) + GOOD, id="length-below-header"),
        pytest.param(nlmsg(NLMSG_NOOP, b"", length=1 << 31) + GOOD, id="huge-length"),
    ],
)
def test_a_broken_netlink_header_ends_the_buffer_after_one_count(tail: bytes) -> None:
    packets, malformed = parse_messages(GOOD + tail)
    assert malformed == 1
    assert len(packets) == 1


def test_empty_buffer() -> None:
    assert parse_messages(b"") == ([], 0)


@given(st.binary())
def test_random_bytes_never_raise(data: bytes) -> None:
    packets, malformed = parse_messages(data)
    assert malformed >= 0
    assert all(isinstance(p, LoggedPacket) for p in packets)


@given(st.binary())
def test_random_attributes_give_a_packet_or_a_count(attrs: bytes) -> None:
    packets, malformed = parse_messages(raw_packet(attrs))
    assert len(packets) + malformed == 1


@given(st.binary(max_size=80))
def test_random_payloads_give_a_packet_or_a_count(payload: bytes) -> None:
    packets, malformed = parse_messages(nflog(payload))
    assert len(packets) + malformed == 1
    for p in packets:
        assert 0 <= p.dport <= 0xFFFF
        ipaddress.IPv4Address(p.src)
        ipaddress.IPv4Address(p.dst)


@given(st.integers(min_value=1, max_value=len(GOOD) - 1))
def test_every_truncation_is_counted(cut: int) -> None:
    packets, malformed = parse_messages(GOOD + GOOD[:cut])
    assert ([p.dport for p in packets], malformed) == ([443], 1)


def test_a_failing_callback_does_not_lose_the_other_packets() -> None:
    seen: list[int] = []

    def on_packet(packet: LoggedPacket) -> None:
        seen.append(packet.dport)
        if packet.dport == 1:
            raise RuntimeError("callback bug")

    reader = NflogReader(7, on_packet)
    reader._deliver(nflog(ipv4(TCP, tcp_syn(1))) + nflog(None) + nflog(ipv4(TCP, tcp_syn(2))))
    assert seen == [1, 2]
    assert reader.malformed == 1


@pytest.mark.parametrize(
    ("group", "copy_bytes", "complaint"),
    [(-1, 64, "group"), (1 << 16, 64, "group"), (7, 0, "copy_bytes"), (7, 1 << 16, "copy_bytes")],
)
def test_reader_arguments_are_checked(group: int, copy_bytes: int, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        NflogReader(group, lambda _: None, copy_bytes=copy_bytes)


# -- the real kernel, in a private network namespace -------------------------------------
# Runs NflogReader(7) in the namespace (a netlink socket belongs to its creator's), prints
# one JSON line when it listens and one with what it got when done. "one": done at the
# first packet, after checking a second reader of the group is refused. "flood": stops
# reading until stdin says the test has flooded the group, then reads until it is quiet.
READER = r"""
import asyncio, dataclasses, json, sys
from agentvm.vm_manager.nflog import NflogReader

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def main(mode):
    packets, arrived = [], asyncio.Event()
    def on_packet(packet):
        packets.append(dataclasses.asdict(packet))
        arrived.set()
    reader = NflogReader(7, on_packet)
    await reader.start()
    busy = ""
    if mode == "one":
        try:
            await NflogReader(7, on_packet).start()
        except OSError as exc:
            busy = str(exc)
        emit(ready=True)
        await asyncio.wait_for(arrived.wait(), 20)
    else:
        emit(ready=True)
        sys.stdin.readline()
        while True:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), 3)
            except TimeoutError:
                break
    await reader.close()
    await reader.close()
    emit(packets=packets, busy=busy, malformed=reader.malformed, lost=reader.lost)

asyncio.run(main(sys.argv[1]))
"""
RULES = """
table inet avmtest {
  chain out {
    type filter hook output priority 0;
    tcp dport 9 log group 7 prefix "avm d " drop
    udp dport 9 log group 7 prefix "avm f "
  }
}
"""
CONNECT = "import socket; s=socket.socket(); s.settimeout(1); s.connect_ex(('127.0.0.1', 9))"
FLOOD = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50000):
    s.sendto(b"x", ("127.0.0.1", 9))
"""


def inside(ns: str, *cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with loopback up and the logging rules loaded."""
    name = f"avmt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        inside(name, "ip", "link", "set", "lo", "up")
        inside(name, NFT, "-f", "-", stdin=RULES)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@contextlib.contextmanager
def reader_in(ns: str, mode: str) -> Iterator[subprocess.Popen[str]]:
    """The READER script running in ``ns``, once it has said it listens."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", READER, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line or "{}") == {"ready": True}, proc.stderr and proc.stderr.read()
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.communicate(timeout=10)


def result(proc: subprocess.Popen[str], stdin: str = "") -> dict[str, Any]:
    out, err = proc.communicate(stdin, timeout=60)
    assert proc.returncode == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def test_the_kernel_logs_a_denied_connection_to_the_reader(netns: str) -> None:
    default_logger = inside(netns, "cat", "/proc/sys/net/netfilter/nf_log/2")
    before = time.time()
    with reader_in(netns, "one") as proc:
        inside(netns, sys.executable, "-c", CONNECT)
        report = result(proc)
    first = report["packets"][0]
    assert {k: v for k, v in first.items() if k != "time"} == {
        "prefix": "avm d ",
        "src": "127.0.0.1",
        "dst": "127.0.0.1",
        "protocol": "tcp",
        "dport": 9,
    }
    assert before <= first["time"] <= time.time()
    assert (report["malformed"], report["lost"]) == (0, 0)
    # The group has one reader per namespace; the kernel refuses the second with EPERM.
    assert "cannot bind NFLOG group 7: Operation not permitted; does another" in report["busy"]
    # The reader leaves the namespace's default IPv4 logger (no legacy PF_BIND).
    assert inside(netns, "cat", "/proc/sys/net/netfilter/nf_log/2") == default_logger


def test_an_overrun_is_counted_and_reading_goes_on(netns: str) -> None:
    with reader_in(netns, "flood") as proc:
        inside(netns, sys.executable, "-c", FLOOD)
        report = result(proc, "flooded\n")
    assert report["lost"] >= 1
    assert report["malformed"] == 0
    packets = report["packets"]
    assert 0 < len(packets) < 50000
    assert {(p["prefix"], p["protocol"], p["dport"]) for p in packets} == {("avm f ", "udp", 9)}
