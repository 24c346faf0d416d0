"""Ctrl-C on the real CLI: exit 130, and the VM the command made is gone."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.unit.helpers import wait_until
from tests.vmharness import REPO, ExecutorProcess, VMManagerProcess, libvirt_domains, wait_for

pytestmark = pytest.mark.vm


def interrupt_when_started(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `agent-vm ARGS`, send SIGINT once the program printed "started"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentvm.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "started", (first, proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_on_vm_run_exits_130_and_destroys_its_vm(vmm: VMManagerProcess) -> None:
    before = set(libvirt_domains(vmm.prefix))
    code, err = interrupt_when_started(
        vmm.env, "vm", "run", "--network", "isolated", "--", "sh", "-c", "echo started; sleep 300"
    )
    assert code == 130, err
    assert "interrupted" in err
    assert "destroyed" in err
    # The run answers before its VM is destroyed; it is gone right after.
    assert wait_for(lambda: set(libvirt_domains(vmm.prefix)) <= before, 60)


def test_ctrl_c_on_run_exits_130_and_the_executor_reclaims_the_vm(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    before = set(libvirt_domains(vmm.prefix))
    code, err = interrupt_when_started(
        executor.env, "run", "--network", "isolated", "--cmd", "echo started; sleep 300"
    )
    assert code == 130, err
    assert "interrupted" in err
    # The cancelled call ends the run's sandbox: the executor destroys its VM.
    assert wait_until(lambda: set(libvirt_domains(vmm.prefix)) <= before, timeout=90), (
        set(libvirt_domains(vmm.prefix)) - before
    )
