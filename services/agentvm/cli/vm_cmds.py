"""`agent-vm vm`: VMs straight through vm-manager (create, exec, snapshots, destroy)."""

from __future__ import annotations

import sys
import time

import click

from agentvm.cli.base import (
    NETWORKS,
    PROFILES,
    check_timeout,
    enum_word,
    handle_errors,
    human_bytes,
    image_option,
    network_option,
    network_word,
    print_json,
    print_json_list,
    print_table,
    profile_option,
    vm_stub,
)
from agentvm.cli.bridge_opt import bridge_option, check_bridge
from agentvm.cli.group import fail
from agentvm.cli.program_args import ProgramCommand
from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2


# -- VMs ---------------------------------------------------------------------
@click.group()
def vm() -> None:
    """Create, inspect and remove VMs directly through vm-manager."""


def _create(
    profile: str,
    network: str,
    labels: dict[str, str] | None = None,
    bridge: str = "",
    image: str | None = None,
) -> common_pb2.VM:
    req = vm_manager_pb2.CreateVMRequest(
        profile=PROFILES[profile],
        network_mode=NETWORKS[network],
        bridge=bridge,
        start=True,
        labels=labels or {},
        image=image or "",
    )
    return vm_stub().CreateVM(req, timeout=60).vm


def _wait_ready(name: str, timeout: float) -> common_pb2.VM:
    req = vm_manager_pb2.WaitVMRequest(name=name, state=common_pb2.VM_STATE_READY)
    req.timeout.FromNanoseconds(int(timeout * 1e9))
    return vm_stub().WaitVM(req, timeout=timeout + 5).vm


def _exec(endpoint: str, argv: list[str], timeout: float) -> int:
    """Run ``argv`` through the guest agent, streaming output; returns the exit code."""
    with sync_channel(endpoint) as channel:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=argv))
        )
        req.timeout.FromNanoseconds(int(timeout * 1e9))
        for ev in stub.Execute(req, timeout=timeout + 10):
            if ev.HasField("output"):
                out = (
                    sys.stdout
                    if ev.output.stream == common_pb2.OUTPUT_STREAM_STDOUT
                    else sys.stderr
                )
                out.buffer.write(ev.output.data)
                out.flush()
            elif ev.HasField("exited"):
                if ev.exited.timed_out:
                    click.echo(f"agent-vm: timed out after {timeout:.0f} s", err=True)
                return ev.exited.exit_code
    return fail("the guest agent ended the stream without an exit status")


@vm.command("create")
@profile_option()
@network_option()
@bridge_option()
@image_option()
@click.option("--no-wait", is_flag=True, help="Return before the guest agent is ready.")
@handle_errors
def vm_create(
    profile: str, network: str, bridge: str | None, image: str | None, no_wait: bool
) -> None:
    """Create and start a VM; print it as JSON once its agent answers."""
    v = _create(profile, network, bridge=check_bridge(network, bridge), image=image)
    if not no_wait:
        v = _wait_ready(v.name, 120)
    print_json(v)


@vm.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the VMs.")
@handle_errors
def vm_list(as_json: bool) -> None:
    """List VMs: name, state, profile, network and, for pool VMs, their pool."""
    vms = vm_stub().ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=10).vms
    if as_json:
        print_json_list(vms)
        return
    print_table(
        ("NAME", "STATE", "PROFILE", "NETWORK", "POOL"),
        (
            (
                v.name,
                enum_word(common_pb2.VMState, v.state, "VM_STATE_"),
                enum_word(common_pb2.ResourceProfile, v.profile, "RESOURCE_PROFILE_"),
                network_word(v.network_mode),
                _pool_mark(v),
            )
            for v in vms
        ),
    )


def _pool_mark(v: common_pb2.VM) -> str:
    """``KEY (warm)`` / ``KEY (leased to WHO)`` for pool VMs, else "-"."""
    if not v.HasField("pool"):
        return "-"
    if v.pool.state == common_pb2.POOL_VM_STATE_LEASED:
        return f"{v.pool.pool} (leased to {v.pool.lessee or 'unnamed'})"
    return f"{v.pool.pool} (warm)"


@vm.command("get")
@click.argument("name")
@handle_errors
def vm_get(name: str) -> None:
    """Show one VM as JSON."""
    print_json(vm_stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm)


@vm.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Power off without the graceful step.")
@handle_errors
def vm_stop(name: str, force: bool) -> None:
    """Stop a VM (graceful, then forced)."""
    resp = vm_stub().StopVM(vm_manager_pb2.StopVMRequest(name=name, force=force), timeout=60)
    click.echo(f"{name} stopped" + (" (forced)" if resp.forced else ""))


@vm.command("destroy")
@click.argument("names", nargs=-1, required=True)
@handle_errors
def vm_destroy(names: tuple[str, ...]) -> None:
    """Destroy VMs (domain, overlay, sockets)."""
    for name in names:
        vm_stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=name), timeout=60)
        click.echo(f"{name} destroyed")


