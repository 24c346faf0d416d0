"""The vm-managers a service works with: discovered, health-checked, and chosen per call.

docs/SCALE_OUT.md ("Placement", "Failures"). :class:`Fleet` keeps one channel
per discovered node, asks each ``GetNode`` every ``PROBE_S`` (``PROBE_TIMEOUT_S``
deadline) and marks a node down after ``DOWN_AFTER`` misses in a row, probing it
then with a backoff that doubles to ``BACKOFF_MAX_S``. A discovered address
counts once it answers, with the id discovery expected (if any) and one no
other address has.

:class:`FleetStub` looks like a ``VMManagerServiceStub`` to the code that holds
it, and routes each call:

* a call about one VM (by its name) goes to that VM's node: known from the
  VM handles the fleet has seen (CreateVM, ListVMs, GetVM answers name their
  node), else asked of every healthy node once;
* ``CreateVM`` goes where placement puts it (``agentvm.common.placement``:
  fits, least loaded of a sample of 3), and to the next candidate on
  RESOURCE_EXHAUSTED or UNAVAILABLE; with one node, straight to it (its own
  refusal is the answer);
* ``ListVMs`` asks every healthy node and merges the answers;
* ``PrepareTemplate`` builds the template on every healthy node (each node
  restores only from its own), answering with the first node's template; a
  ``CreateVM`` from a template then prefers the nodes that hold it;
* anything else (host info, images) goes to the first healthy node.

A call for a VM on a node that is down probes it first (at most once a
``REVIVE_S``: a node that is back is used at once, not after its backoff) and
otherwise fails at once with UNAVAILABLE naming the node and since when. The
stub fails as a real one does (``grpc.aio.AioRpcError``), so its callers'
handling of UNAVAILABLE (a teardown waiting out a restarting vm-manager)
holds for a lost node too. With one node (the single-host default) nothing is
decided here: every call goes to it, as before fleets existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentvm.common import placement
from agentvm.common.errors import AgentVMError, NotFound, Unavailable
from agentvm.common.grpc_util import rpc_error
from agentvm.common.nodes import Discovery, NodeAddress
from agentvm.common.profiles import ResourceProfile
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc

log = logging.getLogger("agentvm.fleet")

PROBE_S = 2.0
PROBE_TIMEOUT_S = 1.0
DOWN_AFTER = 3
BACKOFF_MAX_S = 30.0
REVIVE_S = 1.0
# Calls about one VM, by the request's ``name``.
VM_METHODS = frozenset(
    {
        "StartVM",
        "StopVM",
        "DestroyVM",
        "SuspendVM",
        "ResumeVM",
        "GetVM",
        "WaitVM",
        "UpdateNetworkPolicy",
        "WatchEgress",
        "CaptureEvidence",
        "LeasePoolVM",
        "SetVMRecord",
    }
)
RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass
class NodeLink:
    """One discovered vm-manager: its channel and what its health checks found."""

    address: str
    expected_id: str
    channel: grpc.aio.Channel
    stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    node: vm_manager_pb2.Node | None = None  # its last GetNode answer
    misses: int = 0
    down_since: float = 0.0  # wall clock of the first miss of the current run
    next_probe: float = 0.0  # monotonic
    last_probe: float = float("-inf")  # monotonic, when the last probe started
    probing: asyncio.Future[None] | None = None  # the probe in flight
    error: str = ""

    @property
    def id(self) -> str:
        return self.node.id if self.node is not None else ""

    @property
    def healthy(self) -> bool:
        return self.misses < DOWN_AFTER

    @property
    def local(self) -> bool:
        """On this host: its VMs' relay sockets can be dialled directly."""
        return self.address.startswith("unix:")

    def describe(self) -> str:
        return f"node {self.id or '?'} ({self.address})"

    def for_placement(self) -> placement.Node:
        n = self.node or vm_manager_pb2.Node()

        def amount(r: common_pb2.Resources) -> placement.Amount:
            return placement.Amount(r.vcpus, r.memory_mib, r.disk_mib)

        return placement.Node(
            id=n.id,
            allocatable=amount(n.allocatable),
            committed=amount(n.committed),
            cpu_overcommit=n.cpu_overcommit or 1.0,
            memory_overcommit=n.memory_overcommit or 1.0,
            disk_overcommit=n.disk_overcommit or 1.0,
            labels=dict(n.labels),
            accelerator=common_pb2.Accelerator.Name(n.accelerator),
            templates=frozenset(n.template_keys),
            healthy=self.healthy,
        )


