"""The asyncio client: ``AsyncSandbox`` and the one-shot ``arun``. The sync API wraps this."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import grpc

from agent_vm.errors import (
    AgentVMError,
    CommandExitError,
    CommandTimeoutError,
    FailedPreconditionError,
    NotFoundError,
    from_rpc,
)
from agentvm.common import tls
from agentvm.common.auth import aio_token_interceptors, client_token
from agentvm.common.config import DEFAULT_TLS_DIR
from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc

DEFAULT_ADDRESS = "unix:/run/agent-vm/executor.sock"
CHUNK = 64 * 1024
Callback = Callable[[str], object]
Profile = Literal["light", "standard", "intensive"]
Network = Literal["isolated", "nat-filtered", "bridge"]
Workspace = Literal["auto", "shared", "api"]

_PROFILES = {
    "light": common_pb2.RESOURCE_PROFILE_LIGHT,
    "standard": common_pb2.RESOURCE_PROFILE_STANDARD,
    "intensive": common_pb2.RESOURCE_PROFILE_INTENSIVE,
}
_NETWORKS = {
    "isolated": common_pb2.NETWORK_MODE_ISOLATED,
    "nat-filtered": common_pb2.NETWORK_MODE_NAT_FILTERED,
    "bridge": common_pb2.NETWORK_MODE_BRIDGE,
}
_WORKSPACES = {
    "auto": common_pb2.WORKSPACE_MODE_UNSPECIFIED,
    "shared": common_pb2.WORKSPACE_MODE_SHARED,
    "api": common_pb2.WORKSPACE_MODE_API,
}

T = TypeVar("T")
P = ParamSpec("P")


def default_address() -> str:
    return os.environ.get("AGENTVM_EXECUTOR_ADDR", DEFAULT_ADDRESS)


def _trace_interceptors() -> list[Any] | None:
    """OpenTelemetry client interceptors when the caller's process set up tracing.

    The calls then become client spans under the caller's current span, and the
    trace continues through every agent-vm service.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    return list(aio_client_interceptors(tracer_provider=provider))  # type: ignore[no-untyped-call]


def _channel(address: str) -> grpc.aio.Channel:
    """A channel to the executor, sending the installation's token (AGENTVM_TOKEN or
    AGENTVM_TOKEN_FILE) when this process has one, over mutual TLS with the
    installation's client certificate unless AGENTVM_TLS=off (AGENTVM_TLS_DIR, or
    AGENTVM_TLS_CA/CERT/KEY)."""
    interceptors: list[Any] = list(_trace_interceptors() or ())
    token = client_token()
    if token is not None:
        interceptors += aio_token_interceptors(token)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
        ("grpc.enable_http_proxy", 0),
    ]
    try:
        files = tls.for_identity(
            os.environ.get("AGENTVM_TLS", "mutual"),
            Path(os.environ.get("AGENTVM_TLS_DIR", DEFAULT_TLS_DIR)),
            tls.CLIENT,
        )
        credentials = None if files is None else tls.channel_credentials(files)
    except tls.TLSError as exc:
        raise FailedPreconditionError(str(exc)) from None
    if credentials is None:
        return grpc.aio.insecure_channel(
            address, options=options, interceptors=interceptors or None
        )
    return grpc.aio.secure_channel(
        address,
        credentials,
        options=[*options, *tls.target_options("executor")],
        interceptors=interceptors or None,
    )