@vm.group("snapshot")
def vm_snapshot() -> None:
    """Snapshots of a VM (with memory while it runs, disk-only when stopped)."""


@vm_snapshot.command("create")
@click.argument("name")
@click.argument("snapshot")
@click.option("--description", default="", help="Free text kept with the snapshot.")
@handle_errors
def snapshot_create(name: str, snapshot: str, description: str) -> None:
    """Snapshot VM NAME as SNAPSHOT."""
    running = vm_stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm.state in (
        common_pb2.VM_STATE_BOOTING,
        common_pb2.VM_STATE_READY,
    )
    req = vm_manager_pb2.CreateSnapshotRequest(
        vm_name=name, snapshot_name=snapshot, include_memory=running, description=description
    )
    print_json(vm_stub().CreateSnapshot(req, timeout=600).snapshot)


@vm_snapshot.command("list")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the snapshots.")
@handle_errors
def snapshot_list(name: str, as_json: bool) -> None:
    """List the snapshots of VM NAME."""
    resp = vm_stub().ListSnapshots(vm_manager_pb2.ListSnapshotsRequest(vm_name=name), timeout=60)
    if as_json:
        print_json_list(resp.snapshots)
        return
    print_table(
        ("NAME", "KIND", "SIZE", "CREATED", "DESCRIPTION"),
        (
            (
                s.name,
                "memory+disk" if s.includes_memory else "disk",
                human_bytes(s.size_bytes),
                s.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                if s.HasField("created_at")
                else "-",
                s.description,
            )
            for s in resp.snapshots
        ),
    )


@vm_snapshot.command("restore")
@click.argument("name")
@click.argument("snapshot")
@handle_errors
def snapshot_restore(name: str, snapshot: str) -> None:
    """Return VM NAME to SNAPSHOT."""
    req = vm_manager_pb2.RestoreSnapshotRequest(vm_name=name, snapshot_name=snapshot)
    v = vm_stub().RestoreSnapshot(req, timeout=600).vm
    click.echo(f"{name} restored to {snapshot} ({common_pb2.VMState.Name(v.state)})")


@vm_snapshot.command("delete")
@click.argument("name")
@click.argument("snapshot")
@handle_errors
def snapshot_delete(name: str, snapshot: str) -> None:
    """Delete SNAPSHOT of VM NAME."""
    req = vm_manager_pb2.DeleteSnapshotRequest(vm_name=name, snapshot_name=snapshot)
    vm_stub().DeleteSnapshot(req, timeout=600)
    click.echo(f"snapshot {snapshot} of {name} deleted")


@vm.command("exec", cls=ProgramCommand, example="agent-vm vm exec NAME -- ls -la")
@click.argument("name")
@click.argument("argv", nargs=-1, required=True)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@handle_errors
def vm_exec(name: str, argv: tuple[str, ...], timeout: float) -> None:
    """Run a command in running VM NAME; exits with its exit code.

    The command's own options go after `--`: agent-vm vm exec NAME -- ls -la.
    """
    check_timeout(timeout)
    v = vm_stub().GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10).vm
    if v.pool.state == common_pb2.POOL_VM_STATE_WARM or not v.agent_endpoint:
        # vm-manager withholds a warm pool VM's agent from all but pool-manager.
        fail(
            f"FAILED_PRECONDITION: VM {name} is a warm pool VM of pool {v.pool.pool} and is "
            "not leased: acquire it from the pool (agent-vm pool status shows the pools) "
            "before using it"
            if v.HasField("pool")
            else f"FAILED_PRECONDITION: VM {name} has no agent endpoint"
        )
    sys.exit(_exec(v.agent_endpoint, list(argv), timeout))


@vm.command("run", cls=ProgramCommand, example="agent-vm vm run -- ls -la")
@click.argument("argv", nargs=-1, required=True)
@profile_option()
@network_option()
@bridge_option()
@image_option()
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@handle_errors
def vm_run(
    argv: tuple[str, ...],
    profile: str,
    network: str,
    bridge: str | None,
    image: str | None,
    timeout: float,
) -> None:
    """Boot a fresh VM, run a command in it, destroy it; exits with the command's code.

    The command's own options go after `--`: agent-vm vm run -- uname -r.
    """
    check_timeout(timeout)
    name = check_bridge(network, bridge)
    start = time.monotonic()
    v = _create(profile, network, {"created-by": "agent-vm-cli"}, name, image)
    try:
        v = _wait_ready(v.name, 120)
        click.echo(
            f"agent-vm: {v.name} ready in {time.monotonic() - start:.1f} s "
            f"(kernel {v.guest.kernel_release})",
            err=True,
        )
        code = _exec(v.agent_endpoint, list(argv), timeout)
    finally:
        vm_stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=v.name), timeout=60)
        click.echo(f"agent-vm: {v.name} destroyed", err=True)
    sys.exit(code)
