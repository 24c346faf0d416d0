"""The audit log (agentvm.monitor.audit): hash chain, rotation, recovery, syslog, verify, CLI."""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from agentvm.cli.main import cli
from agentvm.monitor import audit
from agentvm.monitor.audit import AuditLog, verify


def event(i: int, **attributes: Any) -> dict[str, Any]:
    return {
        "event_id": f"executor/6f1c/{i}",
        "time": audit.format_time(1_764_099_601.5 + i),
        "service": "executor",
        "type": "execution.finished",
        "vm": f"agentvm-{i % 7}",
        "sandbox": f"sb-{i % 3}",
        "trace_id": f"{i:032x}",
        "severity": "info",
        "attributes": attributes or {"exec_id": f"x{i}", "exit_code": i % 5, "cpu_s": i / 7},
    }


def write_log(directory: Path, count: int, batch: int = 50, **kwargs: Any) -> AuditLog:
    """A log of ``count`` records appended in batches; closed, returned for its head."""
    log = AuditLog(directory, **kwargs)
    log.open()
    for start in range(0, count, batch):
        assert log.append([event(i) for i in range(start, min(count, start + batch))]) == min(
            batch, count - start
        )
    log.close()
    return log


def files_of(directory: Path) -> list[Path]:
    return audit.log_files(directory)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def rewrite(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("".join(edit(lines_of(path))), encoding="utf-8")


def problems_text(directory: Path, head: bool = False) -> str:
    result = verify(files_of(directory), directory / audit.HEAD_NAME if head else None)
    assert not result.ok
    return "\n".join(result.problems)


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


# -- the chain -----------------------------------------------------------------------------
def test_chain_of_hundreds_of_records_verifies(logdir: Path) -> None:
    log = write_log(logdir, 300)
    assert (logdir.stat().st_mode & 0o777) == 0o750
    lines = lines_of(logdir / audit.LOG_NAME)
    assert len(lines) == 300
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["seq"] == 0
    assert first["prev"] == audit.ZERO_HASH
    assert last["seq"] == 299
    assert log.head == (299, last["hash"])
    for line in lines[:3]:
        record = json.loads(line)
        assert line == audit.canonical_json(record) + "\n"
        body = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == audit.record_hash(body)
    assert json.loads((logdir / audit.HEAD_NAME).read_text()) == {
        "seq": 299,
        "hash": last["hash"],
        "file": "audit.log",
    }
    result = verify(files_of(logdir), logdir / audit.HEAD_NAME)
    assert result.ok, result.problems
    assert (result.records, result.files, result.first_seq, result.last_seq) == (300, 1, 0, 299)
    assert result.last_hash == last["hash"]
    assert result.summary() == f"OK: 300 records in 1 file, seq 0..299, head {last['hash']}"


def test_empty_log_and_fresh_open(logdir: Path) -> None:
    log = AuditLog(logdir)
    assert log.open() == {"previous_file": "", "recovered": ""}
    assert log.head == (-1, audit.ZERO_HASH)
    assert log.append([]) == 0
    log.close()
    result = verify([logdir / audit.LOG_NAME])
    assert result.ok
    assert (result.records, result.first_seq, result.last_seq) == (0, None, None)
    assert result.summary() == "OK: 0 records in 1 file"


def test_edited_field_is_detected(logdir: Path) -> None:
    write_log(logdir, 40)
    path = logdir / audit.LOG_NAME

    def edit(lines: list[str]) -> list[str]:
        record = json.loads(lines[5])
        record["attributes"]["exit_code"] = 0 if record["attributes"]["exit_code"] else 1
        lines[5] = audit.canonical_json(record) + "\n"
        return lines

    rewrite(path, edit)
    text = problems_text(logdir)
    assert f"{path}:6: seq 5: the hash does not match" in text


def test_deleted_line_is_detected(logdir: Path) -> None:
    write_log(logdir, 40)
    path = logdir / audit.LOG_NAME
    rewrite(path, lambda lines: lines[:20] + lines[21:])
    assert f"{path}:21: seq 21: record 20 is missing (lines deleted?)" in problems_text(logdir)


def test_swapped_lines_are_detected(logdir: Path) -> None:
    write_log(logdir, 40)
    path = logdir / audit.LOG_NAME
    rewrite(path, lambda lines: [*lines[:10], lines[11], lines[10], *lines[12:]])
    text = problems_text(logdir)
    assert f"{path}:11: seq 11" in text
    assert "out of order" in text


def test_edit_with_recomputed_hash_breaks_the_chain(logdir: Path) -> None:
    write_log(logdir, 40)
    path = logdir / audit.LOG_NAME

    def forge(lines: list[str]) -> list[str]:
        record = json.loads(lines[7])
        record["vm"] = "someone-else"
        del record["hash"]
        record["hash"] = audit.record_hash(record)
        lines[7] = audit.canonical_json(record) + "\n"
        return lines

    rewrite(path, forge)
    result = verify(files_of(logdir))
    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{path}:9: seq 8: prev is not the hash of seq 7")


def test_non_canonical_line_is_detected(logdir: Path) -> None:
    write_log(logdir, 5)
    path = logdir / audit.LOG_NAME
    rewrite(path, lambda lines: [*lines[:2], json.dumps(json.loads(lines[2])) + "\n", *lines[3:]])
    assert f"{path}:3: not canonical JSON" in problems_text(logdir)


def test_problems_stop_at_fifty(logdir: Path) -> None:
    write_log(logdir, 120)
    rewrite(logdir / audit.LOG_NAME, lambda lines: ["garbage\n" for _ in lines])
    result = verify(files_of(logdir))
    assert len(result.problems) == audit.MAX_PROBLEMS
    assert result.truncated
    assert result.summary() == "TAMPERED: 50 problems (stopped after 50)"


# -- rotation ------------------------------------------------------------------------------
def test_rotation_by_size_verifies_in_any_order(logdir: Path) -> None:
    write_log(logdir, 200, batch=17, max_bytes=8192)
    files = files_of(logdir)
    assert len(files) >= 4
    for path in files:
        if path.name != audit.LOG_NAME:
            first = json.loads(lines_of(path)[0])["seq"]
            assert path.name == f"audit-{first:012d}.log"
            assert path.stat().st_size < 8192 + 1024
    random.Random(7).shuffle(files)
    result = verify(files, logdir / audit.HEAD_NAME)
    assert result.ok, result.problems
    assert (result.records, result.files, result.first_seq, result.last_seq) == (
        200,
        len(files),
        0,
        199,
    )


def test_missing_rotated_file_is_a_gap(logdir: Path) -> None:
    write_log(logdir, 200, max_bytes=8192)
    rotated = sorted(logdir.glob("audit-*.log"))
    assert len(rotated) >= 3
    gone = rotated[1]
    first = json.loads(lines_of(gone)[0])["seq"]
    last = json.loads(lines_of(gone)[-1])["seq"]
    gone.unlink()
    text = problems_text(logdir, head=True)
    assert f"records {first}..{last} are missing (a rotated file removed?)" in text
    assert f"{rotated[2]}:1: seq {last + 1}" in text


def test_rotation_by_age_with_a_fake_clock(logdir: Path) -> None:
    now = [1_000_000.0]
    log = AuditLog(logdir, max_age_s=60, clock=lambda: now[0])
    log.open()
    assert log.append([event(i) for i in range(3)]) == 3
    now[0] += 59
    log.append([event(3)])
    assert not (logdir / "audit-000000000000.log").exists()
    now[0] += 1
    log.append([event(4), event(5)])
    now[0] += 30
    log.append([event(6)])
    now[0] += 30
    log.append([event(7)])
    log.close()
    assert [json.loads(x)["seq"] for x in lines_of(logdir / "audit-000000000000.log")] == [
        0,
        1,
        2,
        3,
    ]
    assert [json.loads(x)["seq"] for x in lines_of(logdir / "audit-000000000004.log")] == [4, 5, 6]
    assert [json.loads(x)["seq"] for x in lines_of(logdir / audit.LOG_NAME)] == [7]
    assert verify(files_of(logdir), logdir / audit.HEAD_NAME).ok


# -- head, restart, recovery ---------------------------------------------------------------
def test_truncated_tail_is_detected_with_the_head(logdir: Path) -> None:
    write_log(logdir, 30)
    rewrite(logdir / audit.LOG_NAME, lambda lines: lines[:-3])
    assert verify(files_of(logdir)).ok  # without the head the cut does not show
    result = verify(files_of(logdir), logdir / audit.HEAD_NAME)
    assert result.problems == [
        "the log ends at seq 26 but audit.head says 29: records were removed from the end"
    ]


def test_rewritten_head_record_is_detected(logdir: Path) -> None:
    write_log(logdir, 10)
    head = logdir / audit.HEAD_NAME
    head.write_text(json.dumps({"seq": 9, "hash": "ab" * 32, "file": "audit.log"}))
    assert "the log was rewritten" in problems_text(logdir, head=True)


def test_records_after_the_head_are_a_note(logdir: Path) -> None:
    write_log(logdir, 10)
    head = logdir / audit.HEAD_NAME
    saved = head.read_bytes()
    log = AuditLog(logdir)
    log.open()
    log.append([event(10)])
    log.close()
    head.write_bytes(saved)
    result = verify(files_of(logdir), head)
    assert result.ok, result.problems
    assert any("after audit.head" in n for n in result.notes)


def test_restart_continues_the_chain(logdir: Path) -> None:
    first = write_log(logdir, 25)
    log = AuditLog(logdir)
    assert log.open() == {"previous_file": "audit.log", "recovered": ""}
    assert log.head == first.head
    log.append([event(100, previous_file="audit.log", recovered="")])
    log.close()
    record = json.loads(lines_of(logdir / audit.LOG_NAME)[-1])
    assert record["seq"] == 25
    assert record["prev"] == first.head[1]
    assert verify(files_of(logdir), logdir / audit.HEAD_NAME).ok


def test_restart_after_rotation_continues_from_the_rotated_file(logdir: Path) -> None:
    write_log(logdir, 20)
    (logdir / audit.LOG_NAME).rename(logdir / "audit-000000000000.log")  # crash mid-rotation
    log = AuditLog(logdir)
    assert log.open()["previous_file"] == "audit-000000000000.log"
    assert log.head[0] == 19
    log.append([event(20)])
    log.close()
    assert verify(files_of(logdir), logdir / audit.HEAD_NAME).ok


def test_torn_last_line_is_moved_aside(logdir: Path) -> None:
    write_log(logdir, 12)
    path = logdir / audit.LOG_NAME
    intact = path.read_bytes()
    half = audit.canonical_json(audit.build_record(event(12), seq=12, prev="0" * 64))[:77]
    path.write_bytes(intact + half.encode())
    assert not verify([path]).ok

    now = 1_764_099_601.0
    log = AuditLog(logdir, clock=lambda: now)
    info = log.open()
    torn = logdir / "audit.log.torn-20251125T194001Z"
    assert torn.read_bytes() == half.encode()
    assert path.read_bytes() == intact
    assert info["previous_file"] == "audit.log"
    assert "77 bytes" in info["recovered"]
    assert torn.name in info["recovered"]
    assert log.head[0] == 11
    log.append([event(12, **info)])
    log.close()
    result = verify(files_of(logdir), logdir / audit.HEAD_NAME)
    assert result.ok, result.problems
    assert result.last_seq == 12


def test_bad_last_line_and_head_beyond_the_log_keep_the_gap_visible(logdir: Path) -> None:
    write_log(logdir, 12)
    path = logdir / audit.LOG_NAME

    def edit_last(lines: list[str]) -> list[str]:
        record = json.loads(lines[-1])
        record["severity"] = "critical"
        return [*lines[:-1], audit.canonical_json(record) + "\n"]

    rewrite(path, edit_last)
    log = AuditLog(logdir)
    info = log.open()
    assert "moved to audit.log.torn-" in info["recovered"]
    assert "audit.head says seq 11" in info["recovered"]
    assert log.head[0] == 11  # continues after the head: seq 11 stays missing
    log.append([event(12, **info)])
    log.close()
    assert "record 11 is missing" in problems_text(logdir, head=True)


def test_unjsonable_attributes_become_strings(logdir: Path) -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd!"

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    attrs: dict[str, Any] = {
        "obj": Odd(),
        "broken": Broken(),
        "bytes": b"\x00\xff",
        "set": {1},
        "nan": math.nan,
        "inf": -math.inf,
        "tuple": (1, "a"),
        "keys": {1: "int", None: "none", (1, 2): "tuple"},
        "surrogate": "a\udc80b",
        "cyclic": cyclic,
        "huge": 1 << 20_000,
        "path": Path("/tmp/x"),
    }
    log = AuditLog(logdir)
    log.open()
    assert log.append([event(0, **attrs), {"type": "bare", "attributes": [1, 2]}]) == 2
    log.close()
    lines = lines_of(logdir / audit.LOG_NAME)
    got = json.loads(lines[0])["attributes"]
    assert got["obj"] == "odd!"
    assert got["broken"] == "<unprintable Broken>"
    assert got["bytes"] == str(b"\x00\xff")
    assert got["set"] == "{1}"
    assert (got["nan"], got["inf"]) == ("nan", "-inf")
    assert got["tuple"] == [1, "a"]
    assert got["keys"] == {"1": "int", "None": "none", "(1, 2)": "tuple"}
    assert got["surrogate"] == "a\\udc80b"
    assert got["huge"] == "<int of 20001 bits>"
    assert got["path"] == "/tmp/x"
    bare = json.loads(lines[1])
    assert bare["attributes"] == {"value": [1, 2]}
    assert bare["event_id"] == ""
    assert bare["time"].endswith("Z")
    assert verify(files_of(logdir)).ok


# -- syslog --------------------------------------------------------------------------------
@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_syslog_over_udp_gets_every_line(logdir: Path, udp_server: socket.socket) -> None:
    port = udp_server.getsockname()[1]
    log = AuditLog(logdir, syslog=f"udp:127.0.0.1:{port}")
    log.open()
    log.append([event(0), event(1)])
    log.close()
    lines = lines_of(logdir / audit.LOG_NAME)
    for line in lines:
        datagram = udp_server.recv(65536)
        # facility authpriv (10) * 8 + info (6)
        assert datagram.rstrip(b"\x00") == b"<86>agent-vm-audit: " + line.rstrip("\n").encode()
    assert log.syslog_errors == 0


def test_syslog_failure_keeps_the_file_record(logdir: Path, tmp_path: Path) -> None:
    log = AuditLog(logdir, syslog=str(tmp_path / "no-syslog-here.sock"))
    log.open()
    assert log.append([event(0), event(1)]) == 2
    log.close()
    assert log.syslog_errors == 2
    assert len(lines_of(logdir / audit.LOG_NAME)) == 2
    assert verify(files_of(logdir), logdir / audit.HEAD_NAME).ok


@pytest.mark.parametrize("spec", ["udp:host", "udp::514", "udp:h:99999", "dev/log", "tcp:h:1"])
def test_bad_syslog_setting_is_refused(spec: str, logdir: Path) -> None:
    with pytest.raises(ValueError, match="audit syslog"):
        AuditLog(logdir, syslog=spec)


def test_syslog_addresses() -> None:
    assert audit.parse_syslog("") is None
    assert audit.parse_syslog("/dev/log") == "/dev/log"
    assert audit.parse_syslog("udp:logs.example:514") == ("logs.example", 514)
    assert audit.parse_syslog("udp:[::1]:5514") == ("::1", 5514)


# -- property: round trip and single-byte tampering ----------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
attribute_dicts = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=40)
@given(
    attrs=st.lists(attribute_dicts, min_size=1, max_size=4),
    line_pick=st.integers(min_value=0),
    offset_pick=st.floats(min_value=0, max_value=1, exclude_max=True),
    new_byte=st.integers(min_value=0, max_value=255),
)
def test_attributes_round_trip_and_any_byte_flip_is_caught(
    attrs: list[dict[str, Any]], line_pick: int, offset_pick: float, new_byte: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        log = AuditLog(directory)
        log.open()
        log.append([{**event(i), "attributes": a} for i, a in enumerate(attrs)])
        log.close()
        path = directory / audit.LOG_NAME
        data = path.read_bytes()
        records = [json.loads(line) for line in data.splitlines()]
        assert [r["attributes"] for r in records] == attrs
        assert verify([path]).ok

        starts = [0]
        for i, byte in enumerate(data):
            if byte == ord("\n"):
                starts.append(i + 1)
        index = line_pick % len(records)
        line_len = starts[index + 1] - starts[index] - 1  # without the newline
        pos = starts[index] + int(offset_pick * line_len)
        if data[pos] == new_byte:
            new_byte = (new_byte + 1) % 256
        path.write_bytes(data[:pos] + bytes([new_byte]) + data[pos + 1 :])
        assert not verify([path]).ok


def test_every_byte_of_a_record_is_covered(logdir: Path) -> None:
    log = AuditLog(logdir)
    log.open()
    log.append([event(0), event(1, note='tab\tquote" ü €', n=1e16, z=-0.0)])
    log.close()
    path = logdir / audit.LOG_NAME
    data = path.read_bytes()
    start = data.index(b"\n") + 1
    for pos in range(start, len(data) - 1):
        for new in {data[pos] ^ 1, data[pos] ^ 0x20, ord("0"), ord("\\"), ord(" ")} - {data[pos]}:
            path.write_bytes(data[:pos] + bytes([new]) + data[pos + 1 :])
            assert not verify([path]).ok, (pos, new)
    path.write_bytes(data)
    assert verify([path]).ok


def test_append_needs_open(logdir: Path) -> None:
    log = AuditLog(logdir)
    with pytest.raises(RuntimeError, match="open"):
        log.append([event(0)])
    log.open()
    assert log.is_open
    with pytest.raises(RuntimeError, match="already open"):
        log.open()
    log.close()
    log.close()
    assert not log.is_open


def test_jsonable_leaves_json_alone() -> None:
    value: Mapping[str, Any] = {"a": [1, 2.5, None, True, {"b": "ü"}], "c": -0.0}
    assert audit.jsonable(value) == value


# -- the CLI -------------------------------------------------------------------------------
def test_cli_verify_good_directory(logdir: Path) -> None:
    write_log(logdir, 60, max_bytes=8192)
    result = CliRunner().invoke(cli, ["audit", "verify", str(logdir)])
    assert result.exit_code == 0, result.output
    head = json.loads((logdir / audit.HEAD_NAME).read_text())["hash"]
    assert result.stdout.strip().startswith("OK: 60 records in ")
    assert result.stdout.strip().endswith(f"seq 0..59, head {head}")


def test_cli_verify_tampered_copy(logdir: Path, tmp_path: Path) -> None:
    write_log(logdir, 30)
    copy = tmp_path / "copy"
    shutil.copytree(logdir, copy)
    rewrite(copy / audit.LOG_NAME, lambda lines: lines[:5] + lines[6:])
    files = [str(p) for p in files_of(copy)]
    result = CliRunner().invoke(
        cli, ["audit", "verify", "--head", str(copy / audit.HEAD_NAME), *files]
    )
    assert result.exit_code == 1, result.output
    out = result.stdout.splitlines()
    assert "record 5 is missing" in out[0]
    assert out[-1] == "TAMPERED: 1 problem"
    assert CliRunner().invoke(cli, ["audit", "verify", str(logdir)]).exit_code == 0


def test_cli_verify_head_catches_a_cut_tail(logdir: Path) -> None:
    write_log(logdir, 30)
    rewrite(logdir / audit.LOG_NAME, lambda lines: lines[:-1])
    result = CliRunner().invoke(cli, ["audit", "verify", str(logdir)])
    assert result.exit_code == 1
    assert "records were removed from the end" in result.stdout


def test_cli_verify_strict_start(logdir: Path) -> None:
    write_log(logdir, 60, max_bytes=4096)
    later = [str(p) for p in files_of(logdir) if p.name != "audit-000000000000.log"]
    lenient = CliRunner().invoke(cli, ["audit", "verify", *later])
    assert lenient.exit_code == 0, lenient.output
    assert "records before seq" in lenient.stderr
    strict = CliRunner().invoke(cli, ["audit", "verify", "--strict-start", *later])
    assert strict.exit_code == 1


def test_cli_verify_unreadable_input(logdir: Path, tmp_path: Path) -> None:
    write_log(logdir, 3)
    missing = tmp_path / "nope.log"
    result = CliRunner().invoke(
        cli, ["audit", "verify", str(logdir / audit.LOG_NAME), str(missing)]
    )
    assert result.exit_code == 2
    assert str(missing) in result.stderr
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["audit", "verify", str(empty)])
    assert result.exit_code == 2
    assert str(empty) in result.stderr
    result = CliRunner().invoke(
        cli, ["audit", "verify", "--head", str(missing), str(logdir / audit.LOG_NAME)]
    )
    assert result.exit_code == 2
    assert str(missing) in result.stderr
