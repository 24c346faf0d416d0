"""Crash safety of the executor: a killed executor's VMs are reclaimed when it starts again."""

from __future__ import annotations

import signal

import pytest

import agent_vm
from tests.integration.test_monitor import wait_records
from tests.vmharness import (
    ExecutorProcess,
    MonitorProcess,
    VMManagerProcess,
    libvirt_domains,
    wait_for,
)

pytestmark = pytest.mark.vm


def test_restarted_executor_reclaims_the_vms_of_its_killed_predecessor(
    executor: ExecutorProcess, vmm: VMManagerProcess, monitor_proc: MonitorProcess
) -> None:
    sb = agent_vm.Sandbox.create(lifetime=3600)
    name = sb.vm_name
    assert name in libvirt_domains(vmm.prefix)
    executor.stop(signal.SIGKILL)  # no cleanup at all
    assert name in libvirt_domains(vmm.prefix)
    executor.start()
    assert wait_for(lambda: name not in libvirt_domains(vmm.prefix), 60)
    assert not (vmm.state_dir / "vms" / name).exists()
    with pytest.raises(agent_vm.NotFoundError):
        sb.run("true")
    sb.close()
    # The reclamation is audited, with who did it and why.
    wait_records(
        monitor_proc,
        lambda r: (
            r.get("type") == "vm.destroyed"
            and r.get("vm") == name
            and "executor restart" in r.get("attributes", {}).get("reason", "")
        ),
    )
