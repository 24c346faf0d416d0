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
import errno
import hashlib
import os
import secrets
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


# -- limits -----------------------------------------------------------------------
# A listing (ListFiles, and Run's collection of output files) is built from
# whatever a guest left in the workspace: these bound what one listing can
# cost the host, whatever the guest built. The walk checks each limit before
# it builds the path (or reads the directory) that would pass it.
MAX_LIST_ENTRIES = 100_000
# Directory levels below the listed directory (the walk holds one descriptor per level).
MAX_LIST_DEPTH = 256
# Sum of the listed paths' lengths in bytes: the answer fits in one gRPC message
# (16 MiB with the per-entry fields) and in the memory of both ends.
MAX_LIST_BYTES = 8 * 1024 * 1024
# A file counts as sparse when more than this many bytes of its size are holes
# and under half of it is allocated: streaming it would send zeros the disk
# never held (``truncate -s 15T`` takes no space and no time).
SPARSE_SLACK = 16 * 1024 * 1024
# A recursive removal holds one descriptor per level up to here; deeper
# directories are first moved up (renamed inside the tree being removed).
MAX_REMOVE_DEPTH = 64
# Complete passes over one directory that keeps refilling while it is removed.
MAX_REMOVE_PASSES = 16
# Subdirectory names one pass over a directory keeps (then it descends, and rescans).
REMOVE_BATCH = 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LimitError(PathError):
    """A listing or a read that would pass one of the limits above (RESOURCE_EXHAUSTED)."""


class SparseError(LimitError):
    """A file whose size is mostly holes (see SPARSE_SLACK)."""


def is_sparse(st: os.stat_result) -> bool:
    """Whether a file's size is mostly holes (see SPARSE_SLACK)."""
    allocated = st.st_blocks * 512
    return st.st_size - allocated > SPARSE_SLACK and allocated < st.st_size // 2


def check_size(st: os.stat_result, path: str, max_bytes: int, refuse_sparse: bool) -> None:
    """LimitError when the file is over ``max_bytes`` (0: no cap), SparseError when sparse."""
    if max_bytes and st.st_size > max_bytes:
        raise LimitError(
            f"{path!r} is {st.st_size} bytes, over the limit of {max_bytes} bytes for one file "
            "(AGENTVM_MAX_OUTPUT_FILE_BYTES on the executor): compress or split it in the sandbox"
        )
    if refuse_sparse and is_sparse(st):
        raise SparseError(
            f"{path!r} is sparse: {st.st_size} bytes of which only {st.st_blocks * 512} are "
            "on disk; it is not streamed (archive it in the sandbox, e.g. tar --sparse, "
            "and read the archive)"
        )


def read_chunks(
    root: str,
    path: str,
    chunk: int = CHUNK,
    *,
    max_bytes: int = 0,
    refuse_sparse: bool = False,
) -> Iterator[tuple[bytes, int]]:
    """(chunk, total size) pieces of a file, checked with ``check_size`` before the first.

    A file that grows past ``max_bytes`` while it is read ends in LimitError.
    """
    fd = open_read(root, path)
    try:
        st = os.fstat(fd)
        check_size(st, path, max_bytes, refuse_sparse)
        sent = 0
        while data := os.read(fd, chunk):
            sent += len(data)
            if max_bytes and sent > max_bytes:
                raise LimitError(
                    f"{path!r} grew past the limit of {max_bytes} bytes for one file "
                    "while it was read"
                )
            yield data, st.st_size
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


def _scan(fd: int, budget: int, where: str, limit: int) -> list[os.DirEntry[str]]:
    """The entries of one directory sorted by name; LimitError past ``budget`` entries."""
    out: list[os.DirEntry[str]] = []
    with os.scandir(fd) as it:
        for e in it:
            if len(out) >= budget:
                raise LimitError(
                    f"the listing of {where} has more than {limit} entries (the listing "
                    "limit): list a subdirectory, or list without recursive"
                )
            out.append(e)
    out.sort(key=lambda e: e.name)
    return out


