"""The short soak of CI (issue 20): two minutes of real work with services killed.

An installation of the test's own (`agent-vm up`, its own supervisor, pool
and prefix; its NAT network routed only into the tests' private internet,
tests/networld.py, so nothing reaches the host's uplink; its state directory
a 2 GiB ext4 of its own) runs `agent-vm soak` with a seed whose faults are a
SIGKILL of the executor, a libvirtd restart, the state directory's file
system filled for 20 s and a SIGKILL of vm-manager. Its work includes
nat-filtered sandboxes whose policy allows one of two of that internet's
servers, drawn per sandbox (`--network-targets`). The soak checks every
result, judges every error against the faults, and looks for leaks; this
test reads its report and checks the machine itself once the installation
is down.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentvm.cli import soak_plan
from agentvm.vm_manager import workspace
from agentvm.vm_manager.netpolicy import NetNames
from tests.installation import Installation, agent_vm
from tests.networld import NetWorld, nat_env
from tests.vmharness import libvirt_domains, net_leftovers

pytestmark = pytest.mark.vm

PREFIX = "agent-vm-testsoak-"
SEED, MINUTES, EVERY = 6, 2.5, 20.0
# Named, so that new kinds do not change this seed's schedule (one of each).
FAULTS = "kill:vm-manager,libvirtd-restart,kill:executor,state-disk-full"
STATE_FS_MIB = 2048
# Two HTTP servers of the tests' internet: each network sandbox may reach one.
TARGETS = "allowed.test:80,other.test:80"
SUBNET = "10.215.6.0/24"


@pytest.fixture
def inst(net_world: NetWorld) -> Iterator[Installation]:
    base = Path("/var/lib/agent-vm-tests") / f"soak-{secrets.token_hex(3)}"
    inst = Installation(base, PREFIX, pools="standard:min=2,max=3")
    # Its NAT network leaves only into the tests' internet (a subnet of its
    # own: the session's vm-manager has the world's).
    inst.env.update(nat_env(net_world), AGENTVM_NAT_SUBNET=SUBNET)
    bridge = NetNames.for_prefix(PREFIX).bridge
    net_world.confine(bridge, SUBNET)
    # The state directory on a file system of its own, for the state-disk-full fault.
    state = Path(inst.env["AGENTVM_STATE_DIR"])
    state.mkdir(parents=True)
    disk = base / "state.ext4"
    with disk.open("wb") as f:
        f.truncate(STATE_FS_MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(disk)], check=True)
    subprocess.run(["mount", "-o", "loop", str(disk), str(state)], check=True)
    state.chmod(0o755)
    # The node's disk capacity comes from that file system's size: room for the
    # pool's and the soak's VMs' 4 GiB thin disks (what they may grow to).
    inst.env["AGENTVM_NODE_RESERVE"] = "disk=0"
    inst.env["AGENTVM_NODE_OVERCOMMIT"] = "disk=32"
    try:
        up = agent_vm(inst.env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        yield inst
    finally:
        down = agent_vm(inst.env, "down")
        shutil.rmtree(inst.run, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not libvirt_domains(PREFIX)
        assert not net_leftovers(PREFIX)
        assert workspace.mounts_under(base) == [state]  # no workspace mount left
        subprocess.run(["umount", str(state)], check=True)
        workspace.remove_tree(base)
        net_world.release(bridge)


def test_a_short_soak_with_killed_services_loses_and_leaks_nothing(inst: Installation) -> None:
    args = ["--minutes", str(MINUTES), "--seed", str(SEED), "--fault-every", str(EVERY)]
    args += ["--faults", FAULTS, "--network-targets", TARGETS]
    proc = agent_vm(inst.env, "soak", *args, "--json", timeout=900)
    assert proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    why = json.dumps({k: report[k] for k in ("failures", "leaks", "audit_problems")}, indent=1)
    assert proc.returncode == 0, why + proc.stderr[-3000:]
    assert (report["failures"], report["leaks"], report["audit_problems"]) == ([], [], [])
    # The same seed gives the same schedule, and it was carried out.
    schedule = soak_plan.fault_schedule(SEED, MINUTES, soak_plan.expand_kinds(FAULTS), EVERY)
    assert report["schedule"] == [f.view() for f in schedule]
    done = [f["kind"] for f in report["faults"]]
    assert done == [f.kind for f in schedule]
    assert sorted(done) == sorted(FAULTS.split(","))  # each once
    assert all(not f["failed"] for f in report["faults"])
    # Real work was done and checked, of several kinds, between the faults.
    assert report["operations_ok"] >= 10, report["operations"]
    assert len(report["latency"]) >= 3, report["latency"]
    assert report["operations"].get("network", 0) >= 1, report["operations"]
    # Every service was sampled, the killed ones under two processes.
    rss = report["service_rss"]
    assert set(rss) == set(soak_plan.KILLABLE)
    assert rss["executor"]["processes"] == 2
    assert rss["vm-manager"]["processes"] == 2
    # The supervisor counted the restarts.
    status = inst.status()["by_name"]
    assert status["executor"]["restarts"] == 1
    assert status["vm-manager"]["restarts"] == 1
