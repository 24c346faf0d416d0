"""envd's filesystem service (``filesystem.Filesystem``) and its HTTP ``/files``.

Paths under /workspace go to the executor's file calls (StatFile, ListFiles,
MakeDirectory, RemoveFile, WriteFile, ReadFile), any other to commands in the
sandbox (:mod:`.guest_fs`); Move runs ``mv`` in the sandbox (the executor has
no rename). Paths: :mod:`.paths`. Directory watching is not offered
(UNIMPLEMENTED with what to use instead).
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import stat
from collections.abc import AsyncIterator
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from agentvm.e2b_gateway.backend import CALL_TIMEOUT, Backend, call
from agentvm.e2b_gateway.envd.filesystem import filesystem_pb2 as pb
from agentvm.e2b_gateway.envd_process import sandbox_of
from agentvm.e2b_gateway.errors import GatewayError, from_rpc
from agentvm.e2b_gateway.guest_fs import GuestFiles
from agentvm.e2b_gateway.paths import absolute, in_workspace, to_guest, to_workspace
from agentvm.v1 import common_pb2, executor_pb2

CHUNK = 1 << 20
MAX_DEPTH = 32
_NO_WATCH = (
    "agent-vm does not watch directories: poll files.list(path) or run "
    "`inotifywait` in the sandbox with commands.run"
)


def entry(info: common_pb2.FileInfo) -> pb.EntryInfo:
    """An executor FileInfo as envd's EntryInfo."""
    path = to_guest(info.path)
    out = pb.EntryInfo(
        name=posixpath.basename(path) or "/",
        path=path,
        size=info.size_bytes,
        mode=info.mode & 0o7777,
        owner="",
        group="",
    )
    kind = stat.S_IFDIR if info.is_dir else stat.S_IFREG
    out.type = pb.FILE_TYPE_DIRECTORY if info.is_dir else pb.FILE_TYPE_FILE
    out.permissions = stat.filemode(kind | (info.mode & 0o7777))
    if info.HasField("modified_at"):
        out.modified_time.CopyFrom(info.modified_at)
    return out


