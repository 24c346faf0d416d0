"""Output files and reads are capped on the host (issue 22, item 4), in process.

The executor's file code runs against a real shared-workspace directory (the
host reads it itself) and against scripted guest agents (API workspace: the
guest may lie about sizes and send more than it may). The real-VM versions
are in tests/integration/test_hostile_files.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

from agent_vm._oneshot import OutputFile, _Saver
from agent_vm.errors import AgentVMError as ClientError
from agentvm.common.config import Settings
from agentvm.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from agentvm.executor.executor import AgentExecutor, SandboxState
from agentvm.executor.outputs import MAX_OUTPUT_ENTRIES, collect_outputs, run_caps
from agentvm.v1 import common_pb2, executor_pb2, guest_agent_pb2

T = TypeVar("T")
MiB = 2**20
Reason = executor_pb2.OutputFileSkipReason


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def executor(**caps: int) -> AgentExecutor:
    return AgentExecutor(Settings(**caps), cast(Any, None))  # type: ignore[arg-type]


class Sandbox(SandboxState):
    stub: Any = None

    @property
    def agent(self) -> Any:
        return self.stub


def sandbox(root: Path | None = None, stub: Any = None) -> Sandbox:
    sb = Sandbox(
        id="sb-caps",
        spec=executor_pb2.SandboxSpec(),
        vm=common_pb2.VM(name="vm-caps", workspace_path=str(root or "")),
        workspace_mode=(
            common_pb2.WORKSPACE_MODE_SHARED if root is not None else common_pb2.WORKSPACE_MODE_API
        ),
        created_at=time.time(),
        expires_at=time.time() + 600,
        boot_duration=0.0,
        channel=cast(Any, None),
    )
    sb.stub = stub
    return sb


async def collect(
    ex: AgentExecutor, sb: SandboxState, req: executor_pb2.RunRequest
) -> tuple[executor_pb2.RunResult, dict[str, bytes]]:
    result = executor_pb2.RunResult()
    sent: dict[str, bytearray] = {}
    async for ev in collect_outputs(ex.files, sb, True, run_caps(ex.files, req), result):
        buf = sent.setdefault(ev.file.path, bytearray())
        assert ev.file.offset == len(buf)
        buf.extend(ev.file.data)
    return result, {k: bytes(v) for k, v in sent.items()}


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_sparse_and_oversized_outputs_are_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    """The reported attack: `truncate -s 15T output/result.bin` streamed 15 TiB of zeros."""
    out = tmp_path / "output"
    sparse(out / "result.bin", 15 * 2**40)
    (out / "big.bin").write_bytes(b"b" * (3 * MiB))
    (out / "a.txt").write_bytes(b"hello")
    (out / "sub").mkdir()
    (out / "sub" / "c.bin").write_bytes(b"c" * (2 * MiB))
    (out / "sub" / "d.bin").write_bytes(b"d" * (2 * MiB))
    ex = executor(max_output_file_bytes=4 * MiB, max_output_files_bytes=8 * MiB)
    req = executor_pb2.RunRequest(max_output_file_bytes=2 * MiB + 1)
    tracemalloc.start()
    try:
        result, sent = run(collect(ex, sandbox(tmp_path), req))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB
    skipped = {s.path: s.reason for s in result.skipped_output_files}
    assert skipped == {
        "big.bin": Reason.OUTPUT_FILE_SKIP_REASON_TOO_LARGE,
        "result.bin": Reason.OUTPUT_FILE_SKIP_REASON_TOO_LARGE,
    }
    assert "max_output_file_bytes" in result.skipped_output_files[0].detail
    assert sent == {"a.txt": b"hello", "sub/c.bin": b"c" * 2 * MiB, "sub/d.bin": b"d" * 2 * MiB}
    files = {f.path: f for f in result.output_files}
    assert files["sub/c.bin"].sha256 == hashlib.sha256(b"c" * 2 * MiB).hexdigest()
    assert not any(f.truncated for f in result.output_files)
    # Under the per-file cap but sparse: refused as sparse, never read.
    req = executor_pb2.RunRequest()
    ex = executor(max_output_file_bytes=2**50, max_output_files_bytes=2**50)
    result, sent = run(collect(ex, sandbox(tmp_path), req))
    assert {s.path: s.reason for s in result.skipped_output_files} == {
        "result.bin": Reason.OUTPUT_FILE_SKIP_REASON_SPARSE
    }
    assert "result.bin" not in sent


def test_the_run_cap_refuses_what_would_pass_it(tmp_path: Path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    for name in ("1", "2", "3"):
        (out / name).write_bytes(name.encode() * MiB)
    ex = executor()
    req = executor_pb2.RunRequest(max_output_files_bytes=2 * MiB + 10)
    result, sent = run(collect(ex, sandbox(tmp_path), req))
    assert sorted(sent) == ["1", "2"]
    [skip] = result.skipped_output_files
    assert (skip.path, skip.reason) == ("3", Reason.OUTPUT_FILE_SKIP_REASON_RUN_CAP)
    assert "max_output_files_bytes" in skip.detail


def test_symlinks_and_fifos_in_output_are_reported_not_dropped(tmp_path: Path) -> None:
    """Run returns regular files only; anything else is named with why (issue 23 item 2)."""
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    (out / "real.txt").write_text("real")
    (out / "link").symlink_to("/etc/passwd")
    os.mkfifo(out / "sub" / "pipe")
    result, sent = run(collect(executor(), sandbox(tmp_path), executor_pb2.RunRequest()))
    assert sent == {"real.txt": b"real"}
    skipped = {s.path: (s.reason, s.detail) for s in result.skipped_output_files}
    assert set(skipped) == {"link", "sub/pipe"}
    assert {r for r, _ in skipped.values()} == {Reason.OUTPUT_FILE_SKIP_REASON_NOT_REGULAR}
    assert "symlink" in skipped["link"][1]
    assert "FIFO" in skipped["sub/pipe"][1]
    assert "regular files only" in skipped["link"][1]


def test_callers_may_lower_the_caps_but_not_raise_them() -> None:
    ex = executor(max_output_file_bytes=MiB, max_output_files_bytes=2 * MiB)
    assert run_caps(ex.files, executor_pb2.RunRequest()) == (MiB, 2 * MiB)
    assert run_caps(ex.files, executor_pb2.RunRequest(max_output_file_bytes=10)) == (10, 2 * MiB)
    with pytest.raises(InvalidArgument, match="AGENTVM_MAX_OUTPUT_FILE_BYTES"):
        run_caps(ex.files, executor_pb2.RunRequest(max_output_file_bytes=MiB + 1))
    with pytest.raises(InvalidArgument, match="AGENTVM_MAX_OUTPUT_FILES_BYTES"):
        run_caps(ex.files, executor_pb2.RunRequest(max_output_files_bytes=2 * MiB + 1))


def test_too_many_output_files_are_reported_not_listed(tmp_path: Path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    for i in range(MAX_OUTPUT_ENTRIES + 1):
        (out / str(i)).touch()
    result, sent = run(collect(executor(), sandbox(tmp_path), executor_pb2.RunRequest()))
    assert sent == {}
    assert not result.output_files
    assert f"more than {MAX_OUTPUT_ENTRIES} entries" in result.output_files_error


def test_read_file_refuses_sparse_and_oversized_files(tmp_path: Path) -> None:
    sparse(tmp_path / "huge", 15 * 2**40)
    (tmp_path / "f").write_bytes(b"x" * 1000)
    sb = sandbox(tmp_path)

    async def read(ex: AgentExecutor, path: str, max_bytes: int = 0) -> bytes:
        return b"".join([d async for d, _, _ in ex.read_file(sb, path, max_bytes)])

    small = executor(max_output_file_bytes=MiB)
    with pytest.raises(ResourceExhausted, match="over the limit of 1048576 bytes"):
        run(read(small, "huge"))
    with pytest.raises(ResourceExhausted, match="over the limit of 999 bytes"):
        run(read(small, "f", 999))
    with pytest.raises(InvalidArgument, match="at most 1048576"):
        run(read(small, "f", MiB + 1))
    assert run(read(small, "f", 1000)) == b"x" * 1000
    large = executor(max_output_file_bytes=2**50)
    with pytest.raises(FailedPrecondition, match="is sparse"):
        run(read(large, "huge"))


# -- API workspace: the guest answers ------------------------------------------------------
class Call:
    """A ReadFile call of a scripted guest: chunks, then an error or the end."""

    def __init__(self, chunks: AsyncIterator[bytes], error: grpc.StatusCode | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.cancelled = False
        self.sent = 0

    def cancel(self) -> None:
        self.cancelled = True

    async def _iter(self) -> AsyncIterator[guest_agent_pb2.GuestAgentServiceReadFileResponse]:
        if self.error is not None:
            raise grpc.aio.AioRpcError(
                self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused: is sparse", None
            )
        async for c in self.chunks:
            self.sent += len(c)
            yield guest_agent_pb2.GuestAgentServiceReadFileResponse(chunk=c, size_bytes=1)

    def __aiter__(self) -> AsyncIterator[guest_agent_pb2.GuestAgentServiceReadFileResponse]:
        return self._iter()


class LyingGuest:
    """Lists ``output/`` with small sizes, then streams without end (or refuses)."""

    def __init__(self, names: list[str], error: grpc.StatusCode | None = None) -> None:
        self.names = names
        self.error = error
        self.calls: list[Call] = []
        self.asked: list[Any] = []

    async def ListFiles(self, req: Any, timeout: float | None = None) -> Any:
        self.asked.append(req)
        return guest_agent_pb2.GuestAgentServiceListFilesResponse(
            files=[
                common_pb2.FileInfo(path=f"output/{n}", size_bytes=10, mode=0o100644)
                for n in self.names
            ]
        )

    def ReadFile(self, req: Any, timeout: float | None = None) -> Call:
        self.asked.append(req)

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"z" * 65536

        call = Call(endless(), self.error)
        self.calls.append(call)
        return call


def test_a_guest_that_sends_more_than_it_listed_is_cut_at_the_cap() -> None:
    guest = LyingGuest(["a", "b"])
    ex = executor(max_output_file_bytes=MiB, max_output_files_bytes=MiB + MiB // 2)
    result, sent = run(collect(ex, sandbox(stub=guest), executor_pb2.RunRequest()))
    assert [len(sent["a"]), len(sent["b"])] == [MiB, MiB // 2]
    assert [(f.path, f.size_bytes, f.truncated) for f in result.output_files] == [
        ("a", MiB, True),
        ("b", MiB // 2, True),
    ]
    assert all(c.cancelled for c in guest.calls)
    assert all(c.sent <= MiB + 65536 for c in guest.calls)
    # The guest was told the caps, and to refuse sparse files.
    reads = [
        r for r in guest.asked if isinstance(r, guest_agent_pb2.GuestAgentServiceReadFileRequest)
    ]
    assert [(r.max_bytes, r.refuse_sparse) for r in reads] == [(MiB, True), (MiB // 2, True)]
    listing = guest.asked[0]
    assert (listing.max_entries, listing.max_bytes) == (MAX_OUTPUT_ENTRIES, 2 * MiB)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.FAILED_PRECONDITION, Reason.OUTPUT_FILE_SKIP_REASON_SPARSE),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.OUTPUT_FILE_SKIP_REASON_TOO_LARGE),
    ],
)
def test_a_guest_refusal_is_reported_as_a_skipped_file(
    code: grpc.StatusCode, reason: Reason.ValueType
) -> None:
    guest = LyingGuest(["result.bin"], error=code)
    result, sent = run(collect(executor(), sandbox(stub=guest), executor_pb2.RunRequest()))
    assert sent == {}
    assert [(s.path, s.reason) for s in result.skipped_output_files] == [("result.bin", reason)]


def test_a_guest_listing_past_the_limits_is_refused() -> None:
    guest = LyingGuest([str(i) for i in range(50)])

    async def body() -> None:
        await ex.files.list_files(sandbox(stub=guest), "output", True, limit=10)

    ex = executor()
    with pytest.raises(ResourceExhausted, match="past the listing limits"):
        run(body())


# -- the client saves outputs to disk as they arrive -----------------------------------------
def chunk(path: str, offset: int, data: bytes = b"", last: bool = False) -> executor_pb2.FileChunk:
    return executor_pb2.FileChunk(path=path, offset=offset, data=data, last=last)


def test_client_streams_outputs_to_disk(tmp_path: Path) -> None:
    saver = _Saver(tmp_path / "out")
    saver.add(chunk("a/b.txt", 0, b"hel"))
    saver.add(chunk("a/b.txt", 3, b"lo"))
    saver.add(chunk("a/b.txt", 5, last=True))
    (tmp_path / "out" / "dir").mkdir()
    saver.add(chunk("dir", 0, b"x"))  # a directory is there: not saved, reported
    saver.add(chunk("dir", 1, last=True))
    saver.add(chunk("empty", 0, last=True))
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"hello"
    assert (tmp_path / "out" / "empty").read_bytes() == b""
    assert list(saver.failed) == ["dir"]
    saver.check([OutputFile("a/b.txt", 5, hashlib.sha256(b"hello").hexdigest())])
    with pytest.raises(ClientError, match="checksum mismatch"):
        saver.check([OutputFile("a/b.txt", 5, "0" * 64)])
    with pytest.raises(ClientError, match="out of order"):
        saver.add(chunk("c", 7, b"x"))
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".agentvm-tmp-")]
