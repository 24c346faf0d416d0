"""Every service of the session refuses calls without the installation's token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvm.common.grpc_util import service_channel, sync_channel
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
    calls: dict[str, Callable[[grpc.Channel], object]] = {
        vmm.address: lambda ch: vm_manager_pb2_grpc.VMManagerServiceStub(ch).CreateVM(
            vm_manager_pb2.CreateVMRequest(start=True), timeout=30
        ),
        executor.address: lambda ch: list(
            executor_pb2_grpc.ExecutorServiceStub(ch).Run(
                executor_pb2.RunRequest(
                    program=common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
                ),
                timeout=30,
            )
        ),
        monitor_proc.address: lambda ch: monitor_pb2_grpc.MonitorServiceStub(ch).ReportEvents(
            monitor_pb2.ReportEventsRequest(), timeout=30
        ),
    }
    for address, call in calls.items():
        with service_channel(address, token) as ch:
            with pytest.raises(grpc.RpcError) as err:
                call(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, address
            assert "AGENTVM_TOKEN" in (err.value.details() or "")
        # Health checks need no token (probes, `agent-vm status`).
        with sync_channel(address) as ch:
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
