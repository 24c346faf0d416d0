"""The installation a soak runs against (tests/e2e/test_soak.py, tests/long_soak.py).

Its own `agent-vm up` (supervisor, pool, prefix, certificates), its NAT
network routed only into the tests' private internet (tests/networld.py,
so nothing reaches the host's uplink) on a subnet of its own, and its state
directory a file system of its own (an ext4 on a loop device) for the
state-disk-full fault. Taken down, it must leave nothing: no domain, no
network object, no workspace mount.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from agentvm.vm_manager import workspace
from agentvm.vm_manager.netpolicy import NetNames
from tests.installation import Installation, agent_vm
from tests.networld import NetWorld, nat_env
from tests.vmharness import libvirt_domains, net_leftovers

PREFIX = "agent-vm-testsoak-"
STATE_FS_MIB = 2048
# Two HTTP servers of the tests' internet: each network sandbox may reach one.
TARGETS = "allowed.test:80,other.test:80"
# Not the world's subnet: the session's vm-manager has that one.
SUBNET = "10.215.6.0/24"


@contextlib.contextmanager
def soak_installation(
    world: NetWorld, pools: str = "standard:min=2,max=3", state_mib: int = STATE_FS_MIB
) -> Iterator[Installation]:
    """A running installation for a soak; down and checked clean on the way out."""
    base = Path("/var/lib/agent-vm-tests") / f"soak-{secrets.token_hex(3)}"
    inst = Installation(base, PREFIX, pools=pools)
    inst.env.update(nat_env(world), AGENTVM_NAT_SUBNET=SUBNET)
    bridge = NetNames.for_prefix(PREFIX).bridge
    world.confine(bridge, SUBNET)
    state = Path(inst.env["AGENTVM_STATE_DIR"])
    state.mkdir(parents=True)
    disk = base / "state.ext4"
    with disk.open("wb") as f:
        f.truncate(state_mib << 20)
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
        world.release(bridge)
