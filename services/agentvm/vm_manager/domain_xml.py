"""libvirt domain XML as an object model (one small class per element).

Never XML from string formatting: every element is built with ElementTree
from typed attributes, in a fixed order, so output is deterministic and
golden-file testable. ``Domain.to_xml()`` is the only way XML is produced.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Protocol

METADATA_NS = "https://agent-vm.dev/xmlns/libvirt/domain/1.0"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


class Element(Protocol):
    """Anything that renders itself as one XML element."""

    def to_element(self) -> ET.Element: ...


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


@dataclass(frozen=True)
class OSBoot:
    """<os>: direct kernel boot (no bootloader)."""

    kernel: str
    initrd: str
    cmdline: str
    machine: str = "q35"
    arch: str = "x86_64"

    def to_element(self) -> ET.Element:
        el = ET.Element("os")
        _sub(el, "type", "hvm", arch=self.arch, machine=self.machine)
        _sub(el, "kernel", self.kernel)
        _sub(el, "initrd", self.initrd)
        _sub(el, "cmdline", self.cmdline)
        return el


@dataclass(frozen=True)
class CPUTune:
    """<cputune>: CFS bandwidth limit (quota per period, in microseconds)."""

    period_us: int
    quota_us: int

    def to_element(self) -> ET.Element:
        el = ET.Element("cputune")
        _sub(el, "period", str(self.period_us))
        _sub(el, "quota", str(self.quota_us))
        return el


@dataclass(frozen=True)
class MemTune:
    """<memtune>: memory hard limit in KiB (guest RAM + QEMU overhead)."""

    hard_limit_kib: int

    def to_element(self) -> ET.Element:
        el = ET.Element("memtune")
        _sub(el, "hard_limit", str(self.hard_limit_kib), unit="KiB")
        return el


@dataclass(frozen=True)
class BlkioTune:
    """<blkiotune>: relative block I/O weight (100-1000)."""

    weight: int

    def to_element(self) -> ET.Element:
        el = ET.Element("blkiotune")
        _sub(el, "weight", str(self.weight))
        return el


@dataclass(frozen=True)
class Disk:
    """<disk>: a qcow2 file on virtio-blk."""

    source: str
    target: str = "vda"
    driver_type: str = "qcow2"
    cache: str = "none"
    discard: str = "unmap"
    # virtio-blk serial the guest finds the disk by (/sys/block/vdX/serial).
    serial: str | None = None

    def to_element(self) -> ET.Element:
        el = ET.Element("disk", type="file", device="disk")
        _sub(
            el, "driver", name="qemu", type=self.driver_type, cache=self.cache, discard=self.discard
        )
        _sub(el, "source", file=self.source)
        _sub(el, "target", dev=self.target, bus="virtio")
        if self.serial is not None:
            _sub(el, "serial", self.serial)
        return el


@dataclass(frozen=True)
class SerialConsole:
    """<serial>: the guest console (ttyS0) logged to a host file by virtlogd."""

    log_file: str

    def to_element(self) -> ET.Element:
        el = ET.Element("serial", type="pty")
        _sub(el, "log", file=self.log_file, append="off")
        _sub(el, "target", port="0")
        return el


@dataclass(frozen=True)
class VirtioSerialChannel:
    """<channel type='unix'>: a virtio-serial port exposed as a host Unix socket.

    With no path, libvirt chooses one under its channel directory and reports
    it in the live XML (with ``state='connected'`` once the guest opened it).
    """

    name: str
    path: str | None = None

    def to_element(self) -> ET.Element:
        el = ET.Element("channel", type="unix")
        if self.path:
            _sub(el, "source", mode="bind", path=self.path)
        else:
            _sub(el, "source", mode="bind")
        _sub(el, "target", type="virtio", name=self.name)
        return el


@dataclass(frozen=True)
class Vsock:
    """<vsock>: virtio-vsock with an automatically assigned guest CID (KVM hosts)."""

    def to_element(self) -> ET.Element:
        el = ET.Element("vsock", model="virtio")
        _sub(el, "cid", auto="yes")
        return el


@dataclass(frozen=True)
class RNG:
    """<rng>: virtio-rng fed from the host's /dev/urandom, rate limited."""

    bytes_per_period: int = 1024 * 1024
    period_ms: int = 1000

    def to_element(self) -> ET.Element:
        el = ET.Element("rng", model="virtio")
        _sub(el, "rate", bytes=str(self.bytes_per_period), period=str(self.period_ms))
        _sub(el, "backend", "/dev/urandom", model="random")
        return el


