"""Domain definition: a VM's libvirt domain XML (from templates.py's object model and
domain_xml.py), its <metadata> record, its overlay, and defining it.

A mixin of VMManager (manager.py), which provides what is declared at the top of
``DomainDefinition``.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
from collections.abc import Mapping
from pathlib import Path

import libvirt

from agentvm.common.config import Settings
from agentvm.common.errors import Aborted, FailedPrecondition, InvalidArgument
from agentvm.common.events import EventSink
from agentvm.common.profiles import NetworkMode
from agentvm.v1 import common_pb2
from agentvm.vm_manager import access, image_vms, workspace
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.clones import TemplateStore
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, libvirt_errors
from agentvm.vm_manager.network import NatNetwork
from agentvm.vm_manager.templates import ImageFiles, VMTemplate
from agentvm.vm_manager.vm import VM

# SetVMRecord's limit: a record is a sandbox's state, not its data.
MAX_RECORD = 64 * 1024


class DomainDefinition:
    """Build, define and record VMs' libvirt domains."""

    settings: Settings
    conn: LibvirtConnection
    net: NatNetwork
    templates: TemplateStore
    image_store: NamedImageStore
    memory_limit: bool
    io_weight: bool
    virtiofsd: str | None
    events: EventSink

    def _lock(self, name: str) -> asyncio.Lock:
        raise NotImplementedError

    def _get(self, name: str) -> VM:
        raise NotImplementedError

    @staticmethod
    def _check_labels(labels: dict[str, str]) -> None:
        raise NotImplementedError

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
                **record_fields(vm),
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

    def _store_metadata(
        self, vm: VM, dom: libvirt.virDomain, what: str = "the network policy"
    ) -> None:
        meta = self._metadata(vm).to_api_xml()
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with libvirt_errors(f"recording {what} of {vm.name}"):
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                meta,
                "agentvm",
                dx.METADATA_NS,
                flags,
            )

    async def lease_pool_vm(
        self, name: str, lessee: str, lease_id: str, extra: Mapping[str, str] | None = None
    ) -> VM:
        """Record that pool-manager handed pool VM ``name`` to ``lessee`` with the
        lessee's ``extra`` labels (access.check_lease vetted them)."""
        async with self._lock(name):
            vm = self._get(name)
            if vm.labels.get(access.LESSEE_LABEL) == lessee:
                return vm
            labels = {
                **vm.labels,
                **(extra or {}),
                access.LESSEE_LABEL: lessee,
                access.LEASE_LABEL: lease_id,
            }
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

    async def set_record(self, name: str, record: bytes, expected_generation: int) -> VM:
        """SetVMRecord: replace the VM's record if its generation is still the expected one."""
        if len(record) > MAX_RECORD:
            raise InvalidArgument(
                f"a VM record is at most {MAX_RECORD} bytes, not {len(record)}: keep large "
                "state elsewhere and only its reference in the record"
            )
        async with self._lock(name):
            vm = self._get(name)
            if vm.record_generation != expected_generation:
                raise Aborted(
                    f"VM {name}'s record is at generation {vm.record_generation}, not "
                    f"{expected_generation}: another write came first; read it again (GetVM) "
                    "and retry"
                )
            dom = await asyncio.to_thread(self.conn.lookup, name)
            old = vm.record, vm.record_generation
            vm.record, vm.record_generation = record, expected_generation + 1
            try:
                await asyncio.to_thread(self._store_metadata, vm, dom, "the record")
            except BaseException:
                vm.record, vm.record_generation = old
                raise
        return vm


def record_fields(vm: VM) -> dict[str, str]:
    """The record's metadata fields (none for a VM whose record was never written)."""
    if not vm.record_generation:
        return {}
    return {
        "record": base64.b64encode(vm.record).decode(),
        "record_generation": str(vm.record_generation),
    }


def parse_record(fields: Mapping[str, str]) -> tuple[bytes, int]:
    """The record and its generation from a domain's metadata (ValueError if malformed)."""
    generation = int(fields.get("record_generation", "0"))
    if generation < 0:
        raise ValueError(f"record_generation {generation}")
    record = base64.b64decode(fields.get("record", ""), validate=True)
    if len(record) > MAX_RECORD:
        raise ValueError(f"record of {len(record)} bytes")
    return record, generation
