"""Run's output files: listed, capped, hashed and (optionally) streamed back.

What a guest leaves under /workspace/output is hostile input: a 15 TiB
sparse file takes it no disk and no time. So the collection is bounded:
* the listing of output/ has lower limits than ListFiles (the result is one
  message with a SHA-256 per file), and a listing past them is reported in
  ``RunResult.output_files_error`` instead of failing the run;
* each file is checked before its first byte is read: over the per-file cap,
  past what is left of the per-run cap, or sparse, it is refused and
  reported in ``RunResult.skipped_output_files``;
* a file that grows past its cap while it is read is cut there
  (``OutputFile.truncated``);
* what is not a regular file (a symlink, a FIFO) is never followed or
  opened, and is reported as skipped (NOT_REGULAR), not dropped.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from agentvm.common.errors import (
    AgentVMError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from agentvm.executor.files import Stream, WorkspaceFiles
from agentvm.v1 import executor_pb2

if TYPE_CHECKING:
    from agentvm.executor.executor import SandboxState

# Run's listing of output/: the result carries a path and a SHA-256 per file
# and must stay far below the 16 MiB message cap.
MAX_OUTPUT_ENTRIES = 10_000
MAX_OUTPUT_LIST_BYTES = 2 * 1024 * 1024

Reason = executor_pb2.OutputFileSkipReason


def run_caps(files: WorkspaceFiles, req: executor_pb2.RunRequest) -> tuple[int, int]:
    """(per-file, per-run) byte caps of a Run; INVALID_ARGUMENT above the server's."""
    per_file = files.file_cap(req.max_output_file_bytes, "max_output_file_bytes")
    high = files.owner.settings.max_output_files_bytes
    if req.max_output_files_bytes > high:
        raise InvalidArgument(
            f"max_output_files_bytes must be at most {high} (the executor's "
            f"AGENTVM_MAX_OUTPUT_FILES_BYTES), got {req.max_output_files_bytes}"
        )
    return per_file, req.max_output_files_bytes or high


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return f"file of type {stat.S_IFMT(mode):o}"


async def collect_outputs(
    files: WorkspaceFiles,
    sb: SandboxState,
    send: bool,
    caps: tuple[int, int],
    result: executor_pb2.RunResult,
) -> AsyncIterator[executor_pb2.RunResponse]:
    """FileChunk events (with ``send``); fills the output fields of ``result``."""
    per_file, budget = caps
    try:
        listing = await files.list_files(
            sb, "output", True, limit=MAX_OUTPUT_ENTRIES, max_bytes=MAX_OUTPUT_LIST_BYTES
        )
    except NotFound:
        return  # the program removed output/
    except AgentVMError as exc:
        result.output_files_error = (
            f"output files not collected: {exc.message} (Run collects at most "
            f"{MAX_OUTPUT_ENTRIES} entries and {MAX_OUTPUT_LIST_BYTES} bytes of path names "
            "under output/: leave an archive there instead)"
        )
        return

    def skip(rel: str, size: int, reason: Reason.ValueType, detail: str) -> None:
        result.skipped_output_files.add(path=rel, size_bytes=size, reason=reason, detail=detail)

    for info in listing:
        if info.is_dir:
            continue
        rel = info.path.removeprefix("output/")
        if not stat.S_ISREG(info.mode):
            skip(
                rel,
                info.size_bytes,
                Reason.OUTPUT_FILE_SKIP_REASON_NOT_REGULAR,
                f"a {file_kind(info.mode)}, not a regular file: Run returns regular files "
                "only (copy the content into a file under output/ to get it back)",
            )
            continue
        size = info.size_bytes
        if size > per_file:
            skip(
                rel,
                size,
                Reason.OUTPUT_FILE_SKIP_REASON_TOO_LARGE,
                f"{size} bytes, over the per-file cap of {per_file} (max_output_file_bytes)",
            )
            continue
        if size > budget:
            skip(
                rel,
                size,
                Reason.OUTPUT_FILE_SKIP_REASON_RUN_CAP,
                f"{size} bytes, over the {budget} bytes left of the per-run cap "
                "(max_output_files_bytes)",
            )
            continue
        state = Stream()
        chunks = files.stream(sb, info.path, min(per_file, budget), state)
        try:
            first = await anext(chunks, None)
        except (ResourceExhausted, FailedPrecondition, NotFound, InvalidArgument) as exc:
            # Refused before its first byte (the size or holes it has now, or gone).
            if isinstance(exc, FailedPrecondition):
                reason = Reason.OUTPUT_FILE_SKIP_REASON_SPARSE
            elif isinstance(exc, ResourceExhausted):
                reason = Reason.OUTPUT_FILE_SKIP_REASON_TOO_LARGE
            else:
                reason = Reason.OUTPUT_FILE_SKIP_REASON_UNREADABLE
            skip(rel, size, reason, exc.message)
            await chunks.aclose()
            continue
        try:
            item = first
            while item is not None:
                if send:
                    yield executor_pb2.RunResponse(
                        file=executor_pb2.FileChunk(
                            path=rel, offset=state.size - len(item[0]), data=item[0]
                        )
                    )
                item = await anext(chunks, None)
        finally:
            await chunks.aclose()
        budget -= state.size
        if send:
            yield executor_pb2.RunResponse(
                file=executor_pb2.FileChunk(path=rel, offset=state.size, last=True)
            )
        result.output_files.add(
            path=rel, size_bytes=state.size, sha256=state.sha256, truncated=state.over
        )
