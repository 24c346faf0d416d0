"""Session and multiplexing protocol for the guest agent over one byte stream.

A virtio-serial port is a single byte stream that survives host-side
reconnects with stale bytes in both directions (see docs/ARCHITECTURE.md,
"Host <-> guest transport"). This module carries many independent
connections (one per gRPC channel on the host) over that stream and lets
either end start a fresh session at any time.

Frame layout (big endian)::

    magic  2 bytes  0xA7 0x56
    type   1 byte   FrameType
    flags  1 byte   0 (reserved)
    stream 4 bytes  stream id (0 for SYNC / SYNC_ACK / RESET)
    length 4 bytes  payload length, at most MAX_PAYLOAD
    payload

Session start: the host writes PAD (zero bytes, longer than any frame, so a
half-delivered stale frame in the guest's parser is completed and the parser
falls into "hunt" mode), then SYNC carrying a random nonce. The guest hunts
for the SYNC header, drops every stream of the previous session and answers
SYNC_ACK with the same nonce. The host discards everything it reads until
that exact SYNC_ACK. Only then are OPEN / DATA / CLOSE frames exchanged.

Guest restart: a starting agent writes RESET (stream 0, no payload) once,
before it reads the port. The host ends the session it holds (its streams
died with the previous agent process) and the next client handshakes again.

This module is shared by the guest (stdlib only) and the host. The host
treats every byte from the guest as hostile: the decoder bounds its buffer
and raises :class:`ProtocolError` for anything malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"\xa7\x56"
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 64 * 1024
NONCE_SIZE = 16
# Longer than the largest frame: whatever stale partial frame the peer's
# parser is in the middle of is completed by zeros, which are not a valid
# header, so the parser starts hunting for SYNC.
PAD = bytes(HEADER_SIZE + MAX_PAYLOAD + 1)
# Name of the virtio-serial port and vsock port the agent serves on.
PORT_NAME = "org.agentvm.agent.0"
VSOCK_PORT = 1024


class FrameType(IntEnum):
    """Kinds of frames."""

    SYNC = 1
    SYNC_ACK = 2
    OPEN = 3
    DATA = 4
    CLOSE = 5
    RESET = 6  # guest -> host only: a new agent process, the session is gone


class ProtocolError(Exception):
    """The byte stream is not valid framing (stale bytes or a hostile peer)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    stream: int
    payload: bytes = b""


def encode(ftype: FrameType, stream: int, payload: bytes = b"") -> bytes:
    """Encode one frame. Raises ValueError for an oversized payload or bad id."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= stream <= 0xFFFFFFFF:
        raise ValueError(f"stream id {stream} out of range")
    return HEADER.pack(MAGIC, int(ftype), 0, stream, len(payload)) + payload


def sync_header() -> bytes:
    """The exact header bytes of a SYNC frame (what a hunting guest looks for)."""
    return HEADER.pack(MAGIC, int(FrameType.SYNC), 0, 0, NONCE_SIZE)


def sync_ack(nonce: bytes) -> bytes:
    """The exact bytes of the SYNC_ACK answering ``nonce``."""
    return encode(FrameType.SYNC_ACK, 0, nonce)


def reset() -> bytes:
    """The exact bytes of the RESET frame a starting agent writes."""
    return encode(FrameType.RESET, 0)


class FrameDecoder:
    """Incremental frame decoder with a bounded buffer.

    ``feed`` returns every complete frame in the data so far. The buffer never
    holds more than one partial frame (at most HEADER_SIZE + max_payload
    bytes) besides the chunk being processed.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Decode ``data``; raise ProtocolError on a malformed header."""
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= HEADER_SIZE:
                magic, ftype, flags, stream, length = HEADER.unpack_from(buf, pos)
                if magic != MAGIC:
                    raise ProtocolError(f"bad frame magic {magic!r}")
                if flags != 0:
                    raise ProtocolError(f"bad frame flags {flags}")
                try:
                    kind = FrameType(ftype)
                except ValueError:
                    raise ProtocolError(f"unknown frame type {ftype}") from None
                if length > self._max:
                    raise ProtocolError(f"frame of {length} bytes exceeds {self._max}")
                if kind in (FrameType.SYNC, FrameType.SYNC_ACK) and (
                    stream != 0 or length != NONCE_SIZE
                ):
                    raise ProtocolError("malformed SYNC frame")
                if kind is FrameType.RESET and (stream != 0 or length != 0):
                    raise ProtocolError("malformed RESET frame")
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    break
                frames.append(Frame(kind, stream, bytes(buf[pos + HEADER_SIZE : end])))
                pos = end
        except ProtocolError:
            self._buf = bytearray()
            raise
        del buf[:pos]
        return frames


class PatternScanner:
    """Finds ``pattern`` in a byte stream, discarding everything before it.

    Keeps at most ``len(pattern) - 1`` bytes between calls, so memory is
    bounded whatever the peer sends.
    """

    def __init__(self, pattern: bytes) -> None:
        if not pattern:
            raise ValueError("empty pattern")
        self._pattern = pattern
        self._tail = b""

    def feed(self, data: bytes) -> bytes | None:
        """Return the bytes after the pattern once found, else None."""
        buf = self._tail + data
        idx = buf.find(self._pattern)
        if idx >= 0:
            self._tail = b""
            return buf[idx + len(self._pattern) :]
        keep = len(self._pattern) - 1
        self._tail = buf[-keep:] if keep else b""
        return None
