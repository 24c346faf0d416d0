"""`agent-vm`: the command line (bring-up, doctor, images, VMs)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict, MessageToJson

from agentvm.cli import bench as bench_mod
from agentvm.cli import doctor as doctor_mod
from agentvm.cli import services
from agentvm.common import tls
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.grpc_util import Caller, sync_channel
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from agentvm.vm_manager.templates import MAX_MEMORY_MIB, MAX_VCPUS

F = TypeVar("F", bound=Callable[..., Any])

PROFILES = {
    "light": common_pb2.RESOURCE_PROFILE_LIGHT,
    "standard": common_pb2.RESOURCE_PROFILE_STANDARD,
    "intensive": common_pb2.RESOURCE_PROFILE_INTENSIVE,
}
NETWORKS = {
    "nat-filtered": common_pb2.NETWORK_MODE_NAT_FILTERED,
    "isolated": common_pb2.NETWORK_MODE_ISOLATED,
    "bridge": common_pb2.NETWORK_MODE_BRIDGE,
}
DEFAULT_NETWORK = "nat-filtered"


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"agent-vm: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error (bad option value, unknown command) as one line, exit 2."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # the help text itself
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "agent-vm"
        fail(f"{exc.format_message()} (see `{where} --help`)")


class Group(click.Group):
    """The `agent-vm` group: usage errors anywhere below it are one line."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)


def handle_errors(func: F) -> F:
    """One line per failure, exit 2; a service that is down says how to start it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            # gRPC's own words for "nothing listens there" (not e.g. a service
            # that cannot connect to libvirt: it is up, and says what to do).
            if code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect"):
                fail(
                    f"an agent-vm service is not reachable ({details}): "
                    "start the services with `agent-vm up`"
                )
            fail(f"{code.name}: {details}")
        except AgentVMError as exc:
            fail(exc.message)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def check_timeout(timeout: float) -> None:
    if not 0 < timeout <= 86400:
        fail(f"--timeout {timeout}: use a number of seconds between 0 and 86400")


def settings() -> Settings:
    try:
        return Settings()
    except AgentVMError as exc:
        fail(exc.message)


def service(address: str, name: str) -> grpc.Channel:
    """A channel to the agent-vm service ``name``: the installation's token and certificate."""
    return Caller.of(settings()).channel(address, name)


def vm_stub() -> vm_manager_pb2_grpc.VMManagerServiceStub:
    return vm_manager_pb2_grpc.VMManagerServiceStub(
        service(settings().vm_manager_addr, "vm-manager")
    )


def print_json(msg: Any) -> None:
    click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


@click.group(cls=Group)
@click.version_option("0.1.0", prog_name="agent-vm")
def cli() -> None:
    """Run untrusted agent code in throw-away KVM/QEMU virtual machines."""


# -- bring-up ---------------------------------------------------------------
@cli.command()
@handle_errors
def up() -> None:
    """Start every agent-vm service (idempotent)."""
    s = settings()
    given = [n for n in tls.FILE_VARIABLES if os.environ.get(n, "").strip()]
    if given and s.tls == "mutual":
        fail(
            f"{', '.join(given)} name one process's certificate, but `agent-vm up` starts "
            "four services that each need their own: unset them (up makes the "
            "installation's in AGENTVM_TLS_DIR), or start each service with its own "
            "files (deploy/systemd)"
        )
    if s.tls == "mutual":
        try:
            made = tls.ensure(s.tls_dir)
        except tls.TLSError as exc:
            fail(str(exc))
        if made:
            click.echo(f"tls: certificates for {', '.join(made)} in {s.tls_dir}")
    for spec in services.service_specs(s):
        try:
            click.echo(f"{spec.name}: {services.start(s, spec)}")
        except RuntimeError as exc:
            fail(str(exc))


@cli.command()
@handle_errors
def down() -> None:
    """Stop every agent-vm service started by `agent-vm up` (idempotent)."""
    s = settings()
    for spec in reversed(services.service_specs(s)):
        click.echo(f"{spec.name}: {services.stop(s, spec)}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be reclaimed.")
