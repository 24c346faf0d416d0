"""AgentExecutor: sandboxes (a VM + a workspace) and the one-shot Run.

The executor holds no VM state of its own beyond its sandboxes: VMs come from
vm-manager (later from pool-manager) and are destroyed through it. Each
sandbox keeps one persistent gRPC channel to its guest agent.

Guarantees:
* Run destroys its VM on every path: success, failure, timeout, client
  cancel or disconnect (cleanup runs as its own task, so a second
  cancellation cannot interrupt it).
* A sandbox is destroyed at the end of its lifetime even if its caller
  vanished (the reaper checks every second).
* Output is capped per stream on the host too (the guest is not trusted to
  honour the cap), so host memory stays bounded whatever the guest prints.
* Workspace paths are checked here and again in the guest; in a shared
  workspace the host walks paths without following any symlink.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

import grpc

from agentvm.common.config import Settings
from agentvm.common.errors import (
    REASON_SANDBOX_CLOSED,
    Aborted,
    AgentVMError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
)
from agentvm.common.events import EventSink, NullSink
from agentvm.common.fleet import Fleet
from agentvm.common.grpc_util import agent_channel
from agentvm.executor.files import WorkspaceFiles
from agentvm.executor.journal import Journal
from agentvm.executor.oneshot import OneShot
from agentvm.executor.pausing import Pausing
from agentvm.executor.ports import Ports
from agentvm.executor.processes import Processes
from agentvm.executor.records import VMRecords
from agentvm.executor.replicas import Replicas
from agentvm.executor.sandbox import (
    BOOT_TIMEOUT_S,
    CREATOR_LABEL,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT_S,
    EXECUTOR_LABEL,
    MAX_LIFETIME_S,
    MAX_OUTPUT,
    MAX_TIMEOUT_S,
    OWNER_LABEL,
    REMEMBER_EXPIRED,
    SANDBOX_LABEL,
    SandboxExpired,
    SandboxState,
    describe_program,
    image_ref,
    orphaned_leases,
    orphaned_vms,
    outcome_of,
    output_cap,
    seconds_of,
)
from agentvm.executor.sandbox_env import SandboxEnv, check_metadata
from agentvm.executor.teardown import Teardown
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

log = logging.getLogger("agentvm.executor")
MIN_AUTO_PAUSE_S = 10.0
# A create waits this long for the slot of a sandbox being torn down.
SLOT_WAIT_S = 60.0

# Also importable from here (tests, files.py).
__all__ = [
    "AgentExecutor",
    "BOOT_TIMEOUT_S",
    "CREATOR_LABEL",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT_S",
    "EXECUTOR_LABEL",
    "MAX_LIFETIME_S",
    "MAX_OUTPUT",
    "MAX_TIMEOUT_S",
    "OWNER_LABEL",
    "REMEMBER_EXPIRED",
    "SANDBOX_LABEL",
    "SandboxExpired",
    "SandboxState",
    "describe_program",
    "orphaned_leases",
    "orphaned_vms",
    "outcome_of",
    "output_cap",
    "seconds_of",
]


class AgentExecutor(Teardown, OneShot, Processes, Ports, Pausing, Replicas):
    """Runs agent code in VMs obtained from vm-manager."""

    def __init__(
        self,
        settings: Settings,
        vm_manager: vm_manager_pb2_grpc.VMManagerServiceAsyncStub,
        pool: pool_manager_pb2_grpc.PoolManagerServiceAsyncStub | None = None,
        *,
        events: EventSink | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.settings = settings
        # The nodes behind ``vm_manager`` (a FleetStub over it): where each VM's agent is.
        self.fleet = fleet
        self.events: EventSink = events or NullSink()
        self.vmm = vm_manager
        self.pool = pool
        self._sandboxes: dict[str, SandboxState] = {}
        # Sandboxes whose VM is being made (its labels name them already).
        self._creating: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._shared_supported: bool | None = None
        self._slots = asyncio.Semaphore(settings.max_sandboxes)
        # Sandboxes the reaper closed: id -> their lifetime in seconds (oldest first).
        self._expired: dict[str, float] = {}
        # Sandboxes closed here or by another replica (find does not look for them).
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.files = WorkspaceFiles(self)
        # Sandbox records live with their VMs (records.py); the journal of the
        # executors before that is read once at start, moved onto the VMs.
        self.records = VMRecords(vm_manager, settings.executor_record_key_file)
        self.journal = Journal(settings.state_dir, settings.executor_addr)

    # -- housekeeping -------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """A graceful stop. Alone (no AGENTVM_EXECUTOR_GROUP), the executor destroys its
        sandboxes; a replica of a group leaves them to the others, but for its one-shot
        Runs, whose streams end with it."""
        if self._reaper is not None:
            self._reaper.cancel()
        alone = not self.settings.executor_group
        await asyncio.gather(
            *(
                self.close_sandbox(sb.id)
                for sb in list(self._sandboxes.values())
                if alone or (sb.oneshot and self._made_here(sb.vm.labels))
            ),
            return_exceptions=True,
        )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _pool_key(
        self, spec: executor_pb2.SandboxSpec, mode: common_pb2.WorkspaceMode.ValueType
    ) -> pool_manager_pb2.PoolKey | None:
        """The pool a sandbox can come from, or None when it needs a VM made for it."""
        r = spec.resources
        network = spec.network_mode or common_pb2.NETWORK_MODE_NAT_FILTERED
        if (
            self.pool is None
            or mode != common_pb2.WORKSPACE_MODE_API
            or network
            not in (common_pb2.NETWORK_MODE_ISOLATED, common_pb2.NETWORK_MODE_NAT_FILTERED)
            or r.vcpus
            or r.memory_mib
            or r.disk_mib
        ):
            return None
        profile = spec.profile or common_pb2.RESOURCE_PROFILE_STANDARD
        # A key with an image no pool holds is NOT_FOUND there: _create_vm makes the VM.
        return pool_manager_pb2.PoolKey(
            profile=profile, network_mode=network, image=image_ref(spec.image)
        )

    async def _from_pool(
        self, key: pool_manager_pb2.PoolKey, labels: dict[str, str]
    ) -> tuple[common_pb2.VM, str] | None:
        """A leased pool VM, or None when the pool cannot serve this kind (make one)."""
        if self.pool is None:
            return None
        req = pool_manager_pb2.AcquireVMRequest(key=key, labels=labels)
        req.timeout.FromSeconds(int(BOOT_TIMEOUT_S))
        try:
            resp = await self.pool.AcquireVM(req, timeout=BOOT_TIMEOUT_S + 10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                log.info("pool cannot serve this sandbox (%s); creating its VM", exc.details())
                return None
            raise RemoteError.from_rpc(exc, "pool-manager") from exc
        return resp.vm, resp.lease_id

    # -- sandboxes -------------------------------------------------------------
    @property
    def colocated(self) -> bool:
        """Every vm-manager (so its VMs and their workspaces) is on this host: Unix sockets."""
        if self.fleet is None:
            return self.settings.vm_manager_addr.startswith("unix:")
        return bool(self.fleet.links) and all(link.local for link in self.fleet.links.values())

    def agent_channel(self, vm: common_pb2.VM) -> grpc.aio.Channel:
        """A channel to ``vm``'s agent: its relay socket here, else through its vm-manager."""
        if self.fleet is None:
            return agent_channel(self.settings.vm_manager_addr, vm.name, vm.agent_endpoint)
        self.fleet.remember(vm)
        return agent_channel(self.fleet.address_of(vm), vm.name, vm.agent_endpoint)

    async def _shared_workspace_supported(self) -> bool:
        if not self.colocated:
            return False  # a virtiofs workspace is a directory on the VM's host
        if self._shared_supported is None:
            try:
                info = await self.vmm.GetHostInfo(vm_manager_pb2.GetHostInfoRequest(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                raise RemoteError.from_rpc(exc, "vm-manager") from exc
            self._shared_supported = info.shared_workspace_supported
        return self._shared_supported

    async def create_sandbox(
        self,
        spec: executor_pb2.SandboxSpec,
        *,
        default_lifetime: float | None = None,
        metadata: Mapping[str, str] | None = None,
        env: SandboxEnv | None = None,
        auto_pause: float = 0.0,
        oneshot: bool = False,
    ) -> SandboxState:
        lifetime = seconds_of(
            spec, "lifetime", default_lifetime or self.settings.sandbox_lifetime_s, MAX_LIFETIME_S
        )
        metadata = check_metadata(metadata or {})
        if spec.bridge and spec.network_mode != common_pb2.NETWORK_MODE_BRIDGE:
            raise InvalidArgument(
                f"bridge {spec.bridge!r} was given, but the network mode is not bridge: "
                "ask for network='bridge' too, or leave bridge out"
            )
        if spec.network_mode == common_pb2.NETWORK_MODE_BRIDGE and not spec.bridge:
            raise InvalidArgument(
                "network mode bridge needs the name of an existing host bridge "
                "(bridge='br0' in the Python client, --bridge with agent-vm run)"
            )
        image_ref(spec.image)  # INVALID_ARGUMENT before any VM is asked for
        mode = spec.workspace_mode
        if mode not in common_pb2.WorkspaceMode.values():
            raise InvalidArgument(f"unknown workspace_mode {mode}: use SHARED or API")
        if mode == common_pb2.WORKSPACE_MODE_UNSPECIFIED and self.pool is not None:
            # Pool VMs are restored from memory templates, which cannot carry a
            # virtiofs device: the API workspace is what makes them usable.
            mode = common_pb2.WORKSPACE_MODE_API
        if mode == common_pb2.WORKSPACE_MODE_UNSPECIFIED:
            shared = await self._shared_workspace_supported()
            mode = common_pb2.WORKSPACE_MODE_SHARED if shared else common_pb2.WORKSPACE_MODE_API
        if mode == common_pb2.WORKSPACE_MODE_SHARED and not self.colocated:
            raise FailedPrecondition(
                "a shared (virtiofs) workspace is a directory on the VM's host, and this "
                "executor reaches its vm-managers over the network (another host): ask for "
                "workspace mode API"
            )
        if auto_pause and not MIN_AUTO_PAUSE_S <= auto_pause <= MAX_LIFETIME_S:
            raise InvalidArgument(
                f"auto_pause must be {MIN_AUTO_PAUSE_S:.0f} s to {MAX_LIFETIME_S:.0f} s "
                f"(or unset: off), got {auto_pause:g}"
            )
        if auto_pause and mode == common_pb2.WORKSPACE_MODE_SHARED:
            raise FailedPrecondition(
                "auto_pause needs a sandbox that can be paused: a shared (virtiofs) workspace "
                "cannot; ask for workspace mode API"
            )
        await self._take_slot()
        sandbox_id = "sb-" + secrets.token_hex(6)
        labels = dict(spec.labels)
        labels.update(self._owner_labels())
        labels[SANDBOX_LABEL] = sandbox_id
        labels[CREATOR_LABEL] = self.settings.executor_addr
        start = time.monotonic()
        lease_id = ""
        self._creating.add(sandbox_id)
        try:
            key = self._pool_key(spec, mode)
            leased = await self._from_pool(key, labels) if key is not None else None
            if leased is not None:
                vm, lease_id = leased
                if vm.network_mode == common_pb2.NETWORK_MODE_NAT_FILTERED:
                    vm = await self._set_policy(vm, lease_id, spec.network_policy)
            else:
                vm = await self._create_vm(spec, mode, labels)
        except BaseException:
            # _create_vm destroys a VM it made before failing.
            self._slots.release()
            self._creating.discard(sandbox_id)
            raise
        now = time.time()
        sb = SandboxState(
            id=sandbox_id,
            spec=spec,
            vm=vm,
            workspace_mode=mode,
            created_at=now,
            expires_at=now + lifetime,
            boot_duration=time.monotonic() - start,
            channel=self.agent_channel(vm),
            lease_id=lease_id,
            metadata=metadata,
            env=env or SandboxEnv(),
            auto_pause=auto_pause,
            oneshot=oneshot,
        )
        try:
            # The sandbox exists once its record does: until then a crash leaves
            # a VM that the sweeps reclaim, never a sandbox without its state.
            sb.record_generation = await self.records.write(sb.record(), 0)
        except BaseException:
            self._slots.release()
            why = f"sandbox {sandbox_id}: its creation failed or was cut short"
            self._spawn(
                self._release(lease_id, vm.name, why)
                if lease_id
                else self._destroy_vm(vm.name, why)
            )
            raise
        finally:
            self._creating.discard(sandbox_id)
        self._sandboxes[sandbox_id] = sb
        self.events.emit(
            "sandbox.created",
            vm=vm.name,
            sandbox=sandbox_id,
            # As the CLI spells them: "nat-filtered", "api".
            network_mode=common_pb2.NetworkMode.Name(vm.network_mode)
            .removeprefix("NETWORK_MODE_")
            .lower()
            .replace("_", "-"),
            workspace_mode=common_pb2.WorkspaceMode.Name(mode)
            .removeprefix("WORKSPACE_MODE_")
            .lower(),
            pooled=bool(lease_id),
            # The named image the workload runs in, as the caller named it.
            image=image_ref(spec.image) or "default",
            boot_s=round(sb.boot_duration, 6),
            labels=dict(spec.labels),
            metadata=metadata,
            env=sorted(sb.env.values),  # names only
        )
        log.info(
            "sandbox %s ready on %s",
            sandbox_id,
            vm.name,
            extra={"sandbox": sandbox_id, "pooled": bool(lease_id)},
        )
        return sb

    async def _take_slot(self) -> None:
        """One of the AGENTVM_MAX_SANDBOXES slots; while sandboxes are being torn down
        (a closed sandbox holds its slot until its VM is gone) wait for theirs."""
        if self._slots.locked():
            full = ResourceExhausted(
                f"{self.settings.max_sandboxes} sandboxes are running (AGENTVM_MAX_SANDBOXES): "
                "close one or retry later"
            )
            if not any(sb.closing for sb in self._sandboxes.values()):
                raise full
            try:
                await asyncio.wait_for(self._slots.acquire(), SLOT_WAIT_S)
            except TimeoutError:
                raise full from None
            return
        await self._slots.acquire()

    async def _set_policy(
        self, vm: common_pb2.VM, lease_id: str, policy: common_pb2.NetworkPolicy
    ) -> common_pb2.VM:
        """Give a pool VM the sandbox's network policy (it was made with the defaults)."""
        try:
            resp = await self.vmm.UpdateNetworkPolicy(
                vm_manager_pb2.UpdateNetworkPolicyRequest(name=vm.name, policy=policy), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            why = "its sandbox's network policy could not be set"
            self._spawn(self._release(lease_id, vm.name, why))
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        return resp.vm

    async def network_log(self, sb: SandboxState) -> list[common_pb2.EgressRecord]:
        """The sandbox's DNS queries and connection attempts so far."""
        if sb.vm.network_mode != common_pb2.NETWORK_MODE_NAT_FILTERED:
            return []
        try:
            return [
                r.record
                async for r in self.vmm.WatchEgress(
                    vm_manager_pb2.WatchEgressRequest(name=sb.vm.name), timeout=30
                )
            ]
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, "vm-manager") from exc

    async def _create_vm(
        self,
        spec: executor_pb2.SandboxSpec,
        mode: common_pb2.WorkspaceMode.ValueType,
        labels: dict[str, str],
    ) -> common_pb2.VM:
        """Create and boot a VM for one sandbox (READY); destroyed again on any failure."""
        vm_name = ""
        try:
            try:
                created = await self.vmm.CreateVM(
                    vm_manager_pb2.CreateVMRequest(
                        profile=spec.profile,
                        network_mode=spec.network_mode,
                        network_policy=spec.network_policy,
                        bridge=spec.bridge,
                        resources=spec.resources,
                        labels=labels,
                        start=True,
                        shared_workspace=mode == common_pb2.WORKSPACE_MODE_SHARED,
                        # vm-manager resolves it (NOT_FOUND reaches the caller as it is).
                        image=image_ref(spec.image),
                    ),
                    timeout=60,
                )
                vm_name = created.vm.name
                wait = vm_manager_pb2.WaitVMRequest(name=vm_name, state=common_pb2.VM_STATE_READY)
                wait.timeout.FromSeconds(int(BOOT_TIMEOUT_S))
                vm = (await self.vmm.WaitVM(wait, timeout=BOOT_TIMEOUT_S + 10)).vm
            except grpc.aio.AioRpcError as exc:
                raise RemoteError.from_rpc(exc, "vm-manager") from exc
        except BaseException:
            if vm_name:
                self._spawn(self._destroy_vm(vm_name, "its boot failed or was cut short"))
            raise
        return vm

    def get(self, sandbox_id: str, *, paused_ok: bool = False) -> SandboxState:
        """The open sandbox; FAILED_PRECONDITION when it is paused (unless ``paused_ok``)."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.closing:
            raise self.gone_error(sandbox_id, cut_short=False)
        if sb.paused and not paused_ok:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is paused: resume it first (ResumeSandbox, "
                "agent-vm sandbox resume)"
            )
        return sb

    def sandbox_or_none(self, sandbox_id: str) -> SandboxState | None:
        """The sandbox, also while it closes; None when there is none."""
        return self._sandboxes.get(sandbox_id)

    def gone_error(self, sandbox_id: str, *, cut_short: bool) -> AgentVMError:
        """Why ``sandbox_id`` cannot serve a call (it expired, was closed, never was)."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is not None and sb.expired:
            return SandboxExpired(sandbox_id, sb.expires_at - sb.created_at, cut_short=cut_short)
        if sandbox_id in self._expired:
            return SandboxExpired(sandbox_id, self._expired[sandbox_id], cut_short=cut_short)
        if cut_short:
            closed = Aborted(f"sandbox {sandbox_id} was closed while this call ran")
            closed.reason = REASON_SANDBOX_CLOSED
            return closed
        return NotFound(
            f"no sandbox {sandbox_id!r}: it was closed or reached the end of its lifetime "
            "(ListSandboxes shows the open ones)"
        )

    def sandboxes(self, metadata: Mapping[str, str] | None = None) -> list[SandboxState]:
        """Open sandboxes; with ``metadata``, those whose metadata holds every pair."""
        want = (metadata or {}).items()
        return [
            s
            for s in self._sandboxes.values()
            if not s.closing and all(s.metadata.get(k) == v for k, v in want)
        ]

    async def set_timeout(self, sb: SandboxState, seconds: float) -> None:
        """``sb`` ends ``seconds`` from now (the reaper closes it then)."""
        if not 1 <= seconds <= MAX_LIFETIME_S:
            raise InvalidArgument(
                f"timeout must be between 1 and {MAX_LIFETIME_S:.0f} seconds, got {seconds:g}"
            )
        before = sb.expires_at

        def change(s: SandboxState) -> None:
            s.expires_at = time.time() + seconds

        await self.update(sb, change)
        self.events.emit(
            "sandbox.timeout_set",
            vm=sb.vm.name,
            sandbox=sb.id,
            timeout_s=round(seconds, 3),
            extended_by_s=round(sb.expires_at - before, 3),
        )

    async def set_network_policy(self, sb: SandboxState, policy: common_pb2.NetworkPolicy) -> None:
        """Replace ``sb``'s egress policy, live (vm-manager applies it and audits it)."""
        if sb.vm.network_mode != common_pb2.NETWORK_MODE_NAT_FILTERED:
            mode = common_pb2.NetworkMode.Name(sb.vm.network_mode).removeprefix("NETWORK_MODE_")
            raise FailedPrecondition(
                f"sandbox {sb.id} is {mode.lower().replace('_', '-')}: only nat-filtered "
                "sandboxes have a network policy (create one with network nat-filtered)"
            )
        async with sb.lock:  # not while it is being paused or resumed
            if sb.paused:
                raise FailedPrecondition(f"sandbox {sb.id} is paused: resume it first")
            try:
                resp = await self.vmm.UpdateNetworkPolicy(
                    vm_manager_pb2.UpdateNetworkPolicyRequest(name=sb.vm.name, policy=policy),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                raise RemoteError.from_rpc(exc, "vm-manager") from exc
            sb.vm.network.CopyFrom(resp.vm.network)

    # -- files (agentvm.executor.files) ---------------------------------------------
    async def write_file(
        self,
        sb: SandboxState,
        path: str,
        mode: int,
        chunks: AsyncIterator[bytes],
        expected: list[str],
    ) -> tuple[int, str]:
        return await self.files.write_file(sb, path, mode, chunks, expected)

    def read_file(
        self, sb: SandboxState, path: str, max_bytes: int = 0
    ) -> AsyncIterator[tuple[bytes, int, str]]:
        return self.files.read_file(sb, path, max_bytes)

    async def list_files(
        self, sb: SandboxState, path: str, recursive: bool
    ) -> list[common_pb2.FileInfo]:
        return await self.files.list_files(sb, path, recursive)

    async def remove_file(self, sb: SandboxState, path: str, recursive: bool) -> None:
        await self.files.remove_file(sb, path, recursive)
