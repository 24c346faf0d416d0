"""Framing of the virtio-serial session protocol (agentvm_guest.mux)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm_guest import mux
from agentvm_guest.mux import HEADER, HEADER_SIZE, MAGIC, MAX_PAYLOAD, NONCE_SIZE, FrameType

from .helpers import split, sync

NONCES = st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
CUTS = st.lists(st.integers(min_value=0, max_value=1 << 17), max_size=24)


@st.composite
def frames(draw: st.DrawFn, max_payload: int = 600) -> mux.Frame:
    ftype = draw(st.sampled_from(list(FrameType)))
    if ftype in (FrameType.SYNC, FrameType.SYNC_ACK):
        return mux.Frame(ftype, 0, draw(NONCES))
    if ftype is FrameType.RESET:
        return mux.Frame(ftype, 0)
    stream = draw(st.integers(min_value=0, max_value=0xFFFFFFFF))
    return mux.Frame(ftype, stream, draw(st.binary(max_size=max_payload)))


def encoded(f: mux.Frame) -> bytes:
    return mux.encode(f.type, f.stream, f.payload)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Plausible (often valid) frame headers with any length field, maybe truncated."""
    head = HEADER.pack(
        draw(st.sampled_from([MAGIC, b"\x00\x00", b"\xa7\x00"])),
        draw(st.integers(min_value=0, max_value=7)),
        draw(st.sampled_from([0, 0, 0, 1, 255])),
        draw(st.sampled_from([0, 1, 3, 0xFFFFFFFF])),
        draw(
            st.one_of(
                st.integers(min_value=0, max_value=64),
                st.integers(min_value=MAX_PAYLOAD - 2, max_value=MAX_PAYLOAD + 2),
                st.integers(min_value=0, max_value=0xFFFFFFFF),
            )
        ),
    )
    return head[: draw(st.integers(min_value=1, max_value=HEADER_SIZE))]


# Anything a confused or hostile peer could send: valid frames, headers, noise.
PIECES = st.lists(st.one_of(frames().map(encoded), headers(), st.binary(max_size=80)), max_size=10)


# -- encode -------------------------------------------------------------------------------
def test_encode_layout() -> None:
    data = mux.encode(FrameType.DATA, 0x01020304, b"xyz")
    assert data == b"\xa7\x56\x04\x00\x01\x02\x03\x04\x00\x00\x00\x03xyz"
    assert HEADER_SIZE == 12


@pytest.mark.parametrize(
    ("stream", "payload"),
    [(0, bytes(MAX_PAYLOAD + 1)), (-1, b""), (0x1_0000_0000, b"")],
)
def test_encode_rejects_bad_frames(stream: int, payload: bytes) -> None:
    with pytest.raises(ValueError):
        mux.encode(FrameType.DATA, stream, payload)


def test_sync_helpers_match_encode() -> None:
    nonce = bytes(range(NONCE_SIZE))
    assert sync(nonce)[:HEADER_SIZE] == mux.sync_header()
    assert mux.sync_ack(nonce) == mux.encode(FrameType.SYNC_ACK, 0, nonce)
    assert mux.FrameDecoder().feed(mux.sync_ack(nonce)) == [mux.Frame(FrameType.SYNC_ACK, 0, nonce)]


def test_reset_helper_matches_encode() -> None:
    assert mux.reset() == mux.encode(FrameType.RESET, 0)
    assert mux.FrameDecoder().feed(mux.reset()) == [mux.Frame(FrameType.RESET, 0)]


def test_pad_is_longer_than_any_frame_and_not_a_header() -> None:
    assert len(mux.PAD) > HEADER_SIZE + MAX_PAYLOAD
    assert set(mux.PAD) == {0}
    with pytest.raises(mux.ProtocolError):
        mux.FrameDecoder().feed(mux.PAD)


# -- decode -------------------------------------------------------------------------------
@given(frame_list=st.lists(frames(), max_size=12), cuts=CUTS)
def test_round_trip_any_split(frame_list: list[mux.Frame], cuts: list[int]) -> None:
    data = b"".join(encoded(f) for f in frame_list)
    decoder = mux.FrameDecoder()
    out: list[mux.Frame] = []
    for chunk in split(data, cuts):
        out += decoder.feed(chunk)
    assert out == frame_list
    assert decoder.buffered == 0


@given(cuts=st.lists(st.integers(min_value=0, max_value=HEADER_SIZE + MAX_PAYLOAD), max_size=5))
def test_round_trip_max_payload(cuts: list[int]) -> None:
    payload = bytes(i % 251 for i in range(MAX_PAYLOAD))
    decoder = mux.FrameDecoder()
    out: list[mux.Frame] = []
    for chunk in split(mux.encode(FrameType.DATA, 7, payload), cuts):
        out += decoder.feed(chunk)
        assert decoder.buffered < HEADER_SIZE + MAX_PAYLOAD
    assert out == [mux.Frame(FrameType.DATA, 7, payload)]


