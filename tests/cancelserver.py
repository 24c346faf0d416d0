"""A standalone gRPC server with every service's real interceptor chain (issue 22, item 1).

Run as ``python -m tests.cancelserver SOCKET``: it serves ``test.Flood`` on
``unix:SOCKET`` behind the tracing interceptor (a real tracer provider), the
CallObserver and the token check, with handlers wrapped the way servicers are
(:func:`grpc_util.grpc_stream_errors` / :func:`grpc_util.grpc_errors`).
A caller that cancels a fast server stream, or lets its deadline pass, used to
crash such a process with SIGSEGV; the test runs it as a child so a crash is
seen as the child's death, not the test runner's.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from agentvm.common import auth, grpc_util, telemetry

TOKEN = "cancel-test-token"
SERVICE = "test.Flood"


class _Sink:
    """Keeps the api.call events, so the server does what a service does with them."""

    def __init__(self) -> None:
        self.count = 0

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        self.count += 1


class Flood:
    @grpc_util.grpc_stream_errors
    async def Stream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """Answers as fast as the caller reads, forever."""
        ping = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        while True:
            yield ping

    @grpc_util.grpc_stream_errors
    async def Slow(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """One answer, then waits: a cancel arrives while it awaits."""
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        await asyncio.sleep(3600)

    @grpc_util.grpc_errors
    async def Unary(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(0.01)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _handlers(flood: Flood) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    req = health_pb2.HealthCheckRequest.FromString
    resp = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Stream": grpc.unary_stream_rpc_method_handler(
                flood.Stream, request_deserializer=req, response_serializer=resp
            ),
            "Slow": grpc.unary_stream_rpc_method_handler(
                flood.Slow, request_deserializer=req, response_serializer=resp
            ),
            "Unary": grpc.unary_unary_rpc_method_handler(
                flood.Unary, request_deserializer=req, response_serializer=resp
            ),
        },
    )


async def serve(path: str) -> None:
    provider = TracerProvider()  # spans made and dropped: the interceptor runs for real
    # Exactly what a service installs (ServiceTelemetry.interceptors), tracing on.
    token = auth.TokenAuth(TOKEN, Path("/nonexistent/token"))
    interceptors = telemetry.server_interceptors(_Sink(), provider, token)
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_handlers(Flood()),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
