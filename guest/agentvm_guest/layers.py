"""Apply an image layer (a tar stream) to a root directory, without ever leaving it.

The guest half of `agent-vm image import` (docs/IMAGES.md): the host has
already verified the layer's digests and refused absolute paths, ``..``,
device nodes and hard links to outside; this module applies the entries in
order, with the OCI whiteout rules, and is the second line of defence. What
it must survive is the image itself: a symlink planted by an earlier entry
or layer (``etc -> /run/agentvm``, ``up -> ../../..``) must not carry a later
entry (``etc/agent.sock``) out of the image's root into the agent's.

So no path is ever resolved by the kernel from ``/``: every parent directory
is opened with ``openat2(RESOLVE_IN_ROOT)`` relative to the root's file
descriptor (symlinks and ``..`` resolve as if the root were ``/``), and the
last component is created, replaced or removed relative to that parent's
descriptor without following it. Whiteouts (``.wh.NAME``) and opaque
directories (``.wh..wh..opq``) remove what lower layers put there
(``shutil.rmtree`` with ``dir_fd`` never follows symlinks).

Runs as root in the guest (owners and modes are the image's). Standard
library only: the guest has no third-party packages but grpc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO

from agentvm_guest import libc

SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_PATH = 4096
CHUNK = 1 << 20


class LayerError(Exception):
    """An entry that cannot be applied; the message names it."""


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


def open_in_root(root_fd: int, path: str, flags: int) -> int:
    """``openat2(root_fd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = int(
        libc.syscall(
            SYS_OPENAT2,
            ctypes.c_int(root_fd),
            ctypes.c_char_p(os.fsencode(path or ".")),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


@dataclass
class LayerResult:
    entries: int = 0
    whiteouts: int = 0
    bytes_written: int = 0
    created: set[str] = field(default_factory=set)


def _parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise LayerError(f"entry {name[:200]!r}: the path leaves the image's root")
    if len(name) > MAX_PATH:
        raise LayerError(f"entry {name[:200]!r}: the path is over {MAX_PATH} bytes")
    return parts


class _Applier:
    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.result = LayerResult()

    def parent(self, parts: list[str]) -> int:
        """An O_PATH descriptor of the entry's parent directory, made if missing."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts[:-1]):
                prefix = "/".join(parts[: i + 1])
                try:
                    nxt = open_in_root(self.root_fd, prefix, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        raise LayerError(
                            f"entry {'/'.join(parts)[:200]!r}: {prefix!r} is a symlink that "
                            "leads nowhere inside the image"
                        ) from None
                    nxt = open_in_root(self.root_fd, prefix, os.O_PATH | os.O_DIRECTORY)
                except NotADirectoryError:
                    # A file (or a symlink to one) where a directory must be: replace it.
                    os.unlink(part, dir_fd=fd)
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = open_in_root(self.root_fd, prefix, os.O_PATH | os.O_DIRECTORY)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def clear(self, name: str, dir_fd: int, keep_dir: bool = False) -> None:
        """Remove ``name`` in ``dir_fd`` (a tree too), unless it is a directory to keep."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def apply(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        parts = _parts(member.name)
        self.result.entries += 1
        if not parts:
            return  # the root itself
        name = parts[-1]
        path = "/".join(parts)
        dir_fd = self.parent(parts)
        try:
            if name.startswith(WHITEOUT):
                self.whiteout(parts, dir_fd)
            elif member.isdir():
                self.clear(name, dir_fd, keep_dir=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                self.attrs(member, name, dir_fd)
            elif member.isfile():
                self.clear(name, dir_fd)
                self.write(member, name, dir_fd, data)
            elif member.issym():
                self.clear(name, dir_fd)
                os.symlink(member.linkname, name, dir_fd=dir_fd)
                self.attrs(member, name, dir_fd)
            elif member.islnk():
                self.link(member, name, dir_fd)
            elif member.isfifo():
                self.clear(name, dir_fd)
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
                self.attrs(member, name, dir_fd)
            else:
                raise LayerError(
                    f"entry {member.name[:200]!r}: type {member.type!r} is not imported "
                    "(device nodes and other special files)"
                )
            self.result.created.add(path)
        finally:
            os.close(dir_fd)

    def whiteout(self, parts: list[str], dir_fd: int) -> None:
        self.result.whiteouts += 1
        name = parts[-1]
        parent = "/".join(parts[:-1])
        if name == OPAQUE:
            # Everything lower layers put in this directory goes; this layer's stays.
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                children = os.listdir(listing)
            finally:
                os.close(listing)
            for child in children:
                if "/".join([*parts[:-1], child]) not in self.result.created:
                    self.clear(child, dir_fd)
            return
        gone = name[len(WHITEOUT) :]
        if gone in ("", ".", "..") or "/" in gone:
            raise LayerError(f"entry {'/'.join(parts)[:200]!r}: a whiteout of nothing")
        if "/".join(filter(None, [parent, gone])) not in self.result.created:
            self.clear(gone, dir_fd)

    def write(
        self, member: tarfile.TarInfo, name: str, dir_fd: int, data: IO[bytes] | None
    ) -> None:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            left = member.size
            while data is not None and left > 0:
                chunk = data.read(min(CHUNK, left))
                if not chunk:
                    raise LayerError(f"entry {member.name[:200]!r}: the layer ends inside it")
                os.write(fd, chunk)
                left -= len(chunk)
                self.result.bytes_written += len(chunk)
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def link(self, member: tarfile.TarInfo, name: str, dir_fd: int) -> None:
        target_parts = _parts(member.linkname)
        if not target_parts:
            raise LayerError(f"entry {member.name[:200]!r}: a hard link to the root")
        try:
            # Parents resolve inside the root; the target itself is not followed.
            src = open_in_root(self.root_fd, "/".join(target_parts), os.O_PATH | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise LayerError(
                f"entry {member.name[:200]!r}: a hard link to {member.linkname[:200]!r}, "
                "which is not in the image"
            ) from exc
        try:
            if stat.S_ISDIR(os.fstat(src).st_mode):
                raise LayerError(f"entry {member.name[:200]!r}: a hard link to a directory")
            self.clear(name, dir_fd)
            os.link(f"/proc/self/fd/{src}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        finally:
            os.close(src)

    def attrs(self, member: tarfile.TarInfo, name: str, dir_fd: int) -> None:
        os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        if not member.issym():
            os.chmod(name, stat.S_IMODE(member.mode), dir_fd=dir_fd)
            os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)


def apply_layer(stream: IO[bytes], root: str) -> LayerResult:
    """Apply the tar ``stream`` to the directory ``root``; entries never land outside it."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        applier = _Applier(root_fd)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    data = tar.extractfile(member) if member.isfile() else None
                    try:
                        applier.apply(member, data)
                    except OSError as exc:
                        if exc.errno == errno.ELOOP:
                            raise LayerError(
                                f"entry {member.name[:200]!r}: too many symlinks on its path"
                            ) from exc
                        raise LayerError(f"entry {member.name[:200]!r}: {exc.strerror}") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise LayerError(f"not a readable tar stream: {exc}") from exc
        return applier.result
    finally:
        os.close(root_fd)