@dataclass(frozen=True)
class Controller:
    """<controller>: e.g. USB model 'none' (no USB), virtio-serial."""

    type: str
    model: str | None = None

    def to_element(self) -> ET.Element:
        attrs = {"type": self.type}
        if self.model is not None:
            attrs["model"] = self.model
        return ET.Element("controller", attrs)


@dataclass(frozen=True)
class NetworkInterface:
    """<interface>: a virtio NIC on a libvirt network or host bridge."""

    kind: str  # "network" or "bridge"
    source: str
    mac: str
    filterref: str | None = None
    # Host tap name (<= 15 characters); libvirt picks "vnetN" when None.
    target: str | None = None

    def to_element(self) -> ET.Element:
        el = ET.Element("interface", type=self.kind)
        _sub(el, "mac", address=self.mac)
        if self.kind == "network":
            _sub(el, "source", network=self.source)
        else:
            _sub(el, "source", bridge=self.source)
        if self.target is not None:
            _sub(el, "target", dev=self.target)
        _sub(el, "model", type="virtio")
        if self.filterref:
            ref = _sub(el, "filterref", filter=self.filterref)
            # Learn the guest's address only from a DHCP lease, never from
            # whatever source address it sends first.
            _sub(ref, "parameter", name="CTRL_IP_LEARNING", value="dhcp")
        return el


@dataclass(frozen=True)
class MemoryBacking:
    """<memoryBacking>: shared memfd memory (needed by vhost-user devices such as virtiofs)."""

    def to_element(self) -> ET.Element:
        el = ET.Element("memoryBacking")
        _sub(el, "source", type="memfd")
        _sub(el, "access", mode="shared")
        return el


@dataclass(frozen=True)
class VirtioFS:
    """<filesystem>: a host directory shared with virtiofs under a mount tag."""

    source_dir: str
    tag: str
    binary: str | None = None

    def to_element(self) -> ET.Element:
        el = ET.Element("filesystem", type="mount", accessmode="passthrough")
        _sub(el, "driver", type="virtiofs")
        # cache=none: the host and the guest both change the workspace, and each
        # must see the other's changes at once (a file written through the API
        # is read by the next command).
        binary = _sub(el, "binary", path=self.binary) if self.binary else _sub(el, "binary")
        _sub(binary, "cache", mode="none")
        _sub(el, "source", dir=self.source_dir)
        _sub(el, "target", dir=self.tag)
        return el


@dataclass(frozen=True)
class MemBalloon:
    """<memballoon>: 'none' (no balloon) or 'virtio'.

    With ``free_page_reporting`` the guest kernel reports pages it has freed
    (in 2 MiB blocks, a few seconds after) and QEMU discards them: an idle VM
    gives back what its programs used, and a saved memory template stores
    those pages as zero pages, which a restore does not make resident. The
    host never inflates the balloon: only the guest gives memory back.
    """

    model: str = "none"
    free_page_reporting: bool = False

    def to_element(self) -> ET.Element:
        el = ET.Element("memballoon", model=self.model)
        if self.free_page_reporting:
            el.set("freePageReporting", "on")
        return el


@dataclass(frozen=True)
class Metadata:
    """<metadata>: agent-vm's own record in the domain (survives service restarts)."""

    fields: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)

    def to_element(self) -> ET.Element:
        el = ET.Element("metadata")
        root = ET.SubElement(el, f"{{{METADATA_NS}}}vm")
        for key in sorted(self.fields):
            ET.SubElement(root, f"{{{METADATA_NS}}}{key}").text = self.fields[key]
        for key in sorted(self.labels):
            lab = ET.SubElement(root, f"{{{METADATA_NS}}}label", {"key": key})
            lab.text = self.labels[key]
        return el

    def to_api_xml(self) -> str:
        """The record for virDomainSetMetadata: without a namespace (libvirt adds it)."""
        root = ET.Element("vm")
        for key in sorted(self.fields):
            ET.SubElement(root, key).text = self.fields[key]
        for key in sorted(self.labels):
            ET.SubElement(root, "label", {"key": key}).text = self.labels[key]
        return ET.tostring(root, encoding="unicode")

    @staticmethod
    def parse(domain_xml: str) -> Metadata | None:
        """Read agent-vm's metadata back from a domain's XML (None if absent)."""
        root = ET.fromstring(domain_xml)
        vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
        if vm is None:
            return None
        fields: dict[str, str] = {}
        labels: dict[str, str] = {}
        for child in vm:
            tag = child.tag.split("}", 1)[-1]
            if tag == "label":
                labels[child.get("key", "")] = child.text or ""
            else:
                fields[tag] = child.text or ""
        return Metadata(fields, labels)


