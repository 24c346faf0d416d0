"""Crash safety: nothing half-made after a kill -9, and VMs nobody holds are reclaimed.

A create cut by a vm-manager crash is either finished (the VM is adopted,
found by its labels, destroyed cleanly) or never happened (no domain, no
overlay, no directory). A VM an executor owns but no sandbox holds (its
CreateVM answer never arrived) is swept by that executor, or by `agent-vm gc`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import agent_vm
from agentvm.cli import soak_faults
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.integration.test_monitor import audit_records
from tests.vmharness import (
    REPO,
    ExecutorProcess,
    MonitorProcess,
    VMFactory,
    VMManagerProcess,
    execute,
    leftovers,
    libvirt_domains,
    lone_vmm_process,
    wait_for,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def lone_vmm(guest_image: Path) -> Iterator[VMManagerProcess]:
    with lone_vmm_process() as proc:
        yield proc


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.5])
def test_kill_9_mid_create_leaves_nothing_half_made(
    lone_vmm: VMManagerProcess, delay: float
) -> None:
    labels = {"crash-test": f"d{int(delay * 1000)}"}
    errors: list[grpc.StatusCode] = []

    def create() -> None:
        req = vm_manager_pb2.CreateVMRequest(
            profile=common_pb2.RESOURCE_PROFILE_STANDARD,
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            start=True,
            labels=labels,
        )
        try:
            lone_vmm.stub().CreateVM(req, timeout=120)
        except grpc.RpcError as exc:
            errors.append(exc.code())

    creators = [threading.Thread(target=create) for _ in range(2)]
    for t in creators:
        t.start()
    time.sleep(delay)
    lone_vmm.stop(signal.SIGKILL)
    for t in creators:
        t.join(30)
    lone_vmm.start()
    stub = lone_vmm.stub()
    vms = stub.ListVMs(vm_manager_pb2.ListVMsRequest(label_selector=labels), timeout=30).vms
    # Whatever exists is a whole VM vm-manager knows about (adopted from libvirt) ...
    assert {v.name for v in vms} == set(libvirt_domains(lone_vmm.prefix))
    dirs = lone_vmm.state_dir / "vms"
    on_disk = {p.name for p in dirs.iterdir()} if dirs.exists() else set()
    assert on_disk <= {v.name for v in vms}, "a VM directory without its domain survived"
    # ... and its creator can find it by its labels and destroy it.
    for v in vms:
        stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=v.name), timeout=60)
    assert wait_for(lambda: not leftovers(lone_vmm), 30), leftovers(lone_vmm)


def _orphan(vmm: VMManagerProcess, executor_address: str, sandbox: str) -> str:
    """A VM as an executor's create leaves it when the answer never arrived."""
    req = vm_manager_pb2.CreateVMRequest(
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        start=False,
        labels={
            "agent-vm/owner": "executor",
            "agent-vm/executor": executor_address,
            "agent-vm/executor-replica": executor_address,
            "agent-vm/sandbox": sandbox,
        },
    )
    return vmm.stub().CreateVM(req, timeout=60).vm.name


def _gone_reason(vmm: VMManagerProcess, name: str) -> str:
    try:
        vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return exc.details() or ""
    return ""


def test_the_executor_sweeps_away_vms_no_sandbox_holds(vmm: VMManagerProcess) -> None:
    ex = ExecutorProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="executor-sweep",
        extra_env={"AGENTVM_RECONCILE_INTERVAL": "2"},
    )
    ex.start()
    try:
        with agent_vm.Sandbox.create(network="isolated", address=ex.address) as sb:
            name = _orphan(vmm, ex.address, "sb-cut-short")
            assert wait_for(lambda: bool(_gone_reason(vmm, name)), 30)
            assert "executor reconcile: sandbox sb-cut-short is not open" in _gone_reason(vmm, name)
            # The VM of an open sandbox is left alone.
            assert sb.run("echo kept").stdout == "kept\n"
    finally:
        ex.stop()


def test_agent_vm_gc_reclaims_vms_of_sandboxes_that_are_not_open(
    vmm: VMManagerProcess, executor: ExecutorProcess
) -> None:
    dead = "unix:/nonexistent/executor.sock"  # an executor that is gone for good
    orphan = _orphan(vmm, dead, "sb-orphan")
    mine = (
        vmm.stub()
        .CreateVM(
            vm_manager_pb2.CreateVMRequest(network_mode=common_pb2.NETWORK_MODE_ISOLATED),
            timeout=60,
        )
        .vm.name
    )
    try:
        young = agent_vm_cli(vmm, "gc")
        assert young.returncode == 0, young.stderr
        assert orphan not in young.stdout  # younger than --min-age (300 s)
        dry = agent_vm_cli(vmm, "gc", "--dry-run", "--min-age", "0")
        assert f"{orphan}: would reclaim" in dry.stdout, dry.stdout
        assert "not running" in dry.stdout
        assert orphan in libvirt_domains(vmm.prefix)
        done = agent_vm_cli(vmm, "gc", "--min-age", "0")
        assert f"{orphan}: reclaimed" in done.stdout, done.stdout + done.stderr
        assert mine not in done.stdout
        assert "agent-vm gc: sandbox sb-orphan" in _gone_reason(vmm, orphan)
        assert mine in libvirt_domains(vmm.prefix)  # not the executor's: not touched
    finally:
        for name in (orphan, mine):
            if name in libvirt_domains(vmm.prefix):
                vmm.stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=name), timeout=60)


