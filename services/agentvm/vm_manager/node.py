"""This vm-manager as a node: id, labels, capacity, refusal beyond it (docs/SCALE_OUT.md).

Allocatable is the host's CPUs and memory (libvirt's node info) and the size
of the file system under the state directory, less AGENTVM_NODE_RESERVE.
Committed is what this vm-manager's VMs were given, running or not (a
stopped VM can be started again). CreateVM checks and records a VM in one
step of the event loop, so two creates cannot both take the last room.
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument, ResourceExhausted
from agentvm.common.nodes import NODE_ID_RE, node_id_of_host
from agentvm.common.placement import Amount, Node
from agentvm.vm_manager.templates import Resources

LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,62}[A-Za-z0-9])?$")


def _pairs(text: str, var: str, keys: tuple[str, ...] | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or (keys is not None and key not in keys):
            want = f"keys {', '.join(keys)}" if keys else "key=value items"
            raise InvalidArgument(f"{var}: {item!r} is not one of {want} (comma-separated)")
        out[key] = value
    return out


def _number(value: str, var: str, key: str, lowest: float) -> float:
    try:
        n = float(value)
    except ValueError:
        n = float("nan")
    if not n >= lowest:  # also refuses NaN
        raise InvalidArgument(f"{var}: {key}={value!r} must be a number of at least {lowest:g}")
    return n


@dataclass(frozen=True)
class NodeConfig:
    """The node's settings, checked at start (InvalidArgument naming the variable)."""

    id: str
    labels: dict[str, str] = field(default_factory=dict)
    cpu_overcommit: float = 16.0
    memory_overcommit: float = 1.5
    # qcow2 overlays are thin: a VM's disk size is what it may grow to.
    disk_overcommit: float = 4.0
    reserve_memory_mib: float = 1024
    reserve_disk_mib: float = 4096

    @classmethod
    def from_settings(cls, settings: Settings) -> NodeConfig:
        node_id = settings.node_id or default_node_id()
        if not NODE_ID_RE.match(node_id):
            raise InvalidArgument(
                f"AGENTVM_NODE_ID={node_id!r}: use 1-32 lowercase letters, digits and '-'"
            )
        labels = _pairs(settings.node_labels, "AGENTVM_NODE_LABELS")
        for key, value in labels.items():
            if not LABEL_RE.match(key) or (value and not LABEL_RE.match(value)):
                raise InvalidArgument(
                    f"AGENTVM_NODE_LABELS: {key}={value!r}: keys and values are letters, "
                    "digits, '-', '_', '.' and '/' (up to 64)"
                )
        over = _pairs(
            settings.node_overcommit, "AGENTVM_NODE_OVERCOMMIT", ("cpu", "memory", "disk")
        )
        reserve = _pairs(settings.node_reserve, "AGENTVM_NODE_RESERVE", ("memory", "disk"))

        def ratio(key: str, default: str) -> float:
            return _number(over.get(key, default), "AGENTVM_NODE_OVERCOMMIT", key, 0.1)

        def kept(key: str, default: str) -> float:
            return _number(reserve.get(key, default), "AGENTVM_NODE_RESERVE", key, 0)

        return cls(
            id=node_id,
            labels=labels,
            cpu_overcommit=ratio("cpu", "16"),
            memory_overcommit=ratio("memory", "1.5"),
            disk_overcommit=ratio("disk", "4"),
            reserve_memory_mib=kept("memory", "1024"),
            reserve_disk_mib=kept("disk", "4096"),
        )


def default_node_id() -> str:
    """The host name as a node id (lowercase, other characters as '-', at most 32)."""
    return node_id_of_host(socket.gethostname())


def host_amount(node_info: list[int], state_dir: Path) -> Amount:
    """The host's CPUs and memory (libvirt getInfo: [model, MiB, cpus, ...]) and disk (MiB)."""
    probe = state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = shutil.disk_usage(probe).total >> 20
    return Amount(float(node_info[2]), float(node_info[1]), float(disk))


def committed(resources: Iterable[Resources]) -> Amount:
    total = Amount()
    for r in resources:
        total = total + Amount(r.vcpus, r.memory_mib, r.disk_mib)
    return total


class NodeState:
    """What GetNode reports and CreateVM checks against.

    ``host`` is probed on first use (libvirt may be down when vm-manager
    starts: its calls then say so) and kept: a host's CPUs and memory do not
    change under a running vm-manager.
    """

    def __init__(self, config: NodeConfig, host: Amount | Callable[[], Amount]) -> None:
        self.config = config
        self._host = host

    @classmethod
    def probe(cls, settings: Settings, node_info: Callable[[], list[int]]) -> NodeState:
        return cls(
            NodeConfig.from_settings(settings),
            lambda: host_amount(node_info(), settings.state_dir),
        )

    @property
    def host(self) -> Amount:
        if callable(self._host):
            self._host = self._host()
        return self._host

    @property
    def allocatable(self) -> Amount:
        c = self.config
        return Amount(
            self.host.vcpus,
            max(0.0, self.host.memory_mib - c.reserve_memory_mib),
            max(0.0, self.host.disk_mib - c.reserve_disk_mib),
        )

    def as_node(self, current: Iterable[Resources]) -> Node:
        """This node as placement sees it: one rule for what fits, here and there."""
        c = self.config
        return Node(
            id=c.id,
            allocatable=self.allocatable,
            committed=committed(current),
            cpu_overcommit=c.cpu_overcommit,
            memory_overcommit=c.memory_overcommit,
            disk_overcommit=c.disk_overcommit,
            labels=c.labels,
        )

    def check_room(self, current: Iterable[Resources], new: Resources) -> None:
        """ResourceExhausted naming the resource when ``new`` does not fit."""
        node = self.as_node(current)
        size = Amount(new.vcpus, new.memory_mib, new.disk_mib)
        if node.fits(size):
            return
        used, limit = node.committed, node.limits()
        for what, have, more, most, unit in (
            ("vCPUs", used.vcpus, size.vcpus, limit.vcpus, ""),
            ("memory", used.memory_mib, size.memory_mib, limit.memory_mib, " MiB"),
            ("disk", used.disk_mib, size.disk_mib, limit.disk_mib, " MiB"),
        ):
            if have + more > most:
                raise ResourceExhausted(
                    f"node {self.config.id}: {what} {have:g}{unit} of {most:g}{unit} committed, "
                    f"this VM needs {more:g}{unit} more: destroy VMs, ask for less, place it on "
                    "another node, or raise AGENTVM_NODE_OVERCOMMIT"
                )
