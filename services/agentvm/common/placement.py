"""Choosing a node for a VM, and splitting a pool's target across nodes (docs/SCALE_OUT.md).

Pure and seeded: the executor and pool-manager pass what their health checks
know of each node and a ``random.Random``; the same inputs give the same
choice, so tests replay a fleet. E2B samples 3 nodes and takes the least
loaded; here the sample is drawn only from nodes where the VM fits (so a
full sample never refuses a VM that some node could take), the score
counts both vCPUs and memory, and a node that holds the image's memory
template or a warm pool VM is preferred unless it is much more loaded.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agentvm.common.errors import ResourceExhausted

SAMPLE = 3
# Score bonuses (load is 0..1 after placing): a clone starts in ~1 s against a
# cold boot's 7-10 s, a warm pool VM at once.
WARM_BONUS = 0.25
TEMPLATE_BONUS = 0.15


@dataclass(frozen=True)
class Amount:
    """vCPUs, memory and disk: a VM's size, or a node's allocatable or committed."""

    vcpus: float = 0
    memory_mib: float = 0
    disk_mib: float = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.disk_mib + other.disk_mib,
        )


@dataclass(frozen=True)
class Node:
    """What placement knows of one node (from its GetNode and health checks)."""

    id: str
    allocatable: Amount
    committed: Amount = Amount()
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    disk_overcommit: float = 1.0
    labels: Mapping[str, str] = field(default_factory=dict)
    accelerator: str = ""
    templates: frozenset[str] = frozenset()
    # Ready pool VMs by pool key.
    warm: Mapping[str, int] = field(default_factory=dict)
    healthy: bool = True

    def limits(self) -> Amount:
        a = self.allocatable
        return Amount(
            a.vcpus * self.cpu_overcommit,
            a.memory_mib * self.memory_overcommit,
            a.disk_mib * self.disk_overcommit,
        )

    def fits(self, size: Amount) -> bool:
        after, limit = self.committed + size, self.limits()
        return (
            after.vcpus <= limit.vcpus
            and after.memory_mib <= limit.memory_mib
            and after.disk_mib <= limit.disk_mib
        )

    def load(self, extra: Amount = Amount()) -> float:
        """The larger of vCPU and memory use (0..1 of the limits) with ``extra`` placed."""
        after, limit = self.committed + extra, self.limits()
        return max(
            after.vcpus / limit.vcpus if limit.vcpus else 1.0,
            after.memory_mib / limit.memory_mib if limit.memory_mib else 1.0,
        )


@dataclass(frozen=True)
class Want:
    """A VM to place: its size and what its node must have or should hold."""

    size: Amount
    labels: Mapping[str, str] = field(default_factory=dict)
    accelerator: str = ""
    template_key: str = ""
    pool_key: str = ""


def eligible(node: Node, want: Want) -> bool:
    return (
        node.healthy
        and all(node.labels.get(k) == v for k, v in want.labels.items())
        and (not want.accelerator or node.accelerator == want.accelerator)
        and node.fits(want.size)
    )


def score(node: Node, want: Want) -> float:
    """Lower is better: load after placing, less the warm and template bonuses."""
    s = node.load(want.size)
    if want.pool_key and node.warm.get(want.pool_key, 0) > 0:
        s -= WARM_BONUS
    elif want.template_key and want.template_key in node.templates:
        s -= TEMPLATE_BONUS
    return s


def choose(
    nodes: Sequence[Node], want: Want, rng: random.Random, sample: int = SAMPLE
) -> list[Node]:
    """Up to ``sample`` nodes to try in order (the caller moves to the next on
    RESOURCE_EXHAUSTED or UNAVAILABLE). ResourceExhausted when none can take it,
    saying why."""
    fit = [n for n in nodes if eligible(n, want)]
    if not fit:
        raise ResourceExhausted(_why_none(nodes, want))
    picked = rng.sample(fit, min(sample, len(fit)))
    return sorted(picked, key=lambda n: (score(n, want), n.id))


def _why_none(nodes: Sequence[Node], want: Want) -> str:
    size = want.size
    what = f"{size.vcpus:g} vCPUs, {size.memory_mib:g} MiB, {size.disk_mib:g} MiB disk"
    healthy = [n for n in nodes if n.healthy]
    if not nodes:
        return "no nodes are known: check the discovery settings (AGENTVM_NODES)"
    if not healthy:
        return f"none of the {len(nodes)} nodes answers: check them (agent-vm status)"
    matching = [
        n
        for n in healthy
        if all(n.labels.get(k) == v for k, v in want.labels.items())
        and (not want.accelerator or n.accelerator == want.accelerator)
    ]
    if not matching:
        asked = ", ".join(f"{k}={v}" for k, v in sorted(want.labels.items()))
        accel = f" with {want.accelerator}" if want.accelerator else ""
        return (
            f"no healthy node has labels [{asked}]{accel} ({len(healthy)} healthy): "
            "relax the selector or label a node"
        )
    return (
        f"no healthy node has room for {what} ({len(matching)} match, the least loaded at "
        f"{min(n.load() for n in matching):.0%}): close sandboxes, shrink the request, or add "
        "a node"
    )


def split(total: int, nodes: Sequence[Node], size: Amount) -> dict[str, int]:
    """A pool's ``total`` VMs of ``size`` split across the healthy nodes in proportion
    to how many each can still take (largest remainder; never more than fits)."""
    room: dict[str, int] = {}
    for n in nodes:
        if not n.healthy:
            continue
        free_vcpus = n.limits().vcpus - n.committed.vcpus
        free_mem = n.limits().memory_mib - n.committed.memory_mib
        free_disk = n.limits().disk_mib - n.committed.disk_mib
        can = min(
            int(free_vcpus // size.vcpus) if size.vcpus else total,
            int(free_mem // size.memory_mib) if size.memory_mib else total,
            int(free_disk // size.disk_mib) if size.disk_mib else total,
        )
        if can > 0:
            room[n.id] = can
    if not room:
        return {}
    want = min(total, sum(room.values()))
    whole = sum(room.values())
    shares = {k: want * v / whole for k, v in room.items()}
    out = {k: min(int(s), room[k]) for k, s in shares.items()}
    left = want - sum(out.values())
    order = sorted(room, key=lambda k: (-(shares[k] - int(shares[k])), k))
    while left > 0:  # ends: want <= the sum of room
        for k in order:
            if left > 0 and out[k] < room[k]:
                out[k] += 1
                left -= 1
    return {k: v for k, v in out.items() if v > 0}
