"""The one-shot ``arun``: a fresh VM runs one program and is destroyed, whatever happens.

Output files come back either in memory (``download_outputs``: the run's
whole output, up to ``max_output_files_bytes``) or streamed to a local
directory (``outputs_dir``: written as they arrive, never held in memory).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

from agent_vm._async import (
    Callback,
    CommandResult,
    EgressRecord,
    Network,
    NetworkPolicy,
    Profile,
    _channel,
    _local_file,
    _Output,
    _program,
    _spec,
    default_address,
)
from agent_vm._calls import count, seconds, str_map, text
from agent_vm._calls import data as bytes_of
from agent_vm.errors import AgentVMError, ArgumentTypeError, DataLossError, from_rpc
from agentvm.v1 import executor_pb2, executor_pb2_grpc
from agentvm_guest.paths import AtomicWriter, PathError

# not_saved: read, but it could not be written under ``outputs_dir`` (e.g. a
# directory of that name is there).
# not_regular: a symlink, FIFO, socket or device (never followed or opened).
SkipReason = Literal[
    "too_large", "run_cap", "sparse", "unreadable", "not_regular", "not_saved", "unknown"
]
_REASONS: dict[int, SkipReason] = {
    executor_pb2.OUTPUT_FILE_SKIP_REASON_TOO_LARGE: "too_large",
    executor_pb2.OUTPUT_FILE_SKIP_REASON_RUN_CAP: "run_cap",
    executor_pb2.OUTPUT_FILE_SKIP_REASON_SPARSE: "sparse",
    executor_pb2.OUTPUT_FILE_SKIP_REASON_UNREADABLE: "unreadable",
    executor_pb2.OUTPUT_FILE_SKIP_REASON_NOT_REGULAR: "not_regular",
}


@dataclass(frozen=True)
class OutputFile:
    path: str
    size_bytes: int
    sha256: str
    # The file grew past its cap while it was read: only size_bytes came back.
    truncated: bool = False


@dataclass(frozen=True)
class SkippedOutputFile:
    """An output file the executor refused before reading it (caps, sparse, not regular)."""

    path: str
    size_bytes: int
    reason: SkipReason
    detail: str


@dataclass(frozen=True)
class RunResult(CommandResult):
    """A one-shot run: the command's result plus the VM it ran in and its output files."""

    boot_s: float = 0.0
    vm_name: str = ""
    output_files: tuple[OutputFile, ...] = ()
    # Content of output files, when asked for with ``download_outputs``.
    output_contents: Mapping[str, bytes] = field(default_factory=dict)
    # Every DNS query and connection attempt of the run (nat-filtered).
    network_log: tuple[EgressRecord, ...] = ()
    # Output files refused before they were read (over a cap, sparse, not regular).
    skipped_output_files: tuple[SkippedOutputFile, ...] = ()
    # Set when output/ could not be listed at all (too many entries, too deep).
    output_files_error: str = ""


