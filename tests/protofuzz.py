"""Hypothesis strategies for hostile but well-formed protobuf messages of any type.

Built from the message descriptor: every field gets values from the whole
range of its type (unknown enum numbers, negative and huge integers, NaN and
infinities, empty/long/any-unicode strings, arbitrary bytes), repeated fields
and maps get from none to many entries (some huge), nested messages go a few
levels deep, and unknown fields are appended. What comes out always decodes:
it reaches the handler, whose answer is what the tests judge.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# Strings long enough to matter, short enough that many examples fit in a message.
LONG = 64 * 1024


def _int(lo_hi: tuple[int, int]) -> st.SearchStrategy[int]:
    lo, hi = lo_hi
    return st.one_of(st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2]), st.integers(lo, hi))


def _text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", "..", "../../etc/passwd", "/", "a/../../b", "\x00", "-rf", "*"]),
        st.integers(1, LONG).map(lambda n: "x" * n),
    )


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return _int(INT32)
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return _int(INT64)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _int(UINT32)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _int(UINT64)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == 1 else 32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _text()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.integers(1, LONG).map(lambda n: b"\0" * n))
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _int(INT32))
    raise AssertionError(f"no strategy for field type {t} ({field.full_name})")


def _is_map(field: Any) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
    )


def _count() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 4), st.sampled_from([1000, 20000]))


@st.composite
def messages(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> Message:
    """One message of type ``desc`` with hostile values in a random subset of its fields."""
    msg = GetMessageClass(desc)()
    field: Any
    for field in desc.fields:
        if not draw(st.booleans()):
            continue
        if _is_map(field):
            _fill_map(draw, msg, field, depth)
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if repeated:
                for _ in range(min(draw(_count()), 50)):
                    getattr(msg, field.name).add().CopyFrom(
                        draw(messages(field.message_type, depth + 1))
                    )
            else:
                getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
            continue
        if not repeated:
            setattr(msg, field.name, draw(_scalar(field)))
            continue
        n = draw(_count())
        if n <= 4:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), min_size=n, max_size=n)))
        else:  # many entries: one small value, repeated
            getattr(msg, field.name).extend([_small(field)] * n)
    return msg


def _small(field: Any) -> Any:
    """A short value of ``field``'s type (for fields with thousands of entries)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        return "x"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"x"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.0
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return 1


def _fill_map(draw: st.DrawFn, msg: Message, field: FieldDescriptor, depth: int) -> None:
    entry: Any = field.message_type
    key_f = entry.fields_by_name["key"]
    value_f = entry.fields_by_name["value"]
    target = getattr(msg, field.name)
    n = draw(_count())
    if value_f.type == FieldDescriptor.TYPE_MESSAGE:
        if depth < 3:
            for _ in range(min(n, 4)):
                key = draw(_scalar(key_f))
                target[key].CopyFrom(draw(messages(value_f.message_type, depth + 1)))
        return
    if n <= 4:
        for _ in range(n):
            target[draw(_scalar(key_f))] = draw(_scalar(value_f))
        return
    for i in range(n):  # many entries: distinct small keys, one small value
        key = f"k{i}" if key_f.type == FieldDescriptor.TYPE_STRING else i
        target[key] = _small(value_f)


def varint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn, desc: Descriptor) -> bytes:
    """A serialized hostile message, sometimes with unknown fields appended."""
    raw = draw(messages(desc)).SerializeToString()
    if draw(st.booleans()):
        number = draw(st.integers(1000, 536_870_911))
        payload = draw(st.binary(max_size=32))
        raw += varint(number << 3 | 2) + varint(len(payload)) + payload
    return raw
