"""One executor over three nodes: three vm-managers under the one libvirtd (issue 19).

Each node is a vm-manager of its own (id, VM name prefix, state and run
directories, TCP address with mutual TLS from the fleet's one CA). n1 and n2
are allowed two one-vCPU VMs each (AGENTVM_NODE_OVERCOMMIT cpu=1.0 on these
2-core hosts); n3 is given a small capacity (cpu=0.1: no whole vCPU), so it
refuses every VM and each sandbox lands on the others (a third node of full
size would add TCG boots to every CI run for no path the second does not
take). The executor knows them from AGENTVM_NODES. On real VMs: sandboxes
spread over n1 and n2 and run through each node's agent proxy; a node filled
behind the executor's back gets no sandbox (placement skips it once a health
check has seen it full; before that, its own RESOURCE_EXHAUSTED sends the
executor to the next node: tests/unit/test_fleet.py pins that path); a
full fleet says so; a node whose vm-manager is SIGKILLed is marked down, its
sandbox answers UNAVAILABLE naming it, new sandboxes go elsewhere, and once
it is back its sandbox works again and closing it destroys its VM there
(the fixture finds nothing left on either node). A pool-manager over both
nodes builds its template on each, keeps its pool spread over them, refills
on the other node when one is lost, and once the lost node is back destroys
the pool VM it had left there. `agent-vm nodes` shows both nodes, then the
lost one as down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import agent_vm
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import (
    ExecutorProcess,
    PoolManagerProcess,
    VMManagerProcess,
    free_port,
    leftovers,
    libvirt_domains,
    new_vmm,
    remove_vmm_dirs,
    wait_for,
)

pytestmark = pytest.mark.vm

# n3's capacity: a tenth of the host's 2 cores, less than one VM's vCPU.
SMALL = "cpu=0.1,memory=1.5,disk=4"


@dataclass
class NodeProcess(VMManagerProcess):
    """A vm-manager as one node of a fleet: TCP, the fleet's CA and token."""

    fleet_dir: Path = Path()
    node_id: str = ""
    port: int = field(default_factory=free_port)
    overcommit: str = "cpu=1.0,memory=1.5,disk=4"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_dir(self) -> Path:
        return self.fleet_dir / "tls"

    @property
    def token_file(self) -> Path:
        return self.fleet_dir / "token"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(
            AGENTVM_VM_MANAGER_ADDR=self.address,
            AGENTVM_NODE_ID=self.node_id,
            AGENTVM_NODE_OVERCOMMIT=self.overcommit,
        )
        return env


@pytest.fixture(scope="module")
def fleet(guest_image: Path) -> Iterator[tuple[list[NodeProcess], ExecutorProcess]]:
    shared = new_vmm()  # the fleet's directory: CA, token, the executor's own dirs
    shared.base.mkdir(parents=True)
    nodes = []
    for n in ("n1", "n2", "n3"):
        base = new_vmm()
        node = NodeProcess(base=base.base, prefix=f"{base.prefix}{n}-", fleet_dir=shared.base)
        node.node_id = n
        if n == "n3":
            node.overcommit = SMALL
        nodes.append(node)
    executor = ExecutorProcess(
        base=shared.base,
        prefix=shared.prefix,
        name="executor-fleet",
        extra_env={"AGENTVM_NODES": ",".join(f"{n.node_id}={n.address}" for n in nodes)},
    )
    # The tests' client presents the fleet's client certificate and token.
    ours = {"AGENTVM_TOKEN_FILE": str(shared.token_file), "AGENTVM_TLS_DIR": str(shared.tls_dir)}
    old = {name: os.environ.get(name) for name in ours}
    os.environ.update(ours)
    try:
        for node in nodes:
            node.start()
        executor.start()
        yield nodes, executor
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        executor.stop_if_running()
        left = []
        for node in nodes:
            node.stop_if_running()
            left += leftovers(node)
            remove_vmm_dirs(node)
        remove_vmm_dirs(shared)
        assert not left, f"left behind: {left}"


def node_of(sb: agent_vm.Sandbox, nodes: list[NodeProcess]) -> str:
    (found,) = [n.node_id for n in nodes if sb.vm_name.startswith(n.prefix)]
    return found


def create(executor: ExecutorProcess) -> agent_vm.Sandbox:
    return agent_vm.Sandbox.create(network="isolated", address=executor.address, lifetime=900)


