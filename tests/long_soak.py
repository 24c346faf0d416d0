"""The long soak (docs/RELIABILITY.md), in the same confined world as CI's short one.

    sudo .venv/bin/python -m tests.long_soak --minutes 60 --seed 20 --out /tmp/soak60

Brings up the tests' private internet and a soak installation of its own
(tests/soakinst.py: nothing reaches the host's uplink, the state directory
is a file system of its own), gives it an E2B key and the static-busybox
named image (tests/ociimages.py), and runs `agent-vm soak` with every fault
kind (state-disk-full included), network operations against two servers of
that internet, E2B calls and image use. The report goes to OUT.json, the
plot to OUT.svg, the soak's running commentary to stderr; the exit status is
the soak's. Everything is taken down and checked clean at the end. Not part
of the test suite: it runs for as long as it is told to.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click

from agentvm.cli import soak_plan
from tests.installation import agent_vm
from tests.networld import networld
from tests.ociimages import busybox_image
from tests.soakinst import TARGETS, soak_installation

IMAGE = "soak-busybox"
# Every kind: the defaults and the opt-in ones (the state directory is its own).
FAULTS = ",".join(soak_plan.FAULT_KINDS + soak_plan.OPT_IN_FAULTS)
# Room for the templates an hour of every kind of work builds (isolated, NAT,
# the named image's) and the running VMs' overlays above the 1 GiB floor.
STATE_MIB = 6144


def _ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise click.ClickException(f"{what} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


@click.command()
@click.option("--minutes", type=float, default=60.0, show_default=True)
@click.option("--seed", type=int, default=20, show_default=True)
@click.option("--fault-every", type=float, default=60.0, show_default=True)
@click.option("--faults", default=FAULTS, show_default=True, help="As `agent-vm soak --faults`.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Writes OUT.json (the report) and OUT.svg (the plot).",
)
def main(minutes: float, seed: int, fault_every: float, faults: str, out: Path) -> None:
    """Run a long soak in the tests' confined world; exit with the soak's status."""
    with (
        networld() as world,
        soak_installation(world, state_mib=STATE_MIB) as inst,
        tempfile.TemporaryDirectory() as d,
    ):
        key = _ok(agent_vm(inst.env, "e2b", "key", "create", "soak"), "creating an E2B key")
        ref = busybox_image(Path(d))["oci-archive"]
        _ok(agent_vm(inst.env, "image", "import", ref, "--name", IMAGE), "importing the image")
        args = ["--minutes", str(minutes), "--seed", str(seed), "--fault-every", str(fault_every)]
        args += ["--faults", faults, "--network-targets", TARGETS]
        args += ["--e2b-key", key.split()[-1], "--image", IMAGE]
        args += ["--json", "--plot", str(out.with_suffix(".svg"))]
        cmd = [sys.executable, "-m", "agentvm.cli.main", "soak", *args]
        with out.with_suffix(".json").open("w") as report:
            rc = subprocess.run(cmd, env=inst.env, stdout=report, check=False).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
