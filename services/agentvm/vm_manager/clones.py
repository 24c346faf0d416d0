"""Memory templates: boot once, save, and restore new VMs from the saved state.

A template is a VM booted to agent-ready and then saved with QEMU's migration
stream into a file (``memory.state``); its overlay at that instant becomes the
frozen ``disk.qcow2``. A clone gets a fresh qcow2 overlay on that frozen disk
and a domain with the same device layout, started paused with
``-incoming defer``; the saved state is then loaded from a file descriptor
(QMP ``getfd`` + ``migrate-incoming fd:``) and the VM resumed. libvirt's own
save/restore cannot do this: it insists the restored domain keeps the saved
UUID, so two clones could never run side by side.

Layout (``<state dir>/templates/<key>/``, written to a temporary directory and
renamed into place, so a half-built template never exists)::

    template.json   the record (key, image, profile, resources, QEMU version)
    memory.state    QEMU migration stream (guest RAM + device state)
    disk.qcow2      the template's overlay when it was saved, read-only
    image.qcow2     templates of a named image only: the overlay of its root
                    (``vdb``) when it was saved, read-only, on the image's root.qcow2

The key names everything that must match for a restore to work (image,
resources, accelerator); the record also holds the QEMU version, and a
template saved by another QEMU is rebuilt rather than trusted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from agentvm.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.templates import Resources

log = logging.getLogger("agentvm.vm_manager.clones")

RECORD = "template.json"
MEMORY = "memory.state"
DISK = "disk.qcow2"
# A named image's template: the frozen layer of its vdb (image_vms.py).
IMAGE_DISK = "image.qcow2"
# QEMU's default migration bandwidth cap (128 MiB/s) would make a save of a
# file on local disk take seconds; the stream is local, so lift it.
SAVE_BANDWIDTH = 16 << 30
MIGRATION_TIMEOUT_S = 120.0
# What a failed save or load of a template's memory tells the caller to do.
REBUILD_TEMPLATE = "delete the template (DeleteTemplate) so it is rebuilt"
# How QEMU's error says a file system is full (strerror(ENOSPC)).
NO_SPACE = os.strerror(errno.ENOSPC)
QMP_FD_NAME = "agentvm-state"


# What TemplateSpec.key makes: image id, profile, sizes, accelerator, network and
# the named image's id (a file name).
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class TemplateSpec:
    """What a template is for: a restore only works onto the same of all of these."""

    image_id: str
    profile: ResourceProfile
    resources: Resources
    accel: Accel
    # ISOLATED templates have no NIC; NAT_FILTERED ones have one (the device
    # layout must match between the template and its clones).
    network: NetworkMode = NetworkMode.ISOLATED
    # Named image (its 64-hex id) the workload runs in; "" for the built-in image.
    # Such a template also holds the frozen layer of the image's disk (vdb).
    workload_image_id: str = ""

    @property
    def key(self) -> str:
        """``<image>-<profile>-<v>c-<m>m-<d>d-<accel>[-nat][-image-<named image id>]``:
        built-in templates keep the keys they always had."""
        r = self.resources
        net = "-nat" if self.network is NetworkMode.NAT_FILTERED else ""
        named = f"-image-{self.workload_image_id}" if self.workload_image_id else ""
        return (
            f"{self.image_id}-{self.profile.name.lower()}-{r.vcpus}c-{r.memory_mib}m-"
            f"{r.disk_mib}d-{self.accel.value}{net}{named}"
        )


@dataclass(frozen=True)
class TemplateInfo:
    """One saved template on disk."""

    key: str
    image_id: str
    profile: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    accel: str
    created_at: float
    build_s: float
    qemu_version: str
    memory_state_bytes: int
    disk_bytes: int
    # Name of the VM that was saved: its kernel command line is reused by clones.
    boot_name: str
    network_mode: str = NetworkMode.ISOLATED.name
    # Named image the template's workload runs in (docs/IMAGES.md); empty for the
    # built-in image and in records written before named images existed.
    workload_image_id: str = ""

    @property
    def resources(self) -> Resources:
        return Resources(self.vcpus, self.memory_mib, self.disk_mib)


class TemplateStore:
    """The templates directory: lookup, listing, atomic publish and removal."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        if not KEY_RE.fullmatch(key):
            raise InvalidArgument(
                f"template key {key!r} is malformed: ListTemplates shows the keys"
            )
        return self.root / key

    def disk(self, key: str) -> Path:
        return self._dir(key) / DISK

    def memory(self, key: str) -> Path:
        return self._dir(key) / MEMORY

    def image_disk(self, key: str) -> Path:
        """The frozen vdb layer of a named image's template (clones overlay it)."""
        return self._dir(key) / IMAGE_DISK

    def load(self, key: str) -> TemplateInfo | None:
        """The record of ``key`` when it is complete on disk, else None."""
        d = self._dir(key)
        try:
            data: dict[str, Any] = json.loads((d / RECORD).read_text())
            info = TemplateInfo(**data)
        except (OSError, ValueError, TypeError) as exc:
            if d.exists():
                log.warning("template %s is unreadable (%s); it will be rebuilt", key, exc)
            return None
        if info.key != key or not (d / MEMORY).is_file() or not (d / DISK).is_file():
            return None
        if info.workload_image_id and not (d / IMAGE_DISK).is_file():
            return None
        return info

    def current(self, spec: TemplateSpec, qemu_version: str) -> TemplateInfo | None:
        """The template for ``spec`` if it was saved by this QEMU."""
        info = self.load(spec.key)
        if info is None:
            return None
        if info.qemu_version != qemu_version:
            log.info(
                "template %s was saved by QEMU %s, this is %s: rebuilding",
                spec.key,
                info.qemu_version,
                qemu_version,
            )
            return None
        return info

    def all(self) -> list[TemplateInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith("."):
                continue
            info = self.load(d.name)
            if info is not None:
                out.append(info)
        return out

    def staging(self, key: str) -> Path:
        """A fresh directory to build ``key`` in (removed first if left over)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        tmp = self.root / f".build-{self._dir(key).name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        tmp.chmod(0o755)
        return tmp

    def publish(self, staging: Path, info: TemplateInfo) -> None:
        """Write the record and move the staged template into place atomically."""
        (staging / RECORD).write_text(json.dumps(asdict(info), indent=2, sort_keys=True))
        final = self._dir(info.key)
        old = self.root / f".old-{info.key}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def clean_staging(self) -> None:
        """Remove half-built templates (call only when no build runs)."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)

    def delete(self, key: str) -> bool:
        d = self._dir(key)
        if not d.exists():
            return False
        shutil.rmtree(d, ignore_errors=True)
        return True

    def prune(self, keep_image_id: str, in_use: set[str]) -> list[str]:
        """Remove templates of other images (unless VMs still use them as their
        disk base) and leftover build directories."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for d in self.root.iterdir():
            if d.name.startswith(".") or d.name in in_use:
                continue
            info = self.load(d.name)
            if info is None or info.image_id != keep_image_id:
                continue
            if info is None or info.image_id != keep_image_id:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed


def freeze_layers(staging: Path, overlay: Path, image_disk: Path | None) -> Path:
    """Move a saved template VM's overlays into ``staging`` as its read-only layers:
    ``overlay`` becomes disk.qcow2 and a named image's ``image_disk`` (vdb) becomes
    image.qcow2. Clones only ever get overlays of their own on top. Returns disk.qcow2."""
    disk = staging / DISK
    os.replace(overlay, disk)
    disk.chmod(0o644)
    if image_disk is not None:
        frozen = staging / IMAGE_DISK
        os.replace(image_disk, frozen)
        frozen.chmod(0o644)
    (staging / MEMORY).chmod(0o600)
    return disk


# -- QEMU migration stream to and from a file --------------------------------
def qmp(dom: libvirt.virDomain, command: str, **arguments: Any) -> Any:
    """One QMP command through libvirt; a QMP error becomes FailedPrecondition."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))
    if "error" in reply:
        err = reply["error"]
        raise FailedPrecondition(f"QEMU refused {command}: {err.get('desc', err)}")
    return reply.get("return")


def _pass_fd(dom: libvirt.virDomain, fd: int) -> None:
    msg = json.dumps({"execute": "getfd", "arguments": {"fdname": QMP_FD_NAME}})
    reply, _files = libvirt_qemu.qemuMonitorCommandWithFiles(dom, msg, [fd], 0)
    parsed = json.loads(reply)
    if "error" in parsed:
        raise FailedPrecondition(f"QEMU refused the state file: {parsed['error']}")


def _wait_migration(
    dom: libvirt.virDomain, what: str, timeout: float, remedy: str, path: Path
) -> dict[str, Any]:
    """Wait for QEMU's migration to or from ``path`` to end; ``remedy`` says what to do
    when it failed. A full file system is RESOURCE_EXHAUSTED (free space, then try
    again)."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = qmp(dom, "query-migrate")
        state = status.get("status")
        if state == "completed":
            return status
        if state in ("failed", "cancelled"):
            desc = str(status.get("error-desc", state))
            if NO_SPACE in desc:
                raise ResourceExhausted(
                    f"{what} failed: {desc}: the file system of {path.parent} is full; "
                    "free space there (or close sandboxes), then try again"
                )
            raise FailedPrecondition(f"{what} failed: {desc}; {remedy}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what} did not finish within {timeout:.0f} s")
        time.sleep(0.01)


def save_state(
    dom: libvirt.virDomain,
    path: Path,
    remedy: str = REBUILD_TEMPLATE,
    timeout: float = MIGRATION_TIMEOUT_S,
) -> None:
    """Pause ``dom`` and write its memory and device state to ``path`` (QEMU stream);
    ``remedy`` is what a failure's message tells the caller to do."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()
        qmp(dom, "migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
        _pass_fd(dom, fd)
    finally:
        os.close(fd)
    qmp(dom, "migrate", uri=f"fd:{QMP_FD_NAME}")
    _wait_migration(dom, f"saving the memory of {dom.name()}", timeout, remedy, path)


def load_state(
    dom: libvirt.virDomain,
    path: Path,
    source: str = "its template",
    remedy: str = REBUILD_TEMPLATE,
    timeout: float = MIGRATION_TIMEOUT_S,
) -> None:
    """Load ``path`` (``source``, named in errors) into ``dom``, which was started paused
    with ``-incoming defer``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _pass_fd(dom, fd)
    finally:
        os.close(fd)
    qmp(dom, "migrate-incoming", uri=f"fd:{QMP_FD_NAME}")
    _wait_migration(dom, f"restoring {dom.name()} from {source}", timeout, remedy, path)