class _Saver:
    """Writes FileChunk events into a local directory as they arrive (atomically per file)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        dest.mkdir(parents=True, exist_ok=True)
        self.writer: AtomicWriter | None = None
        self.sha256: dict[str, str] = {}
        # Files that could not be written here: (path, why).
        self.failed: dict[str, str] = {}

    def add(self, chunk: executor_pb2.FileChunk) -> None:
        if chunk.path in self.failed:
            return
        if self.writer is not None and self.writer.path != chunk.path:
            self.abort()
            raise DataLossError(f"output {chunk.path!r} began before the last ended")
        if self.writer is None:
            try:
                self.writer = AtomicWriter(str(self.dest), chunk.path)
            except (PathError, OSError) as exc:
                self.failed[chunk.path] = f"not saved under {self.dest}: {exc}"
                return
        if chunk.offset != self.writer.size:
            self.abort()
            raise DataLossError(f"output {chunk.path!r} arrived out of order")
        try:
            if chunk.data:
                self.writer.write(chunk.data)
            if chunk.last:
                self.writer.commit("")
                self.sha256[chunk.path] = self.writer.sha256
                self.writer = None
        except OSError as exc:  # e.g. a directory of that name is there; the disk is full
            self.abort()
            self.failed[chunk.path] = f"not saved under {self.dest}: {exc}"

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def check(self, files: Sequence[OutputFile]) -> None:
        """DataLoss when a saved file does not hash to what the executor read."""
        for f in files:
            got = self.sha256.get(f.path)
            if got is not None and got != f.sha256:
                raise DataLossError(f"output {f.path!r}: checksum mismatch in transfer")


async def arun(
    cmd: str | Sequence[str] | None = None,
    *,
    code: str | None = None,
    language: str = "python",
    args: Sequence[str] = (),
    inputs: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | str = b"",
    timeout: float = 300.0,
    profile: Profile = "standard",
    network: Network = "nat-filtered",
    policy: NetworkPolicy | None = None,
    cpus: int = 0,
    memory_mib: int = 0,
    download_outputs: bool = False,
    on_stdout: Callback | None = None,
    on_stderr: Callback | None = None,
    max_output_bytes: int = 0,
    address: str | None = None,
    outputs_dir: str | os.PathLike[str] | None = None,
    max_output_file_bytes: int = 0,
    max_output_files_bytes: int = 0,
    cwd: str = "",
    bridge: str | None = None,
    image: str | None = None,
) -> RunResult:
    """One shot: a fresh VM runs the program and is destroyed, whatever happens.

    ``inputs`` maps paths under /workspace/input to content (bytes, str or a
    local path). With ``download_outputs`` the files the program left under
    /workspace/output come back in ``result.output_contents``; with
    ``outputs_dir`` they are written there as they arrive instead (nothing is
    held in memory). Output files over ``max_output_file_bytes`` (or past
    ``max_output_files_bytes`` for the run; 0: the executor's caps), and sparse
    ones, are not read, nor are symlinks, FIFOs and other files that are not
    regular: see ``result.skipped_output_files``. ``cwd`` is the program's
    working directory in the guest (absolute; default /workspace/work, in a
    named image the image's);
    ``max_output_bytes`` caps each of stdout and stderr (0: 16 MiB), and
    ``result.stdout_truncated``/``stderr_truncated`` say when it cut them.
    ``network="bridge"`` needs ``bridge``, the name of an existing host bridge.
    ``image`` runs the program in a named image (a name, "name:tag" or an id,
    as `agent-vm image list` shows it; None or "default": the built-in
    image); there ``cwd`` defaults to the image's working directory (else "/"),
    and with neither ``cmd`` nor ``code`` the image's default command runs
    (its Entrypoint + Cmd, or the spec's ``cmd``).

    Raises ArgumentTypeError / InvalidArgumentError for bad arguments and
    NotFoundError for a missing local input file (before anything is sent),
    NotFoundError when there is no such image, FailedPreconditionError when
    the host cannot make such a VM (e.g. no bridge of that name),
    UnavailableError when the executor is down.
    """
    addr = address or default_address()
    files = []
    if inputs is not None and not isinstance(inputs, Mapping):
        raise ArgumentTypeError(
            f"inputs must be a mapping of input/ paths to content, got {type(inputs).__name__}"
        )
    for path, content in (inputs or {}).items():
        text("each key of inputs", path)
        if isinstance(content, (str, bytes)):
            data = content.encode() if isinstance(content, str) else content
            mode = 0o644
        elif not isinstance(content, os.PathLike):
            raise ArgumentTypeError(
                f"inputs[{path!r}] must be bytes, str or a local path (pathlib.Path), "
                f"got {type(content).__name__}"
            )
        else:
            src = _local_file(content)
            data = src.read_bytes()
            mode = src.stat().st_mode & 0o777
        files.append(executor_pb2.InputFile(path=path, content=data, mode=mode))
    req = executor_pb2.RunRequest(
        spec=_spec(profile, network, cpus, memory_mib, None, "auto", None, policy, bridge, image),
        program=_program(cmd, code, language, args, image_default=bool(image)),
        inputs=files,
        env=str_map("env", env),
        stdin=bytes_of("stdin", stdin),
        max_output_bytes=count("max_output_bytes", max_output_bytes),
        return_output_files=download_outputs or outputs_dir is not None,
        max_output_file_bytes=count("max_output_file_bytes", max_output_file_bytes),
        max_output_files_bytes=count("max_output_files_bytes", max_output_files_bytes),
        cwd=text("cwd", cwd),
    )
    req.timeout.FromNanoseconds(int(seconds("timeout", timeout) * 1e9))
    out = _Output(on_stdout, on_stderr)
    saver = _Saver(Path(outputs_dir)) if outputs_dir is not None else None
    contents: dict[str, bytearray] = {}
    result: RunResult | None = None
    try:
        async with _channel(addr) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            try:
                async for ev in stub.Run(req, timeout=timeout + 600):
                    kind = ev.WhichOneof("event")
                    if kind == "output":
                        out.add(ev.output)
                    elif kind == "file":
                        if saver is not None:
                            saver.add(ev.file)
                        else:
                            contents.setdefault(ev.file.path, bytearray()).extend(ev.file.data)
                    elif kind == "result" and result is None:
                        result = _result(out, ev.result, contents)
            except grpc.aio.AioRpcError as exc:
                if result is None:
                    raise from_rpc(exc, addr) from exc
    finally:
        if saver is not None:
            saver.abort()
    if result is None:
        raise AgentVMError("the executor ended the run without a result", "UNKNOWN")
    if saver is not None:
        saver.check(result.output_files)
        if saver.failed:
            result = dataclasses.replace(
                result,
                skipped_output_files=result.skipped_output_files
                + tuple(
                    SkippedOutputFile(path, 0, "not_saved", why)
                    for path, why in saver.failed.items()
                ),
            )
    return result


def _result(
    out: _Output, r: executor_pb2.RunResult, contents: Mapping[str, bytearray]
) -> RunResult:
    base = out.result(r.status)
    return RunResult(
        **{f: getattr(base, f) for f in CommandResult.__dataclass_fields__},
        boot_s=r.boot_duration.ToNanoseconds() / 1e9,
        vm_name=r.vm_name,
        output_files=tuple(
            OutputFile(o.path, o.size_bytes, o.sha256, o.truncated) for o in r.output_files
        ),
        output_contents={k: bytes(v) for k, v in contents.items()},
        network_log=tuple(EgressRecord.from_proto(x) for x in r.network_log),
        skipped_output_files=tuple(
            SkippedOutputFile(s.path, s.size_bytes, _REASONS.get(s.reason, "unknown"), s.detail)
            for s in r.skipped_output_files
        ),
        output_files_error=r.output_files_error,
    )
