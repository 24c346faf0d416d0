"""What observability and authentication cost: gRPC call latency with and without
agent-vm's server interceptors, token auth, mutual TLS and tracing, and how fast
monitor takes events into the audit log.

    .venv/bin/python -m tests.performance.bench_telemetry --calls 2000 --events 20000

Prints JSON. Everything runs in this process on Unix sockets (no VMs), so the
figures isolate the instrumentation; the baseline is the same call with none.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from agentvm.common import auth, grpc_util, telemetry, tls
from agentvm.common.config import Settings
from agentvm.common.events import EventReporter, make_event
from agentvm.monitor.anomaly import Detector, Responses, Thresholds
from agentvm.monitor.audit import AuditLog
from agentvm.monitor.metrics import StateCollector
from agentvm.monitor.monitor import Monitor
from agentvm.monitor.servicer import MonitorServicer
from agentvm.v1 import monitor_pb2_grpc


class _Discard(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def _echo(request: bytes, context: Any) -> bytes:
    return request


PING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _check(request: Any, context: Any) -> Any:
    """A handler with protobuf messages: what the malformed-request check wraps."""
    return PING


async def _flood(request: Any, context: Any) -> Any:
    """A server stream of ``FLOOD`` messages (what StreamCloser serves via context.write)."""
    for _ in range(FLOOD):
        yield PING


FLOOD = 2000


def _handlers() -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    req = health_pb2.HealthCheckRequest.FromString
    resp = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        "bench.S",
        {
            "Do": grpc.unary_unary_rpc_method_handler(_echo),
            "Check": grpc.unary_unary_rpc_method_handler(
                _check, request_deserializer=req, response_serializer=resp
            ),
            "Flood": grpc.unary_stream_rpc_method_handler(
                _flood, request_deserializer=req, response_serializer=resp
            ),
        },
    )


async def _latency(
    sock: Path,
    interceptors: list[Any],
    calls: int,
    traced: bool,
    token: str = "",
    tls_dir: Path | None = None,
    setups: list[float] | None = None,
    method: str = "Do",
) -> list[float]:
    """Unary call latencies (ms); with ``tls_dir``, over mutual TLS as between services.

    ``setups`` gets the time of a new channel's first call (connection and handshake).
    """
    server = grpc.aio.server(interceptors=interceptors or None)
    server.add_generic_rpc_handlers((_handlers(),))
    if tls_dir is None:
        server.add_insecure_port(f"unix:{sock}")
        grpc_util.use_plaintext()
    else:
        server.add_secure_port(
            f"unix:{sock}", tls.server_credentials(tls.files_in(tls_dir, "monitor"))
        )
        grpc_util._CREDENTIALS[:] = [tls.channel_credentials(tls.files_in(tls_dir, "executor"))]
        grpc_util._TLS_DECIDED[:] = [True]
    await server.start()
    saved = list(grpc_util.CLIENT_INTERCEPTORS)
    if not traced:
        grpc_util.CLIENT_INTERCEPTORS.clear()
    # The token a service's channels send (grpc_util.setup_auth sets it).
    grpc_util._TOKEN[:] = [token] if token else []
    try:
        await _setup_times(sock, setups)
        async with grpc_util.aio_channel(f"unix:{sock}", "monitor") as ch:
            if method == "Flood":  # ms per streamed message, one stream per sample
                stream = ch.unary_stream("/bench.S/Flood", None, None)
                out = []
                for _ in range(max(calls // 100, 5)):
                    t0 = time.perf_counter()
                    n = sum([1 async for _ in stream(b"")])
                    out.append((time.perf_counter() - t0) * 1000 / n)
                return out
            call = ch.unary_unary(f"/bench.S/{method}", None, None)
            for _ in range(50):
                await call(b"")
            out = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await call(b"")
                out.append((time.perf_counter() - t0) * 1000)
            return out
    finally:
        grpc_util.CLIENT_INTERCEPTORS[:] = saved
        grpc_util._TOKEN.clear()
        grpc_util._CREDENTIALS.clear()
        await server.stop(None)


async def _setup_times(sock: Path, out: list[float] | None) -> None:
    """Append to ``out`` the time of 20 new channels' first calls (connect + handshake)."""
    if out is None:
        return
    for _ in range(20):
        t0 = time.perf_counter()
        async with grpc_util.aio_channel(f"unix:{sock}", "monitor") as fresh:
            await fresh.unary_unary("/bench.S/Do", None, None)(b"x")
        out.append((time.perf_counter() - t0) * 1000)


