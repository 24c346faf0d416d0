"""The VM record and its state machine (vm_manager.vm)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from agentvm.common.errors import FailedPrecondition, StateError
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.relay import HostRelay
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState, can_transition

S = VMState
# The lifecycle as designed (see the module docstring of vm.py).
ALLOWED = {
    (S.CREATING, S.DEFINED),
    (S.CREATING, S.DESTROYING),
    (S.CREATING, S.FAILED),
    (S.DEFINED, S.BOOTING),
    (S.DEFINED, S.DESTROYING),
    (S.BOOTING, S.READY),
    (S.BOOTING, S.STOPPING),
    (S.BOOTING, S.STOPPED),
    (S.BOOTING, S.FAILED),
    (S.BOOTING, S.DESTROYING),
    (S.READY, S.STOPPING),
    (S.READY, S.STOPPED),
    (S.READY, S.FAILED),
    (S.READY, S.DESTROYING),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.FAILED),
    (S.STOPPING, S.DESTROYING),
    (S.STOPPED, S.BOOTING),
    (S.STOPPED, S.DESTROYING),
    (S.FAILED, S.BOOTING),
    (S.FAILED, S.DESTROYING),
    (S.DESTROYING, S.DESTROYED),
}
PAIRS = [(a, b) for a, b in itertools.product(VMState, VMState) if a is not b]


def make_vm(tmp_path: Path, state: VMState = VMState.CREATING, **kw: Any) -> VM:
    args: dict[str, Any] = {
        "name": "agent-vm-1234abcd",
        "uuid": "1234abcd-0000-4000-8000-000000000000",
        "profile": ResourceProfile.LIGHT,
        "network_mode": NetworkMode.ISOLATED,
        "resources": Resources(1, 256, 2048),
        "accel": Accel.TCG,
        "image_id": "img-1",
        "vm_dir": tmp_path / "state",
        "run_dir": tmp_path / "run",
    }
    vm = VM(**(args | kw))
    vm.state = state
    return vm


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.name}->{b.name}" for a, b in PAIRS])
def test_transition_matrix(tmp_path: Path, src: VMState, dst: VMState) -> None:
    vm = make_vm(tmp_path, src)
    assert can_transition(src, dst) == ((src, dst) in ALLOWED)
    if (src, dst) in ALLOWED:
        vm.transition(dst)
        assert vm.state is dst
    else:
        with pytest.raises(StateError) as info:
            vm.transition(dst)
        assert vm.state is src  # unchanged
        err = info.value
        assert isinstance(err, FailedPrecondition)
        assert err.state == src.name
        assert vm.name in err.message
        assert dst.name in err.message


@pytest.mark.parametrize("state", list(VMState))
def test_transition_to_the_same_state_is_a_no_op(tmp_path: Path, state: VMState) -> None:
    vm = make_vm(tmp_path, state)
    vm.transition(state)
    assert vm.state is state


def test_full_lifecycle(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    path = [S.DEFINED, S.BOOTING, S.READY, S.STOPPING, S.STOPPED, S.BOOTING, S.FAILED]
    for state in [*path, S.BOOTING, S.DESTROYING, S.DESTROYED]:
        vm.transition(state)
    assert vm.state is S.DESTROYED
    for state in VMState:
        if state is not S.DESTROYED:
            with pytest.raises(StateError):
                vm.transition(state)


def test_require(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, VMState.STOPPED)
    vm.require(VMState.DEFINED, VMState.STOPPED)
    with pytest.raises(StateError) as info:
        vm.require(VMState.READY, VMState.BOOTING)
    assert info.value.required == ("READY", "BOOTING")
    assert info.value.message == f"VM {vm.name} is STOPPED; this needs it to be READY or BOOTING"


def test_running_and_from_proto() -> None:
    assert {s for s in VMState if s.running} == {VMState.BOOTING, VMState.READY}
    for s in VMState:
        assert VMState.from_proto(s.value) is s
    with pytest.raises(ValueError):
        VMState.from_proto(common_pb2.VM_STATE_UNSPECIFIED)


def test_paths(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    assert vm.overlay == tmp_path / "state" / "overlay.qcow2"
    assert vm.console_log == tmp_path / "state" / "console.log"
    assert vm.agent_endpoint == f"unix:{tmp_path}/run/agent.sock"


def test_to_proto(tmp_path: Path) -> None:
    guest = common_pb2.GuestInfo(agent_version="0.1.0", hostname="g")
    vm = make_vm(
        tmp_path,
        VMState.READY,
        labels={"team": "a"},
        created_at=1700000000.25,
        boot_duration=1.5,
        guest=guest,
        error="",
    )
    msg = vm.to_proto()
    assert msg.name == vm.name
    assert msg.uuid == vm.uuid
    assert msg.state == common_pb2.VM_STATE_READY
    assert msg.profile == common_pb2.RESOURCE_PROFILE_LIGHT
    assert msg.network_mode == common_pb2.NETWORK_MODE_ISOLATED
    assert (msg.resources.vcpus, msg.resources.memory_mib, msg.resources.disk_mib) == (1, 256, 2048)
    assert msg.accelerator == common_pb2.ACCELERATOR_TCG
    assert msg.agent_endpoint == f"unix:{tmp_path}/run/agent.sock"
    assert msg.agent_transport == common_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL
    assert dict(msg.labels) == {"team": "a"}
    assert msg.console_log == str(tmp_path / "state" / "console.log")
    assert msg.image_id == "img-1"
    # float seconds: exact to well under a microsecond
    assert abs(msg.created_at.ToNanoseconds() - 1700000000_250000000) < 1000
    assert msg.boot_duration.ToNanoseconds() == 1_500_000_000
    assert msg.guest == guest


def test_to_proto_optional_parts(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, VMState.FAILED, accel=Accel.KVM, error="boom")
    msg = vm.to_proto()
    assert msg.accelerator == common_pb2.ACCELERATOR_KVM
    assert msg.error == "boom"
    assert not msg.HasField("boot_duration")
    assert not msg.HasField("guest")


def test_to_proto_transport_follows_the_relay(tmp_path: Path) -> None:
    vm = make_vm(tmp_path, VMState.READY)
    vm.relay = HostRelay(vm.name, vm.agent_socket, channel_path=str(tmp_path / "c.sock"))
    assert vm.to_proto().agent_transport == common_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL
    vm.relay = HostRelay(vm.name, vm.agent_socket, vsock_cid=3)
    assert vm.to_proto().agent_transport == common_pb2.AGENT_TRANSPORT_VSOCK
