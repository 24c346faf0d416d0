"""Checks of well-known protobuf field types that the decoder lets through.

A Timestamp with nanos outside [0, 1e9) or seconds outside years 1-9999
decodes fine, and then raises ValueError wherever it is converted: the
service would answer INTERNAL. These answer INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from agentvm.common.errors import InvalidArgument

# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z (google/protobuf/timestamp.proto).
TIMESTAMP_MIN_S = -62_135_596_800
TIMESTAMP_MAX_S = 253_402_300_799


def timestamp_seconds(request: Message, field: str) -> float | None:
    """The Timestamp ``field`` of ``request`` in seconds since the epoch; None when unset."""
    if not request.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(request, field)
    if not 0 <= ts.nanos < 1_000_000_000 or not TIMESTAMP_MIN_S <= ts.seconds <= TIMESTAMP_MAX_S:
        raise InvalidArgument(
            f"{field} is not a valid Timestamp (seconds {ts.seconds}, nanos {ts.nanos}): "
            "seconds must be within years 1-9999 and nanos within 0-999999999"
        )
    return float(ts.seconds) + ts.nanos / 1e9
