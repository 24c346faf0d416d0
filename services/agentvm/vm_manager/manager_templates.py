"""Memory templates (clones.py): building a template from a VM booted once to
agent-ready, starting clones from it, and which templates and named images are in use.

A mixin of VMManager (manager.py), which provides what is declared at the top of
``MemoryTemplates``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid as uuidlib
from pathlib import Path

import grpc
import libvirt

from agentvm.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from agentvm.common.grpc_util import guest_channel
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import observe
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
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.image_store import image_users as named_image_users
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, launch, libvirt_errors
from agentvm.vm_manager.manager_readiness import DEFAULT_WAIT_S, POLL_S
from agentvm.vm_manager.network import Policy
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState

log = logging.getLogger("agentvm.vm_manager")

# The label of a template build's VM (destroyed, never resumed, after a restart).
TEMPLATE_ROLE = ("agent-vm/role", "template")
# Free page reporting hands freed blocks to the host about 2 s after they are
# freed (the guest kernel's PAGE_REPORTING_DELAY): waited for before a save.
REPORTING_SETTLE_S = 3.0


async def _reclaim_memory(stub: guest_agent_pb2_grpc.GuestAgentServiceAsyncStub, key: str) -> None:
    """Have the guest drop its clean caches before the save; through free page
    reporting the freed blocks go back to the host and the saved state holds them
    as zero pages, which restored clones do not make resident. Best effort: a
    template without it is only bigger."""
    try:
        resp = await stub.ReclaimMemory(guest_agent_pb2.ReclaimMemoryRequest(), timeout=60)
    except grpc.aio.AioRpcError as exc:
        log.warning(
            "template %s: the guest did not reclaim memory (%s: %.200s)",
            key,
            exc.code().name,
            exc.details(),
        )
        return
    total = resp.total_bytes
    log.info(
        "template %s: the guest has %d of %d MiB free",
        key,
        min(resp.free_bytes, total) >> 20,
        total >> 20,
    )
    await asyncio.sleep(REPORTING_SETTLE_S)


class MemoryTemplates:
    """Prepare, list and delete memory templates; start VMs from them."""

    conn: LibvirtConnection
    images: ImageStore
    accel: AccelInfo
    templates: TemplateStore
    image_store: NamedImageStore
    _template_locks: dict[str, asyncio.Lock]
    _qemu_ver: str | None
    _vms: dict[str, VM]

    def _lock(self, name: str) -> asyncio.Lock:
        raise NotImplementedError

    def _domain(self, vm: VM, kernel: Path, initrd: Path, *, incoming: bool = False) -> str:
        raise NotImplementedError

    async def _start_relay(self, vm: VM, dom: libvirt.virDomain) -> None:
        raise NotImplementedError

    async def _configure_network(self, vm: VM, timeout: float) -> None:
        raise NotImplementedError

    async def _configure_root(self, vm: VM, timeout: float) -> None:
        raise NotImplementedError

    def _emit_ready(self, vm: VM) -> None:
        raise NotImplementedError

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
        raise NotImplementedError

    async def wait(self, name: str, state: VMState, timeout: float) -> VM:
        raise NotImplementedError

    async def destroy(self, name: str, reason: str = "") -> None:
        raise NotImplementedError

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
            # Where a restore's time goes (logged with it): QEMU started paused,
            # the memory state loaded, the relay's session, the agent's answers.
            phases: dict[str, float] = {}
            started = vm.boot_started

            def restore() -> libvirt.virDomain:
                with libvirt_errors(f"restoring {vm.name} from template {info.key}"):
                    self.conn.define(incoming)
                    dom = self.conn.lookup(vm.name)
                    launch(dom, libvirt.VIR_DOMAIN_START_PAUSED)
                    # The persistent definition boots normally next time.
                    self.conn.define(normal)
                    phases["start_paused_s"] = time.monotonic() - started
                    load_state(dom, memory)
                    dom.resume()
                    phases["load_s"] = time.monotonic() - started
                    return dom

            dom = await asyncio.to_thread(restore)
            vm.transition(VMState.BOOTING)
            await self._start_relay(vm, dom)
            phases["relay_s"] = time.monotonic() - started
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60.0
            while True:
                try:
                    guest = await self._reidentify(vm, max(0.5, deadline - loop.time()))
                    phases["reidentified_s"] = time.monotonic() - started
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
            extra={
                "vm": vm.name,
                "template": info.key,
                "boot_s": round(vm.boot_duration, 3),
                **{k: round(v, 3) for k, v in phases.items()},
            },
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
                await _reclaim_memory(stub, spec.key)
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
