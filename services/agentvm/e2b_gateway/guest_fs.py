"""Files outside /workspace, through commands in the sandbox (the executor's Exec).

agent-vm's file calls reach /workspace only; E2B programs also use ``/``,
``/tmp`` or ``/home/user``. Those paths are served by running coreutils and
findutils in the sandbox (``find -printf``, ``cat``, ``mkdir``, ``rm``), in the
same root and confinement as any command, so a path means what it means to the
sandbox's programs. An image without GNU find/coreutils gets an error saying
so. What the commands print is hostile input: records are parsed strictly and
bounded here.
"""

from __future__ import annotations

import posixpath
import secrets
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from agentvm.e2b_gateway.backend import CALL_TIMEOUT, Backend, write_stdin
from agentvm.e2b_gateway.envd.filesystem import filesystem_pb2 as pb
from agentvm.e2b_gateway.errors import GatewayError, from_rpc
from agentvm.v1 import common_pb2, executor_pb2

# find's record: type, size, mode (octal), mtime, owner, group, link target, path.
_PRINTF = r"%y\t%s\t%m\t%T@\t%u\t%g\t%l\t%p\0"
MAX_LISTING = 16 << 20
MAX_ENTRIES = 100_000
READ_CAP = 1 << 30
CHUNK = 1 << 20
_TYPES = {"f": pb.FILE_TYPE_FILE, "d": pb.FILE_TYPE_DIRECTORY, "l": pb.FILE_TYPE_SYMLINK}
_KIND = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}


@dataclass
class Result:
    """What a command in the sandbox did."""

    exit_code: int = -1
    signal: int = 0
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.signal == 0

    def why(self) -> str:
        return bytes(self.stderr[:2000]).decode(errors="replace").strip() or (
            f"exit status {self.exit_code}" if not self.signal else f"signal {self.signal}"
        )


def parse_record(raw: bytes) -> pb.EntryInfo | None:
    """One of find's records as an EntryInfo; None when it is not one."""
    parts = raw.split(b"\t", 7)
    if len(parts) != 8:
        return None
    kind, size, mode, mtime, owner, group, target, path = (
        p.decode(errors="replace") for p in parts
    )
    if not path.startswith("/") or "\0" in path:
        return None
    try:
        size_i, mode_i, mtime_f = int(size), int(mode, 8), float(mtime)
    except ValueError:
        return None
    if size_i < 0 or not 0 <= mode_i <= 0o7777 or not 0 <= mtime_f < 2**40:
        return None
    out = pb.EntryInfo(
        name=posixpath.basename(path) or "/",
        path=path,
        type=_TYPES.get(kind, pb.FILE_TYPE_UNSPECIFIED),
        size=size_i,
        mode=mode_i,
        permissions=stat.filemode(_KIND.get(kind, 0) | mode_i),
        owner=owner[:64],
        group=group[:64],
        is_symlink=kind == "l",
    )
    if kind == "l":
        out.symlink_target = target
    out.modified_time.CopyFrom(
        timestamp_pb2.Timestamp(seconds=int(mtime_f), nanos=int((mtime_f % 1) * 1e9))
    )
    return out


