"""The audit log: JSON lines in a SHA-256 hash chain, with rotation, a head file and syslog.

The format and the rules are in docs/MONITOR_DESIGN.md, "Audit log". In short:
every record is one line of canonical JSON (keys sorted, no spaces, UTF-8),
``seq`` counts from 0 across files, ``prev`` is the ``hash`` of the record
before (64 zeros for seq 0) and ``hash`` is the SHA-256 of the record's
canonical JSON without ``hash``. ``audit.log`` is the live file; full or old
ones are renamed to ``audit-<first seq, 12 digits>.log`` and never deleted
here. ``audit.head`` holds the last seq and hash so a cut tail shows.

:class:`AuditLog` is the writer (one per directory, monitor only). Its calls
do blocking file I/O with fsync: from asyncio, run them in a thread
(``asyncio.to_thread``); a lock makes that safe. :func:`verify` checks a set
of files; ``agent-vm audit verify`` is its command line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import logging.handlers
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("agentvm.monitor.audit")

LOG_NAME = "audit.log"
HEAD_NAME = "audit.head"
ROTATED_GLOB = "audit-*.log"
ZERO_HASH = "0" * 64
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_MAX_AGE_S = 86400.0
SYSLOG_TAG = "agent-vm-audit: "
MAX_PROBLEMS = 50

#: The string fields every record carries (besides attributes, seq, prev, hash).
EVENT_FIELDS = ("event_id", "time", "service", "type", "vm", "sandbox", "trace_id", "severity")
RECORD_KEYS = frozenset({*EVENT_FIELDS, "attributes", "seq", "prev", "hash"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ROTATED = re.compile(r"audit-(\d{12,})(?:\.\d+)?\.log")
_MAX_DEPTH = 32
_MAX_INT_BITS = 4096  # str() of larger ints is slow, and refused beyond 4300 digits
_SYSLOG_RETRY_S = 60.0
_ROTATE_RETRY_S = 60.0
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o640
_DIR_MODE = 0o750


# -- records -------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """The one serialisation the chain hashes: keys sorted, no spaces, raw UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8", "surrogatepass")).hexdigest()


def format_time(ts: float) -> str:
    """RFC 3339 UTC with microseconds, as records carry it: 2026-11-25T19:40:01.123456Z."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (naive = UTC), or None."""
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _safe_str(value: object) -> str:
    try:
        return _clean_str(str(value))
    except Exception:  # noqa: BLE001 - a broken __str__ must not cost the record
        return f"<unprintable {type(value).__name__}>"