def agent_vm_cli(vmm: VMManagerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", *args],
        env=vmm.env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def restart_libvirtd() -> None:
    """What an upgrade or an OOM kill does to libvirtd (QEMU processes live on): the
    soak's own restart (systemd's libvirtd, else the one started by hand)."""
    failed = soak_faults.restart_libvirtd("qemu:///system")
    assert not failed, failed


def test_libvirtd_restart_mid_run_never_hangs(lone_vmm: VMManagerProcess) -> None:
    """A command running through it finishes; the next libvirt calls reconnect at once."""
    f = VMFactory(lone_vmm)
    try:
        vm = f.booted()
        result: list[int] = []
        runner = threading.Thread(
            target=lambda: result.append(
                execute(vm.agent_endpoint, "sleep 5; echo done", timeout=60).status.exit_code
            )
        )
        runner.start()
        time.sleep(1)
        restart_libvirtd()
        runner.join(60)
        assert result == [0]  # the guest channel does not go through libvirt
        stub = lone_vmm.stub()
        start = time.monotonic()
        got = stub.GetVM(vm_manager_pb2.GetVMRequest(name=vm.name), timeout=30).vm
        assert got.state == common_pb2.VM_STATE_READY
        assert time.monotonic() - start < 10
        # Creating and destroying work on the new connection.
        other = f.booted()
        assert execute(other.agent_endpoint, "echo fresh").stdout == b"fresh\n"
    finally:
        f.cleanup()


@pytest.mark.parametrize("victim", ["executor", "vm-manager"])
def test_a_teardown_cut_by_kill_9_right_after_the_result_is_finished(
    lone_vmm: VMManagerProcess, victim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run answers before its VM is destroyed: a kill -9 of either service then
    leaves nothing behind once it is back (the executor's next start destroys a
    VM no journal record holds; a teardown waits out a vm-manager restart)."""
    ex = ExecutorProcess(base=lone_vmm.base, prefix=lone_vmm.prefix, name=f"ex-{victim}")
    ex.start()
    monkeypatch.setenv("AGENTVM_TLS_DIR", str(lone_vmm.tls_dir))
    monkeypatch.setenv("AGENTVM_TOKEN_FILE", str(lone_vmm.token_file))
    try:
        # Isolated: a vm-manager of its own cannot have a NAT network while the
        # installation's has one (libvirt: "Network is already in use").
        result = agent_vm.run("echo done", address=ex.address, network="isolated")
        (ex if victim == "executor" else lone_vmm).stop(signal.SIGKILL)
        cut = libvirt_domains(lone_vmm.prefix)
        assert result.stdout == "done\n"
        assert result.vm_name in cut, "the teardown was over before the kill: nothing was cut"
        (ex if victim == "executor" else lone_vmm).start()
        assert wait_for(lambda: not leftovers(lone_vmm), 90), leftovers(lone_vmm)
    finally:
        ex.stop()


REPORTER = """
import asyncio, json, sys, time
from agentvm.common import grpc_util
from agentvm.common.config import Settings
from agentvm.common.events import EventReporter

async def main(n):
    settings = Settings()
    grpc_util.setup_auth(settings)
    grpc_util.setup_tls(settings, "executor")
    reporter = EventReporter("executor", settings.monitor_addr, capacity=10 * n, interval=0.05)
    await reporter.start()
    for i in range(n):
        reporter.emit("test.crash", n=i)
        if i % 100 == 99:
            await asyncio.sleep(0.1)
    deadline = time.monotonic() + 120
    while reporter.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await reporter.close()
    print(json.dumps({"pending": reporter.pending, "dropped": reporter.dropped_total}))

asyncio.run(main(int(sys.argv[1])))
"""


def test_kill_9_of_the_monitor_mid_batch_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A service keeps reporting while monitor is killed and restarted: every event is
    in the audit log exactly once (a batch on disk but never acknowledged is known
    again at start), and the chain verifies across the crash."""
    import json

    monitor = MonitorProcess(
        base=tmp_path / "m",
        prefix="agent-vm-crashmon-",
        extra_env={"AGENTVM_VM_MANAGER_ADDR": "", "AGENTVM_POOL_MANAGER_ADDR": ""},
    )
    monitor.start()
    n = 3000
    reporter = subprocess.Popen(
        [sys.executable, "-c", REPORTER, str(n)],
        env=monitor.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: len(_crash_numbers(monitor)) > 200, 30), "no event arrived"
        monitor.stop(signal.SIGKILL)
        time.sleep(1.0)  # the reporter buffers and retries meanwhile
        monitor.start()
        out, err = reporter.communicate(timeout=180)
        assert reporter.returncode == 0, err[-3000:]
        assert json.loads(out) == {"pending": 0, "dropped": 0}
        numbers = _crash_numbers(monitor)
        assert sorted(numbers) == list(range(n)), (
            f"{n - len(set(numbers))} lost, {len(numbers) - len(set(numbers))} repeated"
        )
    finally:
        if reporter.poll() is None:
            reporter.kill()
            reporter.wait()
        monitor.stop_if_running()
    verified = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "audit", "verify", str(monitor.audit_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    starts = [r for r in audit_records(monitor) if r["type"] == "audit.started"]
    assert len(starts) == 2


def _crash_numbers(monitor: MonitorProcess) -> list[int]:
    return [int(r["attributes"]["n"]) for r in audit_records(monitor) if r["type"] == "test.crash"]
