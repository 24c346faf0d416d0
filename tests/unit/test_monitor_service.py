"""Monitor plumbing without VMs: the event reporter against a real gRPC monitor, the
call observer, the monitor's ingest/metrics/detection/response logic with fake stubs."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from agentvm.common import telemetry, tls, tls_issue
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.common.events import EventReporter, make_event
from agentvm.common.grpc_util import aio_channel
from agentvm.monitor.anomaly import Detector, Responses, Thresholds
from agentvm.monitor.audit import AuditLog, recent_event_ids, verify
from agentvm.monitor.metrics import StateCollector
from agentvm.monitor.monitor import Monitor
from agentvm.monitor.servicer import MonitorServicer
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc, vm_manager_pb2
from tests.unit.helpers import async_wait_until, run_async


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FakeVMM:
    """The vm-manager calls monitor makes when it responds (recorded, not carried out)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def DestroyVM(self, req: vm_manager_pb2.DestroyVMRequest, timeout: float) -> Any:
        self.calls.append(("DestroyVM", req.name, req.reason))
        return vm_manager_pb2.DestroyVMResponse()

    async def CaptureEvidence(
        self, req: vm_manager_pb2.CaptureEvidenceRequest, timeout: float
    ) -> Any:
        self.calls.append(("CaptureEvidence", req.name, req.reason))
        return vm_manager_pb2.CaptureEvidenceResponse(path="/evidence/x")


def new_monitor(tmp_path: Path, vmm: Any = None, responses: str = "") -> Monitor:
    settings = dataclasses.replace(
        Settings(), audit_dir=tmp_path / "audit", vm_prefix="agent-vm-t-"
    )
    detector = Detector(Thresholds.parse("max_processes=50"), Responses.parse(responses))
    return Monitor(settings, AuditLog(tmp_path / "audit"), detector, vmm, None, StateCollector())


def event(i: int, type_: str, vm: str = "agent-vm-t-1", **attrs: Any) -> monitor_pb2.Event:
    return make_event("executor", f"executor/test/{i}", type_, vm=vm, attrs=attrs)