@given(
    pieces=PIECES,
    cuts=CUTS,
    max_payload=st.sampled_from([NONCE_SIZE, 100, MAX_PAYLOAD]),
)
def test_decoder_is_total_and_bounded(
    pieces: list[bytes], cuts: list[int], max_payload: int
) -> None:
    """Any bytes, any chunking: frames or ProtocolError, and a bounded buffer."""
    decoder = mux.FrameDecoder(max_payload=max_payload)
    for chunk in split(b"".join(pieces), cuts):
        try:
            out = decoder.feed(chunk)
        except mux.ProtocolError:
            assert decoder.buffered == 0
            continue
        # A complete frame is always consumed, so strictly less than one frame stays.
        assert decoder.buffered < HEADER_SIZE + max_payload
        for f in out:
            assert isinstance(f.type, FrameType)
            assert 0 <= f.stream <= 0xFFFFFFFF
            assert len(f.payload) <= max_payload
            if f.type in (FrameType.SYNC, FrameType.SYNC_ACK):
                assert f.stream == 0
                assert len(f.payload) == NONCE_SIZE
            if f.type is FrameType.RESET:
                assert (f.stream, f.payload) == (0, b"")


@given(pieces=PIECES, cuts=CUTS)
def test_chunking_does_not_change_a_valid_decode(pieces: list[bytes], cuts: list[int]) -> None:
    """Where the whole input decodes without error, every chunking decodes the same."""
    data = b"".join(pieces)
    try:
        whole = mux.FrameDecoder().feed(data)
    except mux.ProtocolError:
        return
    decoder = mux.FrameDecoder()
    out: list[mux.Frame] = []
    for chunk in split(data, cuts):
        out += decoder.feed(chunk)
    assert out == whole


@pytest.mark.parametrize(
    "header",
    [
        HEADER.pack(b"\xa7\x57", FrameType.DATA, 0, 1, 0),  # bad magic
        HEADER.pack(MAGIC, FrameType.DATA, 1, 1, 0),  # reserved flags
        HEADER.pack(MAGIC, 0, 0, 1, 0),  # unknown type
        HEADER.pack(MAGIC, 7, 0, 1, 0),  # unknown type
        HEADER.pack(MAGIC, FrameType.RESET, 0, 1, 0),  # RESET on a stream
        HEADER.pack(MAGIC, FrameType.RESET, 0, 0, 1),  # RESET with a payload
        HEADER.pack(MAGIC, FrameType.DATA, 0, 1, MAX_PAYLOAD + 1),  # too long
        HEADER.pack(MAGIC, FrameType.SYNC, 0, 1, NONCE_SIZE),  # SYNC on a stream
        HEADER.pack(MAGIC, FrameType.SYNC, 0, 0, NONCE_SIZE - 1),  # short nonce
        HEADER.pack(MAGIC, FrameType.SYNC_ACK, 0, 0, NONCE_SIZE + 1),  # long nonce
    ],
    ids=[
        "magic",
        "flags",
        "type0",
        "type7",
        "reset-stream",
        "reset-payload",
        "length",
        "sync-stream",
        "sync-short",
        "ack-long",
    ],
)
def test_malformed_headers_raise_and_reset(header: bytes) -> None:
    decoder = mux.FrameDecoder()
    good = mux.encode(FrameType.DATA, 5, b"ok")
    with pytest.raises(mux.ProtocolError):
        decoder.feed(good + header)
    assert decoder.buffered == 0
    # The decoder is usable again afterwards.
    assert decoder.feed(good) == [mux.Frame(FrameType.DATA, 5, b"ok")]


def test_header_is_checked_before_the_payload_arrives() -> None:
    """An oversized length fails at once instead of buffering up to it."""
    decoder = mux.FrameDecoder(max_payload=10)
    with pytest.raises(mux.ProtocolError, match="exceeds"):
        decoder.feed(HEADER.pack(MAGIC, FrameType.DATA, 0, 1, 11))
    head = HEADER.pack(MAGIC, FrameType.DATA, 0, 1, 10)
    assert decoder.feed(head + b"12345") == []
    assert decoder.buffered == HEADER_SIZE + 5
    assert decoder.feed(b"67890") == [mux.Frame(FrameType.DATA, 1, b"1234567890")]
    assert decoder.buffered == 0


