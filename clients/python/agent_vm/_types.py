"""The client's value types: what a command returned, egress records, file entries, policies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent_vm.errors import CommandExitError, CommandTimeoutError
from agentvm.v1 import common_pb2, executor_pb2

Callback = Callable[[str], object]
Profile = Literal["light", "standard", "intensive"]
Network = Literal["isolated", "nat-filtered", "bridge"]
Workspace = Literal["auto", "shared", "api"]

PROFILES = {
    "light": common_pb2.RESOURCE_PROFILE_LIGHT,
    "standard": common_pb2.RESOURCE_PROFILE_STANDARD,
    "intensive": common_pb2.RESOURCE_PROFILE_INTENSIVE,
}
NETWORKS = {
    "isolated": common_pb2.NETWORK_MODE_ISOLATED,
    "nat-filtered": common_pb2.NETWORK_MODE_NAT_FILTERED,
    "bridge": common_pb2.NETWORK_MODE_BRIDGE,
}
WORKSPACES = {
    "auto": common_pb2.WORKSPACE_MODE_UNSPECIFIED,
    "shared": common_pb2.WORKSPACE_MODE_SHARED,
    "api": common_pb2.WORKSPACE_MODE_API,
}


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
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """stderr decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """Exit code 0 and not timed out."""
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
        """The record of the executor's message."""
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
    """One entry of a workspace listing (path relative to /workspace)."""

    path: str
    size_bytes: int
    mode: int
    is_dir: bool


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

    def __post_init__(self) -> None:
        # Kept as tuples: a policy built from lists equals the same one from the
        # server (which answers with the ports sorted and without duplicates).
        object.__setattr__(self, "allow_domains", tuple(self.allow_domains))
        object.__setattr__(self, "allow_cidrs", tuple(self.allow_cidrs))
        object.__setattr__(self, "ports", tuple(self.ports))

    @classmethod
    def from_proto(cls, policy: common_pb2.NetworkPolicy) -> NetworkPolicy:
        """The policy of the executor's message."""
        return cls(
            allow_domains=tuple(policy.allow_domains),
            allow_cidrs=tuple(policy.allow_cidrs),
            ports=tuple(policy.ports),
        )

    def to_proto(self) -> common_pb2.NetworkPolicy:
        """The policy as the executor takes it."""
        return common_pb2.NetworkPolicy(
            allow_domains=list(self.allow_domains),
            allow_cidrs=list(self.allow_cidrs),
            ports=list(self.ports),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A running sandbox as ``Sandbox.list()`` returns it."""

    id: str
    vm_name: str
    # The named image it runs ("" for the built-in one).
    image: str
    # The caller's metadata, as given at create.
    metadata: dict[str, str]
    # The default environment's non-secret variables.
    envs: dict[str, str]
    # The names of its secret variables (their values are never returned).
    secret_env_names: tuple[str, ...]
    # Unix times.
    created_at: float
    expires_at: float
    # "running" or "paused".
    state: str = "running"
    # A nat-filtered sandbox's egress policy in effect, defaults filled in (as
    # created or as ``set_network_policy`` last set it); None for the others.
    network_policy: NetworkPolicy | None = None

    @classmethod
    def from_proto(cls, sb: executor_pb2.Sandbox) -> SandboxInfo:
        """The info of the executor's message."""
        return cls(
            id=sb.id,
            vm_name=sb.vm_name,
            image=sb.spec.image,
            metadata=dict(sb.metadata),
            envs=dict(sb.env),
            secret_env_names=tuple(sb.secret_env),
            created_at=sb.created_at.ToNanoseconds() / 1e9,
            expires_at=sb.expires_at.ToNanoseconds() / 1e9,
            state="paused" if sb.state == executor_pb2.SANDBOX_STATE_PAUSED else "running",
            network_policy=NetworkPolicy.from_proto(sb.network_policy)
            if sb.HasField("network_policy")
            else None,
        )


STREAM_NAMES = {
    common_pb2.OUTPUT_STREAM_STDOUT: "stdout",
    common_pb2.OUTPUT_STREAM_STDERR: "stderr",
    common_pb2.OUTPUT_STREAM_PTY: "pty",
}


@dataclass(frozen=True)
class ProcessOutput:
    """Bytes a background process printed, at ``offset`` in its whole output.

    ``stream`` is "stdout", "stderr", or "pty" for a process on a terminal.
    When the process's buffer wrapped before the output was read, one marker
    comes first with ``stream`` "dropped", no data, and ``dropped`` bytes
    missing from ``offset`` on.
    """

    stream: str
    data: bytes
    offset: int
    dropped: int = 0

    @property
    def end(self) -> int:
        """The offset after this piece (reconnect with it to go on from here)."""
        return self.offset + len(self.data) + self.dropped

    @property
    def text(self) -> str:
        """``data`` decoded as UTF-8 (undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    @classmethod
    def from_event(cls, ev: common_pb2.ProcessEvent) -> ProcessOutput:
        """The piece of the executor's output or dropped event."""
        if ev.WhichOneof("event") == "dropped":
            d = ev.dropped
            return cls("dropped", b"", d.from_offset, d.to_offset - d.from_offset)
        o = ev.output
        return cls(STREAM_NAMES.get(o.stream, "stdout"), o.data, o.offset)


@dataclass(frozen=True)
class ProcessExit:
    """How a background process ended."""

    exit_code: int
    signal: int
    timed_out: bool
    duration_s: float

    @classmethod
    def from_proto(cls, st: common_pb2.ExitStatus) -> ProcessExit:
        """The exit of the executor's message."""
        return cls(st.exit_code, st.signal, st.timed_out, st.duration.ToNanoseconds() / 1e9)


@dataclass(frozen=True)
class ProcessInfo:
    """A background process of a sandbox as ``sb.processes.list()`` shows it."""

    exec_id: str
    tag: str
    pid: int
    command: str
    pty: bool
    running: bool
    started_at: float
    output_bytes: int
    exit: ProcessExit | None

    @classmethod
    def from_proto(cls, p: common_pb2.ProcessInfo) -> ProcessInfo:
        """The info of the executor's message."""
        return cls(
            exec_id=p.exec_id,
            tag=p.tag,
            pid=p.pid,
            command=p.command,
            pty=p.pty,
            running=p.running,
            started_at=p.started_at.ToNanoseconds() / 1e9,
            output_bytes=p.output_bytes,
            exit=ProcessExit.from_proto(p.exit_status) if p.HasField("exit_status") else None,
        )