def test_ingest_writes_a_verifiable_log_counts_metrics_and_drops_duplicates(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        mon = new_monitor(tmp_path)
        await mon.start()
        ok_before = metric("agentvm_executions_total", outcome="ok")
        lost_before = metric("agentvm_monitor_events_lost_total", service="executor")
        batch = [
            event(1, "execution.finished", outcome="ok", duration_s=0.5, cpu_s=0.1),
            event(2, "vm.ready", boot_s=1.5, restored=True),
            event(3, "api.call", code="NOT_FOUND", method="x/GetVM"),
        ]
        assert await mon.ingest(batch, dropped=4, reporter="executor") == 3
        # A retried batch is not counted twice.
        assert await mon.ingest(batch, dropped=0, reporter="executor") == 0
        assert metric("agentvm_executions_total", outcome="ok") == ok_before + 1
        assert metric("agentvm_monitor_events_lost_total", service="executor") == lost_before + 4
        assert metric("agentvm_grpc_errors_total", service="executor", code="NOT_FOUND") >= 1
        # Made-up services and types do not become series of their own.
        other_before = metric("agentvm_monitor_events_total", service="other", type="other")
        odd = make_event("evil-1", "evil/1", "made.up")
        assert await mon.ingest([odd], dropped=0, reporter="evil") == 1
        assert metric("agentvm_monitor_events_total", service="other", type="other") == (
            other_before + 1
        )
        assert metric("agentvm_monitor_events_total", service="evil-1", type="made.up") == 0
        await mon.close()
        result = verify([tmp_path / "audit" / "audit.log"])
        assert result.ok, result.problems
        assert result.records == 6  # audit.started, events_lost, four events

    run_async(main())


def test_boot_durations_are_observed_by_the_kind_vm_manager_reports(tmp_path: Path) -> None:
    def count(kind: str) -> float:
        return metric("agentvm_vm_boot_duration_seconds_count", kind=kind)

    async def main() -> None:
        mon = new_monitor(tmp_path)
        await mon.start()
        kinds = ("cold", "restore", "snapshot", "resume", "other")
        before = {k: count(k) for k in kinds}
        batch = [
            event(1, "vm.ready", boot_s=7.0, kind="cold", restored=False),
            event(2, "vm.ready", boot_s=0.9, kind="restore", restored=True),
            event(3, "vm.ready", boot_s=1.2, kind="snapshot", restored=False),
            event(7, "vm.ready", boot_s=0.8, kind="resume", restored=False),
            # An older vm-manager says only whether the VM was restored.
            event(4, "vm.ready", boot_s=1.1, restored=True),
            # An adopted VM's boot was not timed: nothing to observe.
            event(5, "vm.ready", kind="adopted", restored=False),
            # A made-up kind does not become a series of its own.
            event(6, "vm.ready", boot_s=2.0, kind="made-up"),
        ]
        assert await mon.ingest(batch, dropped=0, reporter="executor") == len(batch)
        await mon.close()
        assert {k: count(k) - before[k] for k in kinds} == {
            "cold": 1,
            "restore": 2,
            "snapshot": 1,
            "resume": 1,
            "other": 1,
        }
        assert metric("agentvm_vm_boot_duration_seconds_count", kind="made-up") == 0

    run_async(main())


def test_a_batch_written_before_a_crash_is_not_logged_again_after_the_restart(
    tmp_path: Path,
) -> None:
    """monitor died after writing a batch but before acknowledging it: the reporter
    sends it again to the next monitor, which knows its ids from the log's tail."""

    async def main() -> None:
        first = new_monitor(tmp_path)
        await first.start()
        batch = [event(i, "vm.ready") for i in range(10, 20)]
        assert await first.ingest(batch, dropped=0, reporter="executor") == 10
        # No close(): the process is gone (the records are on disk, fsync'ed).
        first.audit.close()
        second = new_monitor(tmp_path)
        await second.start()
        assert await second.ingest(batch, dropped=0, reporter="executor") == 0
        assert await second.ingest([event(20, "vm.ready")], 0, "executor") == 1
        await second.close()
        await first.close()

    run_async(main())
    ids = recent_event_ids(tmp_path / "audit")
    assert [i for i in ids if i.startswith("executor/")] == [
        f"executor/test/{i}" for i in range(10, 21)
    ]


def test_a_reporter_gone_mid_write_does_not_get_its_batch_logged_twice(
    tmp_path: Path,
) -> None:
    """The 60-minute soak's duplicate audit record: the executor was SIGKILLed while
    its ReportEvents call waited for the write; the cancelled handler put the batch
    back although its thread wrote it, and the next flush wrote it again."""

    async def main() -> None:
        mon = new_monitor(tmp_path)
        await mon.start()
        append = mon.audit.append
        started = threading.Event()

        def slow_append(records: Sequence[Mapping[str, Any]]) -> int:
            started.set()
            time.sleep(0.3)
            return append(records)

        mon.audit.append = slow_append  # type: ignore[method-assign,assignment]
        call = asyncio.ensure_future(
            mon.ingest([event(30, "sandbox.paused")], dropped=0, reporter="executor")
        )
        while not started.is_set():
            await asyncio.sleep(0.01)
        call.cancel()  # the reporter died: gRPC cancels its handler
        with pytest.raises(asyncio.CancelledError):
            await call
        await mon.close()

    run_async(main())
    ids = recent_event_ids(tmp_path / "audit")
    assert ids.count("executor/test/30") == 1
    result = verify([tmp_path / "audit" / "audit.log"])
    assert result.ok, result.problems


def test_recent_event_ids_span_rotation_and_skip_torn_lines(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    d.mkdir()
    (d / "audit-000000000001.log").write_text(
        "".join(f'{{"event_id": "old/{i}"}}\n' for i in range(3))
    )
    (d / "audit.log").write_text('{"event_id": "new/0"}\nnot json\n{"event_id": "new/1"}\n{"ev')
    assert recent_event_ids(d) == ["old/0", "old/1", "old/2", "new/0", "new/1"]
    # Only the newest bytes count: the first (cut) line of the window is skipped.
    assert recent_event_ids(d, max_bytes=30) == ["new/1"]


def test_process_storm_from_stats_kills_through_vm_manager(tmp_path: Path) -> None:
    async def main() -> None:
        vmm = FakeVMM()
        mon = new_monitor(tmp_path, vmm, "process_storm=snapshot_and_kill")
        await mon.start()
        stats = vm_manager_pb2.VMStats(name="agent-vm-t-1", vcpus=1)
        stats.guest.process_count = 80
        other = vm_manager_pb2.VMStats(name="someone-else", vcpus=1)
        other.guest.process_count = 80
        mon._check_stats([stats, other])
        await async_wait_until(lambda: len(vmm.calls) == 2)
        assert [c[0] for c in vmm.calls] == ["CaptureEvidence", "DestroyVM"]
        assert "process_storm" in vmm.calls[1][2]
        await mon.close()
        lines = (tmp_path / "audit" / "audit.log").read_text()
        assert '"result":"done"' in lines
        assert "not a VM of this installation" in lines

    run_async(main())


def test_servicer_rejects_bad_batches(tmp_path: Path) -> None:
    async def main() -> None:
        mon = new_monitor(tmp_path)
        await mon.start()
        server = grpc.aio.server(interceptors=list(telemetry.server_interceptors(mon, None)))
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(mon), server)
        sock = tmp_path / "m.sock"
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        try:
            async with aio_channel(f"unix:{sock}", "monitor") as ch:
                stub = monitor_pb2_grpc.MonitorServiceStub(ch)
                bad = monitor_pb2.Event(id="x", service="s", type="NoDots")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ReportEvents(monitor_pb2.ReportEventsRequest(events=[bad]))
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "dotted" in (info.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ReportEvents(
                        monitor_pb2.ReportEventsRequest(
                            events=[monitor_pb2.Event(service="s", type="a.b")]
                        )
                    )
        finally:
            await server.stop(None)
            await mon.close()

    run_async(main())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        self.events.append((type_, attrs))


def test_call_observer_counts_calls_and_reports_mutations_and_failures(tmp_path: Path) -> None:
    async def do(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        if request == b"fail":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no")
        return request

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield request
        yield request

    async def main() -> None:
        rec = Recorder()
        server = grpc.aio.server(interceptors=[telemetry.CallObserver(rec)])
        handler = grpc.method_handlers_generic_handler(
            "t.S",
            {
                "Do": grpc.unary_unary_rpc_method_handler(do),
                "GetThing": grpc.unary_unary_rpc_method_handler(do),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        sock = tmp_path / "s.sock"
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        before = metric("agentvm_grpc_server_handled_total", method="t.S/Do", code="OK")
        try:
            async with aio_channel(f"unix:{sock}", "monitor") as ch:
                assert await ch.unary_unary("/t.S/Do", None, None)(b"x") == b"x"
                assert await ch.unary_unary("/t.S/GetThing", None, None)(b"x") == b"x"
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/t.S/GetThing", None, None)(b"fail")
                assert [m async for m in ch.unary_stream("/t.S/Stream", None, None)(b"y")] == [
                    b"y",
                    b"y",
                ]
        finally:
            await server.stop(None)
        assert metric("agentvm_grpc_server_handled_total", method="t.S/Do", code="OK") == before + 1
        codes = [(a["method"], a["code"]) for t, a in rec.events if t == "api.call"]
        # The successful read (GetThing OK) is counted but not reported.
        assert codes == [
            ("t.S/Do", "OK"),
            ("t.S/GetThing", "FAILED_PRECONDITION"),
            ("t.S/Stream", "OK"),
        ]

    run_async(main())


def test_reporter_buffers_while_monitor_is_away_and_reports_what_it_dropped(
    tmp_path: Path,
) -> None:
    class Sink(monitor_pb2_grpc.MonitorServiceServicer):
        def __init__(self) -> None:
            self.ids: list[str] = []
            self.dropped = 0

        async def ReportEvents(self, request: Any, context: Any) -> Any:
            self.ids.extend(e.id for e in request.events)
            self.dropped += request.dropped
            return monitor_pb2.ReportEventsResponse(accepted=len(request.events))

        async def WatchAlerts(
            self, request: Any, context: Any
        ) -> AsyncIterator[monitor_pb2.WatchAlertsResponse]:
            return
            yield

    async def main() -> None:
        sock = tmp_path / "mon.sock"
        rep = EventReporter("executor", f"unix:{sock}", capacity=5, batch=2, interval=0.05)
        await rep.start()
        for i in range(8):
            rep.emit("test.event", n=i)
        assert not await rep.flush(timeout=0.5)  # nobody listens yet
        assert rep.pending == 5
        assert rep.dropped_total == 3
        sink = Sink()
        server = grpc.aio.server()
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(sink, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        try:
            await async_wait_until(lambda: len(sink.ids) == 5, timeout=15)
            assert sink.dropped == 3
            assert rep.pending == 0
            # Oldest dropped first: the last five arrive, in order.
            assert [int(i.rsplit("/", 1)[1]) for i in sink.ids] == [3, 4, 5, 6, 7]
        finally:
            await rep.close()
            await server.stop(None)

    run_async(main())


def test_tracing_and_metrics_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(InvalidArgument, match="OTEL_TRACES_EXPORTER"):
        telemetry.setup_tracing("executor")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.setup_tracing("executor") is None
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        telemetry.start_metrics("nonsense", "executor")
    telemetry.start_metrics("", "executor")()
    stop = telemetry.start_metrics("127.0.0.1:0", "executor")
    stop()


def test_events_carry_json_safe_attributes() -> None:
    ev = make_event(
        "x", "x/1", "a.b", attrs={"n": 3, "f": float("nan"), "o": object(), "l": [1, "a"]}
    )
    got = dict(ev.attributes)
    assert got["n"] == 3
    assert got["f"] == "nan"
    assert isinstance(got["o"], str)
    assert asyncio.iscoroutinefunction(Monitor.flush)


def _cn_less_pair(tls_dir: Path, out: Path) -> tls.TLSFiles:
    """A certificate of the installation's CA with no common name (SAN only), as an
    operator's own PKI may issue."""
    ca_cert, ca_key = tls_issue._load_ca(tls_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "elsewhere")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("executor.agent-vm")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "nocn.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "nocn.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls.TLSFiles(tls_dir / "ca.pem", out / "nocn.pem", out / "nocn.key")


def test_under_mutual_tls_only_services_report_events_and_only_as_themselves(
    tmp_path: Path,
) -> None:
    d = tmp_path / "tls"
    tls.ensure(d)
    callers = {
        "executor": tls.files_in(d, "executor"),
        "client": tls.files_in(d, "client"),
        "no common name": _cn_less_pair(d, tmp_path),
    }
    sock = f"unix:{tmp_path}/m.sock"
    got: dict[str, str] = {}

    async def main() -> None:
        mon = new_monitor(tmp_path)
        await mon.start()
        server = grpc.aio.server()
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(mon), server)
        server.add_secure_port(sock, tls.server_credentials(tls.files_in(d, "monitor")))
        await server.start()
        try:
            for who, files in callers.items():
                for service in ("executor", "vm-manager"):
                    ev = make_event(service, f"{service}/{who}/1", "vm.ready")
                    async with grpc.aio.secure_channel(
                        sock, tls.channel_credentials(files), tls.target_options("monitor")
                    ) as ch:
                        try:
                            resp = await monitor_pb2_grpc.MonitorServiceStub(ch).ReportEvents(
                                monitor_pb2.ReportEventsRequest(events=[ev]), timeout=10
                            )
                            got[f"{who} as {service}"] = f"accepted {resp.accepted}"
                        except grpc.aio.AioRpcError as exc:
                            got[f"{who} as {service}"] = f"{exc.code().name}: {exc.details()}"
        finally:
            await server.stop(None)
            await mon.close()

    run_async(main())
    assert got.pop("executor as executor") == "accepted 1"
    assert "reports its own events only" in got.pop("executor as vm-manager")
    for key, outcome in got.items():
        assert outcome.startswith("PERMISSION_DENIED"), (key, outcome)
    assert "only agent-vm services" in got["client as executor"]
    assert "no common name" in got["no common name as executor"]