@click.option(
    "--min-age",
    type=click.FloatRange(0, 30 * 86400),
    default=300.0,
    show_default=True,
    help="Leave VMs younger than this many seconds (a sandbox may still be booting).",
)
@handle_errors
def gc(dry_run: bool, min_age: float) -> None:
    """Reclaim VMs whose owner no longer holds them (sandboxes that are not open).

    Executors sweep their own VMs every AGENTVM_RECONCILE_INTERVAL seconds and
    at start; this does it now, also for executors that are gone for good.
    vm-manager removes VM directories without a domain when it starts. It needs
    vm-manager running (each VM's network state is vm-manager's): with the
    services down, `agent-vm up` runs every service's own reconciliation.
    """
    from agentvm.executor.executor import EXECUTOR_LABEL, OWNER_LABEL, SANDBOX_LABEL, orphaned_vms

    vms = (
        vm_stub()
        .ListVMs(vm_manager_pb2.ListVMsRequest(label_selector=dict([OWNER_LABEL])), timeout=30)
        .vms
    )
    by_executor: dict[str, list[common_pb2.VM]] = {}
    for v in vms:
        by_executor.setdefault(v.labels.get(EXECUTOR_LABEL, ""), []).append(v)
    reclaimed = 0
    for address, group in sorted(by_executor.items()):
        where = f"executor {address or '(unknown)'}"
        try:
            stub = executor_pb2_grpc.ExecutorServiceStub(service(address, "executor"))
            resp = stub.ListSandboxes(executor_pb2.ListSandboxesRequest(), timeout=10)
            open_ids = {sb.id for sb in resp.sandboxes}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            open_ids = set()  # the executor is gone: none of its sandboxes is open
            where += " (not running)"
        for v in orphaned_vms(group, open_ids, now=time.time(), min_age=min_age):
            sandbox = v.labels.get(SANDBOX_LABEL, "?")
            reason = f"agent-vm gc: sandbox {sandbox} is not open in {where}"
            if not dry_run:
                vm_stub().DestroyVM(
                    vm_manager_pb2.DestroyVMRequest(name=v.name, reason=reason), timeout=60
                )
            click.echo(f"{v.name}: {'would reclaim' if dry_run else 'reclaimed'} ({reason})")
            reclaimed += 1
    if not reclaimed:
        click.echo("nothing to reclaim")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check prerequisites; exit 1 if agent-vm cannot run VMs here."""
    checks = doctor_mod.run_checks(settings())
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            mark = click.style("ok  ", fg="green") if c.ok else click.style("FAIL", fg="red")
            click.echo(f"{mark} {c.name}: {c.detail}")
            if not c.ok and c.fix:
                click.echo(f"     fix: {c.fix}")
        click.echo("ready" if not failed else f"{len(failed)} problem(s) found")
    sys.exit(1 if failed else 0)


# -- images -------------------------------------------------------------------
@cli.group()
def image() -> None:
    """The guest image."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date image exists.")
@handle_errors
def image_build(force: bool) -> None:
    """Build the guest image through vm-manager (streams progress)."""
    for resp in vm_stub().BuildImage(vm_manager_pb2.BuildImageRequest(force=force), timeout=1800):
        if resp.HasField("image"):
            click.echo(
                f"image {resp.image.id} ready: kernel {resp.image.kernel_release}, "
                f"{len(resp.image.packages)} packages, {resp.image.path}"
            )
        else:
            click.echo(resp.log_line)


@image.command("status")
@handle_errors
def image_status() -> None:
    """Show the guest image (exit 1 if none is built for this version)."""
    resp = vm_stub().GetImage(vm_manager_pb2.GetImageRequest(), timeout=10)
    print_json(resp)
    sys.exit(0 if resp.present else 1)


# -- benchmark ----------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--cold", type=click.IntRange(1, 100), default=3, show_default=True, help="Cold boots to time."
)
@click.option(
    "--restores",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Template restores to time.",
)
@click.option(
    "--acquires",
    type=click.IntRange(1, 10000),
    default=200,
    show_default=True,
    help="Pool acquires to time (p50/p99).",
)
@click.option(
    "--concurrent",
    type=click.IntRange(1, 64),
    default=10,
    show_default=True,
    help="Executions to run at once through the executor.",
)
@handle_errors
def bench(as_json: bool, cold: int, restores: int, acquires: int, concurrent: int) -> None:
    """Measure cold boot, template restore, pool acquire and concurrent runs.

    Needs the services of `agent-vm up` (with a standard pool). Progress goes
    to stderr; the figures, with a host baseline from the same run and the
    cold/restore and cold/acquire ratios, to stdout.
    """
    cfg = bench_mod.BenchConfig(
        cold=cold,
        restores=restores,
        acquires=acquires,
        first_commands=min(10, acquires),
        concurrent=concurrent,
    )
    figures = bench_mod.run(settings(), cfg, lambda line: click.echo(line, err=True))
    click.echo(json.dumps(figures, indent=2) if as_json else bench_mod.render(figures))


