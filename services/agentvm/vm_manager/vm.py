"""``VM`` and ``VMState``: one VM's record and its guarded state machine.

::

    CREATING -> DEFINED -> BOOTING -> READY -> STOPPING -> STOPPED -> BOOTING ...
         \\          \\          \\        \\          \\          \\
          +----------+----------+--------+----------+----------+--> DESTROYING -> DESTROYED
    BOOTING/READY -> FAILED (domain crashed or died) -> DESTROYING
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from agentvm.common.errors import StateError
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.relay import HostRelay
from agentvm.vm_manager.templates import Resources


class VMState(Enum):
    """VM lifecycle states (mirrors agentvm.v1.VMState)."""

    CREATING = common_pb2.VM_STATE_CREATING
    DEFINED = common_pb2.VM_STATE_DEFINED
    BOOTING = common_pb2.VM_STATE_BOOTING
    READY = common_pb2.VM_STATE_READY
    STOPPING = common_pb2.VM_STATE_STOPPING
    STOPPED = common_pb2.VM_STATE_STOPPED
    DESTROYING = common_pb2.VM_STATE_DESTROYING
    DESTROYED = common_pb2.VM_STATE_DESTROYED
    FAILED = common_pb2.VM_STATE_FAILED

    @property
    def running(self) -> bool:
        """The domain is (supposed to be) running."""
        return self in (VMState.BOOTING, VMState.READY)

    @classmethod
    def from_proto(cls, value: int) -> VMState:
        return cls(value)


_ALLOWED: dict[VMState, frozenset[VMState]] = {
    VMState.CREATING: frozenset({VMState.DEFINED, VMState.DESTROYING, VMState.FAILED}),
    VMState.DEFINED: frozenset({VMState.BOOTING, VMState.DESTROYING}),
    VMState.BOOTING: frozenset(
        {VMState.READY, VMState.STOPPING, VMState.FAILED, VMState.DESTROYING, VMState.STOPPED}
    ),
    VMState.READY: frozenset(
        {VMState.STOPPING, VMState.FAILED, VMState.DESTROYING, VMState.STOPPED}
    ),
    VMState.STOPPING: frozenset({VMState.STOPPED, VMState.FAILED, VMState.DESTROYING}),
    VMState.STOPPED: frozenset({VMState.BOOTING, VMState.DESTROYING}),
    VMState.FAILED: frozenset({VMState.DESTROYING, VMState.BOOTING}),
    VMState.DESTROYING: frozenset({VMState.DESTROYED}),
    VMState.DESTROYED: frozenset(),
}


def can_transition(src: VMState, dst: VMState) -> bool:
    return dst in _ALLOWED[src]


@dataclass
class VM:
    """One VM owned by vm-manager."""

    name: str
    uuid: str
    profile: ResourceProfile
    network_mode: NetworkMode
    resources: Resources
    accel: Accel
    image_id: str
    vm_dir: Path
    run_dir: Path
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    state: VMState = VMState.CREATING
    error: str = ""
    boot_started: float | None = None
    boot_duration: float | None = None
    # How the running VM came up, the kind its vm.ready event reports: "cold"
    # (booted), "restore" (from a memory template), "snapshot" (reverted to a
    # memory snapshot), "adopted" (found running at start: boot time unknown).
    boot_kind: str = "cold"
    # A suspend or resume is under way (manager_snapshots.py): GetVM answers
    # once it has ended, with its outcome, not the state it is leaving.
    saving: bool = False
    guest: common_pb2.GuestInfo | None = None
    relay: HostRelay | None = None
    shared_workspace: bool = False
    # Key of the memory template the VM was restored from; empty when booted.
    template_key: str = ""
    # Address, MAC and policy on the NAT network (None: no NIC).
    network: common_pb2.NetworkAttachment | None = None
    # File name of the agent relay's socket in run_dir (random for pool VMs: access.py).
    agent_socket_name: str = "agent.sock"
    # Id of the named image the workload runs in (docs/IMAGES.md): attached
    # as a second disk (image_disk), an overlay on the image's root.qcow2.
    # Empty for the built-in image.
    workload_image_id: str = ""
    # An import's build VM: its raw ext4 disk, attached writable as vdb.
    build_disk: str = ""
    # The node (vm-manager) it runs on (node.py).
    node_id: str = ""
    # Its owner's opaque record (SetVMRecord, docs/SCALE_OUT.md) and how many
    # times it was written: compare-and-set on the generation.
    record: bytes = b""
    record_generation: int = 0

    @property
    def overlay(self) -> Path:
        return self.vm_dir / "overlay.qcow2"

    @property
    def suspended_state(self) -> Path:
        """Where SuspendVM writes the VM's memory and device state (suspend.py)."""
        return self.vm_dir / "suspended.state"

    @property
    def suspended(self) -> bool:
        return self.state is VMState.STOPPED and self.suspended_state.exists()

    @property
    def image_disk(self) -> Path:
        """The named image's per-VM overlay (when ``workload_image_id``)."""
        return self.vm_dir / "image.qcow2"

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"

    @property
    def workspace(self) -> Path:
        """Host directory shared at /workspace (when ``shared_workspace``)."""
        return self.vm_dir / "workspace"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / self.agent_socket_name

    @property
    def agent_endpoint(self) -> str:
        return f"unix:{self.agent_socket}"

    def transition(self, dst: VMState) -> None:
        """Move to ``dst``; raise StateError when the state machine forbids it."""
        if dst is self.state:
            return
        if not can_transition(self.state, dst):
            raise StateError(self.name, self.state.name, (f"able to become {dst.name}",))
        self.state = dst

    def require(self, *states: VMState) -> None:
        """Raise StateError unless the VM is in one of ``states``."""
        if self.state not in states:
            raise StateError(self.name, self.state.name, tuple(s.name for s in states))

    def to_proto(self) -> common_pb2.VM:
        msg = common_pb2.VM(
            name=self.name,
            uuid=self.uuid,
            state=self.state.value,
            suspended=self.suspended,
            profile=self.profile.to_proto(),
            network_mode=self.network_mode.to_proto(),
            resources=common_pb2.Resources(
                vcpus=self.resources.vcpus,
                memory_mib=self.resources.memory_mib,
                disk_mib=self.resources.disk_mib,
            ),
            accelerator=(
                common_pb2.ACCELERATOR_KVM
                if self.accel is Accel.KVM
                else common_pb2.ACCELERATOR_TCG
            ),
            agent_endpoint=self.agent_endpoint,
            agent_transport=common_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL
            if self.relay is None or self.relay.vsock_cid is None
            else common_pb2.AGENT_TRANSPORT_VSOCK,
            labels=self.labels,
            error=self.error,
            console_log=str(self.console_log),
            image_id=self.image_id,
            workspace_path=str(self.workspace) if self.shared_workspace else "",
            from_template=bool(self.template_key),
            workload_image_id=self.workload_image_id,
            node_id=self.node_id,
            record_generation=self.record_generation,
        )
        msg.created_at.FromNanoseconds(int(self.created_at * 1e9))
        if self.boot_duration is not None:
            msg.boot_duration.FromNanoseconds(int(self.boot_duration * 1e9))
        if self.guest is not None:
            msg.guest.CopyFrom(self.guest)
        if self.network is not None:
            msg.network.CopyFrom(self.network)
        return msg
