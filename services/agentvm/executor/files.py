"""Workspace files of a sandbox: write, read, list, remove (shared or API workspace).

In a shared workspace the host walks the guest-writable directory itself,
through ``agentvm_guest.paths`` (no symlink followed, listings bounded,
removal by descriptors); in an API workspace the guest agent does, and
everything it answers is checked here again (paths, sizes, hashes, limits).

Reads are capped: a file over the per-file cap, or sparse (mostly holes), is
refused before its first byte; one that grows past the cap while it is read
is cut there (``Stream.over``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc

from agentvm.common.config import Settings
from agentvm.common.errors import (
    AgentVMError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RemoteError,
    ResourceExhausted,
)
from agentvm.common.events import EventSink
from agentvm.common.grpc_util import malformed_response
from agentvm.v1 import common_pb2, guest_agent_pb2
from agentvm_guest import paths

if TYPE_CHECKING:
    from agentvm.executor.executor import SandboxState

GUEST_WORKSPACE = "/workspace"
CHUNK = 64 * 1024
# The fix a NOT_FOUND of the file calls names.
NOT_THERE = f" (paths are relative to {GUEST_WORKSPACE}; files.list() shows what is there)"

# Walks of a guest-made tree hold up to MAX_LIST_DEPTH (listing) or 64 (removal)
# descriptors each: at most this many run at once per executor, so callers
# cannot add them up to the descriptor limit every sandbox shares.
TREE_WALKS = 4


class Owner(Protocol):
    settings: Settings
    events: EventSink


def check_path(path: str, *, allow_root: bool = False) -> str:
    """Normalised workspace path; INVALID_ARGUMENT for absolute paths, '..', NUL."""
    try:
        return "/".join(paths.split(path, allow_root=allow_root))
    except paths.PathError as exc:
        raise InvalidArgument(str(exc)) from exc


def limit_error(exc: paths.LimitError) -> AgentVMError:
    """A sparse file is FAILED_PRECONDITION; every other limit RESOURCE_EXHAUSTED."""
    if isinstance(exc, paths.SparseError):
        return FailedPrecondition(str(exc))
    return ResourceExhausted(str(exc))


def file_error(exc: grpc.aio.AioRpcError, sb: SandboxState, path: str) -> AgentVMError:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(exc.details() or f"invalid path {path!r}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound((exc.details() or f"no file {path!r} in the workspace") + NOT_THERE)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(exc.details() or f"{path!r}: a limit of the guest agent")
    if code == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. a sparse file
        return FailedPrecondition(exc.details() or f"{path!r}: refused by the guest agent")
    return RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}")


@dataclass
class Stream:
    """What a capped read found: bytes read, their SHA-256, and whether the file had more."""

    size: int = 0
    sha256: str = ""
    over: bool = False


class WorkspaceFiles:
    """File operations on sandboxes for the executor (``owner``: its settings and events)."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self._walks = asyncio.Semaphore(TREE_WALKS)

    def file_cap(self, requested: int, what: str = "max_bytes") -> int:
        """The per-file byte cap: ``requested`` (0: the server's), at most the server's."""
        high = self.owner.settings.max_output_file_bytes
        if requested > high:
            raise InvalidArgument(
                f"{what} must be at most {high} (the executor's AGENTVM_MAX_OUTPUT_FILE_BYTES), "
                f"got {requested}"
            )
        return requested or high

    def _event(self, type_: str, sb: SandboxState, path: str, size: int, sha: str) -> None:
        self.owner.events.emit(
            type_, vm=sb.vm.name, sandbox=sb.id, path=path, size=size, sha256=sha
        )

    async def write_file(
        self,
        sb: SandboxState,
        path: str,
        mode: int,
        chunks: AsyncIterator[bytes],
        expected: list[str],
    ) -> tuple[int, str]:
        """Write a file from ``chunks``; ``expected`` gets the sender's SHA-256 (last message)."""
        path = check_path(path)
        root = sb.shared_root
        if root is not None:
            try:
                writer = await asyncio.to_thread(paths.AtomicWriter, root, path, mode or 0o644)
            except paths.PathError as exc:
                raise InvalidArgument(str(exc)) from exc
            try:
                async for data in chunks:
                    await asyncio.to_thread(writer.write, data)
                await asyncio.to_thread(writer.commit, expected[0] if expected else "")
            except paths.ChecksumError as exc:
                raise DataLoss(str(exc)) from exc
            finally:
                writer.abort()
            self._event("file.written", sb, path, writer.size, writer.sha256)
            return writer.size, writer.sha256

        # What was sent is counted and hashed here: the guest's answer is only a claim.
        sent = hashlib.sha256()
        size = 0

        async def requests() -> AsyncIterator[guest_agent_pb2.GuestAgentServiceWriteFileRequest]:
            nonlocal size
            yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(path=path, mode=mode)
            async for data in chunks:
                sent.update(data)
                size += len(data)
                yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(chunk=data)
            yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(
                sha256=expected[0] if expected else ""
            )

        try:
            resp = await sb.agent.WriteFile(requests(), timeout=3600)
        except grpc.aio.AioRpcError as exc:
            raise file_error(exc, sb, path) from exc
        if resp is None:  # grpc.aio's stand-in for a response it could not parse
            raise file_error(malformed_response("WriteFile"), sb, path)
        digest = sent.hexdigest()
        if (resp.size_bytes, resp.sha256) != (size, digest):
            raise DataLoss(
                f"{path}: the guest says it wrote {resp.size_bytes} bytes with sha256 "
                f"{resp.sha256[:80]!r}, but {size} bytes with sha256 {digest} were sent; "
                "the file in the sandbox cannot be trusted: write it again or close the sandbox"
            )
        self._event("file.written", sb, path, size, digest)
        return size, digest

    async def stream(
        self, sb: SandboxState, path: str, cap: int, state: Stream
    ) -> AsyncGenerator[tuple[bytes, int], None]:
        """(chunk, size announced on the first chunk else 0) of at most ``cap`` bytes.

        Refused before the first byte (ResourceExhausted, FailedPrecondition for
        a sparse file) when the file is over ``cap`` or sparse; a file that
        turns out longer is cut at ``cap`` with ``state.over`` set. ``state``
        ends with the size and SHA-256 of what was read.
        """
        h = hashlib.sha256()
        root = sb.shared_root
        if root is not None:
            try:
                fd = await asyncio.to_thread(paths.open_read, root, path)
            except paths.PathError as exc:
                raise InvalidArgument(str(exc)) from exc
            except FileNotFoundError as exc:
                raise NotFound(f"no file {path!r} in the workspace{NOT_THERE}") from exc
            try:
                st = os.fstat(fd)
                try:
                    paths.check_size(st, path, cap, refuse_sparse=True)
                except paths.LimitError as exc:
                    raise limit_error(exc) from exc
                first = True
                # One byte past the cap tells a file that grew from one that did not.
                while data := await asyncio.to_thread(
                    os.read, fd, min(CHUNK, cap - state.size + 1)
                ):
                    if state.size + len(data) > cap:
                        data = data[: cap - state.size]
                        state.over = True
                    if data:
                        h.update(data)
                        state.size += len(data)
                        yield data, st.st_size if first else 0
                        first = False
                    if state.over:
                        break
            finally:
                os.close(fd)
            state.sha256 = h.hexdigest()
            return
        call = sb.agent.ReadFile(
            guest_agent_pb2.GuestAgentServiceReadFileRequest(
                path=path, max_bytes=cap, refuse_sparse=True
            ),
            timeout=3600,
        )
        claimed = ""
        try:
            async for msg in call:
                if msg.chunk:
                    data = msg.chunk
                    if state.size + len(data) > cap:  # the guest sent more than it may
                        data = data[: cap - state.size]
                        state.over = True
                    if data:
                        h.update(data)
                        state.size += len(data)
                        yield data, msg.size_bytes
                    if state.over:
                        break
                if msg.sha256:
                    claimed = msg.sha256
        except grpc.aio.AioRpcError as exc:
            raise file_error(exc, sb, path) from exc
        finally:
            call.cancel()
        state.sha256 = h.hexdigest()
        # The guest is not trusted: the hash is computed here, and compared.
        if claimed and not state.over and claimed != state.sha256:
            raise DataLoss(f"{path!r} from {sb.vm.name} does not match the checksum the guest sent")

    async def read_file(
        self, sb: SandboxState, path: str, max_bytes: int = 0
    ) -> AsyncIterator[tuple[bytes, int, str]]:
        """(chunk, size on first chunk else 0, sha256 on the last item else '').

        Files over the cap (``max_bytes``, at most AGENTVM_MAX_OUTPUT_FILE_BYTES)
        are RESOURCE_EXHAUSTED, sparse ones FAILED_PRECONDITION, before any byte.
        """
        path = check_path(path)
        cap = self.file_cap(max_bytes)
        state = Stream()
        first = True
        async for data, size in self.stream(sb, path, cap, state):
            yield data, size, ""
            first = False
        if state.over:
            raise ResourceExhausted(
                f"{path!r} grew past the limit of {cap} bytes for one file while it was read"
            )
        if first:
            yield b"", 0, ""
        self._event("file.read", sb, path, state.size, state.sha256)
        yield b"", 0, state.sha256

    async def list_files(
        self,
        sb: SandboxState,
        path: str,
        recursive: bool,
        *,
        limit: int = paths.MAX_LIST_ENTRIES,
        max_bytes: int = paths.MAX_LIST_BYTES,
    ) -> list[common_pb2.FileInfo]:
        """The listing, within the limits of ``paths.list_dir`` (RESOURCE_EXHAUSTED past one)."""
        path = check_path(path, allow_root=True)
        root = sb.shared_root
        if root is not None:
            try:
                async with self._walks:
                    entries = await asyncio.to_thread(
                        paths.list_dir,
                        root,
                        path,
                        recursive=recursive,
                        limit=limit,
                        max_bytes=max_bytes,
                    )
            except paths.LimitError as exc:
                raise limit_error(exc) from exc
            except paths.PathError as exc:
                raise InvalidArgument(str(exc)) from exc
            except FileNotFoundError as exc:
                raise NotFound(f"no directory {path!r} in the workspace{NOT_THERE}") from exc
            out = []
            for e in entries:
                info = common_pb2.FileInfo(
                    path=e.path, size_bytes=e.size, mode=e.mode, is_dir=e.is_dir
                )
                info.modified_at.FromNanoseconds(int(e.mtime * 1e9))
                out.append(info)
            return out
        req = guest_agent_pb2.GuestAgentServiceListFilesRequest(path=path, recursive=recursive)
        if limit < paths.MAX_LIST_ENTRIES:
            req.max_entries = limit
        if max_bytes < paths.MAX_LIST_BYTES:
            req.max_bytes = max_bytes
        try:
            resp = await sb.agent.ListFiles(req, timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise file_error(exc, sb, path) from exc
        total = 0
        for info in resp.files:
            check_path(info.path)  # hostile guests may invent paths
            total += len(info.path.encode())
        if len(resp.files) > limit or total > max_bytes:
            raise ResourceExhausted(
                f"the guest of {sb.vm.name} listed {len(resp.files)} entries, {total} bytes of "
                f"path names: past the listing limits ({limit} entries, {max_bytes} bytes)"
            )
        return list(resp.files)

    async def remove_file(self, sb: SandboxState, path: str, recursive: bool) -> None:
        path = check_path(path)
        root = sb.shared_root
        if root is not None:
            try:
                async with self._walks:
                    await asyncio.to_thread(paths.remove, root, path, recursive=recursive)
            except paths.PathError as exc:
                raise InvalidArgument(str(exc)) from exc
            except FileNotFoundError as exc:
                raise NotFound(f"no file {path!r} in the workspace{NOT_THERE}") from exc
            return
        try:
            await sb.agent.RemoveFile(
                guest_agent_pb2.GuestAgentServiceRemoveFileRequest(path=path, recursive=recursive),
                timeout=60,
            )
        except grpc.aio.AioRpcError as exc:
            raise file_error(exc, sb, path) from exc

    async def stat_file(self, sb: SandboxState, path: str) -> common_pb2.FileInfo | None:
        """The entry at ``path`` (a symlink is one of its own), None when there is none.

        Found in a listing of its directory, which has the listing limits.
        """
        path = check_path(path)
        parent = path.rpartition("/")[0]
        try:
            entries = await self.list_files(sb, parent, False)
        except (NotFound, InvalidArgument):  # no such directory, or a part is no directory
            return None
        return next((e for e in entries if e.path == path), None)

    async def make_dir(self, sb: SandboxState, path: str) -> None:
        """Create directory ``path`` and its missing parents; FAILED_PRECONDITION if a
        file of that name is there."""
        path = check_path(path)
        root = sb.shared_root
        if root is not None:
            try:
                await asyncio.to_thread(_make_dir, root, path)
            except paths.PathError as exc:
                raise InvalidArgument(str(exc)) from exc
            return
        # The guest agent has no call of its own for it: a small script runs there
        # like a command, with the rules of the shared case (no symlink followed).
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(
                argv=common_pb2.Argv(args=["sh", "-c", _MKDIR, "mkdir", *path.split("/")])
            ),
            cwd=GUEST_WORKSPACE,
            max_output_bytes=4096,
        )
        req.timeout.FromSeconds(30)
        err = bytearray()
        code: int | None = None
        call = sb.agent.Execute(req, timeout=60)
        try:
            async for ev in call:
                if ev.HasField("output") and len(err) < 4096:
                    err.extend(ev.output.data)
                elif ev.HasField("exited"):
                    code = ev.exited.exit_code
                    break
        except grpc.aio.AioRpcError as exc:
            raise file_error(exc, sb, path) from exc
        finally:
            call.cancel()
        said = err.decode("utf-8", "replace").strip()[:200]
        if code == 3:
            raise InvalidArgument(
                f"{path!r}: {said!r} is not a directory inside the workspace "
                "(symbolic links are not followed)"
            )
        if code == 4:
            raise FailedPrecondition(
                f"cannot create directory {path!r}: something else of that name is there"
            )
        if code != 0:
            raise FailedPrecondition(
                f"cannot create directory {path!r}: {said or f'exit status {code}'}"
            )


# mkdir -p in the guest, one component at a time, following no symlink: exit 3
# when a parent is not a directory (or a link), 4 when the last one is not.
_MKDIR = """
cd /workspace || exit 5
n=$#; i=0
for p in "$@"; do
  i=$((i + 1))
  if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; then
    printf "%s\n" "$p" >&2
    if [ "$i" -eq "$n" ]; then exit 4; fi
    exit 3
  fi
  [ -d "$p" ] || mkdir -- "$p" || exit 5
  cd -- "$p" || exit 5
done
"""


def _make_dir(root: str, path: str) -> None:
    """mkdir -p under a host-side workspace, never following a symlink."""
    with paths.parent_dir(root, path, create=True) as (dfd, name):
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                raise FailedPrecondition(
                    f"cannot create directory {path!r}: something else of that name is there"
                ) from None
