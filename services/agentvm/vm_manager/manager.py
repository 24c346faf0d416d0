"""VMManager: VM lifecycle over libvirt (async core; libvirt calls run in threads).

State lives in two places only: libvirt (domains, with agent-vm's record in
each domain's <metadata>) and the VM directories (overlay, console log).
The in-memory registry is rebuilt from them at start (``recover``), so a
restarted vm-manager finds the VMs it made and reconnects to their agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import secrets
import subprocess
import time
import uuid as uuidlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import grpc
import libvirt
from google.protobuf import json_format

from agentvm.common.config import Settings
from agentvm.common.errors import (
    AgentVMError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from agentvm.common.events import EventSink, NullSink
from agentvm.common.grpc_util import guest_channel
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2
from agentvm.vm_manager import access, image_vms, observe, workspace
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager import suspend as suspend_vm
from agentvm.vm_manager.accel import AccelInfo
from agentvm.vm_manager.clones import (
    MEMORY,
    TemplateInfo,
    TemplateSpec,
    TemplateStore,
    freeze_layers,
    load_state,
    save_state,
)
from agentvm.vm_manager.hostcaps import find_virtiofsd, io_weight_supported
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.image_store import image_users as named_image_users
from agentvm.vm_manager.image_store import store_root
from agentvm.vm_manager.libvirt_conn import (
    DOMAIN_CRASHED,
    DOMAIN_SHUTOFF,
    LibvirtConnection,
    libvirt_errors,
)
from agentvm.vm_manager.network import NatNetwork, Policy
from agentvm.vm_manager.relay import HostRelay
from agentvm.vm_manager.snapshots import SnapshotInfo, SnapshotManager
from agentvm.vm_manager.templates import (
    ImageFiles,
    Resources,
    VMTemplate,
    random_mac,
)
from agentvm.vm_manager.vm import VM, VMState
from agentvm_guest.mux import PORT_NAME

log = logging.getLogger("agentvm.vm_manager")

NAME_RE = re.compile(r"^agent-vm-[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_WAIT_S = 120.0
DEFAULT_GRACE_S = 10.0
POLL_S = 0.05
TEMPLATE_ROLE = ("agent-vm/role", "template")
TOMBSTONES = 1000
LABEL_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,63}$")


def _undefine_flag_sets() -> list[int]:
    """Undefine flags, most thorough first (snapshot metadata, managed save, NVRAM)."""
    snaps = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    save = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    return [int(snaps | save | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM), int(snaps | save), int(snaps)]


class VMManager:
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
        self.net = NatNetwork(settings, conn)

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

    # -- recovery --------------------------------------------------------
    async def recover(self) -> None:
        """Rebuild the registry from libvirt; reclaim VM directories nobody owns."""
        doms = await asyncio.to_thread(self.conn.list_domains, self.settings.vm_prefix)
        for dom in doms:
            try:
                await self._adopt(dom)
            except AgentVMError as exc:
                log.warning("cannot adopt domain %s: %s", dom.name(), exc)
        await asyncio.to_thread(self.templates.clean_staging)
        await asyncio.to_thread(self.image_store.recover)
        await self.net.finish_recovery()
        # A template build never survives a restart: its VM is garbage.
        for vm in list(self._vms.values()):
            if vm.labels.get(TEMPLATE_ROLE[0]) == TEMPLATE_ROLE[1]:
                log.info("destroying %s, left by an interrupted template build", vm.name)
                await self.destroy(
                    vm.name, "vm-manager restart: left by an interrupted template build"
                )
        for base in (self.settings.vms_state_dir, self.settings.vms_run_dir):
            if not base.exists():
                continue
            for path in base.iterdir():
                if path.name.startswith(self.settings.vm_prefix) and path.name not in self._vms:
                    log.info("removing leftover VM directory %s", path)
                    mounted = await asyncio.to_thread(workspace.mounts_under, path)
                    await asyncio.to_thread(workspace.remove_tree, path)
                    # A create cut short by a crash: audited like any reclamation.
                    self.events.emit(
                        "vm.reclaimed",
                        vm=path.name,
                        path=str(path),
                        unmounted=[str(p) for p in mounted],
                        reason="vm-manager restart: a directory no domain owns",
                    )

    async def _adopt(self, dom: libvirt.virDomain) -> None:
        xml = await asyncio.to_thread(dom.XMLDesc, 0)
        meta = dx.Metadata.parse(xml)
        if meta is None:
            log.info("domain %s has no agent-vm metadata; leaving it alone", dom.name())
            return
        f = meta.fields
        name = dom.name()
        vm_dir, run_dir = self._paths(name)
        profile = ResourceProfile[f.get("profile", "STANDARD")]
        vm = VM(
            name=name,
            uuid=dom.UUIDString(),
            profile=profile,
            network_mode=NetworkMode[f.get("network_mode", "ISOLATED")],
            resources=Resources(
                int(f.get("vcpus", profile.vcpus)),
                int(f.get("memory_mib", profile.memory_mib)),
                int(f.get("disk_mib", profile.disk_mib)),
            ),
            accel=self.accel.accel,
            image_id=f.get("image_id", ""),
            vm_dir=vm_dir,
            run_dir=run_dir,
            labels=dict(meta.labels),
            created_at=float(f.get("created_at", time.time())),
            shared_workspace=f.get("shared_workspace") == "1",
            template_key=f.get("template_key", ""),
            agent_socket_name=access.adopted_socket_name(f.get("agent_socket", "")),
            workload_image_id=f.get("workload_image", ""),
            build_disk=f.get("build_disk", ""),
        )
        if vm.network_mode is NetworkMode.NAT_FILTERED:
            try:
                policy = Policy.from_json(f["net_policy"])
                self.net.adopt(name, self._vm_id(vm), f["net_address"], f["net_mac"], policy)
            except (KeyError, ValueError) as exc:
                raise FailedPrecondition(f"its network record is unreadable ({exc})") from exc
            vm.network = self._net_proto(name)
        elif vm.network_mode is NetworkMode.BRIDGE:
            vm.network = common_pb2.NetworkAttachment(
                mac=f.get("net_mac", ""), bridge=f.get("net_bridge", "")
            )
            if vm.network.mac:
                self.net.adopt_bridged(name, self._vm_id(vm), vm.network.mac)
        active = await asyncio.to_thread(dom.isActive)
        if active:
            vm.state = VMState.BOOTING
            # Booted before this process started: how long that took is unknown,
            # so no boot duration is reported for it (rather than a made-up one).
            vm.boot_kind = "adopted"
            await self._start_relay(vm, dom)
        else:
            vm.state = VMState.STOPPED
        self._vms[name] = vm
        log.info("adopted VM %s (%s)", name, vm.state.name)

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
        )
        base = self.templates.disk(template.key) if template else image.disk
        async with self._lock(name):
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
                defining = asyncio.ensure_future(
                    asyncio.to_thread(self._define, vm, base, image.kernel, image.initrd)
                )
                try:
                    await asyncio.shield(defining)
                except asyncio.CancelledError:
                    # However often we are cancelled meanwhile (a client, then SIGTERM).
                    while not defining.done():
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.shield(defining)
                    raise
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

    def _vm_template(self, vm: VM, kernel: Path, initrd: Path) -> VMTemplate:
        return VMTemplate(
            profile=vm.profile,
            network_mode=vm.network_mode,
            resources=vm.resources,
            accel=vm.accel,
            image=ImageFiles(kernel=str(kernel), initrd=str(initrd)),
            memory_limit=self.memory_limit,
            io_weight=self.io_weight,
            workspace_dir=str(vm.workspace) if vm.shared_workspace else None,
            virtiofsd=self.virtiofsd,
        )

    def _metadata(self, vm: VM) -> dx.Metadata:
        return dx.Metadata(
            {
                "profile": vm.profile.name,
                "network_mode": vm.network_mode.name,
                "vcpus": str(vm.resources.vcpus),
                "memory_mib": str(vm.resources.memory_mib),
                "disk_mib": str(vm.resources.disk_mib),
                "image_id": vm.image_id,
                "created_at": f"{vm.created_at:.3f}",
                "shared_workspace": "1" if vm.shared_workspace else "0",
                "template_key": vm.template_key,
                "agent_socket": vm.agent_socket_name,
                "workload_image": vm.workload_image_id,
                "build_disk": vm.build_disk,
                **self._net_metadata(vm),
            },
            vm.labels,
        )

    @staticmethod
    def _vm_id(vm: VM) -> str:
        """Short id for firewall objects and tap names (hex of the UUID)."""
        return vm.uuid.replace("-", "")[:8]

    def _net_proto(self, name: str) -> common_pb2.NetworkAttachment | None:
        att = self.net.attachment(name)
        return att.to_proto(self.net.names.bridge) if att else None

    def _net_metadata(self, vm: VM) -> dict[str, str]:
        att = self.net.attachment(vm.name)
        if vm.network_mode is NetworkMode.BRIDGE and vm.network is not None:
            return {"net_mac": vm.network.mac, "net_bridge": vm.network.bridge}
        if att is None:
            return {}
        return {
            "net_address": f"{att.ip}/{att.prefixlen}",
            "net_mac": att.mac,
            "net_policy": att.policy.to_json(),
        }

    def _nic(self, vm: VM) -> dx.NetworkInterface | None:
        if vm.network_mode is NetworkMode.BRIDGE and vm.network is not None:
            # libvirt's clean-traffic: MAC, IP (learnt), ARP; nothing else.
            return dx.NetworkInterface(
                kind="bridge",
                source=vm.network.bridge,
                mac=vm.network.mac,
                filterref="clean-traffic",
                target=self.net.names.bridge_tap(self._vm_id(vm)),
            )
        att = self.net.attachment(vm.name)
        if att is None:
            return None
        return dx.NetworkInterface(
            kind="network",
            source=self.net.names.network,
            mac=att.mac,
            target=self.net.names.tap(att.vm_id),
        )

    def _domain(self, vm: VM, kernel: Path, initrd: Path, *, incoming: bool = False) -> str:
        boot_name = None
        if vm.template_key:
            info = self.templates.load(vm.template_key)
            if info is None:
                raise FailedPrecondition(
                    f"the memory template {vm.template_key} of {vm.name} is gone"
                )
            boot_name = info.boot_name
        return (
            self._vm_template(vm, kernel, initrd)
            .domain(
                name=vm.name,
                uuid=vm.uuid,
                overlay=str(vm.overlay),
                console_log=str(vm.console_log),
                metadata=self._metadata(vm),
                boot_name=boot_name,
                qemu_args=("-incoming", "defer") if incoming else (),
                nic=self._nic(vm),
                image_disk=self._image_disk(vm),
            )
            .to_xml()
        )

    @staticmethod
    def _image_disk(vm: VM) -> dx.Disk | None:
        if vm.workload_image_id:
            return image_vms.disk_element(vm.image_disk)
        if vm.build_disk:
            return image_vms.disk_element(
                Path(vm.build_disk), raw=not vm.build_disk.endswith(".qcow2")
            )
        return None

    def _define(self, vm: VM, base: Path, kernel: Path, initrd: Path) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.settings.state_dir, self.settings.vms_state_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        vm.vm_dir.mkdir(mode=0o755)
        vm.vm_dir.chmod(0o755)
        proc = subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(base),
                "-F",
                "qcow2",
                str(vm.overlay),
                f"{vm.resources.disk_mib}M",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise FailedPrecondition(
                f"cannot create the overlay of {vm.name}: {proc.stderr.strip()}"
            )
        if vm.workload_image_id:
            stored = self.image_store.get(vm.workload_image_id)
            # A clone's vdb overlays its template's frozen vdb layer (clones.py).
            image_base = (
                self.templates.image_disk(vm.template_key) if vm.template_key else stored.disk
            )
            image_vms.create_overlay(vm, image_base, stored.manifest.disk_bytes)
        if vm.shared_workspace:
            # A file system of its own, as large as the VM's disk (workspace.py).
            workspace.create(vm.workspace, vm.resources.disk_mib, self.settings.workspace_cap)
        self.conn.define(self._domain(vm, kernel, initrd))

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
            with libvirt_errors(f"starting VM {name}"):
                await asyncio.to_thread(dom.create)
            vm.transition(VMState.BOOTING)
            await self._start_relay(vm, dom)
            log.info("started VM %s", name, extra={"vm": name})
            return vm

    async def _start_relay(self, vm: VM, dom: libvirt.virDomain) -> None:
        xml = await asyncio.to_thread(dom.XMLDesc, 0)
        path, _state = dx.channel_state(xml, PORT_NAME)
        if path is None:
            raise FailedPrecondition(f"VM {vm.name} has no agent channel in its live XML")
        if vm.relay is not None:
            await vm.relay.close()
        vm.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        vm.relay = HostRelay(vm.name, vm.agent_socket, channel_path=path)
        await vm.relay.start()

    async def _refresh(self, vm: VM) -> None:
        """Notice a domain that stopped or crashed behind our back."""
        if not vm.state.running:
            return
        dom = await asyncio.to_thread(self.conn.find, vm.name)
        if dom is None:
            vm.state = VMState.FAILED
            vm.error = "the domain disappeared from libvirt"
            return
        state, reason = await asyncio.to_thread(dom.state)
        if state in (DOMAIN_SHUTOFF, DOMAIN_CRASHED):
            if state == DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
                vm.transition(VMState.STOPPED)
            else:
                vm.transition(VMState.FAILED)
                vm.error = (
                    f"the VM stopped unexpectedly (libvirt state {state}, reason {reason}); "
                    f"see its console log {vm.console_log}"
                )
            if vm.relay is not None:
                await vm.relay.close()
                vm.relay = None

    async def get(self, name: str) -> VM:
        vm = self._get(name)
        await self._refresh(vm)
        return vm

    async def list_vms(self, selector: dict[str, str]) -> list[VM]:
        out = []
        for vm in list(self._vms.values()):
            if all(vm.labels.get(k) == v for k, v in selector.items()):
                await self._refresh(vm)
                out.append(vm)
        return sorted(out, key=lambda v: v.created_at)

    async def wait(self, name: str, state: VMState, timeout: float) -> VM:
        """Wait until ``name`` is in ``state``; READY means the agent answered."""
        vm = self._get(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self._refresh(vm)
            if state is VMState.READY and vm.state is VMState.BOOTING:
                await self._probe_agent(vm, deadline)
            if vm.state is state:
                return vm
            if state is VMState.READY and vm.state is not VMState.BOOTING:
                raise FailedPrecondition(
                    f"VM {name} is {vm.state.name} and will not become READY"
                    + (f": {vm.error}" if vm.error else "; start it first")
                )
            if vm.state is VMState.DESTROYED:
                raise FailedPrecondition(f"VM {name} was destroyed")
            if loop.time() >= deadline:
                raise DeadlineExceeded(
                    f"VM {name} did not become {state.name} within {timeout:.0f} s "
                    f"(it is {vm.state.name}; console log: {vm.console_log})"
                )
            await asyncio.sleep(POLL_S)

    async def _probe_agent(self, vm: VM, deadline: float) -> None:
        """One readiness attempt: the guest opened its port and the agent answers."""
        loop = asyncio.get_running_loop()
        dom = await asyncio.to_thread(self.conn.find, vm.name)
        if dom is None:
            return
        xml = await asyncio.to_thread(dom.XMLDesc, 0)
        _path, cstate = dx.channel_state(xml, PORT_NAME)
        if cstate != "connected":
            return
        budget = max(0.1, min(5.0, deadline - loop.time()))
        try:
            info = await self.agent_status(vm, budget)
        except grpc.aio.AioRpcError as exc:
            log.debug("agent of %s not ready: %s", vm.name, exc.details())
            return
        if vm.state is VMState.BOOTING and vm.network is not None:
            try:
                await self._configure_network(vm, budget)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
                vm.transition(VMState.FAILED)
                vm.error = f"the guest could not configure its network: {exc.details()}"
                return
        if vm.state is VMState.BOOTING and vm.workload_image_id:
            try:
                await self._configure_root(vm, budget)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
                vm.transition(VMState.FAILED)
                vm.error = f"the guest could not mount image {vm.workload_image_id[:12]}: " + (
                    exc.details() or exc.code().name
                )
                return
        if vm.state is VMState.BOOTING:
            vm.guest = observe.sanitize_guest(info, vm.resources.memory_mib * 2**20)
            if vm.boot_started is not None and vm.boot_duration is None:
                vm.boot_duration = time.monotonic() - vm.boot_started
            vm.transition(VMState.READY)
            self._emit_ready(vm)
            log.info(
                "VM %s ready",
                vm.name,
                extra={"vm": vm.name, "boot_s": round(vm.boot_duration or 0.0, 3)},
            )

    async def _configure_root(self, vm: VM, timeout: float) -> None:
        stored = await asyncio.to_thread(self.image_store.get, vm.workload_image_id)
        await image_vms.configure_root(
            vm.agent_endpoint, stored.manifest.config.to_proto(), timeout
        )

    def _emit_ready(self, vm: VM) -> None:
        """vm.ready: the monitor observes boot_s in agentvm_vm_boot_duration_seconds
        by kind; an adopted VM's boot was not timed, so it carries none."""
        timed: dict[str, Any] = {}
        if vm.boot_duration is not None:
            timed["boot_s"] = round(vm.boot_duration, 6)
        self.events.emit(
            "vm.ready",
            vm=vm.name,
            kind=vm.boot_kind,
            restored=vm.boot_kind == "restore",
            labels=dict(vm.labels),
            **timed,
        )

    async def _configure_network(self, vm: VM, timeout: float) -> None:
        """Tell the guest its MAC, and its address, gateway and resolver (NAT: no DHCP
        there) or to take them by DHCP (BRIDGE: the user's network)."""
        bridged = vm.network_mode is NetworkMode.BRIDGE and vm.network is not None
        att = self.net.attachment(vm.name)
        if bridged and vm.network is not None:
            request = guest_agent_pb2.ConfigureNetworkRequest(mac=vm.network.mac, dhcp=True)
        elif att is not None:
            request = guest_agent_pb2.ConfigureNetworkRequest(
                mac=att.mac,
                address=f"{att.ip}/{att.prefixlen}",
                gateway=att.gateway,
                nameservers=[att.gateway],
            )
        else:
            return
        async with guest_channel(vm.agent_endpoint) as channel:
            stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
            resp = await stub.ConfigureNetwork(request, timeout=min(timeout, 30.0))
        if bridged and vm.network is not None:
            # What the guest says it got: shown, never trusted for anything.
            try:
                vm.network.address = str(ipaddress.IPv4Interface(resp.address))
            except ValueError:
                vm.network.address = ""

    async def update_network_policy(self, name: str, policy: Policy) -> VM:
        """Replace a NAT_FILTERED VM's policy, live and in its persistent record."""
        async with self._lock(name):
            vm = self._get(name)
            if self.net.attachment(name) is None:
                raise FailedPrecondition(
                    f"VM {name} is {vm.network_mode.name}: only NETWORK_MODE_NAT_FILTERED VMs "
                    "have a network policy"
                )
            await self.net.update_policy(name, policy)
            vm.network = self._net_proto(name)
            dom = await asyncio.to_thread(self.conn.lookup, name)
            await asyncio.to_thread(self._store_metadata, vm, dom)
        log.info("network policy of %s updated", name, extra={"vm": name})
        self.events.emit("vm.policy_updated", vm=name, policy=policy.to_json())
        return vm

    async def lease_pool_vm(self, name: str, lessee: str, lease_id: str) -> VM:
        """Record that pool-manager handed pool VM ``name`` to ``lessee`` (access.py)."""
        async with self._lock(name):
            vm = self._get(name)
            if vm.labels.get(access.LESSEE_LABEL) == lessee:
                return vm
            labels = {**vm.labels, access.LESSEE_LABEL: lessee, access.LEASE_LABEL: lease_id}
            self._check_labels(labels)
            dom = await asyncio.to_thread(self.conn.lookup, name)
            old, vm.labels = vm.labels, labels
            try:
                await asyncio.to_thread(self._store_metadata, vm, dom)
            except BaseException:
                vm.labels = old
                raise
        self.events.emit("vm.leased", vm=name, lessee=lessee, lease_id=lease_id)
        return vm

    def _store_metadata(self, vm: VM, dom: libvirt.virDomain) -> None:
        meta = self._metadata(vm).to_api_xml()
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        with libvirt_errors(f"recording the network policy of {vm.name}"):
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                meta,
                "agentvm",
                dx.METADATA_NS,
                flags,
            )

    async def agent_status(self, vm: VM, timeout: float) -> common_pb2.GuestInfo:
        async with guest_channel(vm.agent_endpoint) as channel:
            stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
            resp = await stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=timeout)
            return resp.info

    async def stop(self, name: str, grace: float, force: bool) -> tuple[VM, bool]:
        """Graceful stop (agent shutdown), then forced power-off after ``grace`` seconds."""
        async with self._lock(name):
            vm = self._get(name)
            await self._refresh(vm)
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
                        await stub.Shutdown(
                            guest_agent_pb2.ShutdownRequest(), timeout=min(grace, 3)
                        )
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

    async def list_stats(
        self,
        selector: dict[str, str],
        guest_timeout: float,
        guest_min_cpu: float = 0.0,
        guest_max_age: float = 30.0,
    ) -> list[vm_manager_pb2.VMStats]:
        """Resource figures of running VMs (libvirt), with their guests' own view.

        A guest is asked only when its VM was busy since the previous call
        (``guest_min_cpu`` of its vCPUs) or its last answer is older than
        ``guest_max_age``; otherwise that last answer is returned.
        """
        vms = [
            vm
            for vm in self._vms.values()
            if vm.state.running and all(vm.labels.get(k) == v for k, v in selector.items())
        ]

        def collect() -> dict[str, dict[str, Any]]:
            doms = [d for d in (self.conn.find(vm.name) for vm in vms) if d is not None]
            return self.conn.call("reading VM stats", lambda c: observe.bulk_stats(c, doms))

        raw = await asyncio.to_thread(collect)
        now = time.monotonic()
        out: list[vm_manager_pb2.VMStats] = []
        busy: set[str] = set()
        for vm in vms:
            if vm.name not in raw:
                continue
            mem = vm.resources.memory_mib * 2**20
            msg = observe.stats_proto(vm.name, vm.labels, raw[vm.name], mem)
            cpu = msg.cpu_time.ToNanoseconds() / 1e9
            prev = self._cpu_seen.get(vm.name)
            self._cpu_seen[vm.name] = (now, cpu)
            if (
                prev is None
                or now <= prev[0]
                or not msg.vcpus
                or (cpu - prev[1]) / ((now - prev[0]) * msg.vcpus) >= guest_min_cpu
            ):
                busy.add(vm.name)
            out.append(msg)
        for name in set(self._cpu_seen) - set(self._vms):
            self._cpu_seen.pop(name, None)
            self._guest_seen.pop(name, None)
        if guest_timeout <= 0:
            return out

        async def ask(msg: vm_manager_pb2.VMStats) -> None:
            vm = self._vms.get(msg.name)
            if vm is None or vm.state is not VMState.READY:
                return
            seen = self._guest_seen.get(msg.name)
            if seen is not None and msg.name not in busy and now - seen[0] < guest_max_age:
                msg.guest.CopyFrom(seen[1])
                msg.guest_time.FromNanoseconds(seen[2])
                return
            try:
                info = await self.agent_status(vm, guest_timeout)
            except grpc.aio.AioRpcError:
                msg.guest_unresponsive = True
                return
            clean = observe.sanitize_guest(info, msg.memory_max_bytes)
            stamp = time.time_ns()
            self._guest_seen[msg.name] = (now, clean, stamp)
            msg.guest.CopyFrom(clean)
            msg.guest_time.FromNanoseconds(stamp)

        await asyncio.gather(*(ask(m) for m in out))
        return out

    async def capture_evidence(
        self, name: str, reason: str, include_memory: bool
    ) -> observe.Evidence:
        """Pause a VM and preserve memory, disk overlay, XML, metadata and egress log."""
        async with self._lock(name):
            vm = self._get(name)
            dom = await asyncio.to_thread(self.conn.lookup, name)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            directory = self.settings.state_dir / "evidence" / f"{name}-{stamp}"
            metadata = {
                "vm": json.loads(json_format.MessageToJson(vm.to_proto())),
                "reason": reason,
                "backing_image": vm.image_id,
                "template": vm.template_key,
            }
            evidence = await asyncio.to_thread(
                observe.capture,
                dom,
                directory=directory,
                overlay=vm.overlay,
                metadata=metadata,
                egress=self.net.egress.records(name),
                include_memory=include_memory,
            )
        self.events.emit(
            "vm.evidence_captured",
            vm=name,
            severity="warning",
            path=str(evidence.path),
            memory_bytes=evidence.memory_bytes,
            disk_bytes=evidence.disk_bytes,
            reason=reason,
        )
        return evidence

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
        for vm in list(self._vms.values()):
            if vm.labels.get(TEMPLATE_ROLE[0]) == TEMPLATE_ROLE[1]:
                with contextlib.suppress(AgentVMError, OSError):
                    await self.destroy(vm.name)
        for vm in self._vms.values():
            if vm.relay is not None:
                await vm.relay.close()
                vm.relay = None
        await self.net.close()

    # -- snapshots ---------------------------------------------------------
    async def create_snapshot(
        self, vm_name: str, name: str, include_memory: bool, description: str
    ) -> SnapshotInfo:
        """Snapshot a VM: with memory when it runs, disk-only when it is stopped."""
        async with self._lock(vm_name):
            vm = self._get(vm_name)
            await self._refresh(vm)
            running = vm.state.running
            if running and not include_memory:
                raise FailedPrecondition(
                    f"VM {vm_name} is running: a snapshot of a running VM includes its memory "
                    "(set include_memory), or stop it first for a disk-only snapshot"
                )
            if not running and include_memory:
                raise FailedPrecondition(
                    f"VM {vm_name} is {vm.state.name}: there is no memory to save; start it, or "
                    "take a disk-only snapshot"
                )
            if include_memory and vm.shared_workspace:
                raise FailedPrecondition(
                    f"VM {vm_name} has a shared (virtiofs) workspace, whose device state QEMU "
                    "cannot save: use VMs without shared_workspace for memory snapshots"
                )
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            await asyncio.to_thread(
                self.snapshots.create,
                dom,
                name,
                include_memory=include_memory,
                description=description,
            )
            infos = await asyncio.to_thread(self.snapshots.list_snapshots, dom, vm.overlay)
        log.info("snapshot %s of %s created", name, vm_name, extra={"vm": vm_name})
        return next(i for i in infos if i.name == name)

    async def list_snapshots(self, vm_name: str) -> list[SnapshotInfo]:
        vm = self._get(vm_name)
        dom = await asyncio.to_thread(self.conn.lookup, vm_name)
        return await asyncio.to_thread(self.snapshots.list_snapshots, dom, vm.overlay)

    async def restore_snapshot(self, vm_name: str, name: str) -> VM:
        """Return the VM to the snapshot: running (memory) or stopped (disk-only)."""
        async with self._lock(vm_name):
            vm = self._get(vm_name)
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            if vm.relay is not None:
                # The guest's half of the session is rewound with its memory: the
                # next client starts a fresh session (SYNC handshake).
                await vm.relay.close()
                vm.relay = None
            started = time.monotonic()
            await asyncio.to_thread(self.snapshots.revert, dom, name)
            if await asyncio.to_thread(dom.isActive):
                vm.state = VMState.BOOTING
                # Timed from the restore request to the agent answering (WaitVM).
                vm.boot_started = started
                vm.boot_duration = None
                vm.boot_kind = "snapshot"
                await self._start_relay(vm, dom)
            else:
                vm.state = VMState.STOPPED
            vm.error = ""
        log.info("VM %s restored to snapshot %s", vm_name, name, extra={"vm": vm_name})
        return vm

    async def suspend(self, name: str) -> VM:
        """Save a READY VM's state to a file and stop its QEMU (suspend.py)."""
        async with self._lock(name):
            vm = self._get(name)
            await self._refresh(vm)
            vm.require(VMState.READY)
            if vm.shared_workspace:
                raise FailedPrecondition(
                    f"VM {name} has a shared (virtiofs) workspace, whose device state QEMU "
                    "cannot save: only VMs without shared_workspace can be suspended"
                )
            dom = await asyncio.to_thread(self.conn.lookup, name)
            if vm.relay is not None:
                # The guest's half of the session is saved with its memory: the next
                # client after the resume starts a fresh session.
                await vm.relay.close()
                vm.relay = None
            try:
                with libvirt_errors(f"suspending VM {name}"):
                    await asyncio.to_thread(suspend_vm.suspend, dom, vm.suspended_state)
            except BaseException:
                if await asyncio.to_thread(dom.isActive):
                    await self._start_relay(vm, dom)
                raise
            vm.transition(VMState.STOPPED)
            vm.guest = None
        log.info("VM %s suspended", name, extra={"vm": name})
        return vm

    async def resume(self, name: str) -> VM:
        """Start a suspended VM from its saved state; BOOTING until its agent answers."""
        async with self._lock(name):
            vm = self._get(name)
            if not vm.suspended:
                raise FailedPrecondition(
                    f"VM {name} is {vm.state.name} and not suspended: nothing to resume "
                    "(StartVM starts a stopped VM)"
                )
            vm.boot_started = time.monotonic()
            vm.boot_duration = None
            vm.boot_kind = "resume"
            vm.error = ""
            with libvirt_errors(f"resuming VM {name}"):
                dom = await asyncio.to_thread(
                    suspend_vm.resume, self.conn, name, vm.suspended_state
                )
            vm.transition(VMState.BOOTING)
            await self._start_relay(vm, dom)
            # Its agent was running when it was saved: it answers at once, so the
            # caller gets a READY VM without a WaitVM round trip (as a template
            # restore does). A slow one is left BOOTING for WaitVM.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            while vm.state is VMState.BOOTING and loop.time() < deadline:
                await self._probe_agent(vm, deadline)
                if vm.state is VMState.BOOTING:
                    await asyncio.sleep(POLL_S)
        log.info("VM %s resumed (%s)", name, vm.state.name, extra={"vm": name})
        return vm

    async def delete_snapshot(self, vm_name: str, name: str) -> None:
        async with self._lock(vm_name):
            self._get(vm_name)
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            await asyncio.to_thread(self.snapshots.delete, dom, name)

    # -- memory templates ------------------------------------------------
    async def _qemu_version(self) -> str:
        if self._qemu_ver is None:
            self._qemu_ver = (await asyncio.to_thread(self.conn.versions))[1]
        return self._qemu_ver

    async def _workload_id(self, ref: str) -> str:
        """The id of named image ``ref``; "" for the built-in image ("" or "default")."""
        if ref in ("", "default"):
            return ""
        return (await asyncio.to_thread(self.image_store.resolve, ref)).id

    def _spec(
        self,
        profile: ResourceProfile,
        resources: Resources,
        network: NetworkMode,
        workload_image_id: str = "",
    ) -> TemplateSpec:
        if network is NetworkMode.BRIDGE:
            raise InvalidArgument(
                "memory templates are ISOLATED or NAT_FILTERED: a bridged VM's network is "
                "not vm-manager's to re-address; create bridged VMs without from_template"
            )
        manifest = self.images.require_current().load_manifest()
        return TemplateSpec(
            manifest.id, profile, resources, self.accel.accel, network, workload_image_id
        )

    async def _template_for_clone(
        self,
        profile: ResourceProfile,
        network_mode: NetworkMode,
        resources: Resources,
        shared_workspace: bool,
        workload_image_id: str = "",
    ) -> TemplateInfo:
        if shared_workspace:
            raise InvalidArgument(
                "from_template cannot be combined with shared_workspace: QEMU cannot save a "
                "virtiofs device, so templates have none; move files through the file API"
            )
        spec = self._spec(profile, resources, network_mode, workload_image_id)
        info = self.templates.current(spec, await self._qemu_version())
        if info is None:
            named = f" (named image {workload_image_id[:12]})" if workload_image_id else ""
            raise FailedPrecondition(
                f"no memory template for {profile.name.lower()} VMs of image {spec.image_id}"
                f"{named}: call PrepareTemplate (agent-vm template prepare) first, or create "
                "the VM without from_template"
            )
        return info

    async def _start_clone(self, vm: VM, info: TemplateInfo, kernel: Path, initrd: Path) -> None:
        """Start ``vm`` paused with -incoming defer, load the template, resume, reidentify."""
        async with self._lock(vm.name):
            vm.boot_started = time.monotonic()
            vm.boot_kind = "restore"
            incoming = await asyncio.to_thread(self._domain, vm, kernel, initrd, incoming=True)
            normal = await asyncio.to_thread(self._domain, vm, kernel, initrd)
            memory = self.templates.memory(info.key)

            def launch() -> libvirt.virDomain:
                with libvirt_errors(f"restoring {vm.name} from template {info.key}"):
                    self.conn.define(incoming)
                    dom = self.conn.lookup(vm.name)
                    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
                    # The persistent definition boots normally next time.
                    self.conn.define(normal)
                    load_state(dom, memory)
                    dom.resume()
                    return dom

            dom = await asyncio.to_thread(launch)
            vm.transition(VMState.BOOTING)
            await self._start_relay(vm, dom)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60.0
            while True:
                try:
                    guest = await self._reidentify(vm, max(0.5, deadline - loop.time()))
                    vm.guest = observe.sanitize_guest(guest, vm.resources.memory_mib * 2**20)
                    await self._configure_network(vm, max(0.5, deadline - loop.time()))
                    if vm.workload_image_id:
                        # The same config as the template's: the guest keeps its mount.
                        await self._configure_root(vm, max(0.5, deadline - loop.time()))
                    break
                except grpc.aio.AioRpcError as exc:
                    if loop.time() >= deadline:
                        raise DeadlineExceeded(
                            f"the agent of {vm.name} did not answer after the restore from "
                            f"template {info.key}: {exc.details()} (console log: "
                            f"{vm.console_log}); DeleteTemplate rebuilds it"
                        ) from exc
                    await asyncio.sleep(POLL_S)
            vm.boot_duration = time.monotonic() - vm.boot_started
            vm.transition(VMState.READY)
            self._emit_ready(vm)
        log.info(
            "VM %s restored from template",
            vm.name,
            extra={"vm": vm.name, "template": info.key, "boot_s": round(vm.boot_duration, 3)},
        )

    async def _reidentify(self, vm: VM, timeout: float) -> common_pb2.GuestInfo:
        request = guest_agent_pb2.ReidentifyRequest(
            hostname=vm.name,
            machine_id=uuidlib.UUID(vm.uuid).hex,
            seed=secrets.token_bytes(64),
        )
        request.wall_clock.FromNanoseconds(time.time_ns())
        async with guest_channel(vm.agent_endpoint) as channel:
            stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
            resp = await stub.Reidentify(request, timeout=min(timeout, 10.0))
        return resp.info

    async def prepare_template(
        self,
        profile: ResourceProfile,
        resources: Resources,
        force: bool,
        network: NetworkMode = NetworkMode.ISOLATED,
        image: str = "",
    ) -> tuple[TemplateInfo, bool]:
        """The current template for ``profile`` (of named image ``image``, "" for the
        built-in one), building it when missing or stale."""
        spec = self._spec(profile, resources, network, await self._workload_id(image))
        async with self._template_locks.setdefault(spec.key, asyncio.Lock()):
            qemu = await self._qemu_version()
            info = None if force else self.templates.current(spec, qemu)
            if info is not None:
                return info, False
            return await self._build_template(spec, qemu), True

    async def _build_template(self, spec: TemplateSpec, qemu: str) -> TemplateInfo:
        started = time.monotonic()
        vm = await self.create(
            profile=spec.profile,
            network_mode=spec.network,
            resources=spec.resources,
            labels=dict([TEMPLATE_ROLE]),
            start=True,
            workload_image=spec.workload_image_id,
        )
        try:
            await self.wait(vm.name, VMState.READY, DEFAULT_WAIT_S)
            # One command first: the agent's Execute path is then loaded and
            # warm in the saved memory, and every clone starts with it.
            async with guest_channel(vm.agent_endpoint) as channel:
                stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
                req = guest_agent_pb2.ExecuteRequest(
                    program=common_pb2.Program(argv=common_pb2.Argv(args=["sync"]))
                )
                try:
                    async for _ in stub.Execute(req, timeout=30):
                        pass
                except grpc.aio.AioRpcError:
                    if not spec.workload_image_id:
                        raise
                    # A named image may lack sync; the warm-up is optional.
            staging = await asyncio.to_thread(self.templates.staging, spec.key)
            async with self._lock(vm.name):
                if vm.relay is not None:
                    await vm.relay.close()
                    vm.relay = None
                dom = await asyncio.to_thread(self.conn.lookup, vm.name)
                with libvirt_errors(f"saving template {spec.key}"):
                    await asyncio.to_thread(save_state, dom, staging / MEMORY)
                    await asyncio.to_thread(dom.destroy)
                vm.state = VMState.STOPPED
                image_disk = vm.image_disk if vm.workload_image_id else None
                disk = await asyncio.to_thread(freeze_layers, staging, vm.overlay, image_disk)
            info = TemplateInfo(
                key=spec.key,
                image_id=spec.image_id,
                profile=spec.profile.name,
                vcpus=spec.resources.vcpus,
                memory_mib=spec.resources.memory_mib,
                disk_mib=spec.resources.disk_mib,
                accel=spec.accel.value,
                created_at=time.time(),
                build_s=round(time.monotonic() - started, 3),
                qemu_version=qemu,
                memory_state_bytes=(staging / MEMORY).stat().st_size,
                disk_bytes=disk.stat().st_size,
                boot_name=vm.name,
                network_mode=spec.network.name,
                workload_image_id=spec.workload_image_id,
            )
            await asyncio.to_thread(self.templates.publish, staging, info)
        finally:
            await asyncio.shield(self.destroy(vm.name))
        in_use = {v.template_key for v in self._vms.values()}
        removed = await asyncio.to_thread(self.templates.prune, spec.image_id, in_use)
        if removed:
            log.info("removed templates of older images: %s", ", ".join(removed))
        log.info(
            "template %s built in %.1f s (memory %d MiB)",
            spec.key,
            info.build_s,
            info.memory_state_bytes >> 20,
            extra={"template": spec.key},
        )
        return info

    def list_templates(self) -> list[TemplateInfo]:
        return self.templates.all()

    async def delete_template(self, key: str) -> None:
        users = sorted(v.name for v in self._vms.values() if v.template_key == key)
        if users:
            raise FailedPrecondition(
                f"template {key} is the disk base of {', '.join(users)}: destroy them first"
            )
        if not await asyncio.to_thread(self.templates.delete, key):
            raise NotFound(f"no template {key}: ListTemplates shows the templates that exist")

    def image_users(self, image_id: str) -> list[str]:
        """Who uses the named image ``image_id`` (DeleteImage refuses while anyone does)."""
        return named_image_users(image_id, self._vms.copy().values(), self.templates.all())