@dataclass
class Fleet:
    """The nodes a discovery backend names, each with a channel and its health."""

    discovery: Discovery
    channel_for: Callable[[str], grpc.aio.Channel]
    rng: random.Random = field(default_factory=random.Random)
    make_stub: Callable[[grpc.aio.Channel], Any] = vm_manager_pb2_grpc.VMManagerServiceStub
    links: dict[str, NodeLink] = field(default_factory=dict)  # by address
    where: dict[str, str] = field(default_factory=dict)  # VM name -> node id
    # (profile, network mode, image) of a PrepareTemplate -> the template's key.
    template_keys: dict[tuple[int, int, str], str] = field(default_factory=dict)
    # Called (in a task of their own) with a node that answers, recovered, after
    # missing a probe or never answering: a service reconciles what it had there.
    on_up: list[Callable[[NodeLink], Awaitable[None]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _hooks: set[asyncio.Task[None]] = field(default_factory=set)

    # -- membership and health ------------------------------------------------------------

    async def start(self) -> None:
        """One round of discovery and probes (so the first call has nodes), then a loop."""
        await self.refresh()
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for hook in list(self._hooks):
            hook.cancel()
        await asyncio.gather(*self._hooks, return_exceptions=True)
        await self.discovery.close()
        for link in self.links.values():
            await link.channel.close(None)
        self.links.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_S / 4)
            try:
                await self.refresh()
            except Exception:  # the loop must outlive any one round
                log.exception("node health round failed")

    async def refresh(self) -> None:
        try:
            found = await self.discovery.current()
        except AgentVMError as exc:
            log.warning("node discovery failed (keeping the nodes known): %s", exc)
            found = [NodeAddress(a, link.expected_id) for a, link in self.links.items()]
        wanted = {n.address: n for n in found}
        for address in [a for a in self.links if a not in wanted]:
            link = self.links.pop(address)
            log.info("%s is no longer discovered", link.describe())
            await link.channel.close(None)
        for address, n in wanted.items():
            if address not in self.links:
                channel = self.channel_for(address)
                self.links[address] = NodeLink(
                    address,
                    n.expected_id,
                    channel,
                    self.make_stub(channel),
                )
        now = time.monotonic()
        due = [link for link in self.links.values() if link.next_probe <= now]
        await asyncio.gather(*(self.probe(link) for link in due))

    async def probe(self, link: NodeLink) -> None:
        """Ask the node now (joining a probe already in flight: one miss is one miss)."""
        task = link.probing
        if task is None:
            task = link.probing = asyncio.ensure_future(self._probe(link))
        try:
            await asyncio.shield(task)
        finally:
            if link.probing is task and task.done():
                link.probing = None

    async def revive(self, link: NodeLink) -> None:
        """Probe a down node before a call gives up on it (at most once a REVIVE_S)."""
        if not link.healthy and (
            link.probing is not None or time.monotonic() - link.last_probe >= REVIVE_S
        ):
            await self.probe(link)

    async def _probe(self, link: NodeLink) -> None:
        link.last_probe = time.monotonic()
        try:
            node = (
                await link.stub.GetNode(vm_manager_pb2.GetNodeRequest(), timeout=PROBE_TIMEOUT_S)
            ).node
            problem = unusable(node, link.expected_id)
            if problem:
                raise _Refused(problem)
            other = next(
                (o for o in self.links.values() if o is not link and o.id == node.id and o.healthy),
                None,
            )
            if other is not None:
                raise _Refused(f"node id {node.id!r} is {other.address}'s already")
        except (grpc.aio.AioRpcError, _Refused) as exc:
            link.misses += 1
            link.error = (
                (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            )
            if link.misses == 1:
                link.down_since = time.time()
            if link.misses == DOWN_AFTER:
                log.warning("%s is down: %s", link.describe(), link.error)
            backoff = PROBE_S if link.healthy else PROBE_S * 2 ** (link.misses - DOWN_AFTER + 1)
            link.next_probe = time.monotonic() + min(backoff, BACKOFF_MAX_S)
            return
        # Missed once or more (down, restarted, recovering) or never seen: what a
        # service had there may have changed behind its back.
        back = link.misses > 0 or link.node is None
        if not link.healthy:
            log.info("%s answers again", link.describe())
        link.node, link.misses, link.error = node, 0, ""
        link.next_probe = time.monotonic() + PROBE_S
        if back:
            for hook in self.on_up:
                task = asyncio.ensure_future(self._run_hook(hook, link))
                self._hooks.add(task)
                task.add_done_callback(self._hooks.discard)

    async def _run_hook(self, hook: Callable[[NodeLink], Awaitable[None]], link: NodeLink) -> None:
        try:
            await hook(link)
        except Exception:  # a hook's failure is logged, never the fleet's
            log.exception("reconciling %s failed", link.describe())

    # -- choosing a node ------------------------------------------------------------------

    def only(self) -> NodeLink | None:
        """The one node of a single-node fleet (None with more, or none)."""
        if len(self.links) == 1:
            return next(iter(self.links.values()))
        return None

    def healthy(self) -> list[NodeLink]:
        return [link for link in self.links.values() if link.healthy]

    async def link_now(self, node_id: str) -> NodeLink:
        """:meth:`link`, after probing the node if it is down (it may be back)."""
        for link in self.links.values():
            if link.id == node_id and len(self.links) > 1:
                await self.revive(link)
        return self.link(node_id)

    def link(self, node_id: str) -> NodeLink:
        """The node with this id, if it is up (UNAVAILABLE naming it otherwise)."""
        single = self.only()
        if single is not None:
            return single  # one node: every VM is its (as before fleets)
        for link in self.links.values():
            if link.id == node_id:
                if not link.healthy:
                    since = time.strftime("%H:%M:%S", time.localtime(link.down_since))
                    raise Unavailable(
                        f"{link.describe()} has not answered since {since} ({link.error}); "
                        "its sandboxes return when it does, or close them"
                    )
                return link
        raise Unavailable(
            f"node {node_id or '?'} is not one this service knows (not discovered, or it has "
            "never answered): check the node and the discovery settings"
        )

    def any(self) -> NodeLink:
        """A node for a call about no one VM: the first healthy one."""
        single = self.only()
        if single is not None:
            return single
        up = sorted(self.healthy(), key=lambda link: link.address)
        if not up:
            raise self.none_answers()
        return up[0]

    def none_answers(self) -> Unavailable:
        return Unavailable(
            f"none of the {len(self.links)} nodes answers: check them (agent-vm nodes)"
        )

    def candidates(self, want: placement.Want) -> list[NodeLink]:
        """Nodes to try for a new VM, in order (ResourceExhausted saying why when none)."""
        single = self.only()
        if single is not None:
            return [single]
        known = {link.id: link for link in self.links.values() if link.node is not None}
        nodes = [link.for_placement() for link in known.values()]
        holding = [n for n in nodes if want.template_key and want.template_key in n.templates]
        if holding:
            # A restore from a node's own template (~1 s) over a cold boot (7-10 s):
            # only when none of the nodes holding it has room does another one serve.
            with contextlib.suppress(AgentVMError):
                return [known[n.id] for n in placement.choose(holding, want, self.rng)]
        chosen = placement.choose(nodes, want, self.rng)
        return [known[n.id] for n in chosen]

    def remember(self, vm: common_pb2.VM) -> None:
        if vm.name and vm.node_id:
            self.where[vm.name] = vm.node_id

    def address_of(self, vm: common_pb2.VM) -> str:
        return self.link(vm.node_id or self.where.get(vm.name, "")).address


def unusable(node: vm_manager_pb2.Node, expected_id: str) -> str:
    """Why a node that answered ``GetNode`` cannot be used ("" when it can): another id
    than discovery expected, or its VMs and load not whole yet (still recovering)."""
    if expected_id and node.id != expected_id:
        return f"it says it is node {node.id!r}, discovery expected {expected_id!r}"
    if node.recovering:
        return "it is still taking up the VMs of its previous run"
    return ""


class _Refused(Exception):
    pass


def _as_rpc(exc: AgentVMError) -> grpc.aio.AioRpcError:
    return rpc_error(exc.code, str(exc))


def _raising(exc: AgentVMError) -> Callable[..., Any]:
    def call(*args: Any, **kw: Any) -> Any:
        raise _as_rpc(exc) from exc

    return call


class FleetStub:
    """A VMManagerService stub over the fleet: each call to the node it concerns.

    Its refusals (no node up, no room, an unknown VM) are ``grpc.aio.AioRpcError``
    with the status a vm-manager would have given, as from a real stub.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method == "CreateVM":
            return self._create
        if method == "ListVMs":
            return self._list
        if method == "PrepareTemplate":
            return self._prepare
        if method in VM_METHODS:
            return lambda request, **kw: self._by_name(method, request, kw)
        try:
            return getattr(self.fleet.any().stub, method)  # type: ignore[no-any-return]
        except AgentVMError as exc:
            return _raising(exc)

    def _by_name(self, method: str, request: Any, kw: dict[str, Any]) -> Any:
        fleet = self.fleet
        single = fleet.only()
        if single is not None:
            return getattr(single.stub, method)(request, **kw)
        node_id = fleet.where.get(request.name)
        if method == "WatchEgress":  # a stream: its node must be known and up already
            try:
                if node_id is None:
                    raise NotFound(f"no VM named {request.name} is known on any node")
                return getattr(fleet.link(node_id).stub, method)(request, **kw)
            except AgentVMError as exc:
                raise _as_rpc(exc) from exc
        if node_id is None:
            return self._find_then(method, request, kw)
        return self._on_node(node_id, method, request, kw)

    async def _on_node(self, node_id: str, method: str, request: Any, kw: dict[str, Any]) -> Any:
        try:
            link = await self.fleet.link_now(node_id)
        except AgentVMError as exc:
            raise _as_rpc(exc) from exc
        return await getattr(link.stub, method)(request, **kw)

    async def _find_then(self, method: str, request: Any, kw: dict[str, Any]) -> Any:
        """A VM this service has not seen yet: ask every healthy node where it is."""
        fleet = self.fleet
        asked = fleet.healthy()
        answers = await asyncio.gather(
            *(
                link.stub.GetVM(vm_manager_pb2.GetVMRequest(name=request.name), timeout=10)
                for link in asked
            ),
            return_exceptions=True,
        )
        for link, answer in zip(asked, answers, strict=True):
            if isinstance(answer, vm_manager_pb2.GetVMResponse):
                fleet.where[request.name] = link.id
                return await getattr(link.stub, method)(request, **kw)
        silent = len(fleet.links) - len(asked)
        raise _as_rpc(
            NotFound(
                f"no VM named {request.name} on any of the {len(asked)} nodes that answer"
                + (f" ({silent} do not)" if silent else "")
            )
        )

    async def _create(
        self, request: vm_manager_pb2.CreateVMRequest, **kw: Any
    ) -> vm_manager_pb2.CreateVMResponse:
        fleet = self.fleet
        template = ""
        if request.from_template:
            template = fleet.template_keys.get(_template_of(request), "")
        want = placement.Want(size=_size(request), template_key=template)
        tried: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        try:
            candidates = fleet.candidates(want)
        except AgentVMError as exc:
            raise _as_rpc(exc) from exc
        for link in candidates:
            try:
                resp: vm_manager_pb2.CreateVMResponse = await link.stub.CreateVM(request, **kw)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_CODES or fleet.only() is not None:
                    raise
                tried.append(f"{link.describe()}: {exc.details()}")
                last = exc
                continue
            fleet.remember(resp.vm)
            if link.node is not None:  # counted at once: the next probe brings the truth
                c = link.node.committed
                c.vcpus += int(want.size.vcpus)
                c.memory_mib += int(want.size.memory_mib)
                c.disk_mib += int(want.size.disk_mib)
            return resp
        raise _as_rpc(Unavailable("no node took the VM: " + "; ".join(tried))) from last

    async def _list(
        self, request: vm_manager_pb2.ListVMsRequest, **kw: Any
    ) -> vm_manager_pb2.ListVMsResponse:
        fleet = self.fleet
        single = fleet.only()
        if single is not None:
            resp: vm_manager_pb2.ListVMsResponse = await single.stub.ListVMs(request, **kw)
            return resp
        out = vm_manager_pb2.ListVMsResponse()
        answers = await asyncio.gather(
            *(link.stub.ListVMs(request, **kw) for link in fleet.healthy()),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("a node did not list its VMs: %s", answer)
                continue
            for vm in answer.vms:
                fleet.remember(vm)
                out.vms.append(vm)
        return out

    async def _prepare(
        self, request: vm_manager_pb2.PrepareTemplateRequest, **kw: Any
    ) -> vm_manager_pb2.PrepareTemplateResponse:
        """The template on every healthy node (a node restores only from its own)."""
        fleet = self.fleet
        single = fleet.only()
        links = [single] if single is not None else fleet.healthy()
        if not links:
            raise _as_rpc(fleet.none_answers())
        answers = await asyncio.gather(
            *(link.stub.PrepareTemplate(request, **kw) for link in links), return_exceptions=True
        )
        first: vm_manager_pb2.PrepareTemplateResponse | None = None
        failed: list[tuple[NodeLink, BaseException]] = []
        for link, answer in zip(links, answers, strict=True):
            if isinstance(answer, BaseException):
                failed.append((link, answer))
                continue
            fleet.template_keys[_template_of(request)] = answer.template.key
            if link.node is not None and answer.template.key not in link.node.template_keys:
                link.node.template_keys.append(answer.template.key)  # before its next probe
            if first is None:
                first = answer
        if first is None:
            raise failed[0][1]  # none built it: the first node's own error is the answer
        for link, exc in failed:
            # Its restores fail FAILED_PRECONDITION and the pool prepares again.
            log.warning("%s did not build the template: %s", link.describe(), exc)
        return first


def _template_of(
    request: vm_manager_pb2.CreateVMRequest | vm_manager_pb2.PrepareTemplateRequest,
) -> tuple[int, int, str]:
    network = request.network_mode or common_pb2.NETWORK_MODE_ISOLATED
    return (request.profile, network, request.image)


def _size(request: vm_manager_pb2.CreateVMRequest) -> placement.Amount:
    """What the VM will be given: its profile's sizes, or the resources asked for."""
    profile = ResourceProfile.from_proto(request.profile)
    r = request.resources
    return placement.Amount(
        r.vcpus or profile.vcpus,
        r.memory_mib or profile.memory_mib,
        r.disk_mib or profile.disk_mib,
    )
