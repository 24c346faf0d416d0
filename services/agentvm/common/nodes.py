"""Where the nodes (vm-managers) are: discovery backends (docs/SCALE_OUT.md, "Discovery").

A discovered address is only a candidate: a node counts once its GetNode
answers over mutual TLS (the caller's health checks). Backends here:

- static (the default): ``AGENTVM_NODES=[id=]address,...``, else the one
  local vm-manager (``AGENTVM_VM_MANAGER_ADDR``): a single host needs no setting;
- dns: ``AGENTVM_NODES_DNS=name:port``, one A/AAAA record per node (a
  Kubernetes headless Service), resolved on every call;
- kubernetes: ``AGENTVM_NODES_KUBERNETES=[namespace/]service[:port]``, the
  Service's EndpointSlices listed then watched (``nodes_kubernetes.py``,
  imported only when set).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument, Unavailable

# A node id (AGENTVM_NODE_ID, VM.node_id): vm-manager and the discovery settings agree.
NODE_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]{0,252}[A-Za-z0-9])?$")


def node_id_of_host(host: str) -> str:
    """A host name as a node id: its first label, lowercase, other characters as '-', at most 32.

    A vm-manager without AGENTVM_NODE_ID takes its host's; the Kubernetes
    backend expects an endpoint's node to have the id of its node name.
    """
    name = re.sub(r"[^a-z0-9-]", "-", host.split(".", maxsplit=1)[0].lower()).strip("-")
    return name[:32].strip("-") or "node"


@dataclass(frozen=True, order=True)
class NodeAddress:
    """A gRPC target of a vm-manager, and the node id it is expected to have ("": any)."""

    address: str
    expected_id: str = ""


class Discovery(Protocol):
    async def current(self) -> list[NodeAddress]: ...

    async def close(self) -> None: ...


def _check_address(address: str, var: str) -> str:
    if address.startswith("unix:"):
        if len(address) > 5:
            return address
    else:
        host, sep, port = address.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and port.isdigit() and 0 < int(port) < 65536 and host:
            try:
                ipaddress.ip_address(host)
                return address
            except ValueError:
                if HOST_RE.match(host):
                    return address
    raise InvalidArgument(
        f"{var}: {address!r} is not a vm-manager address: use unix:/path, host:port or [ipv6]:port"
    )


@dataclass(frozen=True)
class Static:
    """A fixed list of nodes."""

    nodes: tuple[NodeAddress, ...]

    @classmethod
    def parse(cls, text: str, var: str = "AGENTVM_NODES") -> Static:
        out: list[NodeAddress] = []
        for item in filter(None, (p.strip() for p in text.split(","))):
            node_id, sep, address = item.partition("=")
            if not sep:
                node_id, address = "", item
            elif not NODE_ID_RE.match(node_id):
                raise InvalidArgument(
                    f"{var}: node id {node_id!r}: use 1-32 lowercase letters, digits and '-'"
                )
            out.append(NodeAddress(_check_address(address, var), node_id))
        if not out:
            raise InvalidArgument(f"{var} is empty: name at least one vm-manager address")
        named = Counter([n.address for n in out] + [n.expected_id for n in out if n.expected_id])
        if dup := [k for k, times in named.items() if times > 1]:
            raise InvalidArgument(f"{var}: {', '.join(sorted(dup))} named twice")
        return cls(tuple(out))

    async def current(self) -> list[NodeAddress]:
        return list(self.nodes)

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Dns:
    """One node per address a name resolves to (a headless Service's records)."""

    name: str
    port: int

    @classmethod
    def parse(cls, text: str, var: str = "AGENTVM_NODES_DNS") -> Dns:
        name, sep, port = text.strip().rpartition(":")
        if not sep or not HOST_RE.match(name) or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(
                f"{var}={text!r}: use name:port, e.g. vm-manager.agent-vm.svc.cluster.local:7001"
            )
        return cls(name, int(port))

    async def current(self) -> list[NodeAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Unavailable(
                f"cannot resolve {self.name} (AGENTVM_NODES_DNS): {exc}; check the name and "
                "the resolver, or list the nodes in AGENTVM_NODES"
            ) from None
        found = set()
        for family, _type, _proto, _canon, sockaddr in infos:
            host = str(sockaddr[0])
            found.add(
                f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}"
            )
        return [NodeAddress(a) for a in sorted(found)]

    async def close(self) -> None:
        return None


def from_settings(settings: Settings) -> Discovery:
    """The backend the settings name (InvalidArgument naming the variable)."""
    chosen = {
        "AGENTVM_NODES": settings.nodes,
        "AGENTVM_NODES_DNS": settings.nodes_dns,
        "AGENTVM_NODES_KUBERNETES": settings.nodes_kubernetes,
    }
    if len(named := [k for k, v in chosen.items() if v]) > 1:
        raise InvalidArgument(f"{' and '.join(named)} are set together: set only one")
    if settings.nodes_kubernetes:
        from agentvm.common.nodes_kubernetes import Kubernetes

        return Kubernetes.parse(settings.nodes_kubernetes)
    if settings.nodes_dns:
        return Dns.parse(settings.nodes_dns)
    if settings.nodes:
        return Static.parse(settings.nodes)
    return Static.parse(settings.vm_manager_addr, "AGENTVM_VM_MANAGER_ADDR")
