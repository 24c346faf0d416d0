"""Shared (virtiofs) workspaces on a size-capped file system of their own.

A guest writes into a shared workspace straight onto the host. So that it
cannot fill the host's state directory, the workspace is a fresh ext4 file
system in a sparse image the size of the VM's disk (``workspace.img`` in the
VM's directory), loop-mounted ``nosuid,nodev`` on ``workspace/``. A guest that
fills it gets ENOSPC; the image never grows past that size.

``AGENTVM_WORKSPACE_CAP=none`` (hosts without loop devices) makes a plain
directory instead; `agent-vm doctor` reports which is in force.

Everything that removes a VM directory goes through :func:`remove_tree`,
which unmounts first: a mount left behind would pin its loop device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from agentvm.common.errors import FailedPrecondition
from agentvm_guest import paths

log = logging.getLogger("agentvm.vm_manager.workspace")

IMAGE_NAME = "workspace.img"
PARTS = ("input", "output", "work")
CAPS = ("loop", "none")


def _run(argv: list[str], what: str) -> None:
    _output(argv, what)


def _output(argv: list[str], what: str = "") -> str:
    """stdout of ``argv``; FailedPrecondition starting with ``what`` when it fails."""
    what = what or f"{argv[0]} failed"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise FailedPrecondition(f"{what}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _own_mount_namespace() -> bool:
    """True when this process has a mount namespace other than init's (systemd's
    PrivateTmp, ProtectHome...): a mount made here is invisible to virtiofsd."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False  # cannot tell (not root): assume the host's


def create(workspace: Path, size_mib: int, cap: str) -> None:
    """Make ``workspace`` (mode 0700, with input/output/work), capped at ``size_mib``."""
    if cap != "loop":
        # Only root (virtiofsd, the executor) may enter: whatever the guest
        # creates in there (setuid files, device nodes) is out of reach of
        # other users of the host.
        workspace.mkdir(mode=0o700)
        for part in PARTS:
            (workspace / part).mkdir(mode=0o755)
        return
    hint = (
        "shared workspaces live on a loop-mounted file system of their own "
        "(needs root and /dev/loop-control); use the api workspace mode, or set "
        "AGENTVM_WORKSPACE_CAP=none to allow uncapped ones"
    )
    if _own_mount_namespace():
        raise FailedPrecondition(
            "vm-manager runs in a mount namespace of its own (systemd PrivateTmp= or "
            "ProtectHome=?), so virtiofsd would not see the workspace mounted here: run it "
            f"in the host's mount namespace ({hint})"
        )
    image = workspace.parent / IMAGE_NAME
    seed = Path(tempfile.mkdtemp(prefix=".workspace-seed-", dir=workspace.parent))  # 0700
    try:
        for part in PARTS:
            (seed / part).mkdir(mode=0o755)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size_mib * 2**20)
        finally:
            os.close(fd)
        what = f"cannot make the workspace file system of {workspace.parent.name} ({hint})"
        _run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "agentvm-ws", "-d", str(seed), "-E",
             "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1", str(image)],
            what,
        )  # fmt: skip
        # The root is 0700 before it is ever mounted: no moment where another
        # user of the host could open it (whatever the guest creates in there,
        # setuid files or device nodes, stays out of their reach; nosuid,nodev
        # make it inert anyway).
        _run(["debugfs", "-w", "-R", "sif <2> mode 040700", str(image)], what)
        # debugfs exits 0 even when it could not write: read the mode back.
        if not re.search(r"Mode:\s+0700\b", _output(["debugfs", "-R", "stat <2>", str(image)])):
            raise FailedPrecondition(
                f"{what}: debugfs could not make the root directory private (mode 0700)"
            )
    finally:
        shutil.rmtree(seed, ignore_errors=True)
    workspace.mkdir(mode=0o700)
    _run(
        ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(workspace)],
        f"cannot mount the workspace of {workspace.parent.name} ({hint})",
    )
    if workspace.stat().st_mode & 0o777 != 0o700:
        release(workspace)
        raise FailedPrecondition(f"the workspace of {workspace.parent.name} is not private")
    with contextlib.suppress(OSError):
        (workspace / "lost+found").rmdir()


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mounts_under(path: Path, mountinfo: bytes | None = None) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_bytes()
        except OSError:
            return []
    root = os.path.realpath(path)
    out = []
    # Split on what the kernel writes (it escapes space, tab, newline, backslash).
    for line in mountinfo.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        # The kernel writes space, tab, newline and backslash as octal escapes.
        raw = _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
        point = os.fsdecode(raw)
        if point == root or point.startswith(root.rstrip("/") + "/"):
            out.append(Path(point))
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def release(path: Path) -> None:
    """Unmount every workspace mounted at or below ``path`` (lazily if still busy)."""
    for point in mounts_under(path):
        try:
            _run(["umount", str(point)], f"cannot unmount {point}")
        except FailedPrecondition as exc:
            log.warning("%s; detaching it lazily", exc)
            with contextlib.suppress(FailedPrecondition):
                _run(["umount", "-l", str(point)], f"cannot detach {point}")


def remove_tree(path: Path) -> None:
    """Remove a VM directory: its workspace mount first, then everything in it.

    An uncapped shared workspace is a directory the guest filled: the removal
    walks it with directory descriptors (paths.remove_tree), iteratively, so
    a tree of any depth (shutil.rmtree raised RecursionError past about 1,000
    levels, ignore_errors or not) or a directory swapped for a symlink or a
    FIFO cannot stop a VM's destruction or reach outside it.
    """
    release(path)
    try:
        parent = os.open(path.parent, os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        paths.remove_tree(parent, path.name)
    except (OSError, paths.PathError) as exc:
        log.warning("cannot remove all of %s: %s", path, exc)
    finally:
        os.close(parent)
