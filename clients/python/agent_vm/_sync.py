"""The blocking client: thin wrappers that run the asyncio implementation on a private loop.

One implementation of every behaviour lives in ``_async``; this module only
forwards to it (a test checks that both trees have the same public signatures).
Streaming callbacks run on the private loop's thread.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import signal as signals
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from agent_vm._async import (
    AsyncCommandHandle,
    AsyncSandbox,
    Callback,
    CommandResult,
    EgressRecord,
    FileInfo,
    Network,
    NetworkPolicy,
    Profile,
    Workspace,
)
from agent_vm._oneshot import RunResult, arun
from agent_vm._ports import AsyncPortForward
from agent_vm._processes import AsyncProcess
from agent_vm._types import ProcessExit, ProcessInfo, ProcessOutput, SandboxInfo

T = TypeVar("T")
_lock = threading.Lock()
_state: dict[str, asyncio.AbstractEventLoop] = {}


def _get_loop() -> asyncio.AbstractEventLoop:
    """The private event loop (one daemon thread per process, started on first use)."""
    with _lock:
        if "loop" not in _state:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="agent_vm-loop", daemon=True).start()
            _state["loop"] = loop
        return _state["loop"]


def _call(coro: Coroutine[Any, Any, T]) -> T:
    fut = asyncio.run_coroutine_threadsafe(coro, _get_loop())
    try:
        return fut.result()
    except BaseException:
        fut.cancel()  # Ctrl-C or a dying caller cancels the call (and its command)
        raise


class CommandHandle:
    """A background command: ``wait()``, ``kill()``, ``send_stdin()``."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._inner = inner
        self.exec_id = inner.exec_id

    def wait(self) -> CommandResult:
        """Wait for the command to end; its result (raises as ``AsyncCommandHandle.wait``)."""
        return _call(self._inner.wait())

    def kill(self, signal: int = 9) -> None:
        """Send ``signal`` (default SIGKILL: the whole process tree dies).

        Raises NotFoundError when the command is not running any more.
        """
        _call(self._inner.kill(signal))

    def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        """Write to the command's stdin (started with keep_stdin_open=True);
        ``eof=True`` closes it after ``data``."""
        _call(self._inner.send_stdin(data, eof=eof))