# -- pattern scanner ----------------------------------------------------------------------
@given(
    pattern=st.binary(min_size=1, max_size=28),
    before=st.binary(max_size=120),
    after=st.binary(max_size=60),
    present=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=210), max_size=30),
)
def test_scanner_finds_pattern_across_chunks(
    pattern: bytes, before: bytes, after: bytes, present: bool, cuts: list[int]
) -> None:
    stream = before + (pattern if present else b"") + after
    chunks = split(stream, cuts)
    scanner = mux.PatternScanner(pattern)
    result = None
    for i, chunk in enumerate(chunks):
        rest = scanner.feed(chunk)
        if rest is None:
            # Bounded memory: never more than a pattern's worth of bytes is kept.
            assert len(scanner._tail) <= len(pattern) - 1
            continue
        result = rest + b"".join(chunks[i + 1 :])
        break
    idx = stream.find(pattern)
    if idx < 0:
        assert result is None
    else:
        assert result == stream[idx + len(pattern) :]


def test_scanner_pattern_split_byte_by_byte() -> None:
    pattern = mux.sync_header()
    scanner = mux.PatternScanner(pattern)
    for b in b"junk" + pattern[:-1]:
        assert scanner.feed(bytes([b])) is None
    assert scanner.feed(pattern[-1:] + b"tail") == b"tail"


def test_scanner_self_overlapping_pattern() -> None:
    scanner = mux.PatternScanner(b"aab")
    assert scanner.feed(b"aaa") is None
    assert scanner.feed(b"ab!") == b"!"


def test_scanner_memory_stays_bounded() -> None:
    pattern = mux.sync_ack(bytes(NONCE_SIZE))
    scanner = mux.PatternScanner(pattern)
    for _ in range(50):
        assert scanner.feed(b"\xa7\x56" + bytes(4000)) is None
        assert len(scanner._tail) == len(pattern) - 1


def test_scanner_rejects_empty_pattern() -> None:
    with pytest.raises(ValueError):
        mux.PatternScanner(b"")


# -- recovery after stale bytes ------------------------------------------------------------
class HuntingReader:
    """The guest's reader: a decoder while in a session, a SYNC scanner while hunting.

    Same approach as GuestRelay.feed: a framing error switches to hunting over the
    chunk at hand; a SYNC found starts a fresh decoder at that SYNC.
    """

    def __init__(self, *, in_session: bool) -> None:
        self.decoder = mux.FrameDecoder()
        self.scanner: mux.PatternScanner | None = (
            None if in_session else mux.PatternScanner(mux.sync_header())
        )
        self.errors = 0
        self.frames: list[mux.Frame] = []

    def feed(self, data: bytes) -> None:
        from_hunt = False
        while data:
            if self.scanner is not None:
                rest = self.scanner.feed(data)
                if rest is None:
                    return
                self.scanner = None
                self.decoder = mux.FrameDecoder()
                data = mux.sync_header() + rest
                from_hunt = True
            try:
                out = self.decoder.feed(data)
            except mux.ProtocolError:
                self.errors += 1
                self.scanner = mux.PatternScanner(mux.sync_header())
                if from_hunt:
                    data = data[1:]  # this SYNC was followed by garbage: look past it
                from_hunt = False
                continue
            if any(f.type is FrameType.SYNC for f in out):
                # A new session: only frames from its SYNC on count.
                last = max(i for i, f in enumerate(out) if f.type is FrameType.SYNC)
                self.frames = out[last:]
            else:
                self.frames += out
            return


@given(
    garbage=PIECES,
    in_session=st.booleans(),
    nonce=NONCES,
    after=st.lists(frames().filter(lambda f: f.type is not FrameType.SYNC), max_size=4),
    cuts=st.lists(
        st.integers(min_value=0, max_value=HEADER_SIZE + MAX_PAYLOAD + 2000), max_size=12
    ),
)
def test_stale_garbage_then_pad_and_sync_starts_a_clean_session(
    garbage: list[bytes],
    in_session: bool,
    nonce: bytes,
    after: list[mux.Frame],
    cuts: list[int],
) -> None:
    reader = HuntingReader(in_session=in_session)
    data = b"".join(garbage) + mux.PAD + sync(nonce) + b"".join(encoded(f) for f in after)
    for chunk in split(data, cuts):
        reader.feed(chunk)
        assert reader.decoder.buffered < HEADER_SIZE + MAX_PAYLOAD
    if in_session:
        # Whatever partial frame the garbage left, the PAD completes it and then fails.
        assert reader.errors >= 1
    assert reader.scanner is None
    assert reader.frames == [mux.Frame(FrameType.SYNC, 0, nonce), *after]