# -- memory templates -------------------------------------------------------------
@cli.group()
def template() -> None:
    """Memory templates: VMs booted once and saved, restored in about a second."""


@template.command("prepare")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="standard")
@click.option("--force", is_flag=True, help="Rebuild even if a current template exists.")
@handle_errors
def template_prepare(profile: str, force: bool) -> None:
    """Build the template of PROFILE unless a current one exists."""
    req = vm_manager_pb2.PrepareTemplateRequest(profile=PROFILES[profile], force=force)
    resp = vm_stub().PrepareTemplate(req, timeout=900)
    print_json(resp)


@template.command("list")
@handle_errors
def template_list() -> None:
    """List the memory templates on this host."""
    resp = vm_stub().ListTemplates(vm_manager_pb2.ListTemplatesRequest(), timeout=30)
    for t in resp.templates:
        click.echo(
            f"{t.key}  memory {t.memory_state_bytes >> 20} MiB  disk {t.disk_bytes >> 20} MiB  "
            f"built in {t.build_duration.ToNanoseconds() / 1e9:.1f} s  QEMU {t.qemu_version}"
        )


@template.command("delete")
@click.argument("key")
@handle_errors
def template_delete(key: str) -> None:
    """Delete template KEY (refused while VMs use it)."""
    vm_stub().DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=key), timeout=60)
    click.echo(f"template {key} deleted")


# -- pools --------------------------------------------------------------------
@cli.group()
def pool() -> None:
    """The pool-manager's pools of pre-warmed VMs."""


@pool.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status message as JSON.")
@handle_errors
def pool_status(as_json: bool) -> None:
    """Show each pool: ready, in use and warming VMs, and its counters."""
    stub = pool_manager_pb2_grpc.PoolManagerServiceStub(
        service(settings().pool_manager_addr, "pool-manager")
    )
    resp = stub.GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=10)
    if as_json:
        print_json(resp)
        return
    for p in resp.pools:
        profile = common_pb2.ResourceProfile.Name(p.key.profile).removeprefix("RESOURCE_PROFILE_")
        source = "memory template" if p.template_ready else "cold boot (template not ready)"
        click.echo(
            f"{profile.lower()}: ready {p.ready}, in use {p.in_use}, warming {p.warming} "
            f"(min {p.min_size}, max {p.max_size}, ttl {p.ttl.seconds} s); new VMs from {source}"
        )
        click.echo(
            f"  acquired {p.acquired_total}, created {p.created_total}, on demand "
            f"{p.on_demand_total}, replaced unhealthy {p.replaced_unhealthy}, "
            f"evicted by ttl {p.evicted_ttl}"
        )


# -- VMs ---------------------------------------------------------------------
@cli.group()
def vm() -> None:
    """Create, inspect and remove VMs directly through vm-manager."""


def _create(profile: str, network: str, labels: dict[str, str] | None = None) -> common_pb2.VM:
    req = vm_manager_pb2.CreateVMRequest(
        profile=PROFILES[profile], network_mode=NETWORKS[network], start=True, labels=labels or {}
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
    fail("the guest agent ended the stream without an exit status")


@vm.command("create")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="standard")
@click.option("--network", type=click.Choice(list(NETWORKS)), default=DEFAULT_NETWORK)
@click.option("--no-wait", is_flag=True, help="Return before the guest agent is ready.")
@handle_errors
def vm_create(profile: str, network: str, no_wait: bool) -> None:
    """Create and start a VM; print it as JSON once its agent answers."""
    v = _create(profile, network)
    if not no_wait:
        v = _wait_ready(v.name, 120)
    print_json(v)


@vm.command("list")
@handle_errors
def vm_list() -> None:
    """List VMs."""
    for v in vm_stub().ListVMs(vm_manager_pb2.ListVMsRequest(), timeout=10).vms:
        click.echo(
            f"{v.name}  {common_pb2.VMState.Name(v.state).removeprefix('VM_STATE_')}  "
            f"{common_pb2.ResourceProfile.Name(v.profile).removeprefix('RESOURCE_PROFILE_')}"
            + _pool_mark(v)
        )


