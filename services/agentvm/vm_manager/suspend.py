"""Suspend a VM to a file and resume it from there (sandbox pause, docs/SANDBOXES.md 4).

The same path as memory templates (clones.py): QEMU's migration stream
written to a file next to the VM's overlay, then QEMU exits; resume starts
the domain paused with ``-incoming defer`` and loads the file. Nothing is
copied but the guest's RAM, and loading maps it back as a template restore
does, which an internal qcow2 snapshot does not.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from agentvm.vm_manager.clones import load_state, save_state
from agentvm.vm_manager.domain_xml import QEMU_NS
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, launch

STATE_FILE = "suspended.state"
# What a failed suspend or resume tells the caller to do.
SAVE_FAILED = "the sandbox runs on as it was: try the pause again, or kill it"
LOAD_FAILED = (
    "its saved state stays on disk: try the resume again, or kill the sandbox to discard it"
)


def with_incoming(xml: str) -> str:
    """The domain definition ``xml`` with ``-incoming defer`` among QEMU's arguments."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own XML of our domain)
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    args = [a.get("value") for a in cmd.findall(f"{{{QEMU_NS}}}arg")]
    if "-incoming" not in args:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value="-incoming")
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value="defer")
    return ET.tostring(root, encoding="unicode")


def without_incoming(xml: str) -> str:
    """``xml`` with any ``-incoming X`` pair removed from QEMU's arguments."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)  # noqa: S314 (libvirt's own XML of our domain)
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        return xml
    args = cmd.findall(f"{{{QEMU_NS}}}arg")
    for i, arg in enumerate(args):
        if arg.get("value") == "-incoming":
            cmd.remove(arg)
            if i + 1 < len(args):
                cmd.remove(args[i + 1])
            break
    if not list(cmd):
        root.remove(cmd)
    return ET.tostring(root, encoding="unicode")


def suspend(dom: libvirt.virDomain, path: Path) -> None:
    """Write the running ``dom``'s state to ``path`` and stop its QEMU (the definition stays)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        save_state(dom, path, SAVE_FAILED)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(libvirt.libvirtError):  # libvirtd gone: the caller looks
            if dom.isActive() and dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()  # the save failed: the VM runs on as it was
        raise
    dom.destroy()


def resume(conn: LibvirtConnection, name: str, path: Path) -> libvirt.virDomain:
    """Start domain ``name`` from ``path`` (written by :func:`suspend`); the file is
    then removed."""
    dom = conn.lookup(name)
    normal = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    normal = without_incoming(normal)
    conn.define(with_incoming(normal))
    try:
        dom = conn.lookup(name)
        launch(dom, libvirt.VIR_DOMAIN_START_PAUSED)
    finally:
        # The persistent definition boots normally next time.
        conn.define(normal)
    try:
        load_state(dom, path, "its saved state", LOAD_FAILED)
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        raise
    dom.resume()
    path.unlink()
    return dom
