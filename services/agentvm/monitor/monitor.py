"""Monitor: takes events, writes the audit log, keeps metrics, detects and responds.

Inputs: events the services report (``ingest``), every VM's egress records
(vm-manager ``WatchEgress``), and periodic polls of VM stats and pools.
Outputs: the audit log (the only writer), Prometheus metrics, alerts
(``WatchAlerts``) and responses carried out by vm-manager (``DestroyVM``,
``CaptureEvidence``). See docs/MONITOR_DESIGN.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from agentvm.common.completion import to_completion
from agentvm.common.config import Settings
from agentvm.common.events import SEVERITIES, EventFactory
from agentvm.monitor import metrics as m
from agentvm.monitor.anomaly import FEATURES, Action, Detection, Detector
from agentvm.monitor.audit import AuditLog, recent_event_ids
from agentvm.v1 import (
    common_pb2,
    monitor_pb2,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

log = logging.getLogger("agentvm.monitor")

SEVERITY_NAMES = {v: k for k, v in SEVERITIES.items()}
MAX_BATCH = 1000
SEEN_IDS = 100_000
MAX_VMS_TRACKED = 10_000
# Ask a guest for its view when its VM used at least this much of its vCPUs.
GUEST_MIN_CPU = 0.1


def _rfc3339(ts: timestamp_pb2.Timestamp) -> str:
    ns = ts.ToNanoseconds()
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns % 1_000_000_000) // 1000:06d}Z"


# Label values come from reporters: anything unknown is "other", so a caller
# cannot make monitor grow a series per made-up name.
SERVICES = frozenset({"vm-manager", "pool-manager", "executor", "monitor"})
OUTCOMES = frozenset({"ok", "nonzero_exit", "timeout", "killed", "error"})
# How a VM came up (vm.ready's kind): booted, restored from a memory template,
# reverted to a memory snapshot.
BOOT_KINDS = frozenset({"cold", "restore", "snapshot", "resume"})
CODES = frozenset(c.name for c in grpc.StatusCode)
EVENT_TYPES = frozenset(
    {
        "api.call",
        "vm.created",
        "vm.ready",
        "vm.destroyed",
        "vm.reclaimed",
        "vm.failed",
        "vm.stopped",
        "vm.disk_full",
        "vm.disk_resumed",
        "libvirt.reconnected",
        "vm.policy_updated",
        "vm.evidence_captured",
        "pool.acquired",
        "pool.released",
        "pool.configured",
        "vm.leased",
        "sandbox.created",
        "sandbox.closed",
        "sandbox.timeout_set",
        "sandbox.paused",
        "sandbox.resumed",
        "sandbox.restored",
        "guest.figures_clamped",
        "image.built",
        "image.imported",
        "image.tagged",
        "image.deleted",
        "image.pruned",
        "execution.started",
        "execution.finished",
        "file.written",
        "file.read",
        "network.allowed",
        "network.denied",
        "anomaly.detected",
        "anomaly.response",
        "audit.started",
        "monitor.events_lost",
        "service.restarted",
    }
)
# Records waiting for a disk that keeps failing are capped (then dropped, logged).
MAX_PENDING = 200_000


def _enum_word(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return "unknown"


def _bounded(value: str, known: frozenset[str]) -> str:
    return value if value in known else "other"


def _num(attrs: Mapping[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Monitor:
    """The monitor's state and loops (the gRPC servicer is a thin face on it)."""

    def __init__(
        self,
        settings: Settings,
        audit: AuditLog,
        detector: Detector,
        vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub | None,
        pools: pool_manager_pb2_grpc.PoolManagerServiceAsyncStub | None,
        collector: m.StateCollector,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.detector = detector
        self.vmm = vmm
        self.pools = pools
        self.collector = collector
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._events = EventFactory("monitor")
        self._sandbox_of: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._cpu_prev: dict[str, tuple[float, float]] = {}
        self._responding: set[str] = set()
        self._alert_subs: list[asyncio.Queue[monitor_pb2.Alert]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()
        self._write_lock = asyncio.Lock()
        # Records waiting for the audit log (written in batches, off the event loop).
        self._pending: list[dict[str, Any]] = []
        self._cursor = settings.audit_dir / "egress.cursor"
        # Time of the newest egress record taken; saved once its record is on disk.
        self._cursor_at = 0.0

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        info = await asyncio.to_thread(self.audit.open)
        # Ids already on disk: a batch written just before a crash but never
        # acknowledged comes again from its reporter and must not be logged twice.
        for event_id in await asyncio.to_thread(recent_event_ids, self.audit.directory):
            self._remember(event_id)
        self.emit("audit.started", **info)
        await self.flush()
        self._tasks.append(asyncio.create_task(self._writer(), name="audit-writer"))
        if self.vmm is not None:
            self._tasks.append(asyncio.create_task(self._watch_egress(self.vmm), name="egress"))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="poll"))

    async def close(self) -> None:
        for task in [*self._tasks, *self._spawned]:
            task.cancel()
        for task in [*self._tasks, *self._spawned]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.flush()
        await asyncio.to_thread(self.audit.close)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    # -- events --------------------------------------------------------------------
    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        """Monitor's own events (and its gRPC calls): straight into the pipeline."""
        event = self._events.make(type_, vm=vm, sandbox=sandbox, severity=severity, attrs=attrs)
        self._ingest_now([event])

    async def ingest(self, events: Sequence[monitor_pb2.Event], dropped: int, reporter: str) -> int:
        """Take a batch a service reported; returns how many were new."""
        if dropped:
            m.EVENTS_LOST.labels(_bounded(reporter, SERVICES)).inc(dropped)
            self.emit(
                "monitor.events_lost",
                severity="warning",
                reporter=reporter,
                count=dropped,
            )
        accepted = self._ingest_now(events)
        # Acknowledged only once on disk: a reporter that gets an answer may forget.
        await self.flush()
        return accepted

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _ingest_now(self, events: Sequence[monitor_pb2.Event]) -> int:
        fresh = []
        for ev in events:
            if ev.id in self._seen:
                continue
            self._remember(ev.id)
            fresh.append(ev)
        if not fresh:
            return 0
        records = [self._record(ev) for ev in fresh]
        self._pending.extend(records)
        if len(self._pending) > MAX_PENDING:
            lost = len(self._pending) - MAX_PENDING
            del self._pending[:lost]
            log.error("audit log unwritable: %d records dropped from the backlog", lost)
        for ev, rec in zip(fresh, records, strict=True):
            m.EVENTS.labels(_bounded(ev.service, SERVICES), _bounded(ev.type, EVENT_TYPES)).inc()
            self._observe(ev, rec["attributes"])
        return len(fresh)

    async def _writer(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                await self.flush()
            except OSError:
                log.exception("cannot write the audit log; keeping the records and retrying")
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Write pending records to the audit log (one batch, one fsync)."""
        async with self._write_lock:
            batch, self._pending = self._pending, []
            cursor = self._cursor_at
            if not batch:
                return
            try:
                # The write in its thread goes on whoever stops waiting (a reporter
                # that died mid-call cancels its handler): wait for its outcome, or a
                # batch written would be queued again and logged twice.
                written = await to_completion(asyncio.to_thread(self.audit.append, batch))
            except asyncio.CancelledError:
                m.AUDIT_RECORDS.inc(len(batch))  # written: to_completion waited for it
                raise
            except BaseException:
                self._pending[:0] = batch
                raise
            m.AUDIT_RECORDS.inc(written)
            if cursor:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._cursor.write_text, f"{cursor:.9f}\n")

    @staticmethod
    def _record(ev: monitor_pb2.Event) -> dict[str, Any]:
        return {
            "event_id": ev.id,
            "time": _rfc3339(ev.time),
            "service": ev.service,
            "type": ev.type,
            "vm": ev.vm_name,
            "sandbox": ev.sandbox_id,
            "trace_id": ev.trace_id,
            "severity": SEVERITY_NAMES.get(ev.severity, "info"),
            "attributes": json_format.MessageToDict(ev.attributes),
        }

    def _observe(self, ev: monitor_pb2.Event, attrs: Mapping[str, Any]) -> None:
        """Metrics and detection for one accepted event."""
        kind = ev.type
        if kind == "execution.finished":
            m.EXECUTIONS.labels(_bounded(str(attrs.get("outcome", "error")), OUTCOMES)).inc()
            duration = _num(attrs, "duration_s")
            if duration is not None and duration >= 0:
                m.EXECUTION_SECONDS.observe(duration)
            features = {f: v for f in FEATURES if (v := _num(attrs, f)) is not None}
            if ev.vm_name and "outcome" in attrs and attrs.get("outcome") != "error":
                self._handle(self.detector.on_execution(ev.vm_name, ev.sandbox_id, features))
        elif kind == "vm.ready":
            boot = _num(attrs, "boot_s")
            if boot is not None and boot >= 0:
                # Events of vm-managers older than the kind attribute say only "restored".
                fallback = "restore" if attrs.get("restored") else "cold"
                kind_ = _bounded(str(attrs.get("kind", fallback)), BOOT_KINDS)
                m.BOOT_SECONDS.labels(kind_).observe(boot)
        elif kind == "pool.acquired":
            wait = _num(attrs, "wait_s")
            if wait is not None and wait >= 0:
                m.ACQUIRE_SECONDS.labels(str(bool(attrs.get("warm"))).lower()).observe(wait)
        elif kind == "api.call":
            code = str(attrs.get("code", ""))
            if code and code != "OK":
                m.GRPC_ERRORS.labels(_bounded(ev.service, SERVICES), _bounded(code, CODES)).inc()
        elif kind == "sandbox.created" and ev.vm_name:
            self._sandbox_of[ev.vm_name] = ev.sandbox_id
            if len(self._sandbox_of) > MAX_VMS_TRACKED:
                self._sandbox_of.popitem(last=False)
        elif kind == "vm.destroyed" and ev.vm_name:
            self.detector.forget(ev.vm_name)
            self._sandbox_of.pop(ev.vm_name, None)
            self._cpu_prev.pop(ev.vm_name, None)

    # -- egress --------------------------------------------------------------------
    async def _watch_egress(self, vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        backoff = 0.5
        while True:
            request = vm_manager_pb2.WatchEgressRequest(name="", follow=True)
            since = self._read_cursor()
            request.since.FromNanoseconds(int(since * 1e9))
            try:
                async for resp in vmm.WatchEgress(request):
                    backoff = 0.5
                    self._on_egress(resp.record)
            except grpc.aio.AioRpcError as exc:
                log.info("egress stream from vm-manager ended: %s", exc.code().name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _read_cursor(self) -> float:
        try:
            return float(self._cursor.read_text().strip())
        except (OSError, ValueError):
            # First start: only what happens from now on.
            return time.time()

    def _on_egress(self, rec: common_pb2.EgressRecord) -> None:
        # "allowed"/"denied", "dns"/"connect": the contract's own enum names.
        verdict = _enum_word(common_pb2.EgressVerdict, rec.verdict, "EGRESS_VERDICT_")
        kind = _enum_word(common_pb2.EgressKind, rec.kind, "EGRESS_KIND_")
        m.EGRESS.labels(verdict, kind).inc()
        sandbox = self._sandbox_of.get(rec.vm_name, "")
        self.emit(
            f"network.{verdict}",
            vm=rec.vm_name,
            sandbox=sandbox,
            severity="warning" if verdict == "denied" else "info",
            kind=kind,
            name=rec.name,
            address=rec.address,
            port=rec.port,
            protocol=rec.protocol,
            reason=rec.reason,
            at=_rfc3339(rec.time),
        )
        when = rec.time.ToNanoseconds() / 1e9
        self._cursor_at = max(self._cursor_at, when)
        self._handle(self.detector.on_egress(rec.vm_name, sandbox, when, verdict == "denied"))

    # -- polling ---------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except Exception:
                log.exception("poll failed")
            await asyncio.sleep(
                max(0.1, self.settings.monitor_interval_s - (time.monotonic() - started))
            )

    async def poll(self) -> None:
        """One round: VM stats (with the guests' view) and pool sizes."""
        interval = self.settings.monitor_interval_s
        if self.vmm is not None:
            request = vm_manager_pb2.ListVMStatsRequest()
            request.guest_timeout.FromNanoseconds(int(min(interval, 3.0) * 0.75 * 1e9))
            # Idle VMs are asked rarely (every 30 s): asking costs a guest CPU.
            request.guest_min_cpu = GUEST_MIN_CPU
            try:
                resp = await self.vmm.ListVMStats(request, timeout=interval + 5)
            except grpc.aio.AioRpcError as exc:
                log.debug("ListVMStats failed: %s", exc.details())
            else:
                self.collector.update_vms(resp.stats, len(resp.stats))
                self._check_stats(resp.stats)
        if self.pools is not None:
            try:
                presp = await self.pools.GetPoolStatus(
                    pool_manager_pb2.GetPoolStatusRequest(), timeout=interval + 5
                )
            except grpc.aio.AioRpcError as exc:
                log.debug("GetPoolStatus failed: %s", exc.details())
            else:
                self.collector.update_pools(presp.pools)

    def _check_stats(self, stats: Sequence[vm_manager_pb2.VMStats]) -> None:
        now = time.monotonic()
        alive = set()
        for s in stats:
            alive.add(s.name)
            cpu = s.cpu_time.ToNanoseconds() / 1e9
            fraction = None
            prev = self._cpu_prev.get(s.name)
            if prev is not None and now > prev[0] and s.vcpus:
                fraction = max(0.0, (cpu - prev[1]) / ((now - prev[0]) * s.vcpus))
            self._cpu_prev[s.name] = (now, cpu)
            processes = s.guest.process_count if s.HasField("guest") else None
            disk = None
            if s.HasField("guest") and s.guest.disk_total_bytes:
                disk = 1.0 - s.guest.disk_free_bytes / s.guest.disk_total_bytes
            sandbox = s.labels.get("agent-vm/sandbox", "") or self._sandbox_of.get(s.name, "")
            self._handle(
                self.detector.on_vm_stats(
                    s.name,
                    sandbox,
                    now,
                    cpu_fraction=fraction,
                    processes=processes,
                    disk_used_fraction=disk,
                )
            )
        for name in set(self._cpu_prev) - alive:
            self._cpu_prev.pop(name, None)

    # -- detections and responses ----------------------------------------------------------
    def _handle(self, detections: Sequence[Detection]) -> None:
        for d in detections:
            action = str(d.action)
            m.ANOMALIES.labels(d.rule, action).inc()
            self.emit(
                "anomaly.detected",
                vm=d.vm,
                sandbox=d.sandbox,
                severity=d.severity,
                rule=d.rule,
                value=d.value,
                threshold=d.threshold,
                description=d.description,
                action=action,
            )
            if d.action is Action.ALERT or not d.vm:
                self._alert(d, action, "alerted")
                continue
            if d.vm in self._responding:
                continue
            self._responding.add(d.vm)
            self._spawn(self._respond(d))

    async def _respond(self, d: Detection) -> None:
        action = str(d.action)
        evidence = ""
        result = "done"
        try:
            if not d.vm.startswith(self.settings.vm_prefix):
                result = f"refused: {d.vm} is not a VM of this installation"
                return
            if self.vmm is None:
                result = "refused: monitor has no vm-manager to act through"
                return
            reason = f"anomaly {d.rule}: {d.description} (monitor response {action})"
            if d.action is Action.SNAPSHOT_AND_KILL:
                try:
                    resp = await self.vmm.CaptureEvidence(
                        vm_manager_pb2.CaptureEvidenceRequest(
                            name=d.vm, reason=reason, include_memory=True
                        ),
                        timeout=600,
                    )
                    evidence = resp.path
                except grpc.aio.AioRpcError as exc:
                    # Killing matters more than the evidence: go on.
                    result = f"evidence failed ({exc.code().name}: {exc.details()}); killed"
            try:
                await self.vmm.DestroyVM(
                    vm_manager_pb2.DestroyVMRequest(name=d.vm, reason=reason), timeout=120
                )
            except grpc.aio.AioRpcError as exc:
                result = f"kill failed: {exc.code().name}: {exc.details()}"
        finally:
            self._responding.discard(d.vm)
            self.emit(
                "anomaly.response",
                vm=d.vm,
                sandbox=d.sandbox,
                severity="critical" if result.startswith(("done", "evidence")) else "warning",
                rule=d.rule,
                action=action,
                result=result,
                evidence_path=evidence,
            )
            self._alert(d, action, result)
            log.warning(
                "anomaly %s on %s: %s -> %s",
                d.rule,
                d.vm,
                d.description,
                result,
                extra={"vm": d.vm, "rule": d.rule, "action": action, "evidence": evidence},
            )

    def _alert(self, d: Detection, action: str, result: str) -> None:
        alert = monitor_pb2.Alert(
            id="al-" + secrets.token_hex(6),
            rule=d.rule,
            severity=SEVERITIES.get(d.severity, monitor_pb2.SEVERITY_WARNING),
            vm_name=d.vm,
            sandbox_id=d.sandbox,
            description=f"{d.description} ({result})",
            response=action,
        )
        alert.time.FromNanoseconds(time.time_ns())
        for queue in self._alert_subs:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(alert)

    async def alerts(self) -> AsyncIterator[monitor_pb2.Alert]:
        queue: asyncio.Queue[monitor_pb2.Alert] = asyncio.Queue(1000)
        self._alert_subs.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._alert_subs.remove(queue)


def audit_from_settings(settings: Settings) -> AuditLog:
    return AuditLog(
        Path(settings.audit_dir),
        max_bytes=settings.audit_max_bytes,
        max_age_s=settings.audit_max_age_s,
        syslog=settings.audit_syslog,
    )
