"""VMManager: VM lifecycle over libvirt (async core; libvirt calls run in threads).

State lives in two places only: libvirt (domains, with agent-vm's record in
each domain's <metadata>) and the VM directories (overlay, console log).
The in-memory registry is rebuilt from them at start (``recover``), so a
restarted vm-manager finds the VMs it made and reconnects to their agents.

This module holds the registry and the lifecycle (create, start, stop, destroy);
VMManager's mixins hold the rest: ``manager_recovery.py`` (recover: adopting the
domains of a previous run), ``manager_domain.py`` (domain XML,
metadata, defining), ``manager_readiness.py`` (WaitVM, guest configuration),
``manager_snapshots.py`` (snapshots, suspend/resume), ``manager_templates.py``
(memory templates and clones) and ``manager_observe.py`` (stats, evidence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid as uuidlib
from collections import OrderedDict
from pathlib import Path

import grpc
import libvirt

from agentvm.common.completion import to_completion
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError, FailedPrecondition, InvalidArgument, NotFound
from agentvm.common.events import EventSink, NullSink
from agentvm.common.grpc_util import guest_channel
from agentvm.common.placement import Amount
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import access, console, workspace
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.accel import AccelInfo
from agentvm.vm_manager.clones import TemplateInfo, TemplateStore
from agentvm.vm_manager.diskfull import DiskWatch
from agentvm.vm_manager.hostcaps import find_virtiofsd, io_weight_supported
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.image_store import store_root
from agentvm.vm_manager.libvirt_conn import (
    DOMAIN_CRASHED,
    DOMAIN_SHUTOFF,
    LibvirtConnection,
    launch,
    libvirt_errors,
)
from agentvm.vm_manager.manager_domain import DomainDefinition
from agentvm.vm_manager.manager_observe import Observation
from agentvm.vm_manager.manager_readiness import DEFAULT_WAIT_S, POLL_S, Readiness
from agentvm.vm_manager.manager_recovery import Recovery
from agentvm.vm_manager.manager_snapshots import Snapshots
from agentvm.vm_manager.manager_templates import TEMPLATE_ROLE, MemoryTemplates
from agentvm.vm_manager.network import NatNetwork, Policy
from agentvm.vm_manager.node import NodeState, committed
from agentvm.vm_manager.relay import HostRelay
from agentvm.vm_manager.snapshots import SnapshotManager
from agentvm.vm_manager.templates import Resources, random_mac
from agentvm.vm_manager.vm import VM, VMState
from agentvm_guest.mux import PORT_NAME

# Also importable from here (servicer.py).
__all__ = ["DEFAULT_GRACE_S", "DEFAULT_WAIT_S", "VMManager"]

log = logging.getLogger("agentvm.vm_manager")

NAME_RE = re.compile(r"^agent-vm-[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_GRACE_S = 10.0
TOMBSTONES = 1000
LABEL_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,63}$")


def _undefine_flag_sets() -> list[int]:
    """Undefine flags, most thorough first (snapshot metadata, managed save, NVRAM)."""
    snaps = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    save = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    return [int(snaps | save | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM), int(snaps | save), int(snaps)]


# The mixins that define methods come before those that declare them as stubs
# (Snapshots, MemoryTemplates, Observation and Recovery stub methods of
# DomainDefinition and Readiness): a stub earlier in the MRO would shadow the real method.
class VMManager(DomainDefinition, Readiness, Snapshots, MemoryTemplates, Observation, Recovery):
    """Creates, starts, stops and destroys VMs; owns their agent relays."""

    def __init__(
        self,
        settings: Settings,
        conn: LibvirtConnection,
        images: ImageStore,
        accel: AccelInfo,
        *,
        memory_limit: bool = True,
        events: EventSink | None = None,
    ) -> None:
        self.settings = settings
        self.events: EventSink = events or NullSink()
        # Why recently destroyed VMs went (GetVM's NOT_FOUND names it).
        self._tombstones: OrderedDict[str, str] = OrderedDict()
        # ListVMStats: each VM's CPU time at the previous call, and its guest's last answer.
        self._cpu_seen: dict[str, tuple[float, float]] = {}
        self._guest_seen: dict[str, tuple[float, common_pb2.GuestInfo, int]] = {}
        self.conn = conn
        self.images = images
        self.accel = accel
        self.memory_limit = memory_limit
        self.io_weight = io_weight_supported()
        if not self.io_weight:
            log.warning(
                "this host cannot weight block I/O per VM (no bfq scheduler under cgroup v1's "
                "blkio, no cgroup v2 io controller): VMs run without an I/O weight"
            )
        self.virtiofsd = find_virtiofsd()
        self.snapshots = SnapshotManager()
        self.templates = TemplateStore(settings.state_dir / "templates")
        # Named images (docs/IMAGES.md), the root file systems workloads run in.
        self.image_store = NamedImageStore(store_root(settings))
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._qemu_ver: str | None = None
        self._vms: dict[str, VM] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # False until recover() has taken up the previous run's VMs (GetNode says so).
        self.recovered = False
        self.net = NatNetwork(settings, conn)
        self.node = NodeState.probe(settings, lambda: conn.call("node info", lambda c: c.getInfo()))
        # A full state disk: new VMs refused, VMs QEMU paused resumed (diskfull.py).
        self.disk = DiskWatch(
            settings.state_dir,
            settings.min_free_disk_mib,
            conn,
            settings.vm_prefix,
            self.events,
            self._vms.get,
        )
        self._disk_watch: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Start the background watches (stopped by close()): the full-disk watch, and
        libvirt's reconnects reported to the audit log (``libvirt.reconnected``)."""
        loop = asyncio.get_running_loop()

        def reconnected(away: float) -> None:
            loop.call_soon_threadsafe(
                lambda: self.events.emit(
                    "libvirt.reconnected", severity="warning", uri=self.conn.uri, away_s=away
                )
            )

        self.conn.on_reconnect = reconnected
        if self._disk_watch is None:
            self._disk_watch = asyncio.create_task(self.disk.run(), name="disk-watch")

    def committed(self) -> tuple[Amount, int]:
        """What this node's VMs were given, summed, and how many there are (GetNode)."""
        return committed(v.resources for v in self._vms.values()), len(self._vms)

    # -- helpers ---------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _validate_name(self, name: str) -> None:
        if not NAME_RE.match(name):
            raise InvalidArgument(
                f"VM name {name!r} is not an agent-vm name: names look like "
                f"'{self.settings.vm_prefix}1a2b3c4d' (see ListVMs)"
            )

    def _get(self, name: str) -> VM:
        self._validate_name(name)
        vm = self._vms.get(name)
        if vm is None:
            reason = self._tombstones.get(name)
            if reason:
                raise NotFound(f"VM {name} was destroyed: {reason}")
            raise NotFound(f"no VM named {name}: ListVMs shows the VMs that exist")
        return vm

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.settings.vms_state_dir / name, self.settings.vms_run_dir / name

    @staticmethod
    def _check_labels(labels: dict[str, str]) -> None:
        for key, value in labels.items():
            if not LABEL_RE.match(key):
                raise InvalidArgument(
                    f"label key {key!r} must be 1-63 characters of letters, digits, '_.-/'"
                )
            if len(value) > 256:
                raise InvalidArgument(f"label {key!r} value is longer than 256 characters")
            if any(
                ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF or ord(c) in (0xFFFE, 0xFFFF)
                for c in value
            ):
                raise InvalidArgument(
                    f"label {key!r} value contains control characters: use printable text"
                )

    # -- lifecycle -------------------------------------------------------
    async def create(
        self,
        *,
        profile: ResourceProfile,
        network_mode: NetworkMode,
        resources: Resources,
        labels: dict[str, str],
        start: bool,
        shared_workspace: bool = False,
        from_template: bool = False,
        policy: Policy | None = None,
        bridge: str = "",
        workload_image: str = "",
        build_disk: Path | None = None,
    ) -> VM:
        """``workload_image``: a named image the workload runs in (image_vms.py);
        ``build_disk``: an import's raw ext4 disk, attached writable instead."""
        await asyncio.to_thread(self.disk.check_room)
        template: TemplateInfo | None = None
        workload = await self._workload_id(workload_image)
        if from_template:
            template = await self._template_for_clone(
                profile, network_mode, resources, shared_workspace, workload
            )
        if network_mode is NetworkMode.BRIDGE:
            await self.net.check_bridge(bridge)
        if shared_workspace and self.virtiofsd is None:
            raise FailedPrecondition(
                "shared workspaces need virtiofsd, which this host lacks (Debian: "
                "qemu-system-common or virtiofsd): create the VM without shared_workspace and "
                "move files through the file API (WORKSPACE_MODE_API)"
            )
        self._check_labels(labels)
        image = self.images.require_current()
        manifest = image.load_manifest()
        uid = str(uuidlib.uuid4())
        name = f"{self.settings.vm_prefix}{uid[:8]}"
        vm_dir, run_dir = self._paths(name)
        vm = VM(
            name=name,
            uuid=uid,
            profile=profile,
            network_mode=network_mode,
            resources=resources,
            accel=self.accel.accel,
            image_id=manifest.id,
            vm_dir=vm_dir,
            run_dir=run_dir,
            labels=dict(labels),
            shared_workspace=shared_workspace,
            template_key=template.key if template else "",
            agent_socket_name=access.socket_name(labels),
            workload_image_id=workload,
            build_disk=str(build_disk) if build_disk is not None else "",
            node_id=self.node.config.id,
        )
        base = self.templates.disk(template.key) if template else image.disk
        async with self._lock(name):
            # Checked and recorded with no await between: no two creates take the last room.
            self.node.check_room((v.resources for v in self._vms.values()), resources)
            self._vms[name] = vm
            try:
                if network_mode is NetworkMode.NAT_FILTERED:
                    if policy is None:
                        policy = Policy.from_proto(common_pb2.NetworkPolicy(), self.settings)
                    await self.net.attach(name, self._vm_id(vm), policy)
                    vm.network = self._net_proto(name)
                elif network_mode is NetworkMode.BRIDGE:
                    vm.network = common_pb2.NetworkAttachment(mac=random_mac(), bridge=bridge)
                    await self.net.attach_bridged(name, self._vm_id(vm), vm.network.mac)
                # The thread cannot be cancelled: a cancelled create waits for it
                # before cleaning up, or it could mount or define after the cleanup.
                await to_completion(
                    asyncio.to_thread(self._define, vm, base, image.kernel, image.initrd)
                )
                vm.transition(VMState.DEFINED)
            except BaseException:
                self._vms.pop(name, None)
                await asyncio.to_thread(self._remove_everything, vm)
                await asyncio.shield(self.net.detach(name))
                raise
        log.info("created VM %s", name, extra={"vm": name, "profile": profile.name})
        self.events.emit(
            "vm.created",
            vm=name,
            # As the CLI and pool keys spell them: "standard", "nat-filtered".
            profile=profile.name.lower(),
            network_mode=network_mode.name.lower().replace("_", "-"),
            from_template=template is not None,
            labels=dict(labels),
        )
        if template is not None:
            try:
                await self._start_clone(vm, template, image.kernel, image.initrd)
            except BaseException:
                with contextlib.suppress(AgentVMError, OSError):
                    await self.destroy(name)
                raise
        elif start:
            try:
                await self.start(name)
            except BaseException:
                # A VM nobody will hear of (the caller got an error or was
                # cancelled) must not stay behind.
                with contextlib.suppress(AgentVMError, OSError):
                    await asyncio.shield(self.destroy(name))
                raise
        return vm

    async def start(self, name: str) -> VM:
        async with self._lock(name):
            vm = self._get(name)
            vm.require(VMState.DEFINED, VMState.STOPPED, VMState.FAILED)
            if vm.suspended:
                raise FailedPrecondition(
                    f"VM {name} is suspended: ResumeVM brings it back as it was (a cold "
                    "start would leave its saved memory behind its disk); or DestroyVM"
                )
            dom = await asyncio.to_thread(self.conn.lookup, name)
            vm.boot_started = time.monotonic()
            vm.boot_duration = None
            vm.boot_kind = "cold"
            vm.guest = None
            vm.error = ""

            async def launched() -> None:
                with libvirt_errors(f"starting VM {name}"):
                    await asyncio.to_thread(launch, dom)
                vm.transition(VMState.BOOTING)
                await self._start_relay(vm, dom)

            # Once QEMU is launched, its state and relay are set, whoever stops waiting.
            await to_completion(launched())
            log.info("started VM %s", name, extra={"vm": name})
            return vm

    async def _start_relay(self, vm: VM, dom: libvirt.virDomain) -> None:
        with libvirt_errors(f"reading the live XML of VM {vm.name}"):
            xml = await asyncio.to_thread(dom.XMLDesc, 0)
        path, _state = dx.channel_state(xml, PORT_NAME)
        if path is None:
            raise FailedPrecondition(f"VM {vm.name} has no agent channel in its live XML")
        if vm.relay is not None:
            await vm.relay.close()
        vm.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        vm.relay = HostRelay(vm.name, vm.agent_socket, channel_path=path)
        await vm.relay.start()

    async def _refresh(self, vm: VM, *, held: bool = False) -> None:
        """Notice a domain that stopped or crashed behind our back. A reader (not
        ``held``: the caller does not hold the VM's lock) leaves it to a lifecycle
        call that holds it (a suspend, a stop: the domain goes down on purpose and
        that call sets the state), also one that took it meanwhile."""

        def settled() -> bool:
            return not vm.state.running or (not held and self._lock(vm.name).locked())

        if settled():
            return
        dom = await asyncio.to_thread(self.conn.find, vm.name)
        if settled():
            return
        if dom is None:
            vm.state = VMState.FAILED
            vm.error = "the domain disappeared from libvirt"
            self._stopped_behind_our_back(vm)
            return
        try:
            state, reason = await asyncio.to_thread(dom.state)
        except libvirt.libvirtError as exc:
            # libvirtd restarting, or the domain went meanwhile: the state is as last
            # known, and the next look (a poll of WaitVM, the next call) sees anew.
            log.info("cannot read the state of VM %s: %s", vm.name, exc.get_error_message())
            return
        if settled():
            return
        if state in (DOMAIN_SHUTOFF, DOMAIN_CRASHED):
            shutdown = state == DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
            # A panic resets the guest, which on_reboot=destroy makes a shutdown.
            panic = await asyncio.to_thread(console.panic_line, vm.console_log) if shutdown else ""
            if panic:
                vm.transition(VMState.FAILED)
                vm.error = (
                    f"the guest kernel panicked ({panic}); see its console log {vm.console_log}"
                )
            elif shutdown:
                vm.transition(VMState.STOPPED)
            else:
                vm.transition(VMState.FAILED)
                vm.error = (
                    f"the VM stopped unexpectedly (libvirt state {state}, reason {reason}); "
                    f"see its console log {vm.console_log}"
                )
            self._stopped_behind_our_back(vm)
            if vm.relay is not None:
                await vm.relay.close()
                vm.relay = None

    def _stopped_behind_our_back(self, vm: VM) -> None:
        """Audit a VM that went down without a call of ours: a guest that panicked or
        powered off, a QEMU that died (``vm.failed`` / ``vm.stopped``)."""
        if vm.state is VMState.FAILED:
            self.events.emit("vm.failed", vm=vm.name, severity="warning", error=vm.error)
        else:
            self.events.emit("vm.stopped", vm=vm.name, reason="the guest powered off")

    async def get(self, name: str) -> VM:
        """``name`` as it is; one being suspended or resumed as it is once that ends
        (an executor taking up its sandbox must see the outcome: a VM whose save
        is under way still runs, but will not in a second)."""
        vm = self._get(name)
        if vm.saving:
            async with self._lock(name):
                pass
        await self._refresh(vm)
        return vm

    def lookup(self, name: str) -> VM:
        """The VM as last seen (no libvirt call): the agent proxy's per-call check."""
        return self._get(name)

    def names(self) -> set[str]:
        return set(self._vms)

    async def list_vms(self, selector: dict[str, str]) -> list[VM]:
        out = []
        for vm in list(self._vms.values()):
            if all(vm.labels.get(k) == v for k, v in selector.items()):
                await self._refresh(vm)
                out.append(vm)
        return sorted(out, key=lambda v: v.created_at)

    async def update_network_policy(self, name: str, policy: Policy) -> VM:
        """Replace a NAT_FILTERED VM's policy, live and in its persistent record."""
        async with self._lock(name):
            vm = self._get(name)
            att = self.net.attachment(name)
            if att is None:
                raise FailedPrecondition(
                    f"VM {name} is {vm.network_mode.name}: only NETWORK_MODE_NAT_FILTERED VMs "
                    "have a network policy"
                )
            if att.policy == policy:
                # Nothing to change (a pool VM given to a sandbox that asks for the
                # defaults it was made with): no nft transaction, and what it
                # resolved and opened under this same policy stays.
                return vm
            await self.net.update_policy(name, policy)
            vm.network = self._net_proto(name)
            dom = await asyncio.to_thread(self.conn.lookup, name)
            await asyncio.to_thread(self._store_metadata, vm, dom)
        log.info("network policy of %s updated", name, extra={"vm": name})
        self.events.emit("vm.policy_updated", vm=name, policy=policy.to_json())
        return vm

    async def stop(self, name: str, grace: float, force: bool) -> tuple[VM, bool]:
        """Graceful stop (agent shutdown), then forced power-off after ``grace`` seconds.
        Once begun, it ends (STOPPED) even when its caller goes away."""
        async with self._lock(name):
            return await to_completion(self._stop(name, grace, force))

    async def _stop(self, name: str, grace: float, force: bool) -> tuple[VM, bool]:
        vm = self._get(name)
        await self._refresh(vm, held=True)
        if vm.state in (VMState.STOPPED, VMState.DEFINED):
            return vm, False
        vm.require(VMState.BOOTING, VMState.READY, VMState.FAILED)
        dom = await asyncio.to_thread(self.conn.lookup, name)
        was_ready = vm.state is VMState.READY
        if vm.state is not VMState.FAILED:
            vm.transition(VMState.STOPPING)
        forced = False
        if not force and was_ready:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async with guest_channel(vm.agent_endpoint) as channel:
                    stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
                    await stub.Shutdown(guest_agent_pb2.ShutdownRequest(), timeout=min(grace, 3))
        if not force:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.shutdown)
            forced = not await self._wait_shutoff(dom, grace)
        if force or forced:
            forced = True
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.destroy)
            await self._wait_shutoff(dom, 10)
        if vm.relay is not None:
            await vm.relay.close()
            vm.relay = None
        vm.state = VMState.STOPPED
        log.info("stopped VM %s (forced=%s)", name, forced, extra={"vm": name})
        return vm, forced

    @staticmethod
    async def _wait_shutoff(dom: libvirt.virDomain, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                if not await asyncio.to_thread(dom.isActive):
                    return True
            except libvirt.libvirtError:
                return True
            await asyncio.sleep(POLL_S * 2)
        return False

    async def destroy(self, name: str, reason: str = "") -> None:
        """Remove the domain, overlay, snapshots and sockets. Idempotent."""
        self._validate_name(name)
        if not name.startswith(self.settings.vm_prefix):
            raise InvalidArgument(
                f"{name} does not belong to this vm-manager (prefix {self.settings.vm_prefix})"
            )
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is not None:
                vm.state = VMState.DESTROYING
                if vm.relay is not None:
                    await vm.relay.close()
                    vm.relay = None
            vm_dir, run_dir = self._paths(name)
            await asyncio.to_thread(self._destroy_domain, name)
            await self.net.detach(name)
            for d in (vm_dir, run_dir):
                await asyncio.to_thread(workspace.remove_tree, d)
            if vm is not None:
                vm.state = VMState.DESTROYED
            self._vms.pop(name, None)
        self._locks.pop(name, None)
        log.info("destroyed VM %s", name, extra={"vm": name, "reason": reason})
        if vm is not None:
            if reason:
                self._tombstones[name] = reason[:500]
                while len(self._tombstones) > TOMBSTONES:
                    self._tombstones.popitem(last=False)
            self.events.emit("vm.destroyed", vm=name, reason=reason, labels=dict(vm.labels))

    def _destroy_domain(self, name: str) -> None:
        dom = self.conn.find(name)
        if dom is None:
            return
        with libvirt_errors(f"destroying VM {name}"):
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
            for flags in _undefine_flag_sets():
                try:
                    dom.undefineFlags(flags)
                    return
                except libvirt.libvirtError as exc:
                    code = exc.get_error_code()
                    if code == libvirt.VIR_ERR_NO_DOMAIN:
                        return
                    # Drivers that do not know a flag reject it: try fewer.
                    if code not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                        raise
            dom.undefine()

    def _remove_everything(self, vm: VM) -> None:
        with contextlib.suppress(AgentVMError):
            self._destroy_domain(vm.name)
        workspace.remove_tree(vm.vm_dir)
        workspace.remove_tree(vm.run_dir)

    async def close(self) -> None:
        """Stop relays (VMs keep running; a restarted vm-manager adopts them).

        VMs of template builds cut short by the shutdown are destroyed: a
        build never resumes.
        """
        if self._disk_watch is not None:
            self._disk_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._disk_watch
            self._disk_watch = None
        for vm in list(self._vms.values()):
            if vm.labels.get(TEMPLATE_ROLE[0]) == TEMPLATE_ROLE[1]:
                with contextlib.suppress(AgentVMError, OSError):
                    await self.destroy(vm.name)
        for vm in self._vms.values():
            if vm.relay is not None:
                await vm.relay.close()
                vm.relay = None
        await self.net.close()
