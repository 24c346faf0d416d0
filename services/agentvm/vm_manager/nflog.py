"""Connection records of NAT_FILTERED networks: an asyncio reader of NFLOG messages.

Groundwork for docs/NETWORK_DESIGN.md (issue 5): nothing starts it yet.
The nftables ruleset logs every new connection a VM opens, and every packet it
denies, to one NFLOG group with a prefix telling which ("avm a ...", "avm d ...").
The kernel hands those to the netlink socket bound to that group (nfnetlink_log);
``NflogReader`` binds it and turns each message into a ``LoggedPacket``.

The logged packets are written by untrusted guests, so every length is checked
before it is used: a malformed message is counted in ``malformed`` and skipped,
never raised out of the reader.

The reader does not send the legacy PF_UNBIND/PF_BIND commands: ``log group``
rules find nfnetlink_log by type, and rebinding the family's default logger
would change the host's /proc/sys/net/netfilter/nf_log/2 (where e.g.
conntrack's invalid-packet logs go) for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("agentvm.vm_manager.nflog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
# Queue threshold: 1 hands every packet over at once (the kernel's default
# batches up to 100 packets or 1 s, so a record could trail its run).
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PREFIX = 10
NFULA_PAYLOAD = 9
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SO_RCVBUFFORCE = 33

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the group, big-endian)
NLATTR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # the negative errno, 0 for an ACK
CFG_MODE = struct.Struct("!IBB")  # copy_range, copy_mode, padding
PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
CONFIG_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp"}
PORTED = {6, 17}
IPV4_MIN_HEADER = 20
RCVBUF_BYTES = 1 << 20
# Larger than any one datagram: a message carries at most 0xFFFF bytes of packet.
RECV_BYTES = 1 << 17
ACK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LoggedPacket:
    """One packet an nftables ``log group`` rule reported."""

    prefix: str  # the rule's prefix, e.g. "avm a "
    src: str
    dst: str
    protocol: str  # "tcp", "udp", "icmp" or the protocol number
    dport: int  # 0 unless TCP or UDP with the port in the copied bytes
    time: float  # when it was read (the kernel's timestamp is optional)


class Malformed(ValueError):
    """A netlink message or packet that cannot be read; the reader skips it."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_messages(data: bytes) -> tuple[list[LoggedPacket], int]:
    """The packets in one recv() buffer, and how many messages were skipped as malformed.

    A buffer holds any number of netlink messages; messages other than NFLOG
    packets (ACKs, config replies, NOOP/DONE) are ignored without counting.
    A header whose length runs past the buffer ends the parse: nothing after
    it can be located.
    """
    packets: list[LoggedPacket] = []
    malformed = 0
    now = time.time()
    offset = 0
    while offset < len(data):
        try:
            end, msg_type = _message_bounds(data, offset)
        except Malformed:
            return packets, malformed + 1
        if msg_type == PACKET_TYPE:
            try:
                packets.append(_parse_packet_message(data[offset:end], now))
            except Malformed:
                malformed += 1
        offset = _align(end)
    return packets, malformed


def _message_bounds(data: bytes, offset: int) -> tuple[int, int]:
    """(end, type) of the netlink message at ``offset``; Malformed if it does not fit."""
    if len(data) - offset < NLMSGHDR.size:
        raise Malformed("truncated netlink header")
    length, msg_type, _, _, _ = NLMSGHDR.unpack_from(data, offset)
    if length < NLMSGHDR.size or offset + length > len(data):
        raise Malformed(f"netlink message length {length} does not fit")
    return offset + length, msg_type


def _parse_packet_message(msg: bytes, now: float) -> LoggedPacket:
    """The LoggedPacket of one NFULNL_MSG_PACKET message (header included)."""
    attrs = _parse_attributes(msg, NLMSGHDR.size + NFGENMSG.size)
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        raise Malformed("no payload")
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0]
    return _parse_ipv4(payload, prefix.decode("utf-8", "replace"), now)


def _parse_attributes(msg: bytes, offset: int) -> dict[int, bytes]:
    """The netlink attributes from ``offset`` to the end of ``msg``, by type (last wins)."""
    if offset > len(msg):
        raise Malformed("message shorter than its fixed header")
    attrs: dict[int, bytes] = {}
    while offset < len(msg):
        if len(msg) - offset < NLATTR.size:
            raise Malformed("truncated attribute header")
        length, attr_type = NLATTR.unpack_from(msg, offset)
        if length < NLATTR.size or offset + length > len(msg):
            raise Malformed(f"attribute length {length} does not fit")
        attrs[attr_type & NLA_TYPE_MASK] = msg[offset + NLATTR.size : offset + length]
        offset += _align(length)
    return attrs


def _parse_ipv4(payload: bytes, prefix: str, now: float) -> LoggedPacket:
    """Addresses, protocol and port of the IPv4 packet the payload starts with."""
    if len(payload) < IPV4_MIN_HEADER or payload[0] >> 4 != 4:
        raise Malformed("not an IPv4 header")
    header_len = (payload[0] & 0x0F) * 4
    if header_len < IPV4_MIN_HEADER or header_len > len(payload):
        raise Malformed(f"IPv4 header length {header_len} does not fit")
    proto = payload[9]
    return LoggedPacket(
        prefix=prefix,
        src=str(ipaddress.IPv4Address(payload[12:16])),
        dst=str(ipaddress.IPv4Address(payload[16:20])),
        protocol=PROTOCOLS.get(proto, str(proto)),
        dport=_dport(payload, header_len) if proto in PORTED else 0,
        time=now,
    )


