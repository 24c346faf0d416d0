"""Recovery: a (re)started vm-manager takes up the VMs its previous run made.

libvirt's domains, with agent-vm's record in each domain's <metadata>, and the
VM directories are the only state; ``recover`` rebuilds the registry from them,
reconnects to running VMs' agents and reclaims what no domain owns.

A mixin of VMManager (manager.py), which provides what is declared at the top of
``Recovery``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import libvirt

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError, FailedPrecondition
from agentvm.common.events import EventSink
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2
from agentvm.vm_manager import access, workspace
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.accel import AccelInfo
from agentvm.vm_manager.clones import TemplateStore
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager_domain import parse_record
from agentvm.vm_manager.manager_templates import TEMPLATE_ROLE
from agentvm.vm_manager.network import NatNetwork, Policy
from agentvm.vm_manager.node import NodeState
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState

log = logging.getLogger("agentvm.vm_manager")


class Recovery:
    """Adopt the domains a previous run made; reclaim what none of them owns."""

    settings: Settings
    events: EventSink
    conn: LibvirtConnection
    accel: AccelInfo
    templates: TemplateStore
    image_store: NamedImageStore
    net: NatNetwork
    node: NodeState
    recovered: bool
    _vms: dict[str, VM]

    def _paths(self, name: str) -> tuple[Path, Path]:
        raise NotImplementedError

    async def _start_relay(self, vm: VM, dom: libvirt.virDomain) -> None:
        raise NotImplementedError

    async def destroy(self, name: str, reason: str = "") -> None:
        raise NotImplementedError

    @staticmethod
    def _vm_id(vm: VM) -> str:
        raise NotImplementedError

    def _net_proto(self, name: str) -> common_pb2.NetworkAttachment | None:
        raise NotImplementedError

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
        self.recovered = True

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
            node_id=self.node.config.id,
        )
        try:
            vm.record, vm.record_generation = parse_record(f)
        except ValueError as exc:
            raise FailedPrecondition(f"its record is unreadable ({exc})") from exc
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