async def _ingest(tmp: Path, events: int) -> dict[str, float]:
    """Events/s from EventReporters through ReportEvents into the fsync'ed audit log."""
    settings = dataclasses.replace(Settings(), audit_dir=tmp / "audit")
    mon = Monitor(
        settings,
        AuditLog(tmp / "audit"),
        Detector(Thresholds(), Responses()),
        None,
        None,
        StateCollector(),
    )
    await mon.start()
    server = grpc.aio.server()
    monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(mon), server)
    server.add_insecure_port(f"unix:{tmp}/mon.sock")
    await server.start()
    reporter = EventReporter("bench", f"unix:{tmp}/mon.sock", capacity=events + 10)
    await reporter.start()
    try:
        t0 = time.perf_counter()
        for i in range(events):
            reporter.emit("execution.finished", vm="agent-vm-bench", outcome="ok", n=i)
        emit_s = time.perf_counter() - t0
        while reporter.pending:
            await asyncio.sleep(0.01)
        total = time.perf_counter() - t0
        single = []
        for i in range(200):
            ev = make_event("bench", f"bench/one/{i}", "api.call", attrs={"i": i})
            t1 = time.perf_counter()
            await mon.ingest([ev], 0, "bench")
            single.append((time.perf_counter() - t1) * 1000)
    finally:
        await reporter.close()
        await server.stop(None)
        await mon.close()
    return {
        "emit_us_per_event": round(emit_s / events * 1e6, 2),
        "events_per_s_to_disk": round(events / total),
        "one_event_batch_ack_ms_p50": round(statistics.median(single), 3),
    }


async def main(calls: int, events: int) -> dict[str, Any]:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    grpc_util.CLIENT_INTERCEPTORS[:] = aio_client_interceptors(tracer_provider=provider)  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # Events are built and queued as in a service (never sent: not started).
        sink = EventReporter("bench", f"unix:{tmp}/nobody.sock", capacity=calls * 4)
        plain_setup: list[float] = []
        tls_setup: list[float] = []
        bare = await _latency(tmp / "a.sock", [], calls, traced=False, setups=plain_setup)
        observed = await _latency(tmp / "b.sock", [telemetry.CallObserver(sink)], calls, False)
        token = "ab" * 32
        authed = await _latency(
            tmp / "d.sock",
            [telemetry.CallObserver(sink), auth.TokenAuth(token, tmp / "token")],
            calls,
            False,
            token=token,
        )
        tls.ensure(tmp / "tls")
        mutual = await _latency(
            tmp / "e.sock",
            [telemetry.CallObserver(sink), auth.TokenAuth(token, tmp / "token")],
            calls,
            False,
            token=token,
            tls_dir=tmp / "tls",
            setups=tls_setup,
        )
        traced = await _latency(
            tmp / "c.sock", list(telemetry.server_interceptors(sink, provider)), calls, True
        )
        # The whole chain a service installs minus tracing (stream closing,
        # accounting, token, malformed-request check), on a protobuf method.
        checked = await _latency(tmp / "f.sock", [], calls, False, method="Check")
        chain = list(
            telemetry.server_interceptors(sink, None, auth.TokenAuth(token, tmp / "token"))
        )
        chained = await _latency(tmp / "g.sock", chain, calls, False, token=token, method="Check")
        flood_bare = await _latency(tmp / "h.sock", [], calls, False, method="Flood")
        flood_chain = await _latency(
            tmp / "i.sock", chain, calls, False, token=token, method="Flood"
        )
        ingest = await _ingest(tmp, events)
    provider.shutdown()
    base = statistics.median(bare)

    def fig(xs: list[float]) -> dict[str, float]:
        return {
            "n": len(xs),
            "p50": round(statistics.median(xs), 4),
            "p99": round(_pct(xs, 99), 4),
            "p50_over_bare": round(statistics.median(xs) / base, 3),
        }

    return {
        "unary_call_ms_bare": fig(bare),
        "unary_call_ms_call_observer": fig(observed),
        "unary_call_ms_observer_and_token_auth": fig(authed),
        "unary_call_ms_observer_token_and_mutual_tls": fig(mutual),
        "new_channel_first_call_ms": {
            "plaintext_p50": round(statistics.median(plain_setup), 3),
            "mutual_tls_p50": round(statistics.median(tls_setup), 3),
        },
        "unary_call_ms_observer_and_tracing": fig(traced),
        "protobuf_unary_ms_bare": fig(checked),
        "protobuf_unary_ms_service_chain": fig(chained),
        "protobuf_unary_chain_over_its_bare": round(
            statistics.median(chained) / statistics.median(checked), 3
        ),
        "stream_ms_per_message_bare": fig(flood_bare),
        "stream_ms_per_message_service_chain": fig(flood_chain),
        "stream_chain_over_its_bare": round(
            statistics.median(flood_chain) / statistics.median(flood_bare), 3
        ),
        "monitor_ingest": ingest,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--events", type=int, default=20000)
    ns = parser.parse_args()
    print(json.dumps(asyncio.run(main(ns.calls, ns.events)), indent=2))