@dataclass(frozen=True)
class Domain:
    """<domain>: the whole definition, rendered in a fixed element order."""

    name: str
    uuid: str
    domain_type: str  # "kvm" or "qemu"
    memory_mib: int
    vcpus: int
    os: OSBoot
    devices: tuple[Element, ...]
    metadata: Metadata | None = None
    cputune: CPUTune | None = None
    memtune: MemTune | None = None
    blkiotune: BlkioTune | None = None
    memory_backing: MemoryBacking | None = None
    emulator: str | None = None
    # Extra QEMU arguments (<qemu:commandline>); only "-incoming defer" for
    # VMs restored from a memory template (libvirt taints such domains).
    qemu_args: tuple[str, ...] = ()

    def to_element(self) -> ET.Element:
        el = ET.Element("domain", type=self.domain_type)
        _sub(el, "name", self.name)
        _sub(el, "uuid", self.uuid)
        if self.metadata is not None:
            el.append(self.metadata.to_element())
        _sub(el, "memory", str(self.memory_mib), unit="MiB")
        _sub(el, "currentMemory", str(self.memory_mib), unit="MiB")
        _sub(el, "vcpu", str(self.vcpus), placement="static")
        for part in (self.memory_backing, self.cputune, self.memtune, self.blkiotune):
            if part is not None:
                el.append(part.to_element())
        el.append(self.os.to_element())
        features = _sub(el, "features")
        _sub(features, "acpi")
        if self.domain_type == "kvm":
            _sub(el, "cpu", mode="host-passthrough", check="none", migratable="off")
        _sub(el, "clock", offset="utc")
        _sub(el, "on_poweroff", "destroy")
        _sub(el, "on_reboot", "destroy")
        _sub(el, "on_crash", "destroy")
        devices = _sub(el, "devices")
        if self.emulator:
            _sub(devices, "emulator", self.emulator)
        for dev in self.devices:
            devices.append(dev.to_element())
        if self.qemu_args:
            cmd = ET.SubElement(el, f"{{{QEMU_NS}}}commandline")
            for arg in self.qemu_args:
                ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
        return el

    def to_xml(self) -> str:
        ET.register_namespace("agentvm", METADATA_NS)
        ET.register_namespace("qemu", QEMU_NS)
        el = self.to_element()
        ET.indent(el, space="  ")
        return ET.tostring(el, encoding="unicode") + "\n"


@dataclass(frozen=True)
class DomainSnapshot:
    """<domainsnapshot>: an internal (qcow2) snapshot, with or without guest memory."""

    name: str
    description: str
    include_memory: bool

    def to_element(self) -> ET.Element:
        el = ET.Element("domainsnapshot")
        _sub(el, "name", self.name)
        _sub(el, "description", self.description)
        _sub(el, "memory", snapshot="internal" if self.include_memory else "no")
        return el

    def to_xml(self) -> str:
        el = self.to_element()
        ET.indent(el, space="  ")
        return ET.tostring(el, encoding="unicode") + "\n"


def channel_state(live_xml: str, name: str) -> tuple[str | None, str | None]:
    """(host socket path, state) of the virtio-serial channel ``name`` in live XML."""
    root = ET.fromstring(live_xml)
    for ch in root.findall("devices/channel"):
        target = ch.find("target")
        if target is not None and target.get("name") == name:
            source = ch.find("source")
            return (source.get("path") if source is not None else None, target.get("state"))
    return (None, None)


def vsock_cid(live_xml: str) -> int | None:
    """Guest CID of the vsock device in live XML, if any."""
    root = ET.fromstring(live_xml)
    cid = root.find("devices/vsock/cid")
    if cid is None or cid.get("address") is None:
        return None
    return int(cid.get("address", "0"))