@dataclass(frozen=True)
class CommandResult:
    """How a command ended, with everything it printed (up to the output cap)."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    timed_out: bool
    duration_s: float
    signal: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exec_id: str = ""

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> CommandResult:
        """Return self, or raise CommandTimeoutError / CommandExitError (carrying this result)."""
        if self.timed_out:
            raise CommandTimeoutError(f"the command timed out after {self.duration_s:.1f} s")
        if self.exit_code != 0:
            raise CommandExitError(
                f"the command exited with {self.exit_code}: {self.stderr[-500:]}", self
            )
        return self


@dataclass(frozen=True)
class EgressRecord:
    """One DNS query or connection attempt of a sandbox, and what the network did."""

    time: float
    kind: Literal["dns", "connect"]
    # The name queried (dns), or the allowed name the address came from (connect).
    name: str
    address: str
    port: int
    # "tcp"/"udp"/... (connect) or the query type (dns).
    protocol: str
    verdict: Literal["allowed", "denied"]
    reason: str

    @classmethod
    def from_proto(cls, r: common_pb2.EgressRecord) -> EgressRecord:
        return cls(
            time=r.time.ToNanoseconds() / 1e9,
            kind="dns" if r.kind == common_pb2.EGRESS_KIND_DNS else "connect",
            name=r.name,
            address=r.address,
            port=r.port,
            protocol=r.protocol,
            verdict="allowed" if r.verdict == common_pb2.EGRESS_VERDICT_ALLOWED else "denied",
            reason=r.reason,
        )


@dataclass(frozen=True)
class FileInfo:
    path: str
    size_bytes: int
    mode: int
    is_dir: bool


def _translate(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Translate gRPC errors of an async method into AgentVMError subclasses."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, getattr(args[0], "_address", DEFAULT_ADDRESS)) from exc

    return wrapper


def _local_file(local: str | os.PathLike[str]) -> Path:
    """``local`` as a Path; NotFoundError before anything is sent when it is no file."""
    src = Path(local)
    if not src.is_file():
        raise NotFoundError(f"local file {src} does not exist: pass the path of an existing file")
    return src


def _program(
    cmd: str | Sequence[str] | None, code: str | None, language: str, args: Sequence[str]
) -> common_pb2.Program:
    if (cmd is None) == (code is None):
        raise AgentVMError("give either a command or code=", "INVALID_ARGUMENT")
    if code is not None:
        lang = {
            "python": common_pb2.CODE_LANGUAGE_PYTHON,
            "shell": common_pb2.CODE_LANGUAGE_SHELL,
        }.get(language)
        if lang is None:
            raise AgentVMError(
                f"language {language!r}: use 'python' or 'shell'", "INVALID_ARGUMENT"
            )
        return common_pb2.Program(code=common_pb2.Code(language=lang, source=code, args=list(args)))
    if isinstance(cmd, str):
        return common_pb2.Program(
            code=common_pb2.Code(
                language=common_pb2.CODE_LANGUAGE_SHELL, source=cmd, args=list(args)
            )
        )
    if cmd is None:  # pragma: no cover - excluded above
        raise AgentVMError("give a command", "INVALID_ARGUMENT")
    return common_pb2.Program(argv=common_pb2.Argv(args=[*cmd, *args]))


@dataclass(frozen=True)
class NetworkPolicy:
    """What a nat-filtered sandbox may reach; an empty field takes the server's default.

    ``allow_domains``: names it may resolve and connect to ("pypi.org",
    "*.github.com"); ``allow_cidrs``: address ranges; ``ports``: TCP ports
    (server default 80, 443, 22).
    """

    allow_domains: Sequence[str] = ()
    allow_cidrs: Sequence[str] = ()
    ports: Sequence[int] = ()

    def to_proto(self) -> common_pb2.NetworkPolicy:
        return common_pb2.NetworkPolicy(
            allow_domains=list(self.allow_domains),
            allow_cidrs=list(self.allow_cidrs),
            ports=list(self.ports),
        )


def _spec(
    profile: Profile,
    network: Network,
    cpus: int,
    memory_mib: int,
    lifetime: float | None,
    workspace: Workspace,
    labels: Mapping[str, str] | None,
    policy: NetworkPolicy | None = None,
) -> executor_pb2.SandboxSpec:
    for name, value, table in (
        ("profile", profile, _PROFILES),
        ("network", network, _NETWORKS),
        ("workspace", workspace, _WORKSPACES),
    ):
        if value not in table:
            raise AgentVMError(
                f"{name}={value!r}: use one of {', '.join(table)}", "INVALID_ARGUMENT"
            )
    if policy is not None and network != "nat-filtered":
        raise AgentVMError(
            f"a network policy needs network='nat-filtered', not {network!r}", "INVALID_ARGUMENT"
        )
    spec = executor_pb2.SandboxSpec(
        profile=_PROFILES[profile],
        network_mode=_NETWORKS[network],
        network_policy=policy.to_proto() if policy is not None else None,
        resources=common_pb2.Resources(vcpus=cpus, memory_mib=memory_mib),
        workspace_mode=_WORKSPACES[workspace],
        labels=dict(labels or {}),
    )
    if lifetime is not None:
        spec.lifetime.FromNanoseconds(int(lifetime * 1e9))
    return spec


class _Output:
    """Collects a command's output and feeds the callbacks."""

    def __init__(self, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self._cb = {
            common_pb2.OUTPUT_STREAM_STDOUT: on_stdout,
            common_pb2.OUTPUT_STREAM_STDERR: on_stderr,
        }

    def add(self, chunk: common_pb2.OutputChunk) -> None:
        (self.out if chunk.stream == common_pb2.OUTPUT_STREAM_STDOUT else self.err).extend(
            chunk.data
        )
        cb = self._cb.get(chunk.stream)
        if cb is not None:
            cb(chunk.data.decode("utf-8", "replace"))

    def result(self, status: common_pb2.ExitStatus, exec_id: str = "") -> CommandResult:
        return CommandResult(
            exit_code=status.exit_code,
            stdout_bytes=bytes(self.out),
            stderr_bytes=bytes(self.err),
            timed_out=status.timed_out,
            duration_s=status.duration.ToNanoseconds() / 1e9,
            signal=status.signal,
            stdout_truncated=status.stdout_truncated,
            stderr_truncated=status.stderr_truncated,
            exec_id=exec_id,
        )


class AsyncCommandHandle:
    """A command running in the background: wait for it, kill it, feed its stdin."""

    def __init__(self, sandbox: AsyncSandbox, exec_id: str, task: Any) -> None:
        self._sandbox = sandbox
        self.exec_id = exec_id
        self._task = task

    async def wait(self) -> CommandResult:
        result: CommandResult = await self._task
        return result

    async def kill(self, signal: int = 9) -> None:
        """Send ``signal`` (default SIGKILL: the whole process tree dies)."""
        await self._sandbox._signal(self.exec_id, signal)

    async def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        await self._sandbox._write_stdin(self.exec_id, data, eof)


class AsyncFiles:
    """Files under the sandbox's /workspace (paths relative to it)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @property
    def _address(self) -> str:
        return self._sb._address

    @_translate
    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        """Write ``data`` to ``path`` (e.g. "input/task.py"); returns the size written."""
        raw = data.encode() if isinstance(data, str) else data

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), CHUNK):
                yield raw[i : i + CHUNK]

        return await self._write_stream(path, mode, chunks(), hashlib.sha256(raw).hexdigest())

    @_translate
    async def upload(
        self, local: str | os.PathLike[str], path: str, *, mode: int | None = None
    ) -> int:
        """Stream a local file to ``path`` (any size; verified with SHA-256)."""
        src = _local_file(local)
        h = hashlib.sha256()

        async def chunks() -> AsyncIterator[bytes]:
            with src.open("rb") as fh:
                while data := fh.read(CHUNK):
                    h.update(data)
                    yield data

        return await self._write_stream(
            path, mode if mode is not None else src.stat().st_mode & 0o777, chunks(), h
        )

    async def _write_stream(
        self, path: str, mode: int, chunks: AsyncIterator[bytes], digest: Any
    ) -> int:
        sid = self._sb.id

        async def requests() -> AsyncIterator[executor_pb2.WriteFileRequest]:
            yield executor_pb2.WriteFileRequest(sandbox_id=sid, path=path, mode=mode)
            async for data in chunks:
                yield executor_pb2.WriteFileRequest(chunk=data)
            sha = digest if isinstance(digest, str) else digest.hexdigest()
            yield executor_pb2.WriteFileRequest(sha256=sha)

        resp = await self._sb._stub.WriteFile(requests())
        return int(resp.size_bytes)

    async def _read_stream(self, path: str, max_bytes: int) -> AsyncIterator[bytes]:
        h = hashlib.sha256()
        call = self._sb._stub.ReadFile(
            executor_pb2.ReadFileRequest(sandbox_id=self._sb.id, path=path, max_bytes=max_bytes)
        )
        async for msg in call:
            if msg.chunk:
                h.update(msg.chunk)
                yield msg.chunk
            if msg.sha256 and msg.sha256 != h.hexdigest():
                raise AgentVMError(f"{path}: checksum mismatch in transfer", "DATA_LOSS")

    @_translate
    async def read(self, path: str, *, max_bytes: int = 0) -> bytes:
        """The whole content of ``path`` (use ``download`` for large files).

        Files over ``max_bytes`` (0: the executor's cap, AGENTVM_MAX_OUTPUT_FILE_BYTES)
        raise ResourceExhaustedError, sparse ones FailedPreconditionError.
        """
        buf = bytearray()
        async for data in self._read_stream(path, max_bytes):
            buf.extend(data)
        return bytes(buf)

    async def read_text(self, path: str, *, max_bytes: int = 0) -> str:
        return (await self.read(path, max_bytes=max_bytes)).decode("utf-8", "replace")

    @_translate
    async def download(
        self, path: str, local: str | os.PathLike[str], *, max_bytes: int = 0
    ) -> int:
        """Stream ``path`` to a local file (verified with SHA-256); returns its size.

        ``max_bytes`` as for ``read``.
        """
        dst = Path(local)
        tmp = dst.with_name(dst.name + f".part-{secrets.token_hex(4)}")
        size = 0
        try:
            with tmp.open("wb") as fh:
                async for data in self._read_stream(path, max_bytes):
                    fh.write(data)
                    size += len(data)
            tmp.replace(dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return size

    @_translate
    async def list(self, path: str = "", *, recursive: bool = False) -> list[FileInfo]:
        resp = await self._sb._stub.ListFiles(
            executor_pb2.ListFilesRequest(sandbox_id=self._sb.id, path=path, recursive=recursive)
        )
        return [FileInfo(f.path, f.size_bytes, f.mode, f.is_dir) for f in resp.files]

    @_translate
    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb._stub.RemoveFile(
            executor_pb2.RemoveFileRequest(sandbox_id=self._sb.id, path=path, recursive=recursive)
        )


class AsyncSandbox:
    """A VM for one agent: run commands, move files, close. Use ``await AsyncSandbox.create()``."""

    def __init__(
        self, address: str, channel: grpc.aio.Channel, sandbox: executor_pb2.Sandbox
    ) -> None:
        self._address = address
        self._channel = channel
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        self._proto = sandbox
        self.files = AsyncFiles(self)
        self._closed = False

    @property
    def id(self) -> str:
        return self._proto.id

    @property
    def vm_name(self) -> str:
        return self._proto.vm_name

    @property
    def boot_s(self) -> float:
        """Seconds from asking for the VM to its agent answering."""
        return self._proto.boot_duration.ToNanoseconds() / 1e9

    @property
    def workspace_mode(self) -> str:
        return {v: k for k, v in _WORKSPACES.items()}.get(self._proto.workspace_mode, "auto")

    @classmethod
    async def create(
        cls,
        *,
        profile: Profile = "standard",
        network: Network = "nat-filtered",
        policy: NetworkPolicy | None = None,
        cpus: int = 0,
        memory_mib: int = 0,
        lifetime: float | None = None,
        workspace: Workspace = "auto",
        labels: Mapping[str, str] | None = None,
        address: str | None = None,
        request_timeout: float = 300.0,
    ) -> AsyncSandbox:
        """Boot a sandbox VM. ``lifetime`` (seconds) bounds it even if this process dies.

        ``network``: "nat-filtered" (default: only the names of ``policy``, or
        the server's default allowlist), "isolated" (no network) or "bridge".
        """
        addr = address or default_address()
        spec = _spec(profile, network, cpus, memory_mib, lifetime, workspace, labels, policy)
        channel = _channel(addr)
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            resp = await stub.CreateSandbox(
                executor_pb2.CreateSandboxRequest(spec=spec), timeout=request_timeout
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close(grace=None)
            raise from_rpc(exc, addr) from exc
        except BaseException:
            await channel.close(grace=None)
            raise
        return cls(addr, channel, resp.sandbox)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @_translate
    async def network_log(self) -> list[EgressRecord]:
        """Every DNS query and connection attempt of this sandbox so far, with its verdict."""
        resp = await self._stub.GetNetworkLog(
            executor_pb2.GetNetworkLogRequest(sandbox_id=self.id), timeout=60
        )
        return [EgressRecord.from_proto(r) for r in resp.records]

    @_translate
    async def close(self) -> None:
        """Destroy the VM and its workspace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stub.CloseSandbox(
                executor_pb2.CloseSandboxRequest(sandbox_id=self.id), timeout=120
            )
        finally:
            await self._channel.close(grace=None)

    def _exec_request(
        self,
        cmd: str | Sequence[str] | None,
        code: str | None,
        language: str,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str,
        stdin: bytes | str,
        timeout: float,
        exec_id: str,
        keep_stdin_open: bool,
        max_output_bytes: int,
    ) -> executor_pb2.ExecRequest:
        req = executor_pb2.ExecRequest(
            sandbox_id=self.id,
            program=_program(cmd, code, language, args),
            env=dict(env or {}),
            cwd=cwd,
            stdin=stdin.encode() if isinstance(stdin, str) else stdin,
            exec_id=exec_id,
            keep_stdin_open=keep_stdin_open,
            max_output_bytes=max_output_bytes,
        )
        req.timeout.FromNanoseconds(int(timeout * 1e9))
        return req

    async def _exec(
        self, req: executor_pb2.ExecRequest, out: _Output, started: Any = None
    ) -> CommandResult:
        exec_id = req.exec_id
        result: CommandResult | None = None
        try:
            # Read to the end of the stream (not just to the exit status): the
            # call, and its trace span, then end cleanly.
            async for ev in self._stub.Exec(req, timeout=req.timeout.ToNanoseconds() / 1e9 + 60):
                kind = ev.WhichOneof("event")
                if kind == "started":
                    exec_id = ev.started.exec_id
                    if started is not None and not started.done():
                        started.set_result(exec_id)
                elif kind == "output":
                    out.add(ev.output)
                elif kind == "exited" and result is None:
                    result = out.result(ev.exited, exec_id)
        except grpc.aio.AioRpcError as exc:
            if result is not None:
                return result
            err = from_rpc(exc, self._address)
            if started is not None and not started.done():
                started.set_exception(err)
            raise err from exc
        if result is not None:
            return result
        raise AgentVMError("the executor ended the command without an exit status", "UNKNOWN")

    async def run(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        stdin: bytes | str = b"",
        timeout: float = 300.0,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        max_output_bytes: int = 0,
    ) -> CommandResult:
        """Run a shell command (str), an argv (list) or ``code=`` and wait for it.

        Output streams to ``on_stdout`` / ``on_stderr`` as it comes. The default
        working directory is /workspace/work.
        """
        req = self._exec_request(
            cmd, code, language, args, env, cwd, stdin, timeout, "", False, max_output_bytes
        )
        return await self._exec(req, _Output(on_stdout, on_stderr))

    async def start(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        stdin: bytes | str = b"",
        timeout: float = 300.0,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        keep_stdin_open: bool = True,
    ) -> AsyncCommandHandle:
        """Start a command in the background; returns a handle once it runs."""
        import asyncio

        exec_id = "ex-" + secrets.token_hex(6)
        req = self._exec_request(
            cmd, code, language, args, env, cwd, stdin, timeout, exec_id, keep_stdin_open, 0
        )
        loop = asyncio.get_running_loop()
        started: asyncio.Future[str] = loop.create_future()
        task = asyncio.ensure_future(self._exec(req, _Output(on_stdout, on_stderr), started))
        await started
        return AsyncCommandHandle(self, exec_id, task)

    @_translate
    async def _signal(self, exec_id: str, signal: int) -> None:
        await self._stub.SignalExec(
            executor_pb2.SignalExecRequest(sandbox_id=self.id, exec_id=exec_id, signal=signal),
            timeout=60,
        )

    @_translate
    async def _write_stdin(self, exec_id: str, data: bytes | str, eof: bool) -> None:
        raw = data.encode() if isinstance(data, str) else data
        await self._stub.WriteStdin(
            executor_pb2.ExecutorServiceWriteStdinRequest(
                sandbox_id=self.id, exec_id=exec_id, data=raw, eof=eof
            ),
            timeout=60,
        )
