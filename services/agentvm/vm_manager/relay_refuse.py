"""Answer a gRPC caller at the relay with a status of its own, without the guest.

When the host relay will not carry a connection to the guest agent (the
agent failed its session handshake and is in backoff, too many connections
wait for it, or the VM has too many open), it speaks just enough HTTP/2 to
answer every call the client starts on that connection with a trailers-only
response: ``grpc-status`` UNAVAILABLE and a ``grpc-message`` that says what is
wrong and what to do, then GOAWAY and close. A gRPC caller sees that status
at once, also with ``wait_for_ready``, instead of a bare "Socket closed" (or
waiting for its deadline).

Only host clients reach this code (the relay's socket is mode 0600); still,
everything read is bounded: a frame header at a time, payloads skipped
without being kept, and the caller bounds the time.
"""

from __future__ import annotations

import asyncio
import contextlib

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE = 9
# Frame types and flags (RFC 9113).
DATA, HEADERS, SETTINGS, GOAWAY = 0x0, 0x1, 0x4, 0x7
FLAG_ACK = 0x1
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4
STATUS_UNAVAILABLE = 14
# GOAWAY debug data: gRPC may log it; keep it short.
_GOAWAY_DEBUG_MAX = 256


class NotHTTP2(ValueError):
    """The client did not start an HTTP/2 connection."""


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes((ftype, flags))
        + (stream & 0x7FFFFFFF).to_bytes(4, "big")
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer (RFC 7541 5.1) with ``first``'s high bits kept."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def grpc_message(message: str) -> bytes:
    """``message`` percent-encoded as gRPC's ``grpc-message`` header wants."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(stream: int, code: int, message: str) -> bytes:
    """A complete gRPC response to ``stream``: status ``code``, no messages."""
    block = (
        b"\x88"  # :status 200 (static table entry 8)
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"grpc-status", str(code).encode())
        + _literal(b"grpc-message", grpc_message(message))
    )
    return frame(HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, stream, block)


def goaway(last_stream: int, debug: str) -> bytes:
    data = debug.encode("utf-8", "replace")[:_GOAWAY_DEBUG_MAX]
    return frame(GOAWAY, 0, 0, (last_stream & 0x7FFFFFFF).to_bytes(4, "big") + bytes(4) + data)


class FrameScanner:
    """Frame headers of a client's byte stream: (type, flags, stream) of each.

    Holds at most the preface or one frame header between calls; payloads
    are skipped as they pass.
    """

    def __init__(self) -> None:
        self._buf = b""
        self.preface = False  # the whole client preface has arrived
        self._skip = 0

    def feed(self, data: bytes) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        buf = self._buf + data
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise NotHTTP2("the client did not send the HTTP/2 preface")
                self._buf = buf
                return out
            if not buf.startswith(PREFACE):
                raise NotHTTP2("the client did not send the HTTP/2 preface")
            self.preface = True
            buf = buf[len(PREFACE) :]
        pos = 0
        while True:
            if self._skip:
                step = min(self._skip, len(buf) - pos)
                self._skip -= step
                pos += step
                if self._skip:
                    break
            if len(buf) - pos < FRAME_HEADER_SIZE:
                break
            length = int.from_bytes(buf[pos : pos + 3], "big")
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            out.append((ftype, flags, stream))
            pos += FRAME_HEADER_SIZE
            self._skip = length
        self._buf = buf[pos:]
        return out


async def answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    message: str,
    *,
    prefix: bytes = b"",
    wait: float = 2.0,
    code: int = STATUS_UNAVAILABLE,
) -> int:
    """Answer every call the client starts within ``wait`` seconds; return how many.

    ``prefix``: bytes of this connection already read by the relay. Nothing is
    written to a client that has not sent the HTTP/2 preface (an HTTP/2 client
    sends it at once, unprompted). After the first answers come GOAWAY (start
    nothing more here) and the end of our side of the stream; then the
    client's bytes are read and dropped until it hangs up too (closing with
    unread bytes would reset the connection under the answer) or ``wait``
    ends. Does not close ``writer``.
    """
    scanner = FrameScanner()
    answered = 0
    last = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    data = prefix
    with contextlib.suppress(TimeoutError, NotHTTP2, OSError, ConnectionError):
        while True:
            gone_away = answered > 0
            started = scanner.preface
            events = scanner.feed(data)
            if scanner.preface and not started:
                writer.write(frame(SETTINGS, 0, 0))
            for ftype, flags, stream in events:
                if ftype == SETTINGS and not flags & FLAG_ACK:
                    writer.write(frame(SETTINGS, FLAG_ACK, 0))
                elif ftype == HEADERS and not gone_away and stream > last and stream % 2:
                    writer.write(trailers_only(stream, code, message))
                    answered += 1
                    last = stream
            if answered and not gone_away:
                # GOAWAY, then end of our side: the client closes its end too.
                writer.write(goaway(last, message))
                if writer.can_write_eof():
                    writer.write_eof()
            async with asyncio.timeout_at(deadline):
                await writer.drain()
                data = await reader.read(16384)
            if not data:
                break
    return answered
