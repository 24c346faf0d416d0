"""``AsyncFiles``: the files under a sandbox's /workspace (``sb.files``)."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_vm._calls import count, data, local_file, text, translate
from agent_vm._types import FileInfo
from agent_vm.errors import ArgumentTypeError, DataLossError, InvalidArgumentError
from agentvm.v1 import executor_pb2

if TYPE_CHECKING:
    from agent_vm._async import AsyncSandbox

CHUNK = 64 * 1024


def _mode(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(
            f"mode must be permission bits as an int (e.g. 0o644), got {type(value).__name__}"
        )
    if not 0 <= value <= 0o7777:
        raise InvalidArgumentError(f"mode must be between 0 and 0o7777, got {value:#o}")
    return value


class AsyncFiles:
    """Files under the sandbox's /workspace (paths relative to it, e.g. "input/data.csv").

    Every method raises SandboxClosedError once the sandbox is closed,
    SandboxExpiredError once it reached the end of its lifetime, and
    InvalidArgumentError for paths that are absolute, contain ".." or go
    through a symbolic link.
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @property
    def _address(self) -> str:
        return self._sb._address

    @translate
    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        """Write ``data`` to ``path`` (e.g. "input/task.py"), making missing parent
        directories; returns the size written."""
        self._sb._live()
        raw = _data(data)
        text("path", path)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), CHUNK):
                yield raw[i : i + CHUNK]

        return await self._write_stream(
            path, _mode(mode), chunks(), hashlib.sha256(raw).hexdigest()
        )

    @translate
    async def upload(
        self, local: str | os.PathLike[str], path: str, *, mode: int | None = None
    ) -> int:
        """Stream a local file to ``path`` (any size; verified with SHA-256).

        Raises NotFoundError, before anything is sent, when ``local`` is no file.
        ``mode`` defaults to the local file's permission bits.
        """
        self._sb._live()
        text("path", path)
        src = local_file(local)
        h = hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            with src.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    yield chunk

        return await self._write_stream(
            path, _mode(mode) if mode is not None else src.stat().st_mode & 0o777, chunks(), h
        )

    async def _write_stream(
        self, path: str, mode: int, chunks: AsyncIterator[bytes], digest: Any
    ) -> int:
        sid = self._sb.id

        async def requests() -> AsyncIterator[executor_pb2.WriteFileRequest]:
            yield executor_pb2.WriteFileRequest(sandbox_id=sid, path=path, mode=mode)
            async for chunk in chunks:
                yield executor_pb2.WriteFileRequest(chunk=chunk)
            sha = digest if isinstance(digest, str) else digest.hexdigest()
            yield executor_pb2.WriteFileRequest(sha256=sha)

        resp = await self._sb._stub.WriteFile(requests())
        return int(resp.size_bytes)

    async def _read_stream(self, path: str, max_bytes: int) -> AsyncIterator[bytes]:
        self._sb._live()
        text("path", path)
        h = hashlib.sha256()
        call = self._sb._stub.ReadFile(
            executor_pb2.ReadFileRequest(
                sandbox_id=self._sb.id, path=path, max_bytes=count("max_bytes", max_bytes)
            )
        )
        async for msg in call:
            if msg.chunk:
                h.update(msg.chunk)
                yield msg.chunk
            if msg.sha256 and msg.sha256 != h.hexdigest():
                raise DataLossError(f"{path}: checksum mismatch in transfer: read it again")

    @translate
    async def read(self, path: str, *, max_bytes: int = 0) -> bytes:
        """The whole content of ``path`` (use ``download`` for large files).

        Raises NotFoundError when there is no such file; files over
        ``max_bytes`` (0: the executor's cap, AGENTVM_MAX_OUTPUT_FILE_BYTES)
        ResourceExhaustedError, sparse ones FailedPreconditionError.
        """
        buf = bytearray()
        async for chunk in self._read_stream(path, max_bytes):
            buf.extend(chunk)
        return bytes(buf)

    async def read_text(self, path: str, *, max_bytes: int = 0) -> str:
        """``read`` decoded as UTF-8 (undecodable bytes replaced); raises as ``read``."""
        return (await self.read(path, max_bytes=max_bytes)).decode("utf-8", "replace")

    @translate
    async def download(
        self, path: str, local: str | os.PathLike[str], *, max_bytes: int = 0
    ) -> int:
        """Stream ``path`` to a local file (verified with SHA-256); returns its size.

        The local file appears only once complete. Raises as ``read``.
        """
        if not isinstance(local, (str, os.PathLike)):
            raise ArgumentTypeError(f"local must be a str or path, got {type(local).__name__}")
        dst = Path(local)
        tmp = dst.with_name(dst.name + f".part-{secrets.token_hex(4)}")
        size = 0
        try:
            with tmp.open("wb") as fh:
                async for chunk in self._read_stream(path, max_bytes):
                    fh.write(chunk)
                    size += len(chunk)
            tmp.replace(dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return size

    @translate
    async def list(self, path: str = "", *, recursive: bool = False) -> builtins.list[FileInfo]:
        """The entries of directory ``path`` ("" is /workspace), or of its whole tree.

        Raises NotFoundError when there is no such directory, ResourceExhaustedError
        past the listing limits (100,000 entries: list a narrower directory).
        """
        self._sb._live()
        resp = await self._sb._stub.ListFiles(
            executor_pb2.ListFilesRequest(
                sandbox_id=self._sb.id, path=text("path", path), recursive=bool(recursive)
            )
        )
        return [FileInfo(f.path, f.size_bytes, f.mode, f.is_dir) for f in resp.files]

    @translate
    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a file, directory or symbolic link of that name)."""
        self._sb._live()
        resp = await self._sb._stub.StatFile(
            executor_pb2.StatFileRequest(sandbox_id=self._sb.id, path=text("path", path))
        )
        return bool(resp.exists)

    @translate
    async def mkdir(self, path: str) -> None:
        """Create directory ``path`` and any missing parents; nothing to do if it exists.

        Raises FailedPreconditionError when a file of that name is there.
        """
        self._sb._live()
        await self._sb._stub.MakeDirectory(
            executor_pb2.MakeDirectoryRequest(sandbox_id=self._sb.id, path=text("path", path))
        )

    @translate
    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory with ``recursive=True``.

        Raises NotFoundError when there is nothing of that name.
        """
        self._sb._live()
        await self._sb._stub.RemoveFile(
            executor_pb2.RemoveFileRequest(
                sandbox_id=self._sb.id, path=text("path", path), recursive=bool(recursive)
            )
        )


def _data(value: object) -> bytes:
    return data("data", value)
