"""Every service of the session refuses calls without the installation's token or
without a certificate from the installation's CA (mutual TLS)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvm.common import tls
from agentvm.common.events import make_event
from agentvm.common.grpc_util import Caller
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from tests.integration.test_monitor import audit_records, scrape, value, wait_records
from tests.vmharness import (
    REPO,
    ExecutorProcess,
    MonitorProcess,
    VMManagerProcess,
    libvirt_domains,
)

pytestmark = pytest.mark.vm

WRONG = "f00d" * 16


@pytest.mark.parametrize("token", [None, WRONG])
def test_unauthenticated_calls_do_nothing(
    vmm: VMManagerProcess,
    executor: ExecutorProcess,
    monitor_proc: MonitorProcess,
    token: str | None,
) -> None:
    before = libvirt_domains(vmm.prefix)
    denied_before = value(
        scrape(vmm.metrics_url), "agentvm_grpc_server_handled_total", code="UNAUTHENTICATED"
    )
    calls: list[tuple[VMManagerProcess, Callable[[grpc.Channel], object]]] = [
        (
            vmm,
            lambda ch: vm_manager_pb2_grpc.VMManagerServiceStub(ch).CreateVM(
                vm_manager_pb2.CreateVMRequest(start=True), timeout=30
            ),
        ),
        (
            executor,
            lambda ch: list(
                executor_pb2_grpc.ExecutorServiceStub(ch).Run(
                    executor_pb2.RunRequest(
                        program=common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
                    ),
                    timeout=30,
                )
            ),
        ),
        (
            monitor_proc,
            lambda ch: monitor_pb2_grpc.MonitorServiceStub(ch).ReportEvents(
                monitor_pb2.ReportEventsRequest(), timeout=30
            ),
        ),
    ]
    for proc, call in calls:
        caller = Caller(token, proc.caller().credentials)
        with caller.channel(proc.address, proc.service_name) as ch:
            with pytest.raises(grpc.RpcError) as err:
                call(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, proc.address
            assert "AGENTVM_TOKEN" in (err.value.details() or "")
        # Health checks need no token (probes, `agent-vm status`).
        with caller.bare(proc.address, proc.service_name) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert libvirt_domains(vmm.prefix) == before, "an unauthenticated call made a VM"
    denied = value(
        scrape(vmm.metrics_url), "agentvm_grpc_server_handled_total", code="UNAUTHENTICATED"
    )
    assert denied == denied_before + 1
    # Refused calls are audited, with the method and the code.
    recs = wait_records(
        monitor_proc,
        lambda r: (
            r.get("type") == "api.call"
            and r.get("attributes", {}).get("code") == "UNAUTHENTICATED"
            and r.get("attributes", {}).get("method", "").endswith("CreateVM")
        ),
    )
    assert recs
    # The caller's identity is its certificate's (verified), not a claim.
    assert {r["attributes"].get("identity") for r in recs} == {"agent-vm-client"}
    assert all(WRONG not in str(r) for r in audit_records(monitor_proc))


def test_the_cli_with_a_wrong_token_says_how_to_fix_it(vmm: VMManagerProcess) -> None:
    env = dict(vmm.env, AGENTVM_TOKEN=WRONG)
    proc = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "vm", "list"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "token is wrong" in lines[0]
    assert "AGENTVM_TOKEN" in lines[0]
    # With the installation's token (read from AGENTVM_TOKEN_FILE) it works.
    env.pop("AGENTVM_TOKEN")
    ok = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "vm", "list"],
        env={k: v for k, v in env.items() if k != "AGENTVM_TOKEN"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert os.stat(vmm.token_file).st_mode & 0o777 == 0o600


def _health(channel: grpc.Channel) -> int:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(resp.status)


def test_calls_without_the_installations_certificate_never_reach_a_handler(
    vmm: VMManagerProcess,
    executor: ExecutorProcess,
    monitor_proc: MonitorProcess,
    tmp_path: Path,
) -> None:
    """Plaintext, no client certificate, or one from another CA: the TLS handshake
    fails (UNAVAILABLE) before any handler runs, even with the right token."""
    before = libvirt_domains(vmm.prefix)
    ca = (vmm.tls_dir / "ca.pem").read_bytes()
    other = tmp_path / "other-installation"
    tls.ensure(other, (tls.CLIENT,))
    _, foreign_cert, foreign_key = tls.files_in(other, tls.CLIENT).read()
    attempts = {
        "no certificate": grpc.ssl_channel_credentials(root_certificates=ca),
        "another CA's certificate": grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=foreign_key, certificate_chain=foreign_cert
        ),
    }
    create = vm_manager_pb2.CreateVMRequest(start=True)
    for proc in (vmm, executor, monitor_proc):
        with Caller(vmm.token, None).channel(proc.address, proc.service_name) as ch:
            with pytest.raises(grpc.RpcError) as err:
                vm_manager_pb2_grpc.VMManagerServiceStub(ch).CreateVM(create, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (proc.address, "plaintext")
        for what, credentials in attempts.items():
            with Caller(vmm.token, credentials).channel(proc.address, proc.service_name) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    vm_manager_pb2_grpc.VMManagerServiceStub(ch).CreateVM(create, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (proc.address, what)
        # With the installation's client certificate the same socket answers.
        with proc.caller().bare(proc.address, proc.service_name) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
    assert libvirt_domains(vmm.prefix) == before, "a call without a certificate made a VM"


def test_a_service_socket_cannot_pose_as_another_service(
    vmm: VMManagerProcess, executor: ExecutorProcess
) -> None:
    """Callers verify the name in the server's certificate: whoever holds the executor's
    key (or a socket swapped under the vm-manager path) is not vm-manager."""
    caller = vmm.caller()
    with caller.bare(executor.address, "vm-manager") as ch:
        with pytest.raises(grpc.RpcError) as err:
            _health(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with caller.bare(executor.address, "executor") as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_services_call_each_other_under_their_own_certificates(
    vmm: VMManagerProcess, executor: ExecutorProcess, monitor_proc: MonitorProcess
) -> None:
    """vm-manager audits the executor's CreateVM under the executor's certificate name."""
    import agent_vm

    assert agent_vm.run("true", network="isolated").exit_code == 0
    recs = wait_records(
        monitor_proc,
        lambda r: (
            r.get("type") == "api.call"
            and r.get("service") == "vm-manager"
            and r.get("attributes", {}).get("method", "").endswith("/CreateVM")
            and r.get("attributes", {}).get("code") == "OK"
        ),
    )
    # Each caller's verified identity matches what its user agent claims (other
    # tests' calls, from the test harness with the client certificate, are there too).
    for r in recs:
        claim = r["attributes"].get("caller", "").split(" ", 1)[0]
        expected = claim if claim.startswith("agent-vm-") else "agent-vm-client"
        assert r["attributes"]["identity"] == expected, r
    assert any(r["attributes"]["identity"] == "agent-vm-executor" for r in recs)
    # Keys are private to the services' user; the directory too.
    assert os.stat(vmm.tls_dir).st_mode & 0o777 == 0o700
    for key in vmm.tls_dir.glob("*.key"):
        assert os.stat(key).st_mode & 0o777 == 0o600, key


def test_the_monitor_takes_events_from_services_as_themselves_only(
    vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    """Under mutual TLS the audit log's ``service`` is the reporter's certificate."""

    def report(who: str, service: str) -> grpc.RpcError | None:
        ev = make_event(service, f"test/{who}/{service}/{os.urandom(6).hex()}", "test.forged")
        with monitor_proc.channel(who) as ch:
            try:
                monitor_pb2_grpc.MonitorServiceStub(ch).ReportEvents(
                    monitor_pb2.ReportEventsRequest(events=[ev]), timeout=30
                )
            except grpc.RpcError as exc:
                return exc
        return None

    refused = report(tls.CLIENT, "vm-manager")
    assert refused is not None
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only agent-vm services" in (refused.details() or "")
    posing = report("pool-manager", "vm-manager")
    assert posing is not None
    assert posing.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "reports its own events only" in (posing.details() or "")
    assert report("pool-manager", "pool-manager") is None
    wait_records(
        monitor_proc,
        lambda r: r.get("type") == "test.forged" and r.get("service") == "pool-manager",
    )
    assert not [
        r
        for r in audit_records(monitor_proc)
        if r.get("type") == "test.forged" and r.get("service") != "pool-manager"
    ]
