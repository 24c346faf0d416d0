"""Events for the monitor: a bounded, retrying reporter every service uses.

A service calls :meth:`EventReporter.emit` from its event loop; a background
task sends batches to ``MonitorService.ReportEvents``. While monitor is
unreachable the events wait (at most ``capacity``); beyond that the oldest are
dropped, counted, and the count travels with the next batch so monitor can
show the loss. Nothing here blocks the caller or raises into it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from opentelemetry import trace
from prometheus_client import Counter

from agentvm.common.grpc_util import aio_channel
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc

log = logging.getLogger("agentvm.events")

SEVERITIES = {
    "info": monitor_pb2.SEVERITY_INFO,
    "warning": monitor_pb2.SEVERITY_WARNING,
    "critical": monitor_pb2.SEVERITY_CRITICAL,
}

DROPPED = Counter(
    "agentvm_events_dropped",
    "Events this process could not deliver to monitor (its buffer was full).",
)


class EventSink(Protocol):
    """Where services put events (the reporter, or monitor's own pipeline)."""

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None: ...


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def current_trace_id() -> str:
    """Hex trace id of the current span, "" outside a sampled span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def make_event(
    service: str,
    event_id: str,
    type_: str,
    *,
    vm: str = "",
    sandbox: str = "",
    severity: str = "info",
    attrs: Mapping[str, Any] | None = None,
) -> monitor_pb2.Event:
    """An Event stamped now, with the current trace id."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    attributes = struct_pb2.Struct()
    attributes.update(_jsonable(dict(attrs or {})))
    return monitor_pb2.Event(
        id=event_id,
        time=ts,
        service=service,
        type=type_,
        vm_name=vm,
        sandbox_id=sandbox,
        trace_id=current_trace_id(),
        severity=SEVERITIES.get(severity, monitor_pb2.SEVERITY_INFO),
        attributes=attributes,
    )


class EventFactory:
    """Events of one reporting process, with ids unique to it (``<service>/<uuid>/<n>``)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._ids = itertools.count()
        self._prefix = f"{service}/{uuid.uuid4().hex[:12]}"

    def make(
        self, type_: str, *, vm: str, sandbox: str, severity: str, attrs: Mapping[str, Any]
    ) -> monitor_pb2.Event:
        return make_event(
            self.service,
            f"{self._prefix}/{next(self._ids)}",
            type_,
            vm=vm,
            sandbox=sandbox,
            severity=severity,
            attrs=attrs,
        )


class EventReporter:
    """Buffers events and delivers them to monitor in batches, at least once."""

    def __init__(
        self,
        service: str,
        address: str,
        *,
        capacity: int = 10_000,
        batch: int = 200,
        interval: float = 0.5,
    ) -> None:
        self.service = service
        self.address = address
        self.capacity = capacity
        self.batch = batch
        self.interval = interval
        self._factory = EventFactory(service)
        self._queue: collections.deque[monitor_pb2.Event] = collections.deque()
        # Dropped events monitor has not been told about yet.
        self._unreported_drops = 0
        self.dropped_total = 0
        self.sent_total = 0
        self._wake = asyncio.Event()
        # One batch in flight at a time (the order of events is kept on failure).
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._down_since: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        if not self.enabled:
            return
        event = self._factory.make(type_, vm=vm, sandbox=sandbox, severity=severity, attrs=attrs)
        self._queue.append(event)
        self._trim()
        if len(self._queue) >= self.batch:
            self._wake.set()

    def _trim(self) -> None:
        while len(self._queue) > self.capacity:
            self._queue.popleft()
            self._unreported_drops += 1
            self.dropped_total += 1
            DROPPED.inc()

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._channel = aio_channel(self.address, "monitor")
            self._task = asyncio.create_task(self._run(), name=f"events-{self.service}")

    async def _run(self) -> None:
        backoff = self.interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            backoff = self.interval if await self.flush() else min(5.0, backoff * 2)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Send everything queued; False when monitor could not be reached."""
        if self._channel is None:
            return False
        async with self._flush_lock:
            return await self._flush(self._channel, timeout)

    async def _flush(self, channel: grpc.aio.Channel, timeout: float) -> bool:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        while self._queue or self._unreported_drops:
            n = min(self.batch, len(self._queue))
            events = [self._queue.popleft() for _ in range(n)]
            drops = self._unreported_drops
            try:
                await stub.ReportEvents(
                    monitor_pb2.ReportEventsRequest(events=events, dropped=drops),
                    timeout=timeout,
                )
            except grpc.RpcError as exc:
                self._queue.extendleft(reversed(events))
                self._trim()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "monitor at %s unreachable (%s); buffering events (at most %d)",
                        self.address,
                        exc.code(),
                        self.capacity,
                    )
                return False
            except BaseException:
                # Cancelled mid-send (shutdown): keep the batch for the last flush.
                self._queue.extendleft(reversed(events))
                self._trim()
                raise
            self._unreported_drops -= drops
            self.sent_total += n
            if self._down_since is not None:
                log.info(
                    "monitor reachable again after %.0f s", time.monotonic() - self._down_since
                )
                self._down_since = None
        return True

    async def close(self, timeout: float = 3.0) -> None:
        """Stop the sender after one last attempt to deliver what is queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(timeout), timeout)
            if self._queue:
                log.warning("%d events could not reach monitor before exit", len(self._queue))
            await self._channel.close(grace=None)
            self._channel = None


class NullSink:
    """An EventSink that discards (tests of components without a monitor)."""

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        return None
