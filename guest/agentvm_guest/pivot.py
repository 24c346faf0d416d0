"""Run a program in an image's root instead of the agent's (docs/IMAGES.md).

A VM with a named image has two roots: the system root the agent runs from,
and the image's root (its own disk). Each Execute's process gets its own
mount namespace (:mod:`.confine` makes it), in which this module mounts
``/proc``, ``/sys`` (read-only), ``/dev`` and ``/workspace`` into the image's
root, binds the guest's ``/etc/resolv.conf`` over the image's, then
``pivot_root``s into it and detaches the old root: the agent's files, socket
and Python are not reachable from the program by any path. Then it changes
to the working directory and, last, to the image's user (after the
capability drops, which need root).

:meth:`Pivot.prepare` runs in the agent, before the fork: it makes sure the
mount points are real directories (an image, or an earlier program, may
have replaced one with a symlink; a mount follows symlinks) and resolves
nothing in the image by name from ``/``. :meth:`Pivot.enter` runs in the
child after fork: system calls only.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass

from agentvm_guest.layers import open_in_root
from agentvm_guest.libc import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    mount,
    syscall,
    umount2,
)

SYS_PIVOT_ROOT = 155  # x86_64
# Directories the program finds mounted in the image's root.
MOUNT_POINTS = ("proc", "sys", "dev", "workspace", "tmp")


class PivotError(OSError):
    """The program could not be moved into the image's root; it is not started."""


def _ensure_dir(root_fd: int, name: str) -> None:
    """``name`` in the root is a real directory (a symlink or file there is replaced)."""
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=root_fd)
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=root_fd)
        os.mkdir(name, 0o755, dir_fd=root_fd)


@dataclass(frozen=True)
class Pivot:
    """What the child does to run in the image's root; built by :meth:`prepare`."""

    root: bytes
    binds: tuple[tuple[bytes, bytes, int], ...]  # (source, target, extra flags)
    mounts: tuple[tuple[bytes, bytes, bytes, int], ...]  # (source, target, fstype, flags)
    cwd: bytes
    uid: int | None
    gid: int | None
    groups: tuple[int, ...]

    @classmethod
    def prepare(
        cls,
        root: str,
        *,
        workspace: str = "/workspace",
        resolv_conf: str = "/etc/resolv.conf",
        cwd: str = "/",
        uid: int | None = None,
        gid: int | None = None,
        groups: tuple[int, ...] = (),
    ) -> Pivot:
        """Check and repair the mount points of ``root``; plan the child's steps."""
        root = os.path.realpath(root)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in MOUNT_POINTS:
                _ensure_dir(root_fd, name)
            binds = [(b"/dev", b"dev", MS_REC)]
            if os.path.isdir(workspace):
                binds.append((os.fsencode(workspace), b"workspace", MS_REC))
            # The guest's DNS settings, where the image has a real /etc to put them in.
            etc = (
                os.stat("etc", dir_fd=root_fd, follow_symlinks=False)
                if _exists(root_fd, "etc")
                else None
            )
            if etc is not None and stat.S_ISDIR(etc.st_mode) and os.path.isfile(resolv_conf):
                etc_fd = open_in_root(root_fd, "etc", os.O_PATH | os.O_DIRECTORY)
                try:
                    _ensure_file(etc_fd, "resolv.conf")
                finally:
                    os.close(etc_fd)
                binds.append((os.fsencode(resolv_conf), b"etc/resolv.conf", 0))
        finally:
            os.close(root_fd)
        broot = os.fsencode(root)
        return cls(
            root=broot,
            binds=tuple((src, broot + b"/" + dst, flags) for src, dst, flags in binds),
            mounts=(
                (b"proc", broot + b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
                (b"sysfs", broot + b"/sys", b"sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC),
            ),
            cwd=os.fsencode(cwd),
            uid=uid,
            gid=gid,
            groups=groups,
        )

    def enter(self) -> None:
        """In the child, in its own mount namespace: mount, pivot, detach the old root."""
        if mount(self.root, self.root, None, MS_BIND | MS_REC, None) != 0:
            raise PivotError(ctypes.get_errno(), "bind-mount the image's root")
        for source, target, fstype, flags in self.mounts:
            if mount(source, target, fstype, flags, None) != 0:
                raise PivotError(ctypes.get_errno(), f"mount {fstype.decode()}")
        for source, target, flags in self.binds:
            if mount(source, target, None, MS_BIND | flags, None) != 0:
                raise PivotError(ctypes.get_errno(), f"bind-mount {source.decode()}")
        os.chdir(self.root)
        if syscall(SYS_PIVOT_ROOT, b".", b".") != 0:
            raise PivotError(ctypes.get_errno(), "pivot_root")
        # The old root is now stacked on "/": detach it, with everything under it.
        if umount2(b".", MNT_DETACH) != 0:
            raise PivotError(ctypes.get_errno(), "detach the old root")
        os.chdir(self.cwd)

    def become_user(self) -> None:
        """In the child, last: the image's user (drops root and its capabilities)."""
        if self.gid is not None:
            os.setgroups(list(self.groups))
            os.setgid(self.gid)
        if self.uid is not None:
            os.setuid(self.uid)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _ensure_file(dir_fd: int, name: str) -> None:
    """``name`` is a regular file (a symlink, e.g. to systemd-resolved's, is replaced)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            raise PivotError(21, f"the image's /etc/{name} is a directory")
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o644,
        dir_fd=dir_fd,
    )
    os.close(fd)