def test_sandboxes_spread_refusals_move_on_and_a_lost_node_comes_back(
    fleet: tuple[list[NodeProcess], ExecutorProcess],
) -> None:
    nodes, executor = fleet
    n1, n2, n3 = nodes
    made: list[agent_vm.Sandbox] = []
    try:
        # The small node refuses a VM itself, naming what does not fit.
        with pytest.raises(grpc.RpcError) as refused:
            n3.stub().CreateVM(
                vm_manager_pb2.CreateVMRequest(network_mode=common_pb2.NETWORK_MODE_ISOLATED),
                timeout=60,
            )
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "node n3: vCPUs" in (refused.value.details() or "")
        # Spread: the second sandbox goes to the node the first left emptier; none
        # to n3.
        made += [create(executor), create(executor)]
        assert sorted(node_of(sb, nodes) for sb in made) == ["n1", "n2"]
        for sb in made:
            res = sb.run("cat /proc/sys/kernel/random/boot_id", timeout=60)
            assert res.exit_code == 0, res.stderr
        boot_ids = {sb.run("cat /proc/sys/kernel/random/boot_id").stdout for sb in made}
        assert len(boot_ids) == 2, "two guests"
        # n1 fills up behind the executor's back (a VM defined directly on it): n2
        # takes the sandbox, whether n1 refuses it or a health check saw n1 full first.
        filler = (
            n1.stub()
            .CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    start=False, network_mode=common_pb2.NETWORK_MODE_ISOLATED, labels={"test": "1"}
                ),
                timeout=60,
            )
            .vm
        )
        third = create(executor)
        made.append(third)
        assert node_of(third, nodes) == "n2"
        assert third.run("echo on n2").stdout == "on n2\n"
        # Every node full: one clear refusal naming why.
        with pytest.raises(agent_vm.ResourceExhaustedError, match="no healthy node has room"):
            create(executor)
        n1.stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=filler.name), timeout=60)
        # n2's vm-manager dies: its sandboxes answer UNAVAILABLE naming it; new
        # sandboxes go to n1; its VMs keep running and come back with it.
        on_n2 = next(sb for sb in made if node_of(sb, nodes) == "n2")
        assert n2.proc is not None
        n2.stop(signal.SIGKILL)
        down = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not down:
            try:
                on_n2.run("true", timeout=30)
            except agent_vm.UnavailableError as exc:
                down = "node n2" in str(exc) and "has not answered since" in str(exc)
            time.sleep(1)
        assert down, "n2's sandbox should answer UNAVAILABLE naming the node"
        fourth = create(executor)
        made.append(fourth)
        assert node_of(fourth, nodes) == "n1"
        n2.start()
        assert wait_for(lambda: _runs(on_n2), 90), "n2's sandbox works again once n2 is back"
        assert not libvirt_domains(n3.prefix)
    finally:
        for sb in made:
            sb.close()


def _runs(sb: agent_vm.Sandbox) -> bool:
    try:
        return sb.run("echo back", timeout=30).stdout == "back\n"
    except agent_vm.AgentVMError:
        return False


def test_a_pool_spreads_over_the_nodes_and_refills_on_the_others(
    fleet: tuple[list[NodeProcess], ExecutorProcess],
) -> None:
    nodes, executor = fleet
    n1, n2, n3 = nodes
    pool = PoolManagerProcess(
        base=executor.base,
        prefix=executor.prefix,
        name="pool-manager-fleet",
        pools="light:min=2,max=2,ttl=900",
        extra_env={"AGENTVM_NODES": executor.extra_env["AGENTVM_NODES"]},
    )

    def on(node: NodeProcess) -> list[str]:
        return libvirt_domains(node.prefix)

    # The sandboxes of the test before are destroyed after their close returned:
    # start from two empty nodes, or the pool would rightly favour the emptier.
    assert wait_for(lambda: not on(n1) and not on(n2), 90), (on(n1), on(n2))
    assert not on(n3)
    try:
        pool.start()
        pool.wait_status(lambda st: st.ready == 2, timeout=400)
        # One on each node with room (the second goes where the first left more),
        # each restored from that node's own template; the small node builds none.
        assert (len(on(n1)), len(on(n2)), len(on(n3))) == (1, 1, 0), (on(n1), on(n2), on(n3))
        assert all(any((n.state_dir / "templates").iterdir()) for n in (n1, n2))
        shown = nodes_cli(pool)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        up = [["n1", n1.address, "up"], ["n2", n2.address, "up"], ["n3", n3.address, "up"]]
        assert [r[:3] for r in rows(shown)] == up
        assert all(r[6] == "1" and int(r[7]) >= 1 for r in rows(shown)[:2]), shown.stdout
        assert rows(shown)[2][6:8] == ["0", "0"], shown.stdout
        # n2's vm-manager dies: its VM's agent no longer answers through it, the
        # pool gives it up and makes its replacement on n1.
        (lost,) = on(n2)
        n2.stop(signal.SIGKILL)
        assert wait_for(lambda: len(on(n1)) == 2, 120), on(n1)
        pool.wait_status(lambda st: st.ready == 2, timeout=120)
        assert on(n2) == [lost], "n2's VM runs on while its vm-manager is away"
        shown = nodes_cli(pool)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        states = [r[:3] for r in rows(shown)]
        # (Nodes that answer are listed first.)
        assert states == [up[0], up[2], ["n2", n2.address, "down"]], shown.stdout
        # n2 is back: the pool VM it left there is destroyed, n1's stay.
        n2.start()
        assert wait_for(lambda: not on(n2), 90), f"n2 still has {on(n2)}"
        assert len(on(n1)) == 2
        assert not on(n3)
        assert pool.status().ready == 2
    finally:
        pool.stop_if_running()
    assert wait_for(lambda: not on(n1) and not on(n2), 60), "pool-manager destroys its idle VMs"


def nodes_cli(pool: PoolManagerProcess) -> subprocess.CompletedProcess[str]:
    """`agent-vm nodes` with the pool-manager's settings (its AGENTVM_NODES)."""
    return subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "nodes"],
        env=pool.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rows(shown: subprocess.CompletedProcess[str]) -> list[list[str]]:
    return [line.split() for line in shown.stdout.splitlines()[1:]]