class Files:
    """Files under the sandbox's /workspace (paths relative to it, e.g. "input/data.csv").

    Every method raises SandboxClosedError once the sandbox is closed,
    SandboxExpiredError once it reached the end of its lifetime, and
    InvalidArgumentError for paths that are absolute, contain ".." or go
    through a symbolic link.
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._inner = sandbox.files

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        """Write ``data`` to ``path``, making missing parent directories; the size written."""
        return _call(self._inner.write(path, data, mode=mode))

    def upload(self, local: str | os.PathLike[str], path: str, *, mode: int | None = None) -> int:
        """Stream a local file to ``path`` (any size; verified with SHA-256); its size.

        Raises NotFoundError, before anything is sent, when ``local`` is no file.
        """
        return _call(self._inner.upload(local, path, mode=mode))

    def read(self, path: str, *, max_bytes: int = 0) -> bytes:
        """The whole content of ``path``.

        Raises NotFoundError when there is no such file; files over ``max_bytes``
        (0: the executor's cap) ResourceExhaustedError, sparse ones
        FailedPreconditionError.
        """
        return _call(self._inner.read(path, max_bytes=max_bytes))

    def read_text(self, path: str, *, max_bytes: int = 0) -> str:
        """``read`` decoded as UTF-8 (undecodable bytes replaced); raises as ``read``."""
        return _call(self._inner.read_text(path, max_bytes=max_bytes))

    def download(self, path: str, local: str | os.PathLike[str], *, max_bytes: int = 0) -> int:
        """Stream ``path`` to a local file (verified; it appears only once complete);
        its size. Raises as ``read``."""
        return _call(self._inner.download(path, local, max_bytes=max_bytes))

    def list(self, path: str = "", *, recursive: bool = False) -> builtins.list[FileInfo]:
        """The entries of directory ``path`` ("" is /workspace), or of its whole tree.

        Raises NotFoundError when there is no such directory,
        ResourceExhaustedError past the listing limits.
        """
        return _call(self._inner.list(path, recursive=recursive))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a file, directory or symbolic link of that name)."""
        return _call(self._inner.exists(path))

    def mkdir(self, path: str) -> None:
        """Create directory ``path`` and any missing parents; nothing to do if it exists.

        Raises FailedPreconditionError when a file of that name is there.
        """
        _call(self._inner.mkdir(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory with ``recursive=True``.

        Raises NotFoundError when there is nothing of that name.
        """
        _call(self._inner.remove(path, recursive=recursive))


class Process:
    """A background process: its output from any offset, input, signals, resize.

    The same as ``AsyncProcess``; ``exec_id`` names it for any client.
    """

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner
        self.exec_id = inner.exec_id
        self.pid = inner.pid
        self.pty = inner.pty

    @property
    def offset(self) -> int:
        """Where this handle's reading got to."""
        return self._inner.offset

    @property
    def exit(self) -> ProcessExit | None:
        """How it ended, once seen."""
        return self._inner.exit

    def output(self, offset: int | None = None) -> Iterator[ProcessOutput]:
        """Its output from ``offset`` (default: where this handle left off) until it
        ends; stop iterating at any time (the process goes on)."""
        agen = self._inner.output(offset)

        async def step() -> ProcessOutput | None:
            return await anext(agen, None)

        try:
            while (piece := _call(step())) is not None:
                yield piece
        finally:
            _call(agen.aclose())

    def wait(self, on_output: Callable[[ProcessOutput], object] | None = None) -> ProcessExit:
        """Read its output (to ``on_output``, if given) until it ends; how it ended."""
        return _call(self._inner.wait(on_output))

    def send_input(self, data: bytes | str) -> None:
        """Write to its stdin (its keyboard, on a terminal)."""
        _call(self._inner.send_input(data))

    def close_stdin(self) -> None:
        """End its input (on a terminal: Ctrl-D)."""
        _call(self._inner.close_stdin())

    def signal(self, signal: int = signals.SIGTERM) -> None:
        """Send ``signal`` (on a terminal: to its foreground job)."""
        _call(self._inner.signal(signal))

    def kill(self) -> None:
        """SIGKILL the whole process tree."""
        _call(self._inner.kill())

    def resize(self, rows: int, cols: int) -> None:
        """Set its terminal's size (FailedPreconditionError without a terminal)."""
        _call(self._inner.resize(rows, cols))


class Processes:
    """Background processes of the sandbox (``sb.processes``), as ``AsyncProcesses``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._inner = sandbox.processes

    def start(
        self,
        cmd: str | Sequence[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        pty: tuple[int, int] | None = None,
        term: str = "",
        tag: str = "",
        timeout: float = 0,
        keep_stdin_open: bool = False,
        exec_id: str = "",
    ) -> Process:
        """Start a process that outlives this call; returns once it runs (see
        ``AsyncProcesses.start``)."""
        return Process(
            _call(
                self._inner.start(
                    cmd,
                    code=code,
                    language=language,
                    args=args,
                    env=env,
                    cwd=cwd,
                    pty=pty,
                    term=term,
                    tag=tag,
                    timeout=timeout,
                    keep_stdin_open=keep_stdin_open,
                    exec_id=exec_id,
                )
            )
        )

    def list(self) -> builtins.list[ProcessInfo]:
        """Its background processes, running and ended, oldest first."""
        return _call(self._inner.list())

    def connect(self, exec_id: str) -> Process:
        """A handle on a process started earlier (NotFoundError if unknown)."""
        return Process(_call(self._inner.connect(exec_id)))


class PortForward:
    """A listener on this host forwarding to a port in the sandbox (``AsyncPortForward``)."""

    def __init__(self, inner: AsyncPortForward) -> None:
        self._inner = inner
        self.guest_port = inner.guest_port
        self.host = inner.host
        self.port = inner.port
        self.unix_path = inner.unix_path

    @property
    def address(self) -> str:
        """``host:port`` (or ``unix:PATH``) of the listener."""
        return self._inner.address

    @property
    def closed(self) -> bool:
        """True once it stopped listening."""
        return self._inner.closed

    def close(self) -> None:
        """Stop listening and end the connections it carries. Idempotent."""
        _call(self._inner.close())

    def __enter__(self) -> PortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ports:
    """Ports of the sandbox (``sb.ports``), as ``AsyncPorts``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._inner = sandbox.ports

    def forward(
        self, guest_port: int, *, host: str = "127.0.0.1", port: int = 0, unix_path: str = ""
    ) -> PortForward:
        """Listen on this host (loopback, a free port by default; or ``unix_path``) and
        forward each connection to the guest's 127.0.0.1:``guest_port``."""
        return PortForward(
            _call(self._inner.forward(guest_port, host=host, port=port, unix_path=unix_path))
        )

    def close_all(self) -> None:
        """Close every forward of this sandbox handle (the sandbox's close does this)."""
        _call(self._inner.close_all())


class Sandbox:
    """A VM for one agent. ``with Sandbox.create() as sb: sb.run("ls")``.

    Once closed (or past its lifetime), every call raises SandboxClosedError
    (SandboxExpiredError).
    """

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.files = Files(inner)
        self.processes = Processes(inner)
        self.ports = Ports(inner)

    @property
    def id(self) -> str:
        """The sandbox's id ("sb-...")."""
        return self._inner.id

    @property
    def vm_name(self) -> str:
        """The name of its VM (as ``agent-vm vm list`` shows it)."""
        return self._inner.vm_name

    @property
    def boot_s(self) -> float:
        """Seconds from asking for the VM to its agent answering."""
        return self._inner.boot_s

    @property
    def workspace_mode(self) -> str:
        """ "shared" or "api": how /workspace reaches the VM."""
        return self._inner.workspace_mode

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._inner.closed

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata given at create."""
        return self._inner.metadata

    @property
    def envs(self) -> dict[str, str]:
        """The default environment's non-secret variables (secret ones are never returned)."""
        return self._inner.envs

    @property
    def expires_at(self) -> float:
        """When the sandbox ends (Unix time), unless ``set_timeout`` moves it."""
        return self._inner.expires_at

    def info(self) -> SandboxInfo:
        """What ``Sandbox.list()`` says of this sandbox, as of its last answer."""
        return self._inner.info()

    @classmethod
    def create(
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
    ) -> Sandbox:
        """Boot a sandbox VM (see ``AsyncSandbox.create``: the same arguments, and
        what it raises). ``lifetime`` (seconds; default 1 h, at most 24 h) bounds
        it even if this process dies; ``network="bridge"`` needs ``bridge``;
        ``image`` names an image to run in (NotFoundError when there is none);
        ``metadata``, ``envs`` and ``secret_envs`` as in ``AsyncSandbox.create``."""
        inner = _call(
            AsyncSandbox.create(
                profile=profile,
                network=network,
                policy=policy,
                cpus=cpus,
                memory_mib=memory_mib,
                lifetime=lifetime,
                workspace=workspace,
                labels=labels,
                address=address,
                request_timeout=request_timeout,
                bridge=bridge,
                image=image,
                metadata=metadata,
                envs=envs,
                secret_envs=secret_envs,
                auto_pause=auto_pause,
            )
        )
        return cls(inner)

    @classmethod
    def connect(
        cls, sandbox_id: str, *, address: str | None = None, request_timeout: float = 60.0
    ) -> Sandbox:
        """A handle on a running sandbox by its id (see ``AsyncSandbox.connect``)."""
        return cls(
            _call(
                AsyncSandbox.connect(sandbox_id, address=address, request_timeout=request_timeout)
            )
        )

    @classmethod
    def list(
        cls,
        *,
        metadata: Mapping[str, str] | None = None,
        address: str | None = None,
        request_timeout: float = 60.0,
    ) -> builtins.list[SandboxInfo]:
        """The executor's running sandboxes (of every caller); with ``metadata``, those
        whose metadata holds every given pair."""
        return _call(
            AsyncSandbox.list(metadata=metadata, address=address, request_timeout=request_timeout)
        )

    def set_timeout(self, timeout: float) -> None:
        """End the sandbox ``timeout`` seconds from now (1 s to 24 h; it may also
        shorten its life). ``expires_at`` shows the new end."""
        _call(self._inner.set_timeout(timeout))

    def set_network_policy(self, policy: NetworkPolicy) -> NetworkPolicy:
        """Replace the egress policy of this nat-filtered sandbox while it runs; in
        force when this returns (connections the old policy allowed are ended).
        Empty fields take the server's defaults, as at create. Returns the policy
        now in effect, defaults filled in (also ``info().network_policy``).
        FailedPreconditionError for a sandbox of another network mode or a
        paused one; InvalidArgumentError for a policy the server refuses."""
        return _call(self._inner.set_network_policy(policy))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def network_log(self) -> builtins.list[EgressRecord]:
        """Every DNS query and connection attempt of this sandbox so far, with its
        verdict (empty unless the network is "nat-filtered")."""
        return _call(self._inner.network_log())

    def pause(self) -> None:
        """Save the sandbox on the host and stop its VM (see ``AsyncSandbox.pause``)."""
        _call(self._inner.pause())

    def resume(self) -> None:
        """Bring a paused sandbox back as it was (see ``AsyncSandbox.resume``)."""
        _call(self._inner.resume())

    def disconnect(self) -> None:
        """Let go of this handle without closing the sandbox (``AsyncSandbox.disconnect``)."""
        _call(self._inner.disconnect())

    def close(self, *, wait: bool = False) -> None:
        """Close the sandbox and destroy its VM and workspace (``AsyncSandbox.close``)."""
        _call(self._inner.close(wait=wait))

    def run(
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

        Arguments, result and errors as for ``AsyncSandbox.run``: e.g.
        SandboxExpiredError when the sandbox's lifetime ends during the command,
        ArgumentTypeError for env values that are not str (before anything is sent).
        """
        return _call(
            self._inner.run(
                cmd,
                code=code,
                language=language,
                args=args,
                env=env,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                max_output_bytes=max_output_bytes,
            )
        )

    def start(
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
    ) -> CommandHandle:
        """Start a command in the background; a handle once it runs (``wait()`` for
        its result). Arguments and errors as for ``run``."""
        inner = _call(
            self._inner.start(
                cmd,
                code=code,
                language=language,
                args=args,
                env=env,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                keep_stdin_open=keep_stdin_open,
            )
        )
        return CommandHandle(inner)


def run(
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
    """One shot in a fresh VM, destroyed whatever happens (see ``arun``: the same
    arguments, and what it raises)."""
    return _call(
        arun(
            cmd,
            code=code,
            language=language,
            args=args,
            inputs=inputs,
            env=env,
            stdin=stdin,
            timeout=timeout,
            profile=profile,
            network=network,
            policy=policy,
            cpus=cpus,
            memory_mib=memory_mib,
            download_outputs=download_outputs,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output_bytes=max_output_bytes,
            address=address,
            outputs_dir=outputs_dir,
            max_output_file_bytes=max_output_file_bytes,
            max_output_files_bytes=max_output_files_bytes,
            cwd=cwd,
            bridge=bridge,
            image=image,
        )
    )