def list_dir(
    root: str,
    path: str = "",
    *,
    recursive: bool = False,
    limit: int = MAX_LIST_ENTRIES,
    max_bytes: int = MAX_LIST_BYTES,
    max_depth: int = MAX_LIST_DEPTH,
) -> list[Entry]:
    """Entries under a workspace directory (symlinks are listed, never followed).

    Depth-first, sorted by name, without recursion: one descriptor and the
    not yet listed entries per level. LimitError names the first limit the
    listing would pass (entries, total path bytes, depth, MAX_PATH): nothing
    past it is read or built.
    """
    parts = split(path, allow_root=True)
    base = "/".join(parts)
    where = repr(base) if base else "the workspace"
    out: list[Entry] = []
    total = 0
    scanned = 0
    fd = _walk(root, parts, create=False)
    # Each level: its descriptor, its path prefix and that prefix's length in
    # bytes, and its entries still to list (reversed: pop() takes the next).
    prefix = base + "/" if base else ""
    stack: list[tuple[int, str, int, list[os.DirEntry[str]]]] = []
    try:
        try:
            entries = _scan(fd, limit, where, limit)
        except BaseException:
            os.close(fd)  # not on the stack yet
            raise
        scanned += len(entries)
        entries.reverse()
        stack.append((fd, prefix, len(os.fsencode(prefix)), entries))
        while stack:
            dfd, prefix, plen, todo = stack[-1]
            if not todo:
                stack.pop()
                os.close(dfd)
                continue
            e = todo.pop()
            if e.name.startswith(TMP_PREFIX):
                continue
            nlen = plen + len(os.fsencode(e.name))
            if nlen > MAX_PATH:
                raise LimitError(
                    f"the listing of {where} reaches a path longer than {MAX_PATH} bytes "
                    f"(PATH_MAX) under {prefix[:200]!r}...: such paths cannot be named "
                    "through the API; list without recursive, or remove the tree with a "
                    "recursive RemoveFile of a directory above it"
                )
            if total + nlen > max_bytes:
                raise LimitError(
                    f"the listing of {where} passes {max_bytes} bytes of path names (the "
                    "listing limit): list a subdirectory, or list without recursive"
                )
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read
            total += nlen
            rel = prefix + e.name
            is_dir = stat.S_ISDIR(st.st_mode)
            out.append(Entry(rel, 0 if is_dir else st.st_size, st.st_mode, is_dir, st.st_mtime))
            if not (recursive and is_dir):
                continue
            if len(stack) >= max_depth:
                raise LimitError(
                    f"the listing of {where} nests directories more than {max_depth} levels "
                    f"deep (the listing limit), at {rel[:200]!r}...: list a deeper "
                    "directory, or list without recursive"
                )
            try:
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError:
                continue  # no longer a directory: listed as it was
            try:
                children = _scan(sub, limit - scanned, where, limit)
            except BaseException:
                os.close(sub)
                raise
            scanned += len(children)
            children.reverse()
            stack.append((sub, rel + "/", nlen + 1, children))
    finally:
        for dfd, *_ in stack:
            os.close(dfd)
    return out


# -- removal ----------------------------------------------------------------------
def _open_dir(dfd: int, name: str) -> int | None:
    """Descriptor of the directory ``name`` under ``dfd``; None when it is not one now.

    O_NOFOLLOW|O_DIRECTORY: a symlink or a FIFO swapped in for the directory
    fails here, before anything is opened (O_NONBLOCK as well, for the FIFO).
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except (NotADirectoryError, FileNotFoundError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link
            return None
        raise


def _clear_files(fd: int, batch: int = REMOVE_BATCH) -> list[str]:
    """Unlink what is not a directory in ``fd``; up to ``batch`` subdirectory names."""
    os.lseek(fd, 0, os.SEEK_SET)
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                os.unlink(e.name, dir_fd=fd)  # never follows a link, never opens anything
            except IsADirectoryError:
                subdirs.append(e.name)
                if len(subdirs) >= batch:
                    break
            except FileNotFoundError:
                pass
    return subdirs


def remove_tree(dfd: int, name: str) -> None:
    """Remove ``name`` under the directory ``dfd`` and everything below it.

    Unlike shutil.rmtree (which opens each directory without O_NOFOLLOW,
    O_DIRECTORY or O_NONBLOCK), nothing is ever opened but a directory, by
    a descriptor of its parent: a directory swapped for a symlink or a FIFO
    is unlinked, not followed or opened. Iterative; at most MAX_REMOVE_DEPTH
    descriptors (deeper directories are renamed up into the top one first).
    """
    top = _open_dir(dfd, name)
    if top is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
        return
    # Each level: descriptor, name in its parent, subdirectories still to
    # remove, passes made over it.
    stack: list[tuple[int, str, list[str], int]] = [(top, name, [], 0)]
    try:
        while stack:
            fd, nm, pending, passes = stack[-1]
            if not pending:
                pending.extend(_clear_files(fd))
                if len(pending) < REMOVE_BATCH:  # a complete pass
                    passes += 1
                    stack[-1] = (fd, nm, pending, passes)
                    if pending and passes > MAX_REMOVE_PASSES:
                        raise PathError(
                            f"cannot remove {nm!r}: it keeps refilling (a program in the "
                            "sandbox is writing to it): stop it and retry"
                        )
            if pending:
                child = pending.pop()
                cfd = _open_dir(fd, child)
                if cfd is None:  # a file now (or gone): unlink it as it is
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(child, dir_fd=fd)
                    continue
                if len(stack) >= MAX_REMOVE_DEPTH:
                    os.close(cfd)
                    moved = f"{TMP_PREFIX}rm-{secrets.token_hex(8)}"
                    os.rename(child, moved, src_dir_fd=fd, dst_dir_fd=stack[0][0])
                    stack[0][2].append(moved)
                    continue
                stack.append((cfd, child, [], 0))
                continue
            stack.pop()
            os.close(fd)
            parent = stack[-1][0] if stack else dfd
            try:
                os.rmdir(nm, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY or passes >= MAX_REMOVE_PASSES:
                    raise PathError(
                        f"cannot remove {nm!r}: {exc.strerror} (a program in the sandbox "
                        "may be writing to it: stop it and retry)"
                    ) from exc
                again = _open_dir(parent, nm)
                if again is not None:
                    stack.append((again, nm, [], passes))
    finally:
        for fd, *_ in stack:
            os.close(fd)


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
                remove_tree(dfd, name)
        else:
            os.unlink(name, dir_fd=dfd)
