"""The monitor on real VMs: metrics after real runs, one trace across every service,
the audit log verified (and caught when tampered with), misbehaving runs stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

import agent_vm
from agentvm.common.events import make_event
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc
from tests.networld import NAMES
from tests.otelcollector import Collector
from tests.vmharness import (
    REPO,
    ExecutorProcess,
    MonitorProcess,
    PoolManagerProcess,
    VMManagerProcess,
    wait_for,
)

pytestmark = pytest.mark.vm

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a local test URL
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def audit_records(monitor: MonitorProcess) -> list[dict[str, Any]]:
    files = [*sorted(monitor.audit_dir.glob("audit-*.log")), monitor.audit_dir / "audit.log"]
    out: list[dict[str, Any]] = []
    for f in files:
        if f.exists():
            out.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    return out


def wait_records(
    monitor: MonitorProcess, pred: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [r for r in audit_records(monitor) if pred(r)]
        return bool(found)

    assert wait_for(check, timeout), "no such audit record appeared"
    return found


def test_metrics_show_real_runs(
    executor: ExecutorProcess, vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    url = monitor_proc.metrics_url
    before = scrape(url)
    ok = agent_vm.run("true", network="isolated")
    assert ok.exit_code == 0
    ok2 = agent_vm.run(code="print(sum(range(10**6)))", network="isolated")
    assert ok2.stdout.strip() == "499999500000"
    bad = agent_vm.run("exit 3", network="isolated")
    assert bad.exit_code == 3

    def delta(name: str, **labels: str) -> float:
        return value(scrape(url), name, **labels) - value(before, name, **labels)

    assert wait_for(
        lambda: (
            delta("agentvm_executions_total", outcome="ok") == 2
            and delta("agentvm_executions_total", outcome="nonzero_exit") == 1
            # vm-manager reports the boots on its own beat.
            and delta("agentvm_vm_boot_duration_seconds_count") >= 3
        ),
        30,
    ), scrape(url)
    after = scrape(url)
    assert (
        value(after, "agentvm_vm_boot_duration_seconds_count")
        - value(before, "agentvm_vm_boot_duration_seconds_count")
        >= 3
    )
    assert (
        value(after, "agentvm_execution_duration_seconds_count")
        - value(before, "agentvm_execution_duration_seconds_count")
        == 3
    )
    assert value(after, "agentvm_audit_records_total") > value(
        before, "agentvm_audit_records_total"
    )
    assert (
        value(after, "agentvm_monitor_events_total", service="executor", type="execution.finished")
        >= 3
    )

    # What the guest's cgroup counted reached the audit log with the execution.
    finished = wait_records(
        monitor_proc,
        lambda r: r["type"] == "execution.finished" and r["vm"] == ok2.vm_name,
    )
    attrs = finished[0]["attributes"]
    assert attrs["outcome"] == "ok"
    assert attrs["cpu_s"] > 0
    assert attrs["memory_peak_bytes"] > 1 << 20
    assert attrs["pids_peak"] >= 1
    assert attrs["output_bytes"] == len("499999500000\n")

    # Per-VM figures from libvirt and the guest, while a VM lives; gone after.
    with agent_vm.Sandbox.create(network="isolated") as sb:
        sb.run("true")
        name = sb.vm_name
        assert wait_for(
            lambda: (
                value(scrape(url), "agentvm_vm_processes", vm=name) > 0
                and value(scrape(url), "agentvm_vm_cpu_seconds_total", vm=name) > 0
                and value(scrape(url), "agentvm_vm_memory_bytes", vm=name, kind="rss") > 0
            ),
            20,
        ), scrape(url)
    assert wait_for(lambda: value(scrape(url), "agentvm_vm_processes", vm=name) == 0, 20)

    # Every service serves its own process metrics and call counts.
    for proc, method in (
        (vmm, "agentvm.v1.VMManagerService/CreateVM"),
        (executor, "agentvm.v1.ExecutorService/Run"),
        (monitor_proc, "agentvm.v1.MonitorService/ReportEvents"),
    ):
        own = scrape(proc.metrics_url)
        assert value(own, "process_resident_memory_bytes") > 0, (
            proc.name if hasattr(proc, "name") else "vm-manager"
        )
        assert value(own, "agentvm_grpc_server_handled_total", method=method, code="OK") >= 1


@pytest.fixture(scope="module")
def traced_pool(
    vmm: VMManagerProcess, otel: tuple[Collector, dict[str, str]]
) -> Iterator[tuple[PoolManagerProcess, ExecutorProcess]]:
    """A pool-manager and an executor that takes its VMs from it, both traced."""
    pool = PoolManagerProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        pools="standard:min=1,max=2,ttl=600,network=nat-filtered",
        extra_env=dict(otel[1]),
    )
    pool.start()
    ex = ExecutorProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="executor-pooled",
        pool=pool.address,
        extra_env=dict(otel[1]),
    )
    try:
        ex.start()
        try:
            yield pool, ex
        finally:
            ex.stop()
    finally:
        pool.stop()


def test_one_run_is_one_trace_across_every_service(
    traced_pool: tuple[PoolManagerProcess, ExecutorProcess],
    otel: tuple[Collector, dict[str, str]],
    monitor_proc: MonitorProcess,
) -> None:
    pool, ex = traced_pool
    collector, env = otel
    pool.wait_status(lambda st: st.ready >= 1, timeout=300)
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=env["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    )
    trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("agent task") as root:
        result = agent_vm.run("echo $TRACEPARENT", address=ex.address, timeout=120)
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert result.exit_code == 0
    # The guest process got the caller's trace context.
    assert f"00-{trace_id}-" in result.stdout

    need = {
        ("test-client", "agent task"),
        ("agent-vm-executor", "agentvm.v1.ExecutorService/Run"),
        ("agent-vm-executor", "agentvm.v1.GuestAgentService/Execute"),
        ("agent-vm-pool-manager", "agentvm.v1.PoolManagerService/AcquireVM"),
        ("agent-vm-pool-manager", "agentvm.v1.PoolManagerService/ReleaseVM"),
        ("agent-vm-vm-manager", "agentvm.v1.VMManagerService/UpdateNetworkPolicy"),
    }

    def names() -> set[tuple[str, str]]:
        return {(s.service, s.name.lstrip("/")) for s in collector.spans(trace_id)}

    def pool_calls_vmm() -> bool:
        # pool-manager's own call to vm-manager (the release destroys the VM).
        spans = collector.spans(trace_id)
        ids = {s.span_id: s for s in spans}
        return any(
            s.service == "agent-vm-vm-manager"
            and s.parent_id in ids
            and ids[s.parent_id].service == "agent-vm-pool-manager"
            for s in spans
        )

    assert wait_for(lambda: need <= names() and pool_calls_vmm(), 60), "\n".join(
        map(str, sorted(names()))
    )
    # The audit records of the run lead back to the trace.
    wait_records(
        monitor_proc, lambda r: r["trace_id"] == trace_id and r["type"] == "execution.finished"
    )


def test_fork_storm_is_detected_and_killed(
    executor: ExecutorProcess, vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    # An operator watching alerts (`agent-vm alerts --json`) sees it happen.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "agentvm.cli.main", "alerts", "--json"],
        env=monitor_proc.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    time.sleep(2)  # subscribed before the storm starts
    started = time.monotonic()
    with pytest.raises(agent_vm.AgentVMError) as info:
        agent_vm.run(
            "for i in $(seq 300); do sleep 600 & done; wait",
            language="shell",
            network="isolated",
            timeout=600,
        )
    elapsed = time.monotonic() - started
    assert elapsed < 240, f"the storm ran {elapsed:.0f} s before anything stopped it"
    assert "process_storm" in str(info.value), str(info.value)
    detected = wait_records(
        monitor_proc,
        lambda r: r["type"] == "anomaly.detected" and r["attributes"]["rule"] == "process_storm",
    )
    vm = detected[-1]["vm"]
    response = wait_records(
        monitor_proc, lambda r: r["type"] == "anomaly.response" and r["vm"] == vm
    )[-1]
    assert response["attributes"]["action"] == "kill"
    assert response["attributes"]["result"] == "done"
    destroyed = wait_records(monitor_proc, lambda r: r["type"] == "vm.destroyed" and r["vm"] == vm)
    assert "process_storm" in destroyed[0]["attributes"]["reason"]
    samples = scrape(monitor_proc.metrics_url)
    assert value(samples, "agentvm_anomalies_total", rule="process_storm", action="kill") >= 1
    watcher.terminate()
    out, _ = watcher.communicate(timeout=30)
    alerts = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(
        a["rule"] == "process_storm" and a["vm_name"] == vm and a["response"] == "kill"
        for a in alerts
    ), out


def test_egress_scan_is_snapshotted_then_killed(
    executor: ExecutorProcess, vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    target = NAMES["other.test"]
    scan = (
        "import socket\n"
        "for port in range(1000, 1400):\n"
        "    s = socket.socket(); s.setblocking(False)\n"
        f"    s.connect_ex(('{target}', port)); s.close()\n"
        "import time; time.sleep(600)\n"
    )
    with pytest.raises(agent_vm.AgentVMError) as info:
        agent_vm.run(code=scan, timeout=600)
    assert "egress_denied" in str(info.value), str(info.value)
    response = wait_records(
        monitor_proc,
        lambda r: r["type"] == "anomaly.response" and r["attributes"]["rule"] == "egress_denied",
        timeout=120,
    )[-1]
    attrs = response["attributes"]
    assert attrs["action"] == "snapshot_and_kill"
    assert attrs["result"] == "done", attrs
    evidence = Path(attrs["evidence_path"])
    try:
        assert evidence.parent == vmm.state_dir / "evidence"
        assert (evidence / "memory.elf").stat().st_size > 64 << 20
        assert (evidence / "overlay.qcow2").stat().st_size > 0
        assert "<domain" in (evidence / "domain.xml").read_text()
        meta = json.loads((evidence / "metadata.json").read_text())
        assert "egress_denied" in meta["reason"]
        denied = [
            json.loads(line)
            for line in (evidence / "egress.jsonl").read_text().splitlines()
            if json.loads(line)["verdict"] == "denied"
        ]
        assert len(denied) > 60
        assert {d["address"] for d in denied} == {target}
    finally:
        shutil.rmtree(evidence, ignore_errors=True)
    samples = scrape(monitor_proc.metrics_url)
    assert value(samples, "agentvm_egress_total", verdict="denied", kind="connect") > 60
    assert value(samples, "agentvm_anomalies_total", rule="egress_denied") >= 1
    denied_records = [
        r
        for r in audit_records(monitor_proc)
        if r["type"] == "network.denied" and r["vm"] == response["vm"]
    ]
    assert len(denied_records) > 60


def _verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "audit", "verify", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_audit_log_of_the_session_verifies_and_tampering_is_caught(
    monitor_proc: MonitorProcess, executor: ExecutorProcess, tmp_path: Path
) -> None:
    agent_vm.run("true", network="isolated")
    wait_records(monitor_proc, lambda r: r["type"] == "execution.finished")
    # The session monitor rotates at a small size: report enough (as a service
    # would) that the chain spans several files whatever ran before.
    stub = monitor_pb2_grpc.MonitorServiceStub(monitor_proc.channel("executor"))
    for batch in range(3):
        events = []
        for i in range(100):
            ev = make_event("executor", f"test/{time.time_ns()}/{batch}/{i}", "test.filler")
            ev.attributes.update({"pad": "x" * 400, "i": i})
            events.append(ev)
        resp = stub.ReportEvents(monitor_pb2.ReportEventsRequest(events=events), timeout=30)
        assert resp.accepted == 100
    assert len(list(monitor_proc.audit_dir.glob("audit-*.log"))) >= 2
    ok = _verify(str(monitor_proc.audit_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout

    copy = tmp_path / "audit"
    # Copy while monitor may still write: take the files, then cut to whole lines.
    shutil.copytree(monitor_proc.audit_dir, copy)
    (copy / "audit.head").unlink()
    live = copy / "audit.log"
    lines = live.read_text().splitlines(keepends=True)
    live.write_text("".join(line for line in lines if line.endswith("\n")))
    assert _verify(str(copy)).returncode == 0

    # Tamper with the fullest file (the live one may have just been rotated).
    target = max(copy.glob("audit*.log"), key=lambda p: len(p.read_text().splitlines()))
    lines = target.read_text().splitlines(keepends=True)
    assert len(lines) >= 5
    record = json.loads(lines[len(lines) // 2])
    record["attributes"]["tampered"] = True
    edited = lines.copy()
    edited[len(lines) // 2] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    target.write_text("".join(edited))
    bad = _verify(str(copy))
    assert bad.returncode == 1, bad.stdout
    assert "TAMPERED" in bad.stdout

    target.write_text("".join(lines[:3] + lines[4:]))
    assert _verify(str(copy)).returncode == 1
    target.write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert _verify(str(copy)).returncode == 1


def test_events_wait_while_monitor_is_down_and_arrive_after(
    executor: ExecutorProcess, monitor_proc: MonitorProcess
) -> None:
    monitor_proc.stop()
    try:
        result = agent_vm.run("echo while-away", network="isolated")
        assert result.exit_code == 0
    finally:
        monitor_proc.start()
    # The executor kept the run's events and delivers them to the new monitor,
    # which continues the same chain.
    finished = wait_records(
        monitor_proc,
        lambda r: r["type"] == "execution.finished" and r["vm"] == result.vm_name,
        timeout=60,
    )
    assert finished[0]["attributes"]["outcome"] == "ok"
    started = [r for r in audit_records(monitor_proc) if r["type"] == "audit.started"]
    assert len(started) >= 2
    ok = _verify(str(monitor_proc.audit_dir))
    assert ok.returncode == 0, ok.stdout + ok.stderr
