"""Every server stream of every real service, cancelled and cut by deadlines (issue 22, item 1).

A caller that cancels a stream, or whose deadline passes while a slow reader
still holds it, used to crash the serving process (SIGSEGV inside gRPC): the
executor died on a cancelled shared-workspace ReadFile and on a Run streaming
until its deadline. Here each streaming method of the executor, vm-manager,
monitor and guest agent is abused that way several times; afterwards every
process is the same process (no restart), healthy, and serves real work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import grpc
import pytest
from grpc_health.v1 import health_pb2

import agent_vm
from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from tests.vmharness import ExecutorProcess, MonitorProcess, VMManagerProcess, execute, program

pytestmark = pytest.mark.vm

ROUNDS = 3
# A file far larger than one ReadFile chunk (64 KiB): 512 messages. A reader cut
# by its 1.5 s deadline takes 30 of them, and what the executor, the guest and
# gRPC hold in flight for a slow reader was at most ~160 (10 MiB, measured after
# a 3 s pause), so every stream here is still flowing when it is cut (a stream
# that ended would be OK, which _cut refuses).
BIG = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def sandboxes(executor: ExecutorProcess) -> Iterator[dict[str, agent_vm.Sandbox]]:
    """A sandbox per workspace mode, each holding a big file to read (made side by side)."""
    made: dict[str, agent_vm.Sandbox] = {}

    def make(mode: Literal["shared", "api"]) -> None:
        sb = agent_vm.Sandbox.create(workspace=mode, lifetime=900)
        made[mode] = sb
        res = sb.run(f"head -c {BIG} /dev/urandom > /workspace/work/big", timeout=120)
        assert res.exit_code == 0, res.stderr

    modes: tuple[Literal["shared", "api"], ...] = ("shared", "api")
    try:
        with ThreadPoolExecutor(len(modes)) as threads:
            for done in [threads.submit(make, mode) for mode in modes]:
                done.result()
        yield {mode: made[mode] for mode in modes}
    finally:
        for sb in made.values():
            sb.close()


def _abuse(start: Callable[[float | None], Any]) -> list[grpc.StatusCode]:
    """Cancel after the first message with a slow reader, then let a deadline pass mid-stream."""
    codes: list[grpc.StatusCode] = []
    for _ in range(ROUNDS):
        codes.append(_cancel_mid_stream(start(None)))
        codes.append(_drain(start(1.5)))
    return codes


def _cancel_mid_stream(call: Any) -> grpc.StatusCode:
    """Cancel after the first message, as a slow reader with messages queued."""
    next(iter(call))  # the stream is flowing
    time.sleep(0.3)  # a slow reader: the server has messages queued
    call.cancel()
    return _drain(call)


def _drain(call: Iterable[Any]) -> grpc.StatusCode:
    try:
        for _ in call:
            time.sleep(0.05)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _alive_and_serving(proc: VMManagerProcess, pid: int) -> None:
    assert proc.proc is not None
    assert proc.proc.poll() is None, (
        f"{proc.service_name} died: {proc.log_path.read_text()[-3000:]}"
    )
    assert proc.proc.pid == pid
    assert proc.health() == health_pb2.HealthCheckResponse.SERVING


def _cut(codes: list[grpc.StatusCode]) -> None:
    """Every call ended as the caller chose (cancelled or out of time), none in error."""
    assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes


def test_executor_streams_survive_cancels_and_deadlines(
    executor: ExecutorProcess, sandboxes: dict[str, agent_vm.Sandbox]
) -> None:
    assert executor.proc is not None
    pid = executor.proc.pid
    stub = executor_pb2_grpc.ExecutorServiceStub(executor.channel())
    flood = program("yes agent-vm")
    for mode, sb in sandboxes.items():
        read = executor_pb2.ReadFileRequest(sandbox_id=sb.id, path="work/big")
        _cut(_abuse(lambda t, r=read: stub.ReadFile(r, timeout=t)))  # type: ignore[misc]
        exec_req = executor_pb2.ExecRequest(sandbox_id=sb.id, program=flood)
        exec_req.timeout.FromSeconds(60)
        _cut(_abuse(lambda t, r=exec_req: stub.Exec(r, timeout=t)))  # type: ignore[misc]
        _alive_and_serving(executor, pid)
        # The sandbox still works, and its file reads back whole.
        got = sum(len(c.chunk) for c in stub.ReadFile(read, timeout=120))
        assert got == BIG, mode
    run = executor_pb2.RunRequest(
        program=flood,
        spec=executor_pb2.SandboxSpec(network_mode=common_pb2.NETWORK_MODE_ISOLATED),
    )
    run.timeout.FromSeconds(60)
    # Boots, then floods: cancelled once it streams, then cut by the deadline
    # while it still streams: the deadline is what the first run took to
    # stream, and 10 s more (a fixed 40 s cost this test half a minute).
    began = time.monotonic()
    codes = [_cancel_mid_stream(stub.Run(run, timeout=120))]
    to_stream = time.monotonic() - began
    codes.append(_drain(stub.Run(run, timeout=to_stream + 10)))
    assert codes[0] is grpc.StatusCode.CANCELLED, codes
    _cut(codes)
    _alive_and_serving(executor, pid)
    result = agent_vm.run("echo still serving", timeout=60)
    assert result.stdout == "still serving\n"


def test_vm_manager_and_monitor_streams_survive_cancels_and_deadlines(
    vmm: VMManagerProcess,
    monitor_proc: MonitorProcess,
    sandboxes: dict[str, agent_vm.Sandbox],
) -> None:
    assert vmm.proc is not None
    assert monitor_proc.proc is not None
    vmm_pid, mon_pid = vmm.proc.pid, monitor_proc.proc.pid
    vm_name = sandboxes["api"].vm_name
    stub = vm_manager_pb2_grpc.VMManagerServiceStub(vmm.channel())
    watch = vm_manager_pb2.WatchEgressRequest(name=vm_name, follow=True)
    build = vm_manager_pb2.BuildImageRequest()
    alerts = monitor_pb2_grpc.MonitorServiceStub(monitor_proc.channel())
    for _ in range(ROUNDS):
        # Followed streams that wait for events: cancelled while the handler awaits.
        for call in (
            stub.WatchEgress(watch),
            alerts.WatchAlerts(monitor_pb2.WatchAlertsRequest()),
            stub.BuildImage(build),
        ):
            time.sleep(0.3)
            call.cancel()  # type: ignore[no-untyped-call]
            assert _drain(call) in {grpc.StatusCode.CANCELLED, grpc.StatusCode.OK}
        assert _drain(stub.WatchEgress(watch, timeout=0.5)) is grpc.StatusCode.DEADLINE_EXCEEDED
        code = _drain(alerts.WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=0.5))
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    _alive_and_serving(vmm, vmm_pid)
    _alive_and_serving(monitor_proc, mon_pid)
    assert stub.GetVM(vm_manager_pb2.GetVMRequest(name=vm_name), timeout=30).vm.name == vm_name


def test_guest_agent_streams_survive_cancels_and_deadlines(shared_vm: common_pb2.VM) -> None:
    with sync_channel(shared_vm.agent_endpoint) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        req = guest_agent_pb2.ExecuteRequest(program=program("yes agent-vm"))
        req.timeout.FromSeconds(60)
        _cut(_abuse(lambda t: stub.Execute(req, timeout=t)))
        big = "head -c 33554432 /dev/zero > /workspace/work/cancel-big"
        res = execute(shared_vm.agent_endpoint, big, channel=ch)
        assert res.status.exit_code == 0
        read = guest_agent_pb2.GuestAgentServiceReadFileRequest(path="work/cancel-big")
        _cut(_abuse(lambda t: stub.ReadFile(read, timeout=t)))
        # The agent still answers on the same channel: no process was left flooding it.
        count = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx yes || true"
        res = execute(shared_vm.agent_endpoint, count, channel=ch)
        assert res.stdout.strip() == b"0", res
        execute(shared_vm.agent_endpoint, "rm -f /workspace/work/cancel-big", channel=ch)
