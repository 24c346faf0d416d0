"""Pause and resume of sandboxes, and sandboxes surviving a killed executor
(docs/SANDBOXES.md, section 4), on real VMs."""

from __future__ import annotations

import os
import signal
import threading

import libvirt
import pytest

import agent_vm
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.integration.test_monitor import wait_records
from tests.vmharness import (
    ExecutorProcess,
    MonitorProcess,
    VMManagerProcess,
    libvirt_domains,
    wait_for,
)

pytestmark = pytest.mark.vm

COUNTER = (
    "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.2)\n"
)


def numbers(proc: agent_vm.Process, until: int) -> list[int]:
    """The counter's values from the start of its output until ``until`` is seen."""
    out = b""
    for piece in proc.output(0):
        out += piece.data
        if out.endswith(b"\n") and int(out.split()[-1]) >= until:
            break
    return [int(x) for x in out.split()]


def vm_state(vmm: VMManagerProcess, name: str) -> int:
    return vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=30).vm.state


def test_a_paused_sandbox_survives_a_killed_executor_and_resumes_as_it_was(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    blob = os.urandom(256 * 1024)
    sb = agent_vm.Sandbox.create(network="isolated", workspace="api", lifetime=1800)
    try:
        sb.files.write("notes/blob.bin", blob)
        counter = sb.processes.start(["python3", "-c", COUNTER], tag="counter")
        before = numbers(counter, 5)
        assert before == list(range(1, len(before) + 1))
        sb.pause()
        assert sb.info().state == "paused"
        # Its VM is stopped (no RAM, no CPU); calls but get/list/resume/close say so.
        assert vm_state(vmm, sb.vm_name) == common_pb2.VM_STATE_STOPPED
        with pytest.raises(agent_vm.FailedPreconditionError, match="is paused: resume it"):
            sb.run("true")
        with pytest.raises(agent_vm.FailedPreconditionError, match="already paused"):
            sb.pause()
        assert [i.state for i in agent_vm.Sandbox.list() if i.id == sb.id] == ["paused"]
        executor.stop(signal.SIGKILL)
        executor.start()
        again = agent_vm.Sandbox.connect(sb.id)
        assert again.info().state == "paused"
        again.resume()
        assert again.info().state == "running"
        assert again.files.read("notes/blob.bin") == blob
        # The same process, counting on from where it was: nothing restarted.
        proc = again.processes.connect(counter.exec_id)
        assert proc.pid == counter.pid
        after = numbers(proc, before[-1] + 5)
        assert after == list(range(1, len(after) + 1))
        assert [p.running for p in again.processes.list() if p.exec_id == counter.exec_id] == [True]
        with pytest.raises(agent_vm.FailedPreconditionError, match="not paused"):
            again.resume()
        assert again.run("echo fine").stdout == "fine\n"
    finally:
        sb.close()
    assert wait_for(lambda: sb.vm_name not in libvirt_domains(vmm.prefix), 60)


def domain_paused(name: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        return bool(dom.isActive() and dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED)
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def test_a_pause_cut_short_by_a_killed_executor_still_ends_in_a_usable_sandbox(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    """The 60-minute soak's lost sandbox: the executor died while vm-manager saved
    the VM; vm-manager's SuspendVM was cancelled with its caller while the save
    went on in its thread, so the VM stopped with its state saved but was taken
    for crashed, and the sandbox was lost."""
    blob = os.urandom(64 * 1024)
    sb = agent_vm.Sandbox.create(network="isolated", workspace="api", lifetime=1800)
    try:
        sb.files.write("kept.bin", blob)
        cut: list[BaseException] = []

        def pause() -> None:
            try:
                sb.pause()
            except agent_vm.AgentVMError as exc:  # the executor died under it
                cut.append(exc)

        pausing = threading.Thread(target=pause)
        pausing.start()
        # The save pauses the domain first: the executor dies mid-save.
        assert wait_for(lambda: domain_paused(sb.vm_name), 60, interval=0.02)
        executor.stop(signal.SIGKILL)
        pausing.join(60)
        assert cut, "the pause's caller saw its executor die"
        executor.start()
        again = agent_vm.Sandbox.connect(sb.id)
        # vm-manager finished the save it had begun: the sandbox is paused.
        assert again.info().state == "paused"
        assert vm_state(vmm, sb.vm_name) == common_pb2.VM_STATE_STOPPED
        again.resume()
        assert again.files.read("kept.bin") == blob
        assert again.run("echo fine").stdout == "fine\n"
    finally:
        sb.close()
    assert wait_for(lambda: sb.vm_name not in libvirt_domains(vmm.prefix), 60)


def test_running_sandboxes_survive_a_killed_executor_and_unrecorded_vms_are_reclaimed(
    executor: ExecutorProcess, vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    kept = agent_vm.Sandbox.create(network="isolated", lifetime=1800)
    lost = agent_vm.Sandbox.create(network="isolated", lifetime=1800)
    try:
        kept.files.write("state.txt", "kept")
        executor.stop(signal.SIGKILL)  # no cleanup at all
        # A VM without its sandbox's record (a create cut short) is reclaimed.
        stub = vmm.stub()
        vm = stub.GetVM(vm_manager_pb2.GetVMRequest(name=lost.vm_name), timeout=30).vm
        assert vm.record
        assert vm.record_generation == 1
        stub.SetVMRecord(
            vm_manager_pb2.SetVMRecordRequest(name=lost.vm_name, expected_generation=1),
            timeout=30,
        )
        executor.start()
        assert wait_for(lambda: lost.vm_name not in libvirt_domains(vmm.prefix), 60)
        with pytest.raises(agent_vm.NotFoundError):
            lost.run("true")
        assert kept.run("cat /workspace/state.txt").stdout == "kept"
        assert kept.vm_name in libvirt_domains(vmm.prefix)
        wait_records(
            monitor_proc,
            lambda r: (
                r.get("type") == "vm.destroyed"
                and r.get("vm") == lost.vm_name
                and "executor restart" in r.get("attributes", {}).get("reason", "")
            ),
        )
        wait_records(
            monitor_proc,
            lambda r: r.get("type") == "sandbox.restored" and r.get("sandbox") == kept.id,
        )
    finally:
        kept.close()
        lost.close()
    assert wait_for(lambda: kept.vm_name not in libvirt_domains(vmm.prefix), 60)


def state_of(sandbox_id: str) -> str:
    return next(i.state for i in agent_vm.Sandbox.list() if i.id == sandbox_id)


def test_an_idle_sandbox_pauses_itself_and_a_call_in_flight_keeps_it_running(
    executor: ExecutorProcess, monitor_proc: MonitorProcess
) -> None:
    with pytest.raises(agent_vm.InvalidArgumentError, match="auto_pause must be"):
        agent_vm.Sandbox.create(workspace="api", auto_pause=2)
    with agent_vm.Sandbox.create(
        network="isolated", workspace="api", lifetime=900, auto_pause=10
    ) as sb:
        # A command longer than the idle time: in use all along, never paused.
        assert sb.run("sleep 14; echo done", timeout=60).stdout == "done\n"
        assert state_of(sb.id) == "running"
        assert wait_for(lambda: state_of(sb.id) == "paused", 60)
        mine = wait_records(
            monitor_proc,
            lambda r: r.get("type") == "sandbox.paused" and r.get("sandbox") == sb.id,
        )
        assert mine[0]["attributes"]["reason"] == "idle", mine
        sb.resume()
        assert sb.run("echo back").stdout == "back\n"
