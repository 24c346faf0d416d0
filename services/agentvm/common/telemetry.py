"""Observability every service shares: traces, its own /metrics, gRPC call accounting.

* Traces: opentelemetry-sdk configured from the standard ``OTEL_*`` variables
  (``OTEL_TRACES_EXPORTER`` = otlp | console | none). Server and client
  interceptors of the gRPC instrumentation carry W3C trace context on every
  call. Root spans of periodic plumbing (health checks, monitor's polls, event
  reports) are not sampled, so traces show work, not background noise.
* Metrics: the process's own prometheus-client registry (process and Python
  collectors) on ``AGENTVM_<SERVICE>_METRICS_ADDR``, plus per-method call
  counts and latencies.
* Audit: every mutating call and every failure becomes an ``api.call`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from prometheus_client import Counter, Histogram, start_http_server

from agentvm.common import grpc_util, tls, wire
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.common.events import EventReporter, EventSink
from agentvm_guest.wire import same_kind

log = logging.getLogger("agentvm.telemetry")

TRACE_EXPORTERS = ("otlp", "console", "none")

# Calls that are plumbing, not work: never the root of a trace, never audited.
QUIET_METHODS = frozenset(
    {
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "agentvm.v1.MonitorService/ReportEvents",
        "agentvm.v1.MonitorService/WatchAlerts",
        "agentvm.v1.VMManagerService/ListVMStats",
        "agentvm.v1.VMManagerService/WatchEgress",
        "agentvm.v1.PoolManagerService/GetPoolStatus",
    }
)
# Method-name prefixes of calls that change nothing (counted, not audited).
READ_PREFIXES = ("Get", "List", "Watch", "Wait")

HANDLED = Counter(
    "agentvm_grpc_server_handled",
    "gRPC calls this process served, by method and status code.",
    ["method", "code"],
)
HANDLING = Histogram(
    "agentvm_grpc_server_handling_seconds",
    "Time this process took to serve gRPC calls.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def _method_key(name: str) -> str:
    return name.lstrip("/")


class _QuietRoots(Sampler):
    """Samples every root span except those of plumbing calls."""

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if _method_key(name) in QUIET_METHODS:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "agent-vm: all roots except plumbing calls"


def _exporter(kind: str) -> SpanExporter:
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return ConsoleSpanExporter(out=sys.stderr)


def setup_tracing(service: str) -> TracerProvider | None:
    """Install the global tracer provider and the gRPC client interceptors.

    Returns None when tracing is off (``OTEL_TRACES_EXPORTER`` unset or none).
    """
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if kind not in TRACE_EXPORTERS:
        raise InvalidArgument(
            f"OTEL_TRACES_EXPORTER={kind!r}: agent-vm supports {', '.join(TRACE_EXPORTERS)}"
        )
    if kind == "none":
        return None
    resource = Resource.create({"service.name": f"agent-vm-{service}"})
    provider = TracerProvider(resource=resource, sampler=ParentBased(root=_QuietRoots()))
    provider.add_span_processor(BatchSpanProcessor(_exporter(kind)))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    grpc_util.CLIENT_INTERCEPTORS[:] = aio_client_interceptors(tracer_provider=provider)  # type: ignore[no-untyped-call]
    return provider


def start_metrics(address: str, service: str) -> Callable[[], None]:
    """Serve this process's /metrics on ``HOST:PORT``; returns a stopper. "" = off."""
    if not address:
        return lambda: None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(
            f"metrics address {address!r} of {service}: use HOST:PORT "
            f"(AGENTVM_{service.upper().replace('-', '_')}_METRICS_ADDR; empty disables)"
        )
    try:
        server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    except OSError as exc:
        raise InvalidArgument(
            f"{service} cannot serve /metrics on {address}: {exc.strerror}; set "
            f"AGENTVM_{service.upper().replace('-', '_')}_METRICS_ADDR to a free HOST:PORT "
            "or to empty to disable"
        ) from exc
    log.info("%s metrics on http://%s/metrics", service, address)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


