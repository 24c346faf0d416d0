"""A real OTLP/gRPC trace receiver for tests: services export to it, tests read spans."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it receives (bounded)."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    got.append(
                        Span(
                            service=service,
                            name=sp.name,
                            trace_id=sp.trace_id.hex(),
                            span_id=sp.span_id.hex(),
                            parent_id=sp.parent_span_id.hex(),
                            kind=sp.kind,
                        )
                    )
        with self._lock:
            self._spans.extend(got)
            del self._spans[: max(0, len(self._spans) - self.limit)]
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str = "") -> list[Span]:
        with self._lock:
            return [s for s in self._spans if not trace_id or s.trace_id == trace_id]


@contextmanager
def otlp_collector() -> Iterator[tuple[Collector, str]]:
    """A collector listening on 127.0.0.1; yields it and its endpoint URL."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
