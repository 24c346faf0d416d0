"""Discovery from the Kubernetes API: the vm-manager Service's EndpointSlices, listed then watched.

``AGENTVM_NODES_KUBERNETES=[namespace/]service[:port]`` (docs/SCALE_OUT.md,
"Discovery"). Run in a pod: the service account's token and CA, and the API
server from ``KUBERNETES_SERVICE_HOST``/``_PORT`` (the official client's
in-cluster loader, token re-read as it rotates). The account needs ``list``
and ``watch`` on ``endpointslices`` in the namespace (deploy/kubernetes has
the Role).

The slices are listed, then watched from the list's resourceVersion (with
bookmarks) for a few minutes at a time, then listed again: a watch the server
ends, a 410 Gone (the version expired) or a broken connection all lead to a
fresh list, after a backoff when the list itself failed. ``current()`` answers
from what was last seen, so a caller keeps its nodes while the API server is
away; before the first list succeeds it waits briefly, then raises
UNAVAILABLE naming what went wrong.

Each ready endpoint address is a node candidate (``ready`` unset counts as
ready, as the API defines it; terminating endpoints are not ready); the node
id expected there is the endpoint's node name made a node id the way a
vm-manager makes its own from its host name (a DaemonSet pod on the host
network has the node's host name). Every field is checked: a malformed
address, port or type is skipped, never dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentvm.common.errors import InvalidArgument, Unavailable
from agentvm.common.nodes import HOST_RE, NodeAddress, node_id_of_host

log = logging.getLogger("agentvm.nodes.kubernetes")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_LABEL = "kubernetes.io/service-name"
WATCH_S = 240  # one watch's server-side timeout; then a fresh list
FIRST_LIST_S = 5.0  # how long current() waits for the first list
BACKOFF_S = (0.5, 30.0)
# A DNS-1123 label (a Service or namespace name) and an IANA_SVC_NAME (a port name).
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PORT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
VAR = "AGENTVM_NODES_KUBERNETES"


@dataclass(frozen=True)
class Target:
    """Which Service's endpoints, and which of their ports (a name, or a number)."""

    namespace: str
    service: str
    port: str = "grpc"

    @classmethod
    def parse(cls, text: str, sa_dir: Path = SA_DIR) -> Target:
        rest = text.strip()
        namespace, sep, rest = rest.rpartition("/")
        service, sep2, port = rest.partition(":")
        if not sep:
            namespace = _own_namespace(sa_dir)
        port = port if sep2 else "grpc"
        good_port = (port.isdigit() and 0 < int(port) < 65536) or (
            PORT_NAME_RE.match(port) and not port.isdigit()
        )
        if not (NAME_RE.match(namespace) and NAME_RE.match(service) and good_port):
            raise InvalidArgument(
                f"{VAR}={text!r}: use [namespace/]service[:port], e.g. agent-vm/vm-manager:grpc "
                "(lowercase DNS labels; the port by name or number)"
            )
        return cls(namespace, service, port)


def _own_namespace(sa_dir: Path) -> str:
    try:
        return (sa_dir / "namespace").read_text().strip()
    except OSError:
        raise InvalidArgument(
            f"{VAR}: no namespace given and none in {sa_dir}/namespace (not in a pod?): "
            "write it as namespace/service"
        ) from None


def _addresses(slice_: Any, port_wanted: str) -> list[NodeAddress]:
    """The ready addresses of one EndpointSlice (a V1EndpointSlice), each checked."""
    kind = getattr(slice_, "address_type", None)
    if kind not in ("IPv4", "IPv6"):
        return []
    if port_wanted.isdigit():
        port = int(port_wanted)
    else:
        found = [
            p.port
            for p in getattr(slice_, "ports", None) or []
            if p.name == port_wanted and (p.protocol or "TCP") == "TCP"
        ]
        if not found or not isinstance(found[0], int) or not 0 < found[0] < 65536:
            return []
        port = found[0]
    out: list[NodeAddress] = []
    for ep in getattr(slice_, "endpoints", None) or []:
        conditions = ep.conditions
        if conditions is not None and conditions.ready is False:
            continue
        node = ep.node_name if isinstance(ep.node_name, str) and HOST_RE.match(ep.node_name) else ""
        for raw in ep.addresses or []:
            try:
                ip = ipaddress.ip_address(raw)
            except (TypeError, ValueError):
                continue
            if ip.version != (4 if kind == "IPv4" else 6):
                continue
            host = f"[{ip}]" if ip.version == 6 else str(ip)
            out.append(NodeAddress(f"{host}:{port}", node_id_of_host(node) if node else ""))
    return out