class GuestFiles:
    """File operations on any guest path, as commands in the sandbox."""

    def __init__(self, backend: Backend) -> None:
        self._stub = backend.stub

    async def _run(self, sandbox_id: str, argv: list[str], max_output: int = 1 << 20) -> Result:
        stream = self._stub.Exec(
            executor_pb2.ExecRequest(
                sandbox_id=sandbox_id,
                program=common_pb2.Program(argv=common_pb2.Argv(args=argv)),
                cwd="/",
                exec_id="e2b-fs-" + secrets.token_hex(4),
                max_output_bytes=max_output,
            ),
            timeout=CALL_TIMEOUT,
        )
        result = Result()
        try:
            async for resp in stream:
                kind = resp.WhichOneof("event")
                if kind == "output":
                    sink = (
                        result.stderr
                        if resp.output.stream == common_pb2.OUTPUT_STREAM_STDERR
                        else result.stdout
                    )
                    sink += resp.output.data
                elif kind == "exited":
                    result.exit_code = resp.exited.exit_code
                    result.signal = resp.exited.signal
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, argv[0]) from exc
        return result

    async def _find(self, sandbox_id: str, path: str, depth: int | None) -> list[pb.EntryInfo]:
        argv = ["find", path]
        argv += ["-maxdepth", "0"] if depth is None else ["-mindepth", "1", "-maxdepth", str(depth)]
        result = await self._run(sandbox_id, [*argv, "-printf", _PRINTF], MAX_LISTING)
        if not result.ok and not result.stdout:
            why = result.why()
            if "No such file" in why:
                raise GatewayError(404, f"path {path!r} does not exist")
            if "Permission denied" in why:
                raise GatewayError(403, f"path {path!r}: permission denied")
            raise GatewayError(
                500,
                f"list {path!r} in the sandbox: {why} (files outside /workspace need GNU "
                "find in the sandbox's image)",
            )
        out = []
        for raw in bytes(result.stdout).split(b"\0")[:MAX_ENTRIES]:
            if raw and (item := parse_record(raw)) is not None:
                out.append(item)
        return out

    async def stat(self, sandbox_id: str, path: str) -> pb.EntryInfo:
        found = await self._find(sandbox_id, path, None)
        if not found:
            raise GatewayError(404, f"path {path!r} does not exist")
        return found[0]

    async def list(self, sandbox_id: str, path: str, depth: int) -> list[pb.EntryInfo]:
        info = await self.stat(sandbox_id, path)
        if info.type != pb.FILE_TYPE_DIRECTORY:
            raise GatewayError(400, f"path {path!r} is not a directory")
        return await self._find(sandbox_id, path, depth)

    async def make_dir(self, sandbox_id: str, path: str) -> None:
        result = await self._run(sandbox_id, ["mkdir", "-p", "--", path])
        if not result.ok:
            raise GatewayError(400, f"make directory {path!r}: {result.why()}")

    async def remove(self, sandbox_id: str, path: str) -> None:
        result = await self._run(sandbox_id, ["rm", "-rf", "--", path])
        if not result.ok:
            raise GatewayError(400, f"remove {path!r}: {result.why()}")

    async def write(self, sandbox_id: str, path: str, data: AsyncIterator[bytes]) -> None:
        exec_id = "e2b-fs-" + secrets.token_hex(4)
        script = 'mkdir -p -- "$(dirname -- "$1")" && exec cat > "$1"'
        stream = self._stub.Exec(
            executor_pb2.ExecRequest(
                sandbox_id=sandbox_id,
                program=common_pb2.Program(
                    argv=common_pb2.Argv(args=["sh", "-c", script, "sh", path])
                ),
                cwd="/",
                exec_id=exec_id,
                keep_stdin_open=True,
                max_output_bytes=1 << 16,
            ),
            timeout=CALL_TIMEOUT * 5,
        )
        result = Result()
        try:
            events = stream.__aiter__()
            first = await events.__anext__()  # started: stdin can be written now
            if first.WhichOneof("event") != "started":
                raise GatewayError(500, f"write {path!r}: the command did not start")
            async for piece in data:
                await write_stdin(self._stub, sandbox_id, exec_id, piece)
            await write_stdin(self._stub, sandbox_id, exec_id, b"", eof=True)
            async for resp in events:
                kind = resp.WhichOneof("event")
                if kind == "output" and resp.output.stream == common_pb2.OUTPUT_STREAM_STDERR:
                    result.stderr += resp.output.data
                elif kind == "exited":
                    result.exit_code = resp.exited.exit_code
                    result.signal = resp.exited.signal
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, "write") from exc
        finally:
            stream.cancel()
        if not result.ok:
            raise GatewayError(400, f"write {path!r}: {result.why()}")

    async def read(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        info = await self.stat(sandbox_id, path)
        if info.type == pb.FILE_TYPE_DIRECTORY:
            raise GatewayError(400, f"path {path!r} is a directory: files.list reads directories")
        stream = self._stub.Exec(
            executor_pb2.ExecRequest(
                sandbox_id=sandbox_id,
                program=common_pb2.Program(argv=common_pb2.Argv(args=["cat", "--", path])),
                cwd="/",
                exec_id="e2b-fs-" + secrets.token_hex(4),
                max_output_bytes=READ_CAP,
            ),
            timeout=CALL_TIMEOUT * 5,
        )
        return _stdout(stream, path)


async def _stdout(
    stream: grpc.aio.UnaryStreamCall[executor_pb2.ExecRequest, executor_pb2.ExecResponse],
    path: str,
) -> AsyncIterator[bytes]:
    try:
        async for resp in stream:
            kind = resp.WhichOneof("event")
            if kind == "output" and resp.output.stream == common_pb2.OUTPUT_STREAM_STDOUT:
                yield resp.output.data
            elif kind == "exited" and (resp.exited.exit_code or resp.exited.signal):
                raise GatewayError(500, f"read {path!r}: cat ended with {resp.exited.exit_code}")
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, "read") from exc
