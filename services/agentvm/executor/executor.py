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
from agentvm.executor.sandbox import (
    BOOT_TIMEOUT_S,
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


class AgentExecutor(Teardown, OneShot, Processes, Ports, Pausing):
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
        self.files = WorkspaceFiles(self)
        self.journal = Journal(settings.state_dir, settings.executor_addr)

    # -- housekeeping -------------------------------------------------------
    def _owner_labels(self) -> dict[str, str]:
        return dict([OWNER_LABEL, (EXECUTOR_LABEL, self.settings.executor_addr)])

    def _vm_selector(self) -> dict[str, str]:
        """This executor's sandboxes' VMs: those it made, and pool VMs leased to it
        (they keep the pool's owner label and carry this executor's from the lease)."""
        return {EXECUTOR_LABEL: self.settings.executor_addr}

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        """Reclaim VMs a previous executor left behind, then start the reaper."""
        try:
            resp = await self.vmm.ListVMs(
                vm_manager_pb2.ListVMsRequest(label_selector=self._vm_selector()), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list leftover VMs: %s", exc.details())
        else:
            # Sandboxes of a previous executor (killed, crashed) are taken up
            # from the journal; VMs no record holds are reclaimed (a pool VM's
            # lease is released below).
            kept = await self.take_up(list(resp.vms))
            for vm in orphaned_vms(resp.vms, set()):
                if vm.name in kept:
                    continue
                log.info("destroying VM %s left by a previous executor", vm.name)
                await self._destroy_vm(
                    vm.name, "executor restart: its sandbox did not survive the previous executor"
                )
        # Every lease with this executor's labels that no sandbox taken up
        # holds was a previous executor's.
        await self._reconcile_leases()
        self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for sb in list(self._sandboxes.values()):
                if sb.expires_at <= now and not sb.closing and not sb.paused:
                    log.info("sandbox %s reached the end of its lifetime", sb.id)
                    sb.expired = True
                    self._spawn(self.close_sandbox(sb.id))
            for sb in self.idle_sandboxes():
                log.info("sandbox %s idle for %g s: pausing it", sb.id, sb.auto_pause)
                self._spawn(self.auto_pause(sb))
            interval = self.settings.reconcile_interval_s
            if interval > 0 and time.monotonic() - last_sweep >= interval:
                last_sweep = time.monotonic()
                try:
                    await self.reconcile()
                except grpc.aio.AioRpcError as exc:
                    log.warning("cannot sweep for orphaned VMs: %s", exc.details())

    async def reconcile(self) -> list[str]:
        """Destroy the VMs and release the pool leases this executor owns that no
        sandbox holds; the VMs' names.

        Such a VM is left when its CreateVM answer never arrived (vm-manager
        killed mid-create, a deadline): vm-manager adopts it on restart, and
        only its owner can tell that nobody uses it. The same goes for a lease
        whose AcquireVM answer never arrived (pool-manager killed mid-acquire).
        """
        resp = await self.vmm.ListVMs(
            vm_manager_pb2.ListVMsRequest(label_selector=self._vm_selector()), timeout=30
        )
        gone = orphaned_vms(resp.vms, set(self._sandboxes) | self._creating)
        for vm in gone:
            sandbox = vm.labels.get(SANDBOX_LABEL, "?")
            log.info("destroying VM %s: sandbox %s is not open", vm.name, sandbox)
            await self._destroy_vm(
                vm.name,
                f"executor reconcile: sandbox {sandbox} is not open (its creation was cut short)",
            )
        return [vm.name for vm in gone] + await self._reconcile_leases()

    async def _reconcile_leases(self) -> list[str]:
        if self.pool is None:
            return []
        try:
            resp = await self.pool.ListLeases(
                pool_manager_pb2.ListLeasesRequest(label_selector=self._owner_labels()),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list pool leases to sweep: %s", exc.details())
            return []
        held = {sb.lease_id for sb in self._sandboxes.values() if sb.lease_id}
        gone = orphaned_leases(resp.leases, held, self._creating)
        for lease in gone:
            log.info(
                "releasing lease %s of %s: no sandbox holds it (a previous executor's, or "
                "its AcquireVM answer was lost)",
                lease.lease_id,
                lease.vm_name,
            )
            await self._release(lease.lease_id, lease.vm_name)
        return [lease.vm_name for lease in gone]

    async def close(self) -> None:
        """Destroy every sandbox (their state does not survive the executor)."""
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(
            *(self.close_sandbox(i) for i in list(self._sandboxes)), return_exceptions=True
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
        self._creating.discard(sandbox_id)
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
        )
        self._sandboxes[sandbox_id] = sb
        self.journal.save(sb.record())
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
            self._spawn(self._release(lease_id, vm.name))
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
                self._spawn(self._destroy_vm(vm_name))
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

    def set_timeout(self, sb: SandboxState, seconds: float) -> None:
        """``sb`` ends ``seconds`` from now (the reaper closes it then)."""
        if not 1 <= seconds <= MAX_LIFETIME_S:
            raise InvalidArgument(
                f"timeout must be between 1 and {MAX_LIFETIME_S:.0f} seconds, got {seconds:g}"
            )
        before = sb.expires_at
        sb.expires_at = time.time() + seconds
        self.journal.save(sb.record())
        self.events.emit(
            "sandbox.timeout_set",
            vm=sb.vm.name,
            sandbox=sb.id,
            timeout_s=round(seconds, 3),
            extended_by_s=round(sb.expires_at - before, 3),
        )

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
