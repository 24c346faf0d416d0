"""`agent-vm gc`, `doctor`, `bench`, `alerts` and `audit`: looking after an installation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import grpc

from agentvm.cli import bench as bench_mod
from agentvm.cli import doctor as doctor_mod
from agentvm.cli.base import (
    handle_errors,
    message_dict,
    service,
    settings,
    vm_stub,
)
from agentvm.cli.group import fail
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    vm_manager_pb2,
)


# -- maintenance ----------------------------------------------------------------
@click.command()
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
    from agentvm.executor.executor import (
        CREATOR_LABEL,
        EXECUTOR_LABEL,
        OWNER_LABEL,
        SANDBOX_LABEL,
        orphaned_vms,
    )

    vms = (
        vm_stub()
        .ListVMs(vm_manager_pb2.ListVMsRequest(label_selector=dict([OWNER_LABEL])), timeout=30)
        .vms
    )
    by_executor: dict[str, list[common_pb2.VM]] = {}
    for v in vms:
        by_executor.setdefault(v.labels.get(EXECUTOR_LABEL, ""), []).append(v)
    reclaimed = 0
    for name, group in sorted(by_executor.items()):
        # Any replica of a group lists all its open sandboxes: the group's name
        # when it is an address (one executor), else the replicas that made its VMs.
        addresses = sorted({name} | {v.labels.get(CREATOR_LABEL, "") for v in group} - {""})
        where = f"executor {name or '(unknown)'}"
        open_ids: set[str] | None = None
        for address in addresses:
            try:
                stub = executor_pb2_grpc.ExecutorServiceStub(service(address, "executor"))
                resp = stub.ListSandboxes(executor_pb2.ListSandboxesRequest(), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                continue  # not running (or a group's name, not an address)
            open_ids = {sb.id for sb in resp.sandboxes}
            break
        if open_ids is None:
            open_ids = set()  # no replica answers: none of its sandboxes is open
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON, a level each.")
def doctor(as_json: bool) -> None:
    """Check prerequisites; exit 1 if agent-vm cannot run VMs here.

    Each check is ok, WARN (optional, not met: agent-vm works, with less) or
    FAIL (required); only a FAIL makes the exit status 1.
    """
    checks = doctor_mod.run_checks(settings())
    line, status = doctor_mod.summary(checks)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            word, color = doctor_mod.MARKS[c.level]
            click.echo(f"{click.style(word, fg=color)} {c.name}: {c.detail}")
            if not c.ok and c.fix:
                click.echo(f"     fix: {c.fix}")
        click.echo(line)
    sys.exit(status)


# -- benchmark ----------------------------------------------------------------
@click.command()
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
@click.option(
    "--oneshots",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="One-shot runs, sandbox creates and closes to time.",
)
@click.option(
    "--commands",
    type=click.IntRange(1, 10000),
    default=50,
    show_default=True,
    help="Commands to time in a warm sandbox (p50/p99).",
)
@handle_errors
def bench(
    as_json: bool,
    cold: int,
    restores: int,
    acquires: int,
    concurrent: int,
    oneshots: int,
    commands: int,
) -> None:
    """Measure cold boot, template restore, pool acquire, concurrent runs and the
    latency a caller feels.

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
        oneshots=oneshots,
        commands=commands,
    )
    figures = bench_mod.run(settings(), cfg, lambda line: click.echo(line, err=True))
    click.echo(json.dumps(figures, indent=2) if as_json else bench_mod.render(figures))


# -- audit log ------------------------------------------------------------------
@click.command("alerts")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per alert, one per line.")
@handle_errors
def alerts_cmd(as_json: bool) -> None:
    """Print the monitor's alerts (anomalies and the responses taken) as they happen.

    Runs until Ctrl-C (exit 130).
    """
    channel = service(settings().monitor_addr, "monitor")
    stub = monitor_pb2_grpc.MonitorServiceStub(channel)
    try:
        for resp in stub.WatchAlerts(monitor_pb2.WatchAlertsRequest()):
            a = resp.alert
            if as_json:
                click.echo(json.dumps(message_dict(a)))
            else:
                when = a.time.ToDatetime().strftime("%H:%M:%S")
                click.echo(f"{when}  {a.rule}  {a.vm_name}  {a.response}: {a.description}")
    finally:
        channel.close()


@click.group()
def audit() -> None:
    """The monitor's audit log (hash-chained JSON lines)."""


@audit.command("verify")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--head",
    type=click.Path(path_type=Path),
    help="The audit.head file: a log cut short of it fails (default: DIR/audit.head).",
)
@click.option("--strict-start", is_flag=True, help="Fail unless the records start at seq 0.")
def audit_verify(paths: tuple[Path, ...], head: Path | None, strict_start: bool) -> None:
    """Check the hash chain of audit FILEs (any order) or of an audit DIR.

    Without PATHS, the installation's audit directory (AGENTVM_AUDIT_DIR,
    default /var/log/agent-vm/audit). Exit 0 when intact, 1 when tampered
    with, 2 when a file cannot be read.
    """
    from agentvm.monitor import audit as audit_log

    if not paths:
        paths = (settings().audit_dir,)

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