def _pool_mark(v: common_pb2.VM) -> str:
    """``  pool: KEY (warm)`` / ``(leased to WHO)`` for pool VMs, else ""."""
    if not v.HasField("pool"):
        return ""
    if v.pool.state == common_pb2.POOL_VM_STATE_LEASED:
        return f"  pool: {v.pool.pool} (leased to {v.pool.lessee or 'unnamed'})"
    return f"  pool: {v.pool.pool} (warm)"


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
@click.option("--description", default="")
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
@handle_errors
def snapshot_list(name: str) -> None:
    """List the snapshots of VM NAME."""
    resp = vm_stub().ListSnapshots(vm_manager_pb2.ListSnapshotsRequest(vm_name=name), timeout=60)
    for s in resp.snapshots:
        kind = "memory+disk" if s.includes_memory else "disk"
        click.echo(f"{s.name}  {kind}  {s.size_bytes} bytes  {s.description}")


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


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@handle_errors
def vm_exec(name: str, argv: tuple[str, ...], timeout: float) -> None:
    """Run a command in a running VM; exits with its exit code."""
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


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--profile", type=click.Choice(list(PROFILES)), default="standard")
@click.option("--network", type=click.Choice(list(NETWORKS)), default=DEFAULT_NETWORK)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@handle_errors
def vm_run(argv: tuple[str, ...], profile: str, network: str, timeout: float) -> None:
    """Boot a fresh VM, run a command in it, destroy it; exits with the command's code."""
    check_timeout(timeout)
    start = time.monotonic()
    v = _create(profile, network, {"created-by": "agent-vm-cli"})
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


MAX_INLINE_INPUT = 15 * 1024 * 1024


def _collect_inputs(paths: tuple[str, ...]) -> dict[str, Path]:
    """input/-relative name -> local file, for files and (recursively) directories."""
    out: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    out[f"{p.name}/{f.relative_to(p).as_posix()}"] = f
        elif p.is_file():
            out[p.name] = p
        else:
            fail(f"--input {raw}: no such file or directory")
    total = sum(f.stat().st_size for f in out.values())
    if total > MAX_INLINE_INPUT:
        fail(
            f"--input files total {total} bytes, more than a run carries ({MAX_INLINE_INPUT}): "
            "use the Python client (Sandbox.files.upload) for large inputs"
        )
    return out


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "code", help="Python code to run (instead of FILE).")
@click.option("--cmd", "shell", help="Shell command to run (instead of FILE).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="standard")
@click.option("--network", type=click.Choice(list(NETWORKS)), default=DEFAULT_NETWORK)
@click.option(
    "--allow-domain",
    "allow_domains",
    multiple=True,
    metavar="NAME",
    help="Name the run may resolve and connect to (repeat; '*.example.com' for a zone). "
    "Replaces the default allowlist.",
)
@click.option(
    "--allow-cidr", "allow_cidrs", multiple=True, metavar="CIDR", help="Address range allowed."
)
@click.option(
    "--allow-port",
    "ports",
    multiple=True,
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="TCP port allowed (repeat; default 80, 443, 22).",
)
@click.option(
    "--cpus", type=click.IntRange(0, MAX_VCPUS), default=0, help="vCPUs (default: the profile's)."
)
@click.option(
    "--memory",
    type=click.IntRange(0, MAX_MEMORY_MIB),
    default=0,
    help="Memory in MiB (default: the profile's).",
)
@click.option("--input", "inputs", multiple=True, help="File or directory for /workspace/input.")
@click.option(
    "--output", "output_dir", type=click.Path(file_okay=False), help="Save /workspace/output here."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of live output."
)
def run_cmd(
    argv: tuple[str, ...],
    code: str | None,
    shell: str | None,
    timeout: float,
    profile: str,
    network: str,
    allow_domains: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    ports: tuple[int, ...],
    cpus: int,
    memory: int,
    inputs: tuple[str, ...],
    output_dir: str | None,
    as_json: bool,
) -> None:
    """Run FILE.py [-- ARGS], -c CODE or --cmd 'SHELL' in a fresh VM; exit with its code.

    Exits 124 when the program timed out. Output files written to
    /workspace/output are listed (and saved with --output DIR).
    """
    import agent_vm

    if (
        sum(x is not None for x in (code, shell))
        + (1 if argv and code is None and shell is None else 0)
        != 1
    ):
        fail("give exactly one of FILE.py, -c CODE or --cmd 'SHELL COMMAND'")
    check_timeout(timeout)
    policy = None
    if allow_domains or allow_cidrs or ports:
        if network != "nat-filtered":
            fail("--allow-domain, --allow-cidr and --allow-port need --network nat-filtered")
        policy = agent_vm.NetworkPolicy(allow_domains, allow_cidrs, ports)
    files = _collect_inputs(inputs)
    kwargs: dict[str, Any] = {}
    if code is not None:
        kwargs = {"code": code, "args": argv}
    elif shell is not None:
        kwargs = {"cmd": shell, "args": argv}
    else:
        script = Path(argv[0])
        if not script.is_file():
            fail(f"{argv[0]}: no such file (to run a command, use --cmd)")
        files[script.name] = script
        kwargs = {"cmd": ["python3", f"/workspace/input/{script.name}"], "args": argv[1:]}

    def live(stream: Any) -> Callable[[str], object] | None:
        if as_json:
            return None
        return lambda text: (stream.write(text), stream.flush())

    try:
        result = agent_vm.run(
            **kwargs,
            inputs=files,
            timeout=timeout,
            profile=profile,  # type: ignore[arg-type]
            network=network,  # type: ignore[arg-type]
            policy=policy,
            cpus=cpus,
            memory_mib=memory,
            outputs_dir=output_dir,
            on_stdout=live(sys.stdout),
            on_stderr=live(sys.stderr),
            address=settings().executor_addr,
        )
    except agent_vm.AgentVMError as exc:
        fail(f"{exc.code}: {exc.message}")
    for skipped in result.skipped_output_files:
        click.echo(f"agent-vm: output {skipped.path!r} not read: {skipped.detail}", err=True)
    if result.output_files_error:
        click.echo(f"agent-vm: {result.output_files_error}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "exit_code": result.exit_code,
                    "stdout": result.stdout,
                    "stderr": result.stderr,
                    "timed_out": result.timed_out,
                    "duration_s": round(result.duration_s, 3),
                    "boot_s": round(result.boot_s, 3),
                    "vm": result.vm_name,
                    "output_files": [
                        {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256}
                        | ({"truncated": True} if f.truncated else {})
                        for f in result.output_files
                    ],
                    "skipped_output_files": [
                        dataclasses.asdict(f) for f in result.skipped_output_files
                    ],
                    "output_files_error": result.output_files_error,
                    "stdout_truncated": result.stdout_truncated,
                    "stderr_truncated": result.stderr_truncated,
                    "network_log": [dataclasses.asdict(r) for r in result.network_log],
                }
            )
        )
    elif result.timed_out:
        click.echo(f"agent-vm: timed out after {timeout:g} s", err=True)
    sys.exit(result.exit_code)


