"""MonitorService: the gRPC face of Monitor."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentvm.common import tls
from agentvm.common.errors import InvalidArgument, PermissionDenied
from agentvm.common.grpc_util import grpc_errors, grpc_stream_errors
from agentvm.monitor.monitor import MAX_BATCH, Monitor
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
ID_MAX = 200


def reporter_of(context: Ctx) -> str:
    """The reporting service: its certificate's name under mutual TLS (verified), else
    as its user-agent names it ("agent-vm-executor" -> "executor")."""
    identity = tls.peer_identity(context)
    if identity:
        return identity.removeprefix("agent-vm-")[:40]
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent" and isinstance(value, str):
            first = value.split(" ", 1)[0]
            if first.startswith("agent-vm-"):
                return first.removeprefix("agent-vm-")[:40]
    return "unknown"


def _check_reporter(request: monitor_pb2.ReportEventsRequest, context: Ctx) -> None:
    """Under mutual TLS a service reports events as itself only, and callers that are
    not services (the client certificate) report none: the audit log's ``service``
    is then the certificate's, not a claim."""
    identity = tls.peer_identity(context)
    if not identity:
        if tls.peer_uses_tls(context):
            raise PermissionDenied(
                "the caller's certificate has no common name: a service that reports "
                "events needs one named agent-vm-<service> (e.g. agent-vm-executor)"
            )
        return
    service = identity.removeprefix("agent-vm-")
    if service not in tls.SERVICES:
        raise PermissionDenied(
            f"{identity} may not report events: only agent-vm services do (with their "
            "own certificates)"
        )
    for i, ev in enumerate(request.events):
        if ev.service != service:
            raise PermissionDenied(
                f"events[{i}].service is {ev.service!r} but the caller's certificate is "
                f"{identity}'s: a service reports its own events only"
            )


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    @grpc_errors
    async def ReportEvents(
        self, request: monitor_pb2.ReportEventsRequest, context: Ctx
    ) -> monitor_pb2.ReportEventsResponse:
        if len(request.events) > MAX_BATCH:
            raise InvalidArgument(
                f"{len(request.events)} events in one batch: send at most {MAX_BATCH} per call"
            )
        for i, ev in enumerate(request.events):
            if not ev.id or len(ev.id) > ID_MAX:
                raise InvalidArgument(
                    f"events[{i}].id is empty or longer than {ID_MAX} characters: give every "
                    "event an id unique to the reporting service"
                )
            if not TYPE_RE.match(ev.type):
                raise InvalidArgument(
                    f"events[{i}].type {ev.type!r} is not a dotted lower-case type "
                    "such as 'execution.finished'"
                )
            if not ev.service:
                raise InvalidArgument(f"events[{i}].service is empty: name the reporting service")
        _check_reporter(request, context)
        accepted = await self.monitor.ingest(
            list(request.events), request.dropped, reporter_of(context)
        )
        return monitor_pb2.ReportEventsResponse(accepted=accepted)

    @grpc_stream_errors
    async def WatchAlerts(
        self, request: monitor_pb2.WatchAlertsRequest, context: Ctx
    ) -> AsyncIterator[monitor_pb2.WatchAlertsResponse]:
        async for alert in self.monitor.alerts():
            yield monitor_pb2.WatchAlertsResponse(alert=alert)