class Kubernetes:
    """Nodes are the ready endpoints of a Service, kept current by list + watch."""

    def __init__(
        self,
        target: Target,
        *,
        sa_dir: Path = SA_DIR,
        environ: Mapping[str, str] = os.environ,
        watch_s: int = WATCH_S,
    ) -> None:
        self.target = target
        self._sa_dir = sa_dir
        self._environ = environ
        self._watch_s = watch_s
        self.first_list_s = FIRST_LIST_S
        self._slices: dict[str, Any] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._api: Any = None
        self.error = ""  # what the last failed list or watch said ("" when it is well)
        self.lists = 0  # how many lists succeeded (a watch broken and resumed shows here)

    @classmethod
    def parse(cls, text: str, sa_dir: Path = SA_DIR) -> Kubernetes:
        return cls(Target.parse(text, sa_dir), sa_dir=sa_dir)

    def _client(self) -> Any:
        from kubernetes.aio import client
        from kubernetes.aio.config import incluster_config
        from kubernetes.aio.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            loader = incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=str(self._sa_dir / "token"),
                cert_filename=str(self._sa_dir / "ca.crt"),
                environ=self._environ,
            )
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise InvalidArgument(
                f"{VAR}: not in a Kubernetes pod ({exc}); outside a cluster set "
                "AGENTVM_NODES_DNS or AGENTVM_NODES instead"
            ) from None
        return client.DiscoveryV1Api(client.ApiClient(configuration))

    async def current(self) -> list[NodeAddress]:
        if self._task is None:
            self._api = self._client()
            self._task = asyncio.create_task(self._run(), name="k8s-discovery")
        if not self._synced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), self.first_list_s)
        if not self._synced.is_set():
            t = self.target
            raise Unavailable(
                f"cannot list the endpoints of Service {t.namespace}/{t.service} "
                f"({VAR}): {self.error or 'no answer yet'}; check the API server, the "
                "service account's list/watch on endpointslices, and the Service name"
            )
        seen = {a for s in self._slices.values() for a in _addresses(s, self.target.port)}
        return sorted(seen)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._api is not None:
            await self._api.api_client.close()
            self._api = None

    async def _run(self) -> None:
        delay, gone_before = BACKOFF_S[0], False
        while True:
            try:
                version = await self._list()
                await self._watch(version)
                delay, gone_before = BACKOFF_S[0], False  # a watch that ran its course
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: list again, after a pause
                self.error = _describe(exc)
                if getattr(exc, "status", None) == 410 and not gone_before:
                    gone_before = True  # the version expired: list again now, once
                    continue
                gone_before = False
                log.warning("kubernetes discovery: %s; listing again in %.1f s", self.error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_S[1])

    def _selector(self) -> str:
        return f"{SERVICE_LABEL}={self.target.service}"

    async def _list(self) -> str:
        got = await self._api.list_namespaced_endpoint_slice(
            self.target.namespace, label_selector=self._selector(), _request_timeout=30
        )
        self._slices = {s.metadata.name: s for s in got.items or [] if s.metadata}
        self.lists += 1
        self.error = ""
        self._synced.set()
        return str(got.metadata.resource_version or "")

    async def _watch(self, version: str) -> None:
        from kubernetes.aio import watch

        async with watch.Watch() as w:  # type: ignore[no-untyped-call]
            stream = w.stream(
                self._api.list_namespaced_endpoint_slice,
                self.target.namespace,
                label_selector=self._selector(),
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_s,
                _request_timeout=self._watch_s + 30,
            )
            async for event in stream:
                kind, obj = event.get("type"), event.get("object")
                name = getattr(getattr(obj, "metadata", None), "name", None)
                if kind == "BOOKMARK" or not isinstance(name, str):
                    continue
                if kind == "DELETED":
                    self._slices.pop(name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    self._slices[name] = obj


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        reason = str(getattr(exc, "reason", "") or "").strip()
        return f"HTTP {status} {reason}".strip()
    return f"{type(exc).__name__}: {exc}"[:300]
