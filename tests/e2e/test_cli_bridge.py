"""`--bridge NAME` on run, vm create and vm run, against the real services."""

from __future__ import annotations

import pytest

from tests.installation import agent_vm
from tests.networld import bridge_world
from tests.vmharness import ExecutorProcess, VMManagerProcess, libvirt_domains, wait_for

pytestmark = pytest.mark.vm


def test_bridge_needs_bridge_mode_and_bridge_mode_needs_a_bridge(
    executor: ExecutorProcess,
) -> None:
    for args, words in (
        (("run", "--bridge", "br0", "--cmd", "true"), "--bridge br0 needs --network bridge"),
        (("run", "--network", "bridge", "--cmd", "true"), "--network bridge needs --bridge"),
        (("vm", "create", "--bridge", "br0"), "--bridge br0 needs --network bridge"),
        (("vm", "run", "--network", "bridge", "--", "true"), "needs --bridge NAME"),
    ):
        proc = agent_vm(executor.env, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_unknown_bridge_is_refused_before_any_vm(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    before = set(libvirt_domains(vmm.prefix))
    for args in (
        ("run", "--network", "bridge", "--bridge", "avmb-nosuch", "--cmd", "true"),
        ("vm", "create", "--network", "bridge", "--bridge", "avmb-nosuch"),
    ):
        proc = agent_vm(executor.env, *args)
        assert proc.returncode != 0, args
        assert "no bridge named avmb-nosuch" in proc.stderr, (args, proc.stderr)
    # The run answers before its VM is destroyed; it is gone right after.
    assert wait_for(lambda: set(libvirt_domains(vmm.prefix)) <= before, 60)


def test_run_on_a_named_bridge(executor: ExecutorProcess, vmm: VMManagerProcess) -> None:
    with bridge_world() as lan:
        proc = agent_vm(
            executor.env,
            "run",
            "--network",
            "bridge",
            "--bridge",
            lan.bridge,
            "--cmd",
            "busybox ip -4 addr show eth0",
        )
        assert proc.returncode == 0, proc.stderr
        assert "198.19.0.1" in proc.stdout, proc.stdout  # a lease of that LAN (.100-.120)