async def rechunk(data: AsyncIterator[bytes], size: int = CHUNK) -> AsyncIterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (an HTTP body's chunks are any size)."""
    pending = b""
    async for piece in data:
        pending += piece
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


class FileCalls:
    """The executor's file calls for one sandbox, with E2B's paths and errors."""

    def __init__(self, backend: Backend) -> None:
        self._stub = backend.stub
        self._guest = GuestFiles(backend)

    async def stat(self, sandbox_id: str, path: str) -> pb.EntryInfo:
        rel = in_workspace(absolute(path))
        if rel is None:
            return await self._guest.stat(sandbox_id, absolute(path))
        resp = await call(
            "stat",
            self._stub.StatFile(
                executor_pb2.StatFileRequest(sandbox_id=sandbox_id, path=rel),
                timeout=CALL_TIMEOUT,
            ),
        )
        if not resp.exists:
            raise GatewayError(404, f"path {path!r} does not exist")
        return entry(resp.file)

    async def list(self, sandbox_id: str, path: str, depth: int) -> list[pb.EntryInfo]:
        depth = max(1, min(depth or 1, MAX_DEPTH))
        rel = in_workspace(absolute(path))
        if rel is None:
            return await self._guest.list(sandbox_id, absolute(path), depth)
        resp = await call(
            "list",
            self._stub.ListFiles(
                executor_pb2.ListFilesRequest(sandbox_id=sandbox_id, path=rel, recursive=depth > 1),
                timeout=CALL_TIMEOUT,
            ),
        )
        base = to_guest(rel)
        out = []
        for info in resp.files:
            item = entry(info)
            below = posixpath.relpath(item.path, base)
            if below.startswith("..") or below == ".":
                continue  # not under the directory asked for: a guest's lie
            if below.count("/") < depth:
                out.append(item)
        return out

    async def make_dir(self, sandbox_id: str, path: str) -> pb.EntryInfo:
        rel = in_workspace(absolute(path))
        if rel is None:
            try:
                await self._guest.stat(sandbox_id, absolute(path))
            except GatewayError as exc:
                if exc.status != 404:
                    raise
            else:
                raise GatewayError(409, f"{path!r} exists already", Code.ALREADY_EXISTS)
            await self._guest.make_dir(sandbox_id, absolute(path))
            return await self.stat(sandbox_id, path)
        exists = await call(
            "stat",
            self._stub.StatFile(
                executor_pb2.StatFileRequest(sandbox_id=sandbox_id, path=rel),
                timeout=CALL_TIMEOUT,
            ),
        )
        if exists.exists:
            raise GatewayError(409, f"{path!r} exists already", Code.ALREADY_EXISTS)
        await call(
            "make directory",
            self._stub.MakeDirectory(
                executor_pb2.MakeDirectoryRequest(sandbox_id=sandbox_id, path=rel),
                timeout=CALL_TIMEOUT,
            ),
        )
        return await self.stat(sandbox_id, path)

    async def remove(self, sandbox_id: str, path: str) -> None:
        if in_workspace(absolute(path)) is None:
            await self._guest.stat(sandbox_id, absolute(path))  # 404 when missing
            await self._guest.remove(sandbox_id, absolute(path))
            return
        await call(
            "remove",
            self._stub.RemoveFile(
                executor_pb2.RemoveFileRequest(
                    sandbox_id=sandbox_id, path=to_workspace(path), recursive=True
                ),
                timeout=CALL_TIMEOUT,
            ),
        )

    async def move(self, sandbox_id: str, source: str, destination: str) -> pb.EntryInfo:
        src, dst = absolute(source), absolute(destination)
        await self.stat(sandbox_id, source)  # NOT_FOUND as envd says it
        argv = ["mv", "-f", "--", src, dst]
        stream = self._stub.Exec(
            executor_pb2.ExecRequest(
                sandbox_id=sandbox_id,
                program=common_pb2.Program(argv=common_pb2.Argv(args=argv)),
                exec_id="e2b-mv-" + secrets.token_hex(4),
                max_output_bytes=4096,
            ),
            timeout=CALL_TIMEOUT,
        )
        stderr = b""
        status: common_pb2.ExitStatus | None = None
        try:
            async for resp in stream:
                kind = resp.WhichOneof("event")
                if kind == "output":
                    stderr += resp.output.data[: 4096 - len(stderr)]
                elif kind == "exited":
                    status = resp.exited
        except Exception as exc:
            raise GatewayError(500, f"move {source!r} to {destination!r}: {exc}") from exc
        if status is None or status.exit_code or status.signal:
            detail = stderr.decode(errors="replace").strip() or "mv failed"
            raise GatewayError(400, f"move {source!r} to {destination!r}: {detail}")
        return await self.stat(sandbox_id, destination)

    async def write(self, sandbox_id: str, path: str, data: AsyncIterator[bytes]) -> pb.EntryInfo:
        """Write the file from ``data``'s chunks as they come (never the whole in memory)."""
        rel = in_workspace(absolute(path))
        if rel is None:
            await self._guest.write(sandbox_id, absolute(path), rechunk(data))
            return await self.stat(sandbox_id, path)
        if rel == ".":
            raise GatewayError(400, f"path {path!r} is a directory: name a file")
        digest = hashlib.sha256()

        async def requests() -> AsyncIterator[executor_pb2.WriteFileRequest]:
            yield executor_pb2.WriteFileRequest(sandbox_id=sandbox_id, path=rel, mode=0o644)
            async for piece in rechunk(data):
                digest.update(piece)
                yield executor_pb2.WriteFileRequest(chunk=piece)
            yield executor_pb2.WriteFileRequest(sha256=digest.hexdigest())

        await call("write", self._stub.WriteFile(requests(), timeout=CALL_TIMEOUT * 5))
        return await self.stat(sandbox_id, path)

    async def read(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        rel = in_workspace(absolute(path))
        if rel is None:
            return await self._guest.read(sandbox_id, absolute(path))
        info = await self.stat(sandbox_id, path)
        if info.type == pb.FILE_TYPE_DIRECTORY:
            raise GatewayError(400, f"path {path!r} is a directory: files.list reads directories")
        stream = self._stub.ReadFile(
            executor_pb2.ReadFileRequest(sandbox_id=sandbox_id, path=rel),
            timeout=CALL_TIMEOUT * 5,
        )
        return _chunks(stream)


async def _chunks(
    stream: grpc.aio.UnaryStreamCall[Any, executor_pb2.ReadFileResponse],
) -> AsyncIterator[bytes]:
    try:
        async for resp in stream:
            if resp.chunk:
                yield resp.chunk
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, "read") from exc


class FilesystemService:
    """``filesystem.Filesystem`` for the sandbox named by the request's headers."""

    def __init__(self, files: FileCalls) -> None:
        self._files = files

    async def stat(
        self, request: pb.StatRequest, ctx: RequestContext[pb.StatRequest, pb.StatResponse]
    ) -> pb.StatResponse:
        return pb.StatResponse(entry=await self._files.stat(sandbox_of(ctx), request.path))

    async def make_dir(
        self, request: pb.MakeDirRequest, ctx: RequestContext[pb.MakeDirRequest, pb.MakeDirResponse]
    ) -> pb.MakeDirResponse:
        return pb.MakeDirResponse(entry=await self._files.make_dir(sandbox_of(ctx), request.path))

    async def move(
        self, request: pb.MoveRequest, ctx: RequestContext[pb.MoveRequest, pb.MoveResponse]
    ) -> pb.MoveResponse:
        info = await self._files.move(sandbox_of(ctx), request.source, request.destination)
        return pb.MoveResponse(entry=info)

    async def list_dir(
        self, request: pb.ListDirRequest, ctx: RequestContext[pb.ListDirRequest, pb.ListDirResponse]
    ) -> pb.ListDirResponse:
        entries = await self._files.list(sandbox_of(ctx), request.path, request.depth)
        return pb.ListDirResponse(entries=entries)

    async def remove(
        self, request: pb.RemoveRequest, ctx: RequestContext[pb.RemoveRequest, pb.RemoveResponse]
    ) -> pb.RemoveResponse:
        await self._files.remove(sandbox_of(ctx), request.path)
        return pb.RemoveResponse()

    def watch_dir(
        self,
        request: pb.WatchDirRequest,
        ctx: RequestContext[pb.WatchDirRequest, pb.WatchDirResponse],
    ) -> AsyncIterator[pb.WatchDirResponse]:
        raise ConnectError(Code.UNIMPLEMENTED, _NO_WATCH)

    async def create_watcher(
        self,
        request: pb.CreateWatcherRequest,
        ctx: RequestContext[pb.CreateWatcherRequest, pb.CreateWatcherResponse],
    ) -> pb.CreateWatcherResponse:
        raise ConnectError(Code.UNIMPLEMENTED, _NO_WATCH)

    async def get_watcher_events(
        self,
        request: pb.GetWatcherEventsRequest,
        ctx: RequestContext[pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse],
    ) -> pb.GetWatcherEventsResponse:
        raise ConnectError(Code.UNIMPLEMENTED, _NO_WATCH)

    async def remove_watcher(
        self,
        request: pb.RemoveWatcherRequest,
        ctx: RequestContext[pb.RemoveWatcherRequest, pb.RemoveWatcherResponse],
    ) -> pb.RemoveWatcherResponse:
        raise ConnectError(Code.UNIMPLEMENTED, _NO_WATCH)
