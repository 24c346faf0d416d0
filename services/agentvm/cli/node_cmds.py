"""`agent-vm nodes`: the vm-managers the executor and pool-manager work over, as they see them.

The nodes come from the same discovery as the services' (AGENTVM_NODES,
AGENTVM_NODES_DNS or AGENTVM_NODES_KUBERNETES; the local vm-manager when none
is set), and each is asked ``GetNode`` once, with the rules the services'
fleet applies (``agentvm.common.fleet``): the id discovery expects, one
address per id, and a node still taking up its VMs is not usable yet.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import click
import grpc

from agentvm.cli.base import enum_word, handle_errors, message_dict, print_table, service, settings
from agentvm.cli.group import fail
from agentvm.common import nodes as discovery
from agentvm.common.errors import AgentVMError
from agentvm.common.fleet import unusable
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc

ASK_TIMEOUT_S = 3.0


@dataclass
class Seen:
    """One discovered address and what its vm-manager answered."""

    address: str
    expected_id: str
    node: vm_manager_pb2.Node | None = None
    problem: str = ""

    @property
    def state(self) -> str:
        if self.problem:
            return "unusable" if self.node is not None else "down"
        return "up"


def _ask(where: discovery.NodeAddress) -> Seen:
    seen = Seen(where.address, where.expected_id)
    stub = vm_manager_pb2_grpc.VMManagerServiceStub(service(where.address, "vm-manager"))
    try:
        seen.node = stub.GetNode(vm_manager_pb2.GetNodeRequest(), timeout=ASK_TIMEOUT_S).node
    except grpc.RpcError as exc:
        seen.problem = f"{exc.code().name}: {exc.details()}"
        return seen
    seen.problem = unusable(seen.node, where.expected_id)  # the services' own rule
    return seen


def survey() -> list[Seen]:
    """Every discovered node, asked at once (a node id claimed twice marks both)."""
    try:
        found = discovery.from_settings(settings())

        async def current() -> list[discovery.NodeAddress]:
            try:
                return await found.current()
            finally:
                await found.close()

        addresses = asyncio.run(current())
    except AgentVMError as exc:
        fail(f"cannot discover the nodes: {exc.message}")
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(addresses)))) as pool:
        seen = list(pool.map(_ask, addresses))
    by_id: dict[str, list[Seen]] = {}
    for s in seen:
        if s.node is not None and not s.problem:
            by_id.setdefault(s.node.id, []).append(s)
    for node_id, same in by_id.items():
        if len(same) > 1:
            for s in same:
                others = ", ".join(o.address for o in same if o is not s)
                s.problem = f"node id {node_id!r} is answered by {others} too"
    return sorted(seen, key=lambda s: (s.node.id if s.node else "~", s.address))


def _share(used: float, allocatable: float, overcommit: float) -> str:
    limit = allocatable * (overcommit or 1.0)
    return f"{used:g}/{limit:g}"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handle_errors
def nodes(as_json: bool) -> None:
    """The vm-manager nodes (from AGENTVM_NODES*, else the local one) and their capacity.

    VCPUS and MEMORY_MIB are committed against allocatable times the
    overcommit the node allows. Exits 1 when a node is down or unusable.
    """
    seen = survey()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "address": s.address,
                        "state": s.state,
                        "problem": s.problem,
                        "node": message_dict(s.node) if s.node is not None else None,
                    }
                    for s in seen
                ],
                indent=2,
            )
        )
    else:
        rows: list[list[object]] = []
        for s in seen:
            n = s.node
            if n is None:
                blank = [""] * 5
                rows.append([s.expected_id or "?", s.address, s.state, *blank, s.problem])
                continue
            a, c = n.allocatable, n.committed
            rows.append(
                [
                    n.id,
                    s.address,
                    s.state,
                    enum_word(common_pb2.Accelerator, n.accelerator, "ACCELERATOR_"),
                    _share(c.vcpus, a.vcpus, n.cpu_overcommit),
                    _share(c.memory_mib, a.memory_mib, n.memory_overcommit),
                    n.vm_count,
                    len(n.template_keys),
                    s.problem or ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
                ]
            )
        print_table(
            [
                "NODE",
                "ADDRESS",
                "STATE",
                "ACCEL",
                "VCPUS",
                "MEMORY_MIB",
                "VMS",
                "TEMPLATES",
                "LABELS / PROBLEM",
            ],
            rows,
        )
    if any(s.problem for s in seen):
        raise SystemExit(1)
