"""A sandbox's state and the executor's rules that need no service: limits,
durations, which VMs and leases are orphaned, how an execution is described."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentvm.common.errors import REASON_SANDBOX_EXPIRED, Aborted, InvalidArgument
from agentvm.executor.journal import Record
from agentvm.executor.sandbox_env import SandboxEnv
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    guest_agent_pb2_grpc,
    pool_manager_pb2,
)

OWNER_LABEL = ("agent-vm/owner", "executor")
# Which executor group (AGENTVM_EXECUTOR_GROUP; one executor: its address): the
# replicas that share sandboxes. Several groups may share one vm-manager.
EXECUTOR_LABEL = "agent-vm/executor"
# Which replica made the VM (its address): a restarted replica reclaims at once
# what its previous self left half made; others' only after CREATE_GRACE_S.
CREATOR_LABEL = "agent-vm/executor-replica"
SANDBOX_LABEL = "agent-vm/sandbox"
DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 24 * 3600.0
MAX_LIFETIME_S = 24 * 3600.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
MAX_OUTPUT = 1024 * 1024 * 1024
BOOT_TIMEOUT_S = 180.0
# A VM or lease of this group without a record may be a create still under way
# on another replica for this long (AcquireVM or CreateVM + WaitVM, then the record).
CREATE_GRACE_S = 2 * BOOT_TIMEOUT_S
# How many expired sandboxes get() still recognises (to say why they are gone).
REMEMBER_EXPIRED = 1024
# The built-in image's name; an empty SandboxSpec.image means it too.
BUILTIN_IMAGE = "default"
# What SandboxSpec.image may hold: a name ("coder"), "name:tag", or a full or
# unique-prefix id. Resolving it is vm-manager's (NOT_FOUND comes from there);
# the executor refuses only what cannot be one, before any VM is asked for.
MAX_IMAGE_REF = 200
IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._:-]*")


class SandboxExpired(Aborted):
    """The sandbox reached the end of its lifetime: ABORTED for a call it cut
    short, NOT_FOUND for a call that came after."""

    reason = REASON_SANDBOX_EXPIRED

    def __init__(self, sandbox_id: str, lifetime: float, *, cut_short: bool) -> None:
        what = "and was destroyed while this call ran" if cut_short else "and was destroyed"
        super().__init__(
            f"sandbox {sandbox_id} reached the end of its lifetime ({lifetime:g} s) {what}; "
            "extend a running sandbox's lifetime before it ends (SetSandboxTimeout, "
            "sandbox.set_timeout(SECONDS) in the Python client, `agent-vm sandbox "
            f"set-timeout`), or create it with a longer one (at most {MAX_LIFETIME_S:.0f} s)"
        )
        if not cut_short:
            self.code = grpc.StatusCode.NOT_FOUND


def seconds_of(msg: Any, field_name: str, default: float, high: float) -> float:
    """A Duration field in seconds; ``default`` when unset; INVALID_ARGUMENT outside (0, high]."""
    if not msg.HasField(field_name):
        return default
    value = float(getattr(msg, field_name).ToNanoseconds()) / 1e9
    if value == 0:
        return default
    if not 0 < value <= high:
        raise InvalidArgument(
            f"{field_name} must be between 0 and {high:.0f} seconds, got {value:g}"
        )
    return value


def image_ref(value: str) -> str:
    """SandboxSpec.image as sent on: "" for the built-in image; INVALID_ARGUMENT naming
    the field when it cannot be an image name or id."""
    if value in ("", BUILTIN_IMAGE):
        return ""
    if len(value) > MAX_IMAGE_REF or not IMAGE_REF.fullmatch(value):
        shown = value[:60] + ("..." if len(value) > 60 else "")
        raise InvalidArgument(
            f"image {shown!r}: expected an image name, name:tag or id as `agent-vm image "
            f"list` shows it (lower-case letters, digits, '.', '_', '-', ':', at most "
            f"{MAX_IMAGE_REF} "
            "characters), or empty for the built-in image"
        )
    return value


def default_cwd(spec: executor_pb2.SandboxSpec) -> str:
    """The cwd of a command that asked for none: /workspace/work in the built-in image;
    empty in a named one (the guest then takes the image's workdir, else "/")."""
    return "" if image_ref(spec.image) else "/workspace/work"


def output_cap(value: int) -> int:
    if value > MAX_OUTPUT:
        raise InvalidArgument(f"max_output_bytes must be at most {MAX_OUTPUT}, got {value}")
    return value or DEFAULT_MAX_OUTPUT


@dataclass
class SandboxState:
    """One sandbox: its VM, workspace mode and agent channel."""

    id: str
    spec: executor_pb2.SandboxSpec
    vm: common_pb2.VM
    workspace_mode: common_pb2.WorkspaceMode.ValueType
    created_at: float
    expires_at: float
    boot_duration: float
    channel: grpc.aio.Channel
    # Closed: it serves no call; ``teardown`` destroys its VM (executor.py).
    closing: bool = False
    teardown: asyncio.Task[None] | None = None
    # Closed by the reaper at the end of its lifetime (not by its caller).
    expired: bool = False
    # Set when the VM came from the pool-manager: closing releases the lease.
    lease_id: str = ""
    execs: set[str] = field(default_factory=set)
    # Forwarded connections open now (ports.py bounds them).
    open_ports: int = 0
    # Paused (pausing.py): its VM is saved and stopped; the life it had left.
    paused: bool = False
    paused_left: float = 0.0
    # Holds one of the executor's AGENTVM_MAX_SANDBOXES slots (a sandbox taken
    # up after a restart past the limit does not).
    slot: bool = True
    # Serializes pause and resume.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Idle auto-pause after this many seconds without a call (0: off); calls in
    # flight now, and when the last one ended (time.monotonic()).
    auto_pause: float = 0.0
    busy: int = 0
    last_active: float = field(default_factory=time.monotonic)
    # The caller's metadata and the default environment (sandbox_env.py).
    metadata: dict[str, str] = field(default_factory=dict)
    env: SandboxEnv = field(default_factory=SandboxEnv)
    # Its record with its VM (records.py): the generation this replica last
    # read or wrote; when a call on another replica last used it (wall clock);
    # when this replica last wrote its own use there (time.monotonic()).
    record_generation: int = 0
    remote_active: float = 0.0
    touched: float = 0.0
    # The use of this replica's that its last write recorded (wall clock): a
    # recorded use no later is its own, which its idle clock has already.
    own_active: float = 0.0
    # A one-shot Run's sandbox: no caller can reconnect to it.
    oneshot: bool = False
    # The reaper is checking its lifetime with the record (one check at a time).
    checking: bool = False

    @property
    def agent(self) -> guest_agent_pb2_grpc.GuestAgentServiceAsyncStub:
        return guest_agent_pb2_grpc.GuestAgentServiceStub(self.channel)

    @property
    def shared_root(self) -> str | None:
        if self.workspace_mode == common_pb2.WORKSPACE_MODE_SHARED:
            return self.vm.workspace_path
        return None

    def local_active_at(self) -> float:
        """When a call on this replica last used it (wall clock)."""
        return time.time() - (time.monotonic() - self.last_active)

    def active_at(self) -> float:
        """When a call last used it, here or (as recorded) on another replica."""
        return max(self.local_active_at(), self.remote_active)

    def record(self) -> Record:
        """Its record (journal.py's Record, kept with its VM: records.py)."""
        return Record(
            id=self.id,
            vm_name=self.vm.name,
            spec=self.spec,
            workspace_mode=self.workspace_mode,
            created_at=self.created_at,
            expires_at=self.expires_at,
            boot_duration=self.boot_duration,
            lease_id=self.lease_id,
            metadata=self.metadata,
            env=self.env,
            paused=self.paused,
            paused_left=self.paused_left,
            auto_pause=self.auto_pause,
            closing=self.closing,
            oneshot=self.oneshot,
            active_at=self.active_at(),
        )

    def to_proto(self) -> executor_pb2.Sandbox:
        msg = executor_pb2.Sandbox(
            id=self.id,
            vm_name=self.vm.name,
            spec=self.spec,
            workspace_mode=self.workspace_mode,
            metadata=self.metadata,
            env=self.env.public(),
            secret_env=sorted(self.env.secret),
            state=executor_pb2.SANDBOX_STATE_PAUSED
            if self.paused
            else executor_pb2.SANDBOX_STATE_RUNNING,
        )
        msg.created_at.FromNanoseconds(int(self.created_at * 1e9))
        msg.expires_at.FromNanoseconds(int(self.expires_at * 1e9))
        msg.boot_duration.FromNanoseconds(int(self.boot_duration * 1e9))
        if self.auto_pause:
            msg.auto_pause.FromNanoseconds(int(self.auto_pause * 1e9))
        if self.vm.network_mode == common_pb2.NETWORK_MODE_NAT_FILTERED:
            msg.network_policy.CopyFrom(self.vm.network.policy)
        return msg


def orphaned_vms(
    vms: Iterable[common_pb2.VM],
    open_sandboxes: set[str],
    *,
    now: float = 0.0,
    min_age: float = 0.0,
) -> list[common_pb2.VM]:
    """The executor-owned VMs whose sandbox is not open (and older than ``min_age`` s)."""
    out = []
    for vm in vms:
        if vm.labels.get(OWNER_LABEL[0]) != OWNER_LABEL[1]:
            continue
        if vm.labels.get(SANDBOX_LABEL, "") in open_sandboxes:
            continue
        if min_age > 0 and now - vm.created_at.ToSeconds() < min_age:
            continue
        out.append(vm)
    return out


def orphaned_leases(
    leases: Iterable[pool_manager_pb2.Lease], held: set[str], creating: set[str]
) -> list[pool_manager_pb2.Lease]:
    """The pool leases this executor took that no sandbox holds.

    Such a lease is left when pool-manager recorded it but its AcquireVM answer
    never arrived (pool-manager killed, a deadline): the sandbox went on with a
    VM of its own, or failed. Leases of sandboxes still being created are kept.
    """
    return [
        lease
        for lease in leases
        if lease.lease_id not in held and lease.labels.get(SANDBOX_LABEL, "") not in creating
    ]


def describe_program(program: common_pb2.Program) -> tuple[str, str]:
    """The command for the audit log (first 4 KiB) and the SHA-256 of all of it."""
    if program.WhichOneof("kind") == "argv":
        text = shlex.join(program.argv.args)
    else:
        lang = common_pb2.CodeLanguage.Name(program.code.language)
        text = f"[{lang}] {program.code.source}"
        if program.code.args:
            text += " -- " + shlex.join(program.code.args)
    return text[:4096], hashlib.sha256(program.SerializeToString(deterministic=True)).hexdigest()


def outcome_of(status: common_pb2.ExitStatus | None, failure: str) -> str:
    """ok | nonzero_exit | timeout | killed | error."""
    if status is None:
        return "error"
    if status.timed_out:
        return "timeout"
    if status.signal:
        return "killed"
    return "ok" if status.exit_code == 0 else "nonzero_exit"
