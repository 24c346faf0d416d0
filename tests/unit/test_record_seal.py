"""The executor's sealed sandbox records (executor/record_seal.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm.common.errors import FailedPrecondition
from agentvm.executor.record_seal import KEY_BYTES, RecordKey, RecordUnreadable

KEY = RecordKey(bytes(range(KEY_BYTES)))


@given(st.binary(max_size=4096))
def test_a_sealed_record_opens_for_its_vm_only(record: bytes) -> None:
    sealed = KEY.seal("agent-vm-a", record)
    assert record == KEY.open("agent-vm-a", sealed)
    if len(record) >= 8:
        assert record not in sealed
    with pytest.raises(RecordUnreadable, match="another VM"):
        KEY.open("agent-vm-b", sealed)


def test_two_seals_of_one_record_differ() -> None:
    assert KEY.seal("agent-vm-a", b"same") != KEY.seal("agent-vm-a", b"same")


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=199))
def test_any_changed_byte_or_foreign_blob_does_not_open(blob: bytes, at: int) -> None:
    sealed = bytearray(KEY.seal("agent-vm-a", b"secret=1"))
    sealed[at % len(sealed)] ^= 0x01
    with pytest.raises(RecordUnreadable):
        KEY.open("agent-vm-a", bytes(sealed))
    with pytest.raises(RecordUnreadable):
        KEY.open("agent-vm-a", blob)


def test_another_key_does_not_open_it() -> None:
    other = RecordKey(bytes(KEY_BYTES))
    with pytest.raises(RecordUnreadable, match="another record key"):
        other.open("agent-vm-a", KEY.seal("agent-vm-a", b"x"))


def test_the_key_file_is_made_once_private_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "executor" / "record.key"
    keys: list[RecordKey] = []
    threads = [
        threading.Thread(target=lambda: keys.append(RecordKey.load_or_create(path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 4  # none of them read a key half written (a thread raised)
    assert [p.name for p in path.parent.iterdir()] == ["record.key"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 2 * KEY_BYTES
    sealed = keys[0].seal("agent-vm-a", b"shared")
    assert all(k.open("agent-vm-a", sealed) == b"shared" for k in keys)
    # Read again, not replaced.
    assert RecordKey.load_or_create(path).open("agent-vm-a", sealed) == b"shared"


def test_a_readable_or_malformed_key_file_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "record.key"
    path.write_text("00" * KEY_BYTES)
    path.chmod(0o644)
    with pytest.raises(FailedPrecondition, match=f"open to every user .*chmod 600 {path}"):
        RecordKey.load_or_create(path)
    path.chmod(0o440)  # a Kubernetes Secret for the pod's fsGroup
    assert (
        RecordKey.load_or_create(path).open("v", RecordKey(bytes(KEY_BYTES)).seal("v", b"k"))
        == b"k"
    )
    path.write_text("not hex")
    with pytest.raises(FailedPrecondition, match="64 hex digits"):
        RecordKey.load_or_create(path)
    path.write_text("00" * 8)
    with pytest.raises(FailedPrecondition, match="64 hex digits"):
        RecordKey.load_or_create(path)
