"""The short soak of CI (issue 20): two minutes of real work with services killed.

An installation of the test's own (tests/soakinst.py: its own supervisor,
pool and prefix; its NAT network routed only into the tests' private
internet; its state directory a 2 GiB ext4 of its own) runs `agent-vm soak`
with a seed whose faults are a SIGKILL of the executor, a libvirtd restart,
the state directory's file system filled for 20 s and a SIGKILL of
vm-manager. Its work includes
nat-filtered sandboxes whose policy allows one of two of that internet's
servers, drawn per sandbox (`--network-targets`). The soak checks every
result, judges every error against the faults, and looks for leaks; this
test reads its report and checks the machine itself once the installation
is down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from agentvm.cli import soak_plan
from tests.installation import Installation, agent_vm
from tests.networld import NetWorld
from tests.soakinst import TARGETS, soak_installation

pytestmark = pytest.mark.vm

SEED, MINUTES, EVERY = 6, 2.5, 20.0
# Named, so that new kinds do not change this seed's schedule (one of each).
FAULTS = "kill:vm-manager,libvirtd-restart,kill:executor,state-disk-full"


@pytest.fixture
def inst(net_world: NetWorld) -> Iterator[Installation]:
    with soak_installation(net_world) as inst:
        yield inst


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