# -- audit log ------------------------------------------------------------------
@cli.command("alerts")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per alert.")
@handle_errors
def alerts_cmd(as_json: bool) -> None:
    """Print the monitor's alerts (anomalies and the responses taken) as they happen."""
    channel = service(settings().monitor_addr, "monitor")
    stub = monitor_pb2_grpc.MonitorServiceStub(channel)
    try:
        for resp in stub.WatchAlerts(monitor_pb2.WatchAlertsRequest()):
            a = resp.alert
            if as_json:
                click.echo(MessageToJson(a, indent=None))
            else:
                when = a.time.ToDatetime().strftime("%H:%M:%S")
                click.echo(f"{when}  {a.rule}  {a.vm_name}  {a.response}: {a.description}")
    except KeyboardInterrupt:
        pass
    finally:
        channel.close()


@cli.group()
def audit() -> None:
    """The monitor's audit log (hash-chained JSON lines)."""


@audit.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--head",
    type=click.Path(path_type=Path),
    help="The audit.head file: a log cut short of it fails (default: DIR/audit.head).",
)
@click.option("--strict-start", is_flag=True, help="Fail unless the records start at seq 0.")
def audit_verify(paths: tuple[Path, ...], head: Path | None, strict_start: bool) -> None:
    """Check the hash chain of audit FILEs (any order) or of an audit DIR.

    Exit 0 when intact, 1 when tampered with, 2 when a file cannot be read.
    """
    from agentvm.monitor import audit as audit_log

    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        try:
            found = audit_log.log_files(path)
        except OSError as exc:
            fail(f"{path}: cannot read the directory: {exc.strerror or exc}")
        if not found:
            fail(f"{path}: no {audit_log.LOG_NAME} or {audit_log.ROTATED_GLOB} in it")
        files += found
        if head is None and (path / audit_log.HEAD_NAME).exists():
            head = path / audit_log.HEAD_NAME
    try:
        result = audit_log.verify(files, head, strict_start=strict_start)
    except OSError as exc:
        fail(f"{exc.filename or exc}: cannot read: {exc.strerror or exc}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for problem in result.problems:
        click.echo(problem)
    click.echo(result.summary())
    sys.exit(0 if result.ok else 1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