def _dport(payload: bytes, header_len: int) -> int:
    """The TCP/UDP destination port, or 0 when the copied bytes do not hold it.

    A fragment after the first carries data, not a transport header, where the
    port would be.
    """
    (fragment_offset,) = struct.unpack_from("!H", payload, 6)
    if fragment_offset & 0x1FFF or len(payload) < header_len + 4:
        return 0
    (port,) = struct.unpack_from("!H", payload, header_len + 2)
    return int(port)


def _ack_errno(data: bytes, seq: int) -> int | None:
    """The errno the kernel answered request ``seq`` with (0: success), None if no answer."""
    offset = 0
    while offset < len(data):
        try:
            end, msg_type = _message_bounds(data, offset)
        except Malformed:
            return None
        _, _, _, msg_seq, _ = NLMSGHDR.unpack_from(data, offset)
        body = offset + NLMSGHDR.size
        if msg_type == NLMSG_ERROR and msg_seq == seq and end - body >= NLMSGERR.size:
            return -int(NLMSGERR.unpack_from(data, body)[0])
        offset = _align(end)
    return None


def _config_message(group: int, seq: int, attrs: bytes, *, ack: bool = True) -> bytes:
    """An NFULNL_MSG_CONFIG request for ``group`` carrying ``attrs``."""
    body = NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attrs
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), CONFIG_TYPE, flags, seq, 0) + body


def _attribute(attr_type: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = NLATTR.pack(NLATTR.size + len(value), attr_type) + value
    return raw + bytes(_align(len(raw)) - len(raw))


class NflogReader:
    """Reads one NFLOG group of this network namespace and calls ``on_packet`` per packet.

    ``copy_bytes`` is how much of each packet the kernel copies: 64 holds an
    IPv4 header with the most options plus the ports.
    """

    def __init__(
        self, group: int, on_packet: Callable[[LoggedPacket], None], copy_bytes: int = 64
    ) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} is not 0-65535")
        if not 1 <= copy_bytes <= 0xFFFF:
            raise ValueError(f"copy_bytes {copy_bytes} is not 1-65535")
        self.group = group
        self.on_packet = on_packet
        self.copy_bytes = copy_bytes
        self.malformed = 0
        # Receive-queue overruns: each one means the kernel dropped at least one batch.
        self.lost = 0
        self._sock: socket.socket | None = None
        self._seq = 0

    async def start(self) -> None:
        """Bind the group with packet copies on; OSError saying why if the kernel refuses."""
        if self._sock is not None:
            raise RuntimeError(f"NFLOG group {self.group} reader is already started")
        sock = _open_socket()
        try:
            bind = _attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
            await self._configure(sock, "bind", bind)
            mode = CFG_MODE.pack(self.copy_bytes, NFULNL_COPY_PACKET, 0)
            await self._configure(sock, "set the copy mode of", _attribute(NFULA_CFG_MODE, mode))
            qthresh = _attribute(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
            await self._configure(sock, "set the queue threshold of", qthresh)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable, sock)

    async def close(self) -> None:
        """Unbind the group and close the socket; safe to call more than once."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        # Best effort: closing the socket releases the group as well.
        unbind = _attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND]))
        with contextlib.suppress(OSError):
            sock.send(_config_message(self.group, self._next_seq(), unbind, ack=False))
        sock.close()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _configure(self, sock: socket.socket, step: str, attrs: bytes) -> None:
        """Send one config request and wait for its ACK; packets arriving meanwhile are kept."""
        loop = asyncio.get_running_loop()
        seq = self._next_seq()
        await loop.sock_sendall(sock, _config_message(self.group, seq, attrs))
        try:
            async with asyncio.timeout(ACK_TIMEOUT_S):
                while (err := _ack_errno(await self._receive(loop, sock), seq)) is None:
                    pass
        except TimeoutError:
            err = errno.ETIMEDOUT
        if err:
            raise OSError(err, f"cannot {step} NFLOG group {self.group}: {_explain(err)}")

    async def _receive(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        """The next buffer during setup, after handing its packets on."""
        try:
            data = await loop.sock_recv(sock, RECV_BYTES)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            self.lost += 1
            return b""
        self._deliver(data)
        return data

    def _on_readable(self, sock: socket.socket) -> None:
        """One datagram per wakeup, so a flood of logs cannot starve the event loop."""
        try:
            data = sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            self.lost += 1
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        """Hand on the packets of ``data``; a failing ``on_packet`` does not lose the others."""
        packets, malformed = parse_messages(data)
        self.malformed += malformed
        for packet in packets:
            try:
                self.on_packet(packet)
            except Exception:
                log.exception("NFLOG group %d: on_packet failed", self.group)


def _open_socket() -> socket.socket:
    """A non-blocking NETLINK_NETFILTER socket with a receive buffer for bursts."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
    try:
        sock.setblocking(False)
        sock.bind((0, 0))
        # FORCE may exceed net.core.rmem_max but needs CAP_NET_ADMIN in the initial user
        # namespace; the group itself only needs it in the network namespace's.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    except BaseException:
        sock.close()
        raise
    return sock


def _explain(err: int) -> str:
    """The errno text plus the likely cause."""
    text = os.strerror(err)
    if err == errno.EPERM:
        return (
            f"{text}; does another socket of this network namespace read that group,"
            " or does this process lack CAP_NET_ADMIN?"
        )
    return f"{text}; is the nfnetlink_log module available?"
