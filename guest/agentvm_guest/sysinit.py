"""The guest's one-time system setup at boot, done by the agent before it serves.

Mounts (/proc, /sys, /dev, devpts, /dev/shm, /run, /tmp, cgroup2 with
nsdelegate), the root file system grown to the VM's disk, loopback up, the
hostname from the kernel command line, a fresh machine id, the workspace
(virtiofs when the VM has the device). It was a shell script (busybox
init's sysinit), but under TCG every exec costs about 45 ms in the guest and
the script ran some twenty of them: about 1 s of every cold boot. Here the
same steps are system calls of a process that starts anyway; only
``modprobe virtiofs`` (a VM with a shared workspace) and, should the kernel
refuse the online resize, ``resize2fs`` are still programs.

It runs once per boot: a respawned agent finds it done (``DONE``). Each step
also checks first, so a setup cut short can be run again. A step that fails
is logged to the console and the rest still run, as the script did: the
agent then reports what it cannot do.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from agentvm_guest import libc, netif
from agentvm_guest.libc import MS_NODEV, MS_NOSUID

log = logging.getLogger("agentvm_guest")

# _IOW('f', 16, __u64): grow a mounted ext4 file system to this many blocks
# (what resize2fs calls for an online resize).
EXT4_IOC_RESIZE_FS = 0x40086610
VIRTIO_ID_FS = "0x001a"
ROOT_SECTORS = Path("/etc/agentvm/root-sectors")
WORKSPACE = Path("/workspace")
CGROUP = Path("/sys/fs/cgroup")
# Written at the end of the setup, on /run's tmpfs: present only after a
# boot's setup (or in a clone of a template, whose memory holds it).
DONE = Path("/run/agentvm-setup.done")
# (source, target, type, flags, data), in order: each needs the one before.
MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", 0, ""),
    ("sysfs", "/sys", "sysfs", 0, ""),
    ("devtmpfs", "/dev", "devtmpfs", 0, ""),
    ("devpts", "/dev/pts", "devpts", 0, "gid=5,mode=620"),
    ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)


class SetupError(OSError):
    """One step of the setup failed (logged; the others still run)."""


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    rc = libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() if data else None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def _ensure_mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if not os.path.ismount(target):
        _mount(source, target, fstype, flags, data)


def grow_root(disk_sectors: int, root: str = "/") -> int:
    """Grow the ext4 file system mounted at ``root`` to ``disk_sectors`` (512-byte
    sectors); the number of blocks it spans now."""
    block = os.statvfs(root).f_frsize
    blocks = disk_sectors * 512 // block
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", blocks))
    finally:
        os.close(fd)
    return blocks


def _grow_root() -> None:
    """The image's root file system is 2 GiB; the VM's disk is as large as its
    profile says. ROOT_SECTORS holds the size the file system spans (the image
    build writes it): equal to the disk, nothing to do."""
    disk = int(Path("/sys/block/vda/size").read_text().strip())
    try:
        spans = int(ROOT_SECTORS.read_text().strip())
    except (OSError, ValueError):
        spans = -1
    if disk == spans:
        return
    how = "online resize"
    try:
        grow_root(disk)
    except OSError as exc:
        how = f"resize2fs, the kernel refused the online resize: {exc}"
        proc = subprocess.run(
            ["resize2fs", "/dev/vda"], check=False, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SetupError(
                f"cannot grow the root file system to the disk ({exc}; resize2fs: "
                f"{(proc.stdout + proc.stderr).strip()})"
            ) from exc
    ROOT_SECTORS.write_text(f"{disk}\n")
    log.info("root file system grown to %d MiB (%s)", disk // 2048, how)


def _cgroup() -> None:
    """cgroup2 with nsdelegate: an execution in its own cgroup namespace cannot leave
    its cgroup or raise its limits (confine.py). Each Execute gets a child of
    agentvm with the controllers whose figures its ExitStatus reports.

    ``favordynmods`` (Linux 6.0+): every Execute moves a process into a new
    cgroup, and without it each move waits for an RCU grace period (10 ms
    of the 26 ms a start took under TCG); forks and exits pay a little
    instead. Kept off where the kernel does not know it."""
    _ensure_mount("cgroup2", str(CGROUP), "cgroup2", 0, "nsdelegate")
    try:
        _mount("cgroup2", str(CGROUP), "cgroup2", libc.MS_REMOUNT, "nsdelegate,favordynmods")
    except SetupError as exc:
        log.info("cgroup2 without favordynmods (%s)", exc)
    (CGROUP / "agentvm").mkdir(exist_ok=True)
    for ctl in ("cpu", "memory", "pids"):
        for d in (CGROUP, CGROUP / "agentvm"):
            with contextlib.suppress(OSError):
                (d / "cgroup.subtree_control").write_text(f"+{ctl}")


def boot_name(cmdline: str) -> str | None:
    """The VM's name from ``agentvm.name=`` on the kernel command line."""
    for word in cmdline.split():
        if word.startswith("agentvm.name="):
            return word.partition("=")[2] or None
    return None


def _identity() -> None:
    name = boot_name(Path("/proc/cmdline").read_text())
    if name:
        socket.sethostname(name)
        Path("/etc/hostname").write_text(name + "\n")
    # A new machine id per boot (clones get theirs from Reidentify).
    Path("/etc/machine-id").write_text(uuid.uuid4().hex + "\n")


def has_virtiofs(devices: Path = Path("/sys/bus/virtio/devices")) -> bool:
    for dev in devices.glob("*/device"):
        with contextlib.suppress(OSError):
            if dev.read_text().strip() == VIRTIO_ID_FS:
                return True
    return False


def _workspace() -> None:
    """A virtiofs share when the VM has one, else a plain directory the file API fills."""
    WORKSPACE.mkdir(exist_ok=True)
    if has_virtiofs() and not os.path.ismount(WORKSPACE):
        modprobe = subprocess.run(["modprobe", "virtiofs"], check=False, capture_output=True)
        if modprobe.returncode != 0:
            raise SetupError("virtiofs mount failed: modprobe virtiofs failed")
        _mount("workspace", str(WORKSPACE), "virtiofs")
    for sub in ("input", "output", "work"):
        (WORKSPACE / sub).mkdir(exist_ok=True)


def _dev_fd() -> None:
    if not os.path.lexists("/dev/fd"):
        os.symlink("/proc/self/fd", "/dev/fd")


def run(done: Path = DONE) -> list[str]:
    """Set the system up once per boot; what failed (each also logged to the console).

    An agent that init respawns (it crashed, or agent code killed it) finds
    ``done`` and leaves the system as it is: the hostname and machine id above
    all, which a clone got from Reidentify and a new setup would overwrite.
    """
    if done.exists():
        return []
    failed: list[str] = []
    mounts = [(f"mount {m[1]}", functools.partial(_ensure_mount, *m)) for m in MOUNTS]
    steps: list[tuple[str, Callable[[], None]]] = [
        *mounts[:3],  # /proc, /sys, /dev: what the rest reads
        ("grow the root file system", _grow_root),
        *mounts[3:],
        ("cgroup2", _cgroup),
        ("/dev/fd", _dev_fd),
        ("hostname and machine id", _identity),
        ("loopback", lambda: netif.set_up("lo")),
        ("workspace", _workspace),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as exc:
            log.warning("setup: %s: %s", what, exc)
            failed.append(what)
    try:
        done.touch()
    except OSError as exc:
        log.warning("setup: cannot mark it done (%s): a respawned agent repeats it", exc)
    return failed
