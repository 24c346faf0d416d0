"""SnapshotManager: internal qcow2 snapshots of a VM, with or without its memory.

A snapshot of a running VM includes guest memory (QEMU savevm into the
overlay): restoring it resumes every process where it was. A stopped VM gets
disk-only snapshots. Snapshots live inside the VM's overlay, so destroying
the VM removes them (the domain is undefined with its snapshot metadata).
"""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from agentvm.common.errors import AlreadyExists, InvalidArgument, NotFound
from agentvm.vm_manager.domain_xml import DomainSnapshot
from agentvm.vm_manager.libvirt_conn import libvirt_errors

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# The <qemu:commandline> of a template clone's live definition (domain_xml.Domain.qemu_args).
_INCOMING = re.compile(r"\s*<qemu:commandline>.*?</qemu:commandline>", re.DOTALL)


@dataclass(frozen=True)
class SnapshotInfo:
    """What ListSnapshots reports about one snapshot."""

    name: str
    vm_name: str
    created_at: float
    parent: str
    includes_memory: bool
    size_bytes: int
    description: str


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"snapshot name {name!r}: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _vm_state_sizes(overlay: Path) -> dict[str, int]:
    """Snapshot name -> bytes of saved guest memory + disk table, from qemu-img."""
    proc = subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", str(overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {}
    info = json.loads(proc.stdout)
    return {s["name"]: int(s.get("vm-state-size", 0)) for s in info.get("snapshots", [])}


class SnapshotManager:
    """Create, list, restore and delete snapshots of libvirt domains (blocking calls)."""

    def create(
        self, dom: libvirt.virDomain, name: str, *, include_memory: bool, description: str
    ) -> None:
        check_name(name)
        if len(description) > 1024:
            raise InvalidArgument("description is longer than 1024 characters")
        if self._find(dom, name) is not None:
            raise AlreadyExists(f"VM {dom.name()} already has a snapshot {name!r}")
        xml = DomainSnapshot(name, description, include_memory).to_xml()
        with libvirt_errors(f"snapshot {name} of {dom.name()}"):
            snap = dom.snapshotCreateXML(xml, 0)
            # A VM restored from a memory template was started with
            # "-incoming defer", and the snapshot keeps that live definition:
            # its revert would start QEMU with -incoming and -loadvm, which QEMU
            # refuses. Keep the snapshot's domain without it.
            saved = snap.getXMLDesc(0)
            fixed = _INCOMING.sub("", saved)
            if fixed != saved:
                dom.snapshotCreateXML(
                    fixed,
                    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
                    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
                )

    def list_snapshots(self, dom: libvirt.virDomain, overlay: Path) -> list[SnapshotInfo]:
        sizes = _vm_state_sizes(overlay)
        out = []
        with libvirt_errors(f"snapshots of {dom.name()}"):
            snaps = dom.listAllSnapshots(0)
            for snap in snaps:
                root = ET.fromstring(snap.getXMLDesc(0))  # noqa: S314 - from libvirt
                memory = root.find("memory")
                state = root.findtext("state", "")
                out.append(
                    SnapshotInfo(
                        name=snap.getName(),
                        vm_name=dom.name(),
                        created_at=float(root.findtext("creationTime", "0")),
                        parent=root.findtext("parent/name", ""),
                        includes_memory=(
                            memory is not None and memory.get("snapshot") == "internal"
                        )
                        or state in ("running", "paused"),
                        size_bytes=sizes.get(snap.getName(), 0),
                        description=root.findtext("description", ""),
                    )
                )
        return sorted(out, key=lambda s: s.created_at)

    def _find(self, dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise

    def _get(self, dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot:
        check_name(name)
        snap = self._find(dom, name)
        if snap is None:
            raise NotFound(f"VM {dom.name()} has no snapshot {name!r}: ListSnapshots shows them")
        return snap

    def revert(self, dom: libvirt.virDomain, name: str) -> None:
        snap = self._get(dom, name)
        with libvirt_errors(f"restoring snapshot {name} of {dom.name()}"):
            dom.revertToSnapshot(snap, 0)

    def delete(self, dom: libvirt.virDomain, name: str) -> None:
        snap = self._get(dom, name)
        with libvirt_errors(f"deleting snapshot {name} of {dom.name()}"):
            snap.delete(0)
