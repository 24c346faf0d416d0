"""The asyncio client: ``AsyncSandbox`` and its command handles. The sync API wraps this.

Value types live in ``_types``, argument checks and the channel in ``_calls``,
``sb.files`` in ``_files``; the names other modules import from here stay here.
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from agent_vm._calls import (
    DEFAULT_ADDRESS,
    Output,
    channel,
    count,
    data,
    default_address,
    local_file,
    network_policy,
    program,
    sandbox_env,
    seconds,
    spec,
    str_map,
    text,
    translate,
)
from agent_vm._files import CHUNK, AsyncFiles
from agent_vm._ports import AsyncPortForward, AsyncPorts
from agent_vm._processes import AsyncProcess, AsyncProcesses
from agent_vm._types import (
    WORKSPACES,
    Callback,
    CommandResult,
    EgressRecord,
    FileInfo,
    Network,
    NetworkPolicy,
    Profile,
    SandboxInfo,
    Workspace,
)
from agent_vm.errors import AgentVMError, SandboxClosedError, from_rpc
from agentvm.v1 import executor_pb2, executor_pb2_grpc

# Names other modules (and tests) take from here.
_channel = channel
_local_file = local_file
_Output = Output
_program = program
_spec = spec
_translate = translate
__all__ = [
    "CHUNK",
    "DEFAULT_ADDRESS",
    "AsyncCommandHandle",
    "AsyncFiles",
    "AsyncPortForward",
    "AsyncPorts",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncSandbox",
    "Callback",
    "CommandResult",
    "EgressRecord",
    "FileInfo",
    "Network",
    "NetworkPolicy",
    "Profile",
    "Workspace",
    "default_address",
]


class AsyncCommandHandle:
    """A command running in the background: wait for it, kill it, feed its stdin."""

    def __init__(self, sandbox: AsyncSandbox, exec_id: str, task: Any) -> None:
        self._sandbox = sandbox
        self.exec_id = exec_id
        self._task = task

    async def wait(self) -> CommandResult:
        """Wait for the command to end; its result.

        Raises SandboxExpiredError when the sandbox's lifetime ended first, and
        the errors of ``AsyncSandbox.run``.
        """
        result: CommandResult = await self._task
        return result

    async def kill(self, signal: int = 9) -> None:
        """Send ``signal`` (default SIGKILL: the whole process tree dies).

        Raises NotFoundError when the command is not running any more.
        """
        await self._sandbox._signal(self.exec_id, count("signal", signal))

    async def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        """Write to the command's stdin (it was started with keep_stdin_open=True);
        ``eof=True`` closes it after ``data``."""
        await self._sandbox._write_stdin(self.exec_id, data, eof)


# How long close() keeps trying a CloseSandbox the executor could not answer
# (UNAVAILABLE: restarting under its supervisor, a few seconds as a rule).
CLOSE_RETRY_S = 30.0


class AsyncSandbox:
    """A VM for one agent: run commands, move files, close. Use ``await AsyncSandbox.create()``.

    Once closed (or past its lifetime), every call raises SandboxClosedError
    (SandboxExpiredError).
    """

    def __init__(
        self, address: str, channel: grpc.aio.Channel, sandbox: executor_pb2.Sandbox
    ) -> None:
        self._address = address
        self._channel = channel
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        self._proto = sandbox
        self.files = AsyncFiles(self)
        self.processes = AsyncProcesses(self)
        self.ports = AsyncPorts(self)
        self._closed = False

    @property
    def id(self) -> str:
        """The sandbox's id ("sb-...")."""
        return self._proto.id

    @property
    def vm_name(self) -> str:
        """The name of its VM (as ``agent-vm vm list`` shows it)."""
        return self._proto.vm_name

    @property
    def boot_s(self) -> float:
        """Seconds from asking for the VM to its agent answering."""
        return self._proto.boot_duration.ToNanoseconds() / 1e9

    @property
    def workspace_mode(self) -> str:
        """ "shared" or "api": how /workspace reaches the VM."""
        return {v: k for k, v in WORKSPACES.items()}.get(self._proto.workspace_mode, "auto")

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata given at create."""
        return dict(self._proto.metadata)

    @property
    def envs(self) -> dict[str, str]:
        """The default environment's non-secret variables (secret ones are never returned)."""
        return dict(self._proto.env)

    @property
    def expires_at(self) -> float:
        """When the sandbox ends (Unix time), unless ``set_timeout`` moves it."""
        return self._proto.expires_at.ToNanoseconds() / 1e9

    def info(self) -> SandboxInfo:
        """What ``AsyncSandbox.list()`` says of this sandbox, as of its last answer."""
        return SandboxInfo.from_proto(self._proto)

    def _live(self) -> None:
        if self._closed:
            raise SandboxClosedError(
                f"the sandbox {self.id} is closed: create a new one (Sandbox.create()) "
                "to run more commands or move files"
            )

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
        bridge: str | None = None,
        image: str | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        secret_envs: Mapping[str, str] | None = None,
        auto_pause: float | None = None,
    ) -> AsyncSandbox:
        """Boot a sandbox VM. ``lifetime`` (seconds; default 1 h, at most 24 h) bounds
        it even if this process dies; ``set_timeout`` moves its end later.

        ``metadata``: your key/value pairs, returned by ``list()`` and filterable
        there. ``envs``: the default environment of every command (a command's
        own ``env`` wins); ``secret_envs`` too, but their values are never
        returned and are replaced by "[secret NAME]" in the server's error
        messages, audit records and logs. ``auto_pause``: pause the sandbox (see
        ``pause()``) once no call used it for that many seconds (10 s to 24 h;
        None: never; needs ``workspace="api"``, or a pool).

        ``network``: "nat-filtered" (default: only the names of ``policy``, or
        the server's default allowlist), "isolated" (no network) or "bridge"
        (attached to the existing host bridge ``bridge``, e.g. "br0").
        ``image``: a named image the commands run in (a name, "name:tag" or an
        id, as `agent-vm image list` shows it); None or "default" is the
        built-in image. In a named image a command without ``cwd`` starts in
        the image's working directory (else "/"), and the image's environment
        and user apply.
        Raises InvalidArgumentError / ArgumentTypeError for bad arguments
        (before anything is sent), NotFoundError when there is no such image,
        FailedPreconditionError when the host cannot make such a VM (e.g. no
        bridge of that name), ResourceExhaustedError when too many sandboxes
        run, UnavailableError when the executor is down.
        """
        addr = address or default_address()
        sandbox_spec = spec(
            profile, network, cpus, memory_mib, lifetime, workspace, labels, policy, bridge, image
        )
        req = executor_pb2.CreateSandboxRequest(
            spec=sandbox_spec,
            metadata=str_map("metadata", metadata),
            env=sandbox_env(envs, secret_envs),
        )
        if auto_pause:
            req.auto_pause.FromNanoseconds(int(seconds("auto_pause", auto_pause) * 1e9))
        chan, sandbox = await cls._open(addr, "CreateSandbox", req, request_timeout)
        return cls(addr, chan, sandbox)

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, address: str | None = None, request_timeout: float = 60.0
    ) -> AsyncSandbox:
        """A handle on a running sandbox by its id (made by any client): run commands,
        reach its processes and files. ``close()`` on it closes the sandbox.
        NotFoundError when there is no such sandbox (closed, expired or unknown)."""
        addr = address or default_address()
        req = executor_pb2.GetSandboxRequest(sandbox_id=text("sandbox_id", sandbox_id))
        chan, sandbox = await cls._open(addr, "GetSandbox", req, request_timeout)
        return cls(addr, chan, sandbox)

    @staticmethod
    async def _open(
        addr: str, method: str, req: Any, request_timeout: float
    ) -> tuple[grpc.aio.Channel, executor_pb2.Sandbox]:
        """A channel to the executor and the sandbox ``method`` answered (closed on error)."""
        deadline = seconds("request_timeout", request_timeout)
        chan = _channel(addr)
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(chan)
            resp = await getattr(stub, method)(req, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            await chan.close(grace=None)
            raise from_rpc(exc, addr) from exc
        except BaseException:
            await chan.close(grace=None)
            raise
        sandbox: executor_pb2.Sandbox = resp.sandbox
        return chan, sandbox

    @classmethod
    async def list(
        cls,
        *,
        metadata: Mapping[str, str] | None = None,
        address: str | None = None,
        request_timeout: float = 60.0,
    ) -> builtins.list[SandboxInfo]:
        """The executor's running sandboxes (of every caller); with ``metadata``, those
        whose metadata holds every given pair."""
        addr = address or default_address()
        req = executor_pb2.ListSandboxesRequest(metadata=str_map("metadata", metadata))
        deadline = seconds("request_timeout", request_timeout)
        chan = _channel(addr)
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(chan)
            resp = await stub.ListSandboxes(req, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc, addr) from exc
        finally:
            await chan.close(grace=None)
        return [SandboxInfo.from_proto(sb) for sb in resp.sandboxes]

    @translate
    async def set_timeout(self, timeout: float) -> None:
        """End the sandbox ``timeout`` seconds from now (1 s to 24 h; it may also
        shorten its life). ``expires_at`` shows the new end."""
        self._live()
        req = executor_pb2.SetSandboxTimeoutRequest(sandbox_id=self.id)
        req.timeout.FromNanoseconds(int(seconds("timeout", timeout) * 1e9))
        resp = await self._stub.SetSandboxTimeout(req, timeout=60)
        self._proto = resp.sandbox

    @translate
    async def set_network_policy(self, policy: NetworkPolicy) -> NetworkPolicy:
        """Replace the egress policy of this nat-filtered sandbox while it runs; in
        force when this returns (connections the old policy allowed are ended).
        Empty fields take the server's defaults, as at create. Returns the policy
        now in effect, defaults filled in (also ``info().network_policy``).
        FailedPreconditionError for a sandbox of another network mode or a
        paused one; InvalidArgumentError for a policy the server refuses."""
        self._live()
        req = executor_pb2.SetSandboxNetworkPolicyRequest(
            sandbox_id=self.id, policy=network_policy(policy)
        )
        resp = await self._stub.SetSandboxNetworkPolicy(req, timeout=60)
        self._proto = resp.sandbox
        return NetworkPolicy.from_proto(resp.sandbox.network_policy)

    @translate
    async def pause(self) -> None:
        """Save the sandbox's memory and disk on the host and stop its VM: it costs only
        disk until ``resume()``, which brings back its files and running processes as
        they were. A paused sandbox does not expire; other calls raise
        FailedPreconditionError until it is resumed. It also survives an executor
        restart. FailedPreconditionError when it is paused already or has a shared
        workspace (create it with ``workspace="api"`` to pause it)."""
        self._live()
        resp = await self._stub.PauseSandbox(
            executor_pb2.PauseSandboxRequest(sandbox_id=self.id), timeout=1200
        )
        self._proto = resp.sandbox

    @translate
    async def resume(self) -> None:
        """Bring a paused sandbox back (FailedPreconditionError when it runs); it gets
        the life it had left at the pause."""
        self._live()
        resp = await self._stub.ResumeSandbox(
            executor_pb2.ResumeSandboxRequest(sandbox_id=self.id), timeout=1200
        )
        self._proto = resp.sandbox

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translate
    async def network_log(self) -> builtins.list[EgressRecord]:
        """Every DNS query and connection attempt of this sandbox so far, with its verdict
        (empty unless the network is "nat-filtered")."""
        self._live()
        resp = await self._stub.GetNetworkLog(
            executor_pb2.GetNetworkLogRequest(sandbox_id=self.id), timeout=60
        )
        return [EgressRecord.from_proto(r) for r in resp.records]

    @translate
    async def close(self, *, wait: bool = False) -> None:
        """Close the sandbox and destroy its VM and workspace. Idempotent (also after the
        lifetime ended).

        It returns once the sandbox is closed (no call reaches it any more); the
        executor destroys the VM right after, certainly (also across a crash).
        ``wait=True`` returns only once the VM and workspace are gone. An executor
        that is restarting is waited for (up to 30 s); a close that still
        fails raises and leaves the handle open, so that ``close()`` can be
        called again.
        """
        if self._closed:
            return
        await self.ports.close_all()
        req = executor_pb2.CloseSandboxRequest(sandbox_id=self.id, wait=wait)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CLOSE_RETRY_S
        pause = 0.25
        while True:
            try:
                await self._stub.CloseSandbox(req, timeout=120)
                break
            except grpc.aio.AioRpcError as exc:
                # The executor's close is idempotent: a call cut off by its
                # restart (or not yet able to connect) is simply made again.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() + pause > give_up:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 4.0)
        self._closed = True
        await self._channel.close(grace=None)

    async def disconnect(self) -> None:
        """Let go of this handle without closing the sandbox (it lives on until its
        lifetime ends or someone closes it): its port forwards and connection close."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.ports.close_all()
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
        self._live()
        req = executor_pb2.ExecRequest(
            sandbox_id=self.id,
            program=program(cmd, code, language, args),
            env=str_map("env", env),
            cwd=text("cwd", cwd),
            stdin=data("stdin", stdin),
            exec_id=exec_id,
            keep_stdin_open=bool(keep_stdin_open),
            max_output_bytes=count("max_output_bytes", max_output_bytes),
        )
        req.timeout.FromNanoseconds(int(seconds("timeout", timeout) * 1e9))
        return req

    async def _exec(
        self, req: executor_pb2.ExecRequest, out: Output, started: Any = None
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
            if result is None:
                raise AgentVMError(
                    "the executor ended the command without an exit status", "UNKNOWN"
                )
        except grpc.aio.AioRpcError as exc:
            if result is not None:
                return result
            err = from_rpc(exc, self._address)
            if started is not None and not started.done():
                started.set_exception(err)
            raise err from exc
        except BaseException as exc:
            # start() waits for this: it must not wait forever.
            if started is not None and not started.done():
                started.set_exception(exc)
            raise
        return result

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
        working directory is /workspace/work (in a named image, the image's).
        A command that outlives ``timeout`` is killed (``result.timed_out``); a
        non-zero exit is a result, not an error (``result.check()`` raises for
        it). Raises SandboxExpiredError when the sandbox's lifetime ends during
        the command, SandboxClosedError after ``close()``, ArgumentTypeError /
        InvalidArgumentError for bad arguments (e.g. env values that are not
        str), before anything is sent.
        """
        req = self._exec_request(
            cmd, code, language, args, env, cwd, stdin, timeout, "", False, max_output_bytes
        )
        return await self._exec(req, Output(on_stdout, on_stderr))

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
        """Start a command in the background; returns a handle once it runs.

        Arguments and errors as for ``run``; the handle's ``wait()`` gives the result.
        """
        exec_id = "ex-" + secrets.token_hex(6)
        req = self._exec_request(
            cmd, code, language, args, env, cwd, stdin, timeout, exec_id, keep_stdin_open, 0
        )
        loop = asyncio.get_running_loop()
        started: asyncio.Future[str] = loop.create_future()
        task = asyncio.ensure_future(self._exec(req, Output(on_stdout, on_stderr), started))
        await started
        return AsyncCommandHandle(self, exec_id, task)

    @translate
    async def _signal(self, exec_id: str, signal: int) -> None:
        self._live()
        await self._stub.SignalExec(
            executor_pb2.SignalExecRequest(sandbox_id=self.id, exec_id=exec_id, signal=signal),
            timeout=60,
        )

    @translate
    async def _write_stdin(self, exec_id: str, raw: bytes | str, eof: bool) -> None:
        self._live()
        await self._stub.WriteStdin(
            executor_pb2.ExecutorServiceWriteStdinRequest(
                sandbox_id=self.id, exec_id=exec_id, data=data("data", raw), eof=bool(eof)
            ),
            timeout=60,
        )