Behavior = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class _CallFacts:
    """Who made a call, read from its context before the handler runs.

    Only the call's status may be read from the context after the handler:
    the rest of it lives in gRPC core's call, which a cancel frees.
    """

    caller: str
    identity: str
    peer: str

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext[Any, Any]) -> _CallFacts:
        metadata = dict(context.invocation_metadata() or ())
        return cls(
            caller=str(metadata.get("user-agent", "")),
            identity=tls.peer_identity(context),
            peer=context.peer(),
        )


class CallObserver(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every served call and reports mutating or failed ones as events."""

    def __init__(self, events: EventSink) -> None:
        self.events = events

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(details)
        if handler is None:
            return handler
        method = _method_key(details.method)
        if handler.unary_unary or handler.stream_unary:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with self._observed(method, context, _CallFacts.of(context)):
                    return await inner(request, context)

            return same_kind(handler, unary, handler.request_deserializer)
        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # Everything the record needs is read from the context now: once a
            # caller cancels (or its deadline passes) the call is freed, and
            # peer()/auth_context()/invocation_metadata() then read freed memory
            # (a SIGSEGV of the whole service, issue 22 item 1).
            facts = _CallFacts.of(context)
            with self._observed(method, context, facts):
                # Closed here, on every exit path: never left to the garbage
                # collector, which would run its finally blocks later, after
                # the call is gone.
                async with wire.closing(wire.forward(inner_stream(request, context))) as items:
                    async for item in items:
                        yield item

        return same_kind(handler, stream, handler.request_deserializer)

    @contextlib.contextmanager
    def _observed(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], facts: _CallFacts
    ) -> Iterator[None]:
        start = time.monotonic()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._record(method, _status(context, error), facts, start)

    def _record(self, method: str, code: grpc.StatusCode, facts: _CallFacts, start: float) -> None:
        elapsed = time.monotonic() - start
        HANDLED.labels(method, code.name).inc()
        HANDLING.labels(method).observe(elapsed)
        if method in QUIET_METHODS:
            return
        name = method.rpartition("/")[2]
        if code is grpc.StatusCode.OK and name.startswith(READ_PREFIXES):
            return
        self.events.emit(
            "api.call",
            severity="info" if code is grpc.StatusCode.OK else "warning",
            method=method,
            caller=facts.caller,
            identity=facts.identity,
            peer=facts.peer,
            code=code.name,
            duration_s=round(elapsed, 6),
        )


def _status(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context that cannot tell means UNKNOWN
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def server_interceptors(
    events: EventSink, provider: TracerProvider | None, auth: Any = None
) -> Sequence[Any]:
    """Interceptors for a service's gRPC server, outermost first.

    Stream closing, tracing, accounting, then the token check (refused calls
    are counted and audited too) and the malformed-request check (innermost:
    it replaces the deserializer every outer layer hands on, and refuses
    before any handler runs; see :mod:`agentvm.common.wire`).
    """
    out: list[Any] = [wire.StreamCloser()]
    if provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        out.append(aio_server_interceptor(tracer_provider=provider))  # type: ignore[no-untyped-call]
    out.append(CallObserver(events))
    if auth is not None:
        out.append(auth)
    out.append(wire.RejectMalformed())
    return out


class ServiceTelemetry:
    """What a service process sets up once: identity, traces, /metrics, event reporter."""

    def __init__(self, service: str, settings: Settings, *, report_events: bool = True) -> None:
        self.service = service
        grpc_util.set_identity(service)
        self.provider = setup_tracing(service)
        self._stop_metrics = start_metrics(settings.metrics_addr(service), service)
        self.auth = grpc_util.setup_auth(settings)
        # The TLS its server requires and its channels present (None: TLS is off).
        self.server_credentials = grpc_util.setup_tls(settings, service)
        self.events = EventReporter(service, settings.monitor_addr if report_events else "")

    def interceptors(self, sink: EventSink | None = None) -> Sequence[Any]:
        return server_interceptors(sink or self.events, self.provider, self.auth)

    async def start(self) -> None:
        await self.events.start()

    async def close(self) -> None:
        await self.events.close()
        self._stop_metrics()
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)
