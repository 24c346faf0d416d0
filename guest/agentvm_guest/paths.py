"""Workspace file access that cannot escape the workspace root.

Used on both sides: by the guest agent under /workspace, and by the host
(executor) inside a shared workspace directory that a hostile guest can
fill with symlinks at any moment. Every path is walked one component at a
time with ``O_NOFOLLOW`` relative to the previous directory's descriptor, so
no symbolic link is ever followed and ``..`` never leaves the root, whatever
the guest does between two calls. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

MAX_PATH = 4096
MAX_COMPONENT = 255
CHUNK = 64 * 1024
TMP_PREFIX = ".agentvm-tmp-"


class PathError(ValueError):
    """A path that is not a plain relative path inside the workspace."""


class ChecksumError(PathError):
    """The content written does not match the SHA-256 the sender announced."""


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mode: int
    is_dir: bool
    mtime: float


def split(path: str, *, allow_root: bool = False) -> list[str]:
    """Components of a relative workspace path; PathError for anything else."""
    if "\0" in path:
        raise PathError("path contains a NUL byte")
    if len(path.encode()) > MAX_PATH:
        raise PathError(f"path is longer than {MAX_PATH} bytes")
    if path.startswith("/"):
        raise PathError(f"{path!r} is absolute: give a path relative to the workspace")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise PathError(f"{path!r} contains '..': paths must stay inside the workspace")
        if len(part.encode()) > MAX_COMPONENT:
            raise PathError(f"a component of {path!r} is longer than {MAX_COMPONENT} bytes")
    if not parts and not allow_root:
        raise PathError("path is empty: name a file inside the workspace")
    return parts


def _open_root(root: str) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _walk(root: str, parts: list[str], *, create: bool) -> int:
    """Descriptor of the directory ``root/parts``, never following a symlink."""
    fd = _open_root(root)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nxt = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise PathError(
                    f"{'/'.join(parts)!r}: {part!r} is not a directory inside the workspace "
                    "(symbolic links are not followed)"
                ) from exc
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def parent_dir(root: str, path: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
    """(descriptor of the parent directory, final name) of a workspace path."""
    parts = split(path)
    fd = _walk(root, parts[:-1], create=create)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def open_read(root: str, path: str) -> int:
    """Descriptor of an existing regular file; PathError for links, dirs, devices."""
    with parent_dir(root, path) as (dfd, name):
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise PathError(
                f"{path!r} is not a regular file (symbolic links are not followed)"
            ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathError(f"{path!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


class AtomicWriter:
    """Writes a file into a temporary name next to it; ``commit`` checks the hash and renames."""

    def __init__(self, root: str, path: str, mode: int = 0o644) -> None:
        self.path = path
        self._ctx = parent_dir(root, path, create=True)
        self._dfd, self._name = self._ctx.__enter__()
        self._tmp = TMP_PREFIX + secrets.token_hex(8)
        self._fd = os.open(
            self._tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            (mode or 0o644) & 0o777,
            dir_fd=self._dfd,
        )
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self, expected_sha256: str) -> None:
        """Move into place if the content hashes to ``expected_sha256`` (empty: no check)."""
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if expected_sha256 and expected_sha256.lower() != self.sha256:
            self.abort()
            raise ChecksumError(
                f"checksum mismatch for {self.path!r}: got {self.sha256}, "
                f"expected {expected_sha256}"
            )
        os.rename(self._tmp, self._name, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        self._done = True
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temporary file. Idempotent; a no-op after a successful commit."""
        if self._done:
            return
        self._done = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp, dir_fd=self._dfd)
        self._ctx.__exit__(None, None, None)


def read_chunks(root: str, path: str, chunk: int = CHUNK) -> Iterator[tuple[bytes, int]]:
    """(chunk, total size) pieces of a file; the generator's value ends with the hash."""
    fd = open_read(root, path)
    try:
        size = os.fstat(fd).st_size
        while data := os.read(fd, chunk):
            yield data, size
    finally:
        os.close(fd)


def file_sha256(root: str, path: str) -> tuple[int, str]:
    """(size, hex sha256) of a workspace file."""
    h = hashlib.sha256()
    size = 0
    for data, _ in read_chunks(root, path):
        h.update(data)
        size += len(data)
    return size, h.hexdigest()


def list_dir(
    root: str, path: str = "", *, recursive: bool = False, limit: int = 100_000
) -> list[Entry]:
    """Entries under a workspace directory (symlinks are listed, never followed)."""
    parts = split(path, allow_root=True)
    out: list[Entry] = []

    def walk(fd: int, prefix: str) -> None:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith(TMP_PREFIX):
                continue
            if len(out) >= limit:
                raise PathError(f"more than {limit} entries: list a subdirectory")
            st = e.stat(follow_symlinks=False)
            rel = f"{prefix}{e.name}"
            is_dir = stat.S_ISDIR(st.st_mode)
            out.append(Entry(rel, 0 if is_dir else st.st_size, st.st_mode, is_dir, st.st_mtime))
            if recursive and is_dir:
                sub = os.open(
                    e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                try:
                    walk(sub, rel + "/")
                finally:
                    os.close(sub)

    fd = _walk(root, parts, create=False)
    try:
        walk(fd, "/".join(parts) + "/" if parts else "")
    finally:
        os.close(fd)
    return out


def remove(root: str, path: str, *, recursive: bool = False) -> None:
    """Remove a file, link or (with ``recursive``) directory tree inside the workspace."""
    with parent_dir(root, path) as (dfd, name):
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                try:
                    os.rmdir(name, dir_fd=dfd)
                except OSError as exc:
                    raise PathError(f"{path!r} is a non-empty directory: use recursive") from exc
            else:
                shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