def _clean_str(text: str) -> str:
    """A plain str that encodes to UTF-8 (lone surrogates become backslash escapes)."""
    text = str.__str__(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON types; anything else becomes its str(). Never raises."""
    try:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _clean_str(value)
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                return f"<int of {value.bit_length()} bits>"
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else str(float(value))
        if _depth >= _MAX_DEPTH:
            return _safe_str(value)
        if isinstance(value, Mapping):
            return {
                (_clean_str(k) if isinstance(k, str) else _safe_str(k)): jsonable(v, _depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [jsonable(v, _depth + 1) for v in value]
    except Exception:  # noqa: BLE001 - odd containers or numbers: fall back to str()
        return _safe_str(value)
    return _safe_str(value)


def _field(value: object) -> str:
    if value is None:
        return ""
    return _clean_str(value) if isinstance(value, str) else _safe_str(value)


def build_record(
    event: Mapping[str, Any], *, seq: int, prev: str, default_time: str = ""
) -> dict[str, Any]:
    """The audit record of ``event`` at ``seq`` after the record whose hash is ``prev``.

    ``event`` has the keys of :data:`EVENT_FIELDS` (strings; a missing one is
    "", a missing ``time`` is ``default_time``) and ``attributes`` (a mapping;
    values that are not JSON become their str()).
    """
    record: dict[str, Any] = {k: _field(event.get(k)) for k in EVENT_FIELDS}
    if not record["time"]:
        record["time"] = default_time
    attributes = event.get("attributes")
    if attributes is None:
        record["attributes"] = {}
    elif isinstance(attributes, Mapping):
        record["attributes"] = jsonable(attributes)
    else:
        record["attributes"] = {"value": jsonable(attributes)}
    record["seq"] = seq
    record["prev"] = prev
    record["hash"] = record_hash(record)
    return record


def check_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse one record line (without its newline): ``(record, problem)``.

    ``record`` is None when the line is not a well-formed record at all; a
    record whose hash does not match comes back with that as the problem (its
    seq and hash still link the chain). ``problem`` is "" for a good record.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    try:
        canonical = canonical_json(obj) == text
    except (ValueError, RecursionError):
        canonical = False
    if not canonical:
        return None, "not canonical JSON (keys sorted, no spaces): the line was edited"
    missing = RECORD_KEYS - obj.keys()
    if missing:
        return None, f"missing keys: {', '.join(sorted(missing))}"
    seq = obj["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None, "seq is not a non-negative integer"
    for key in ("prev", "hash"):
        if not isinstance(obj[key], str) or not _HEX64.fullmatch(obj[key]):
            return None, f"seq {seq}: {key} is not 64 hex digits"
    if not isinstance(obj["attributes"], dict):
        return None, f"seq {seq}: attributes is not an object"
    wrong = [k for k in EVENT_FIELDS if not isinstance(obj[k], str)]
    if wrong:
        return None, f"seq {seq}: not a string: {', '.join(wrong)}"
    if record_hash(obj) != obj["hash"]:
        return obj, "the hash does not match the record: the record was edited"
    return obj, ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- the writer ----------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    seq: int = -1
    hash: str = ZERO_HASH
    size: int = 0  # bytes in audit.log
    first_seq: int | None = None  # of audit.log
    started: float | None = None  # clock() when audit.log got its first record


class _SyslogHandler(logging.handlers.SysLogHandler):
    def __init__(self, on_error: Callable[[BaseException | None], None], **kwargs: Any) -> None:
        self._on_error = on_error
        super().__init__(**kwargs)

    def handleError(self, record: logging.LogRecord) -> None:
        self._on_error(sys.exc_info()[1])


def parse_syslog(spec: str) -> str | tuple[str, int] | None:
    """``""`` -> None, ``/dev/log`` -> the path, ``udp:HOST:PORT`` -> (host, port)."""
    if not spec:
        return None
    if spec.startswith("udp:"):
        host, sep, port = spec[4:].rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return host, int(port)
    elif spec.startswith("/"):
        return spec
    raise ValueError(
        f"audit syslog {spec!r}: use a socket path like /dev/log, udp:HOST:PORT, or nothing"
    )


class AuditLog:
    """The writer of one audit directory: ``open()``, then ``append()`` batches, ``close()``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        syslog: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("audit max_bytes and max_age_s must be positive")
        self.directory = Path(directory)
        self.path = self.directory / LOG_NAME
        self.head_path = self.directory / HEAD_NAME
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.syslog = syslog
        self._syslog_address = parse_syslog(syslog)
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._state = _State()
        self._rotate_retry_at = 0.0
        self._syslog_logger: logging.Logger | None = None
        self._syslog_handler: _SyslogHandler | None = None
        self._syslog_retry_at = 0.0
        #: Records written since open() (the agentvm_audit_records_total figure).
        self.records_written = 0
        #: Syslog sends (or connects) that failed; the file records are kept.
        self.syslog_errors = 0
        #: audit.head replacements that failed (the records themselves were written).
        self.head_errors = 0

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (-1, 64 zeros) when there is none."""
        with self._lock:
            return self._state.seq, self._state.hash

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    # -- open / recovery --------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        """Open the directory and continue its chain.

        Returns the attributes of the ``audit.started`` record the caller
        should append next: ``previous_file`` (the file holding the record the
        chain continues from, "" for a new log) and ``recovered`` (what was
        repaired or found wrong, "" when nothing).
        """
        with self._lock:
            if self._fd is not None:
                raise RuntimeError(f"{self.path}: already open")
            if not self.directory.is_dir():
                self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
                os.chmod(self.directory, _DIR_MODE)
            notes: list[str] = []
            previous_file = ""
            last: tuple[int, str] | None = None
            state = _State()
            if self.path.exists():
                last = self._recover_live(notes)
                if last is not None:
                    previous_file = LOG_NAME
                    first = _first_record(self.path)
                    state.first_seq = first[0] if first else last[0]
                    started = parse_time(first[1]) if first else None
                    now = self._clock()
                    state.started = now if started is None else min(started, now)
            if last is None:
                rotated = newest_rotated(self.directory)
                if rotated is not None:
                    found = _last_good_record(rotated)
                    if found is None:
                        notes.append(f"{rotated.name} has no intact record at its end")
                    else:
                        last = found
                        previous_file = rotated.name
            last = self._check_head(last, notes)
            if last is not None:
                state.seq, state.hash = last
            self._fd = os.open(self.path, _OPEN_FLAGS, _FILE_MODE)
            state.size = os.fstat(self._fd).st_size
            if state.size == 0:
                state.first_seq = state.started = None
            self._state = state
            self._setup_syslog()
            recovered = "; ".join(notes)
            if recovered:
                log.warning("audit log %s: %s", self.directory, recovered)
            return {"previous_file": previous_file, "recovered": recovered}

    def _recover_live(self, notes: list[str]) -> tuple[int, str] | None:
        """Cut a torn or bad tail off audit.log (kept aside); (seq, hash) of its last record."""
        with self.path.open("r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            good_end, last = _scan_tail(fh, size)
            if good_end == size:
                return last
            fh.seek(good_end)
            torn = fh.read(size - good_end)
            aside = self._torn_path()
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            try:
                _write_all(fd, torn)
                os.fsync(fd)
            finally:
                os.close(fd)
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.directory)
        after = f"after seq {last[0]}" if last else "with no intact record before them"
        notes.append(f"{len(torn)} bytes at the end of {LOG_NAME} {after} moved to {aside.name}")
        return last

    def _torn_path(self) -> Path:
        stamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = self.directory / f"{LOG_NAME}.torn-{stamp}"
        n = 1
        while path.exists():
            path = self.directory / f"{LOG_NAME}.torn-{stamp}.{n}"
            n += 1
        return path

    def _check_head(self, last: tuple[int, str] | None, notes: list[str]) -> tuple[int, str] | None:
        """Compare audit.head with the log; a head beyond the log wins (the gap stays visible)."""
        try:
            head = read_head(self.head_path)
        except FileNotFoundError:
            return last
        except (OSError, ValueError) as exc:
            notes.append(f"{HEAD_NAME} unusable ({exc})")
            return last
        if last is None or head[0] > last[0]:
            ends = f"ends at seq {last[0]}" if last else "has no records"
            notes.append(
                f"the log {ends} but {HEAD_NAME} says seq {head[0]}: records are missing; "
                "the chain continues from the head"
            )
            return head
        if head[0] == last[0] and head[1] != last[1]:
            notes.append(
                f"seq {head[0]} has hash {last[1]} but {HEAD_NAME} says {head[1]}: "
                "the log was rewritten"
            )
        return last

    # -- writing ----------------------------------------------------------------------------
    def append(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Write ``events`` as records (fsync, then audit.head, then syslog); returns the count."""
        if not events:
            return 0
        with self._lock:
            self._require_fd()
            committed: list[str] = []
            try:
                state = dataclasses.replace(self._state)
                pending: list[str] = []
                for event in events:
                    now = self._clock()
                    if self._must_rotate(state, now):
                        self._commit(pending, state)
                        committed += pending
                        pending = []
                        self._rotate(now)
                        state = dataclasses.replace(self._state)
                    record = build_record(
                        event, seq=state.seq + 1, prev=state.hash, default_time=format_time(now)
                    )
                    line = canonical_json(record) + "\n"
                    pending.append(line)
                    if state.first_seq is None:
                        state.first_seq, state.started = record["seq"], now
                    state.seq, state.hash = record["seq"], record["hash"]
                    state.size += len(line.encode("utf-8"))
                self._commit(pending, state)
                committed += pending
            finally:
                if committed:
                    self.records_written += len(committed)
                    self._write_head()
                    self._send_syslog(committed)
            return len(committed)

    def _must_rotate(self, state: _State, now: float) -> bool:
        if state.size == 0 or now < self._rotate_retry_at:
            return False
        if state.size >= self.max_bytes:
            return True
        return state.started is not None and now - state.started >= self.max_age_s

    def _commit(self, lines: list[str], state: _State) -> None:
        """Write ``lines`` and fsync; on failure cut the file back and keep the old state."""
        if not lines:
            return
        fd = self._require_fd()
        try:
            _write_all(fd, "".join(lines).encode("utf-8"))
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, self._state.size)
            except OSError:
                log.exception("audit log %s: cannot cut a failed write back", self.path)
            raise
        self._state = dataclasses.replace(state)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: open() the audit log first")
        return self._fd

    def _rotate(self, now: float) -> None:
        fd = self._require_fd()
        first = self._state.first_seq if self._state.first_seq is not None else self._state.seq
        target = self.directory / f"audit-{first:012d}.log"
        n = 1
        while target.exists():
            target = self.directory / f"audit-{first:012d}.{n}.log"
            n += 1
        try:
            os.rename(self.path, target)
        except OSError:
            log.exception("audit log %s: cannot rotate to %s; writing on", self.path, target.name)
            self._rotate_retry_at = now + _ROTATE_RETRY_S
            return
        self._fd = None
        os.close(fd)
        self._fd = os.open(self.path, _OPEN_FLAGS, _FILE_MODE)
        _fsync_dir(self.directory)
        self._state = _State(seq=self._state.seq, hash=self._state.hash)
        log.info("audit log rotated to %s", target.name)

    def _write_head(self) -> None:
        data = json.dumps({"seq": self._state.seq, "hash": self._state.hash, "file": LOG_NAME})
        tmp = self.directory / f"{HEAD_NAME}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
            try:
                _write_all(fd, (data + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.head_path)
            _fsync_dir(self.directory)
        except OSError:
            self.head_errors += 1
            log.exception("audit log %s: cannot update %s", self.directory, HEAD_NAME)

    # -- syslog -----------------------------------------------------------------------------
    def _setup_syslog(self) -> None:
        if self._syslog_address is None or self._syslog_logger is not None:
            return
        if self._clock() < self._syslog_retry_at:
            return
        kwargs: dict[str, Any] = {
            "address": self._syslog_address,
            "facility": logging.handlers.SysLogHandler.LOG_AUTHPRIV,
        }
        if not isinstance(self._syslog_address, str):
            kwargs["socktype"] = socket.SOCK_DGRAM
        try:
            handler = _SyslogHandler(self._syslog_failed, **kwargs)
        except OSError as exc:
            self._syslog_failed(exc)
            self._syslog_retry_at = self._clock() + _SYSLOG_RETRY_S
            return
        handler.setFormatter(logging.Formatter("%(message)s"))
        # Not registered with logging's manager: no propagation, nothing else attaches.
        logger = logging.Logger("agentvm.monitor.audit.syslog", logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
        self._syslog_handler, self._syslog_logger = handler, logger

    def _syslog_failed(self, exc: BaseException | None) -> None:
        self.syslog_errors += 1
        if self.syslog_errors == 1 or self.syslog_errors % 100 == 0:
            log.warning(
                "audit syslog %s: %s (%d failures so far; the file records are kept)",
                self.syslog,
                exc,
                self.syslog_errors,
            )

    def _send_syslog(self, lines: list[str]) -> None:
        if self._syslog_address is None:
            return
        self._setup_syslog()
        if self._syslog_logger is None:
            return
        for line in lines:
            self._syslog_logger.info("%s%s", SYSLOG_TAG, line.rstrip("\n"))

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._syslog_logger is not None and self._syslog_handler is not None:
                self._syslog_logger.removeHandler(self._syslog_handler)
                self._syslog_handler.close()
            self._syslog_logger = self._syslog_handler = None


# -- file helpers --------------------------------------------------------------------------
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_head(path: Path) -> tuple[int, str]:
    """(seq, hash) of an audit.head file; OSError if unreadable, ValueError if malformed."""
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not JSON") from exc
    if not isinstance(obj, dict):
        obj = {}
    seq, digest = obj.get("seq"), obj.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"{path}: seq is not a non-negative integer")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ValueError(f"{path}: hash is not 64 hex digits")
    return seq, digest


def log_files(directory: Path) -> list[Path]:
    """``audit.log`` (if present) and every ``audit-*.log`` in ``directory``."""
    files = sorted(directory.glob(ROTATED_GLOB))
    live = directory / LOG_NAME
    if live.exists():
        files.append(live)
    return files


def recent_event_ids(directory: Path, max_bytes: int = 4 * 2**20) -> list[str]:
    """``event_id`` of the newest records (at most ``max_bytes`` of the live file and,
    when that is shorter, of the newest rotated one), oldest first.

    A monitor killed after writing a batch but before acknowledging it gets that
    batch again from its reporter: these ids let the restarted monitor know it.
    """
    files = [directory / LOG_NAME]
    rotated = newest_rotated(directory)
    if rotated is not None:
        files.insert(0, rotated)
    chunks: list[list[str]] = []
    budget = max_bytes
    for path in reversed(files):
        if budget <= 0:
            break
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                start = max(0, size - budget)
                fh.seek(start)
                data = fh.read(size - start)
        except OSError:
            continue
        budget -= len(data)
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first line is cut
        ids = []
        for line in lines:
            try:
                value = json.loads(line).get("event_id")
            except (ValueError, AttributeError):
                continue  # a torn or foreign line: nothing to remember
            if isinstance(value, str) and value:
                ids.append(value)
        chunks.insert(0, ids)
    return [i for chunk in chunks for i in chunk]


def newest_rotated(directory: Path) -> Path | None:
    """The rotated file with the highest first seq (by its name), or None."""
    best: tuple[int, str] | None = None
    for path in directory.glob(ROTATED_GLOB):
        m = _ROTATED.fullmatch(path.name)
        if m and (best is None or (int(m[1]), path.name) > best):
            best = (int(m[1]), path.name)
    return directory / best[1] if best else None


def _lines_backwards(fh: BinaryIO, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, bytes, ends with a newline) of each line, last first; the piece after the
    last newline (empty when the file ends with one) comes first with False."""
    pos = size
    tail = b""  # the file from pos to the end of the line not yet yielded
    last = True
    while True:
        i = tail.rfind(b"\n")
        if i >= 0:
            yield pos + i + 1, tail[i + 1 :], not last
            last = False
            tail = tail[:i]
            continue
        if pos == 0:
            yield 0, tail, not last
            return
        n = min(max(1 << 16, len(tail)), pos)  # doubling: long lines cost O(size)
        pos -= n
        fh.seek(pos)
        tail = fh.read(n) + tail


def _scan_tail(fh: BinaryIO, size: int) -> tuple[int, tuple[int, str] | None]:
    """End offset of the last intact record line and its (seq, hash); (0, None) if none."""
    for offset, line, has_newline in _lines_backwards(fh, size):
        if not has_newline:
            continue  # the piece after the last newline: torn, or nothing
        record, problem = check_line(line)
        if record is not None and not problem:
            return offset + len(line) + 1, (record["seq"], record["hash"])
    return 0, None


def _last_good_record(path: Path) -> tuple[int, str] | None:
    with path.open("rb") as fh:
        return _scan_tail(fh, os.fstat(fh.fileno()).st_size)[1]


def _first_record(path: Path, max_lines: int = 100) -> tuple[int, str] | None:
    """(seq, time) of the first well-formed record of ``path``."""
    with path.open("rb") as fh:
        for n, line in enumerate(fh):
            if n >= max_lines:
                break
            record, _ = check_line(line.rstrip(b"\n"))
            if record is not None:
                return record["seq"], record["time"]
    return None


# -- verification --------------------------------------------------------------------------
@dataclasses.dataclass
class VerifyResult:
    ok: bool
    records: int
    files: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str
    problems: list[str]
    #: Facts that are not tampering (the first record is not seq 0, records after the head).
    notes: list[str] = dataclasses.field(default_factory=list)
    #: True when checking stopped at MAX_PROBLEMS problems.
    truncated: bool = False

    def summary(self) -> str:
        """The one-line verdict ``agent-vm audit verify`` prints."""
        if not self.ok:
            more = f" (stopped after {MAX_PROBLEMS})" if self.truncated else ""
            return f"TAMPERED: {_count(len(self.problems), 'problem')}{more}"
        text = f"OK: {_count(self.records, 'record')} in {_count(self.files, 'file')}"
        if self.first_seq is not None:
            text += f", seq {self.first_seq}..{self.last_seq}, head {self.last_hash}"
        return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _TooMany(Exception):
    pass


def verify(
    paths: Sequence[Path], head: Path | None = None, *, strict_start: bool = False
) -> VerifyResult:
    """Check the chain across ``paths`` (any order; sorted by the seq of their first record).

    With ``head`` (an audit.head file, read before the logs) the log must
    reach its seq with its hash; records after it (written meanwhile, or a
    crash between the log and the head update) are a note. A first record
    other than seq 0 is a note, or a problem with ``strict_start``. Raises
    OSError (with ``filename``) for a file that cannot be read.
    """
    problems: list[str] = []
    notes: list[str] = []
    head_value: tuple[int, str] | None = None
    if head is not None:
        try:
            head_value = read_head(head)
        except ValueError as exc:
            problems.append(str(exc))

    def problem(text: str) -> None:
        problems.append(text)
        if len(problems) >= MAX_PROBLEMS:
            raise _TooMany

    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(p.resolve(), p)
    files = list(unique.values())
    firsts = {p: _first_record(p, max_lines=1 << 30) for p in files}
    ordered = sorted(
        files,
        key=lambda p: (firsts[p] is None, firsts[p][0] if firsts[p] else 0),  # type: ignore[index]
    )

    records = 0
    first_seq: int | None = None
    expected: int | None = None
    last_hash = ""
    head_seen: str | None = None
    truncated = False
    try:
        for path in ordered:
            at_file_start = True
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    where = f"{path}:{lineno}"
                    if not raw.endswith(b"\n"):
                        problem(f"{where}: the last line has no newline (torn write or edit)")
                        break
                    if raw == b"\n":
                        problem(f"{where}: empty line")
                        continue
                    record, issue = check_line(raw[:-1])
                    if record is None:
                        problem(f"{where}: {issue}")
                        continue
                    seq: int = record["seq"]
                    if issue:
                        problem(f"{where}: seq {seq}: {issue}")
                    if expected is None:
                        first_seq = seq
                        if seq == 0 and record["prev"] != ZERO_HASH:
                            problem(f"{where}: seq 0: prev is not 64 zeros")
                        elif seq > 0:
                            msg = (
                                f"records before seq {seq} are not included "
                                f"(the earliest file given, {path}, starts there)"
                            )
                            if strict_start:
                                problem(msg)
                            else:
                                notes.append(msg)
                    elif seq == expected:
                        if record["prev"] != last_hash:
                            problem(
                                f"{where}: seq {seq}: prev is not the hash of seq {seq - 1}: "
                                "the chain is broken (a record edited, replaced or reordered)"
                            )
                    elif seq > expected:
                        span = (
                            f"record {expected} is"
                            if seq == expected + 1
                            else f"records {expected}..{seq - 1} are"
                        )
                        why = "a rotated file removed?" if at_file_start else "lines deleted?"
                        problem(f"{where}: seq {seq}: {span} missing ({why})")
                    else:
                        problem(
                            f"{where}: seq {seq}: out of order or repeated "
                            f"(seq {expected} expected)"
                        )
                    if head_value is not None and seq == head_value[0]:
                        head_seen = record["hash"]
                    expected, last_hash = seq + 1, record["hash"]
                    records += 1
                    at_file_start = False
    except _TooMany:
        truncated = True
    last_seq = expected - 1 if expected is not None else None

    if head_value is not None and head is not None and not truncated:
        _check_against_head(head.name, head_value, first_seq, last_seq, head_seen, problems, notes)
    return VerifyResult(
        ok=not problems,
        records=records,
        files=len(files),
        first_seq=first_seq,
        last_seq=last_seq,
        last_hash=last_hash,
        problems=problems[:MAX_PROBLEMS],
        notes=notes,
        truncated=truncated,
    )


def _check_against_head(
    name: str,
    head: tuple[int, str],
    first_seq: int | None,
    last_seq: int | None,
    head_seen: str | None,
    problems: list[str],
    notes: list[str],
) -> None:
    seq, digest = head
    if last_seq is None:
        problems.append(f"the log has no records but {name} says {seq}: records were removed")
    elif last_seq < seq:
        problems.append(
            f"the log ends at seq {last_seq} but {name} says {seq}: "
            "records were removed from the end"
        )
    elif head_seen is None:
        if first_seq is not None and seq >= first_seq:
            problems.append(f"{name} says seq {seq}, which is not in the log")
        else:
            notes.append(f"{name} (seq {seq}) is before the first record given: not checked")
    elif head_seen != digest:
        problems.append(
            f"seq {seq} has hash {head_seen} but {name} says {digest}: the log was rewritten"
        )
    elif last_seq > seq:
        notes.append(
            f"{last_seq - seq} record(s) after {name}'s seq {seq} (written while verifying, "
            "or the monitor stopped before updating the head)"
        )
