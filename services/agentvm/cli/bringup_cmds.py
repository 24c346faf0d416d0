"""`agent-vm up / down / status / restart`: the services of one host, kept running.

`up` starts the supervisor (:mod:`.supervisor`), which starts the services and
restarts one that exits; under systemd (deploy/systemd) none of this is used.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from agentvm.cli import services
from agentvm.cli import supervisor as sup
from agentvm.cli.base import handle_errors, print_table, settings
from agentvm.cli.group import fail
from agentvm.common import tls
from agentvm.common.config import Settings

# `up` waits this long for the supervisor's bring-up (each service may take
# sup.START_TIMEOUT).
UP_TIMEOUT = 4 * sup.START_TIMEOUT + 30
DOWN_TIMEOUT = 4 * sup.STOP_TIMEOUT + 30


def _tls(s: Settings) -> None:
    given = [n for n in tls.FILE_VARIABLES if os.environ.get(n, "").strip()]
    if given and s.tls == "mutual":
        fail(
            f"{', '.join(given)} name one process's certificate, but `agent-vm up` starts "
            "five services that each need their own: unset them (up makes the "
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


def _wait_for_bring_up(s: Settings, proc: Any) -> dict[str, Any]:  # noqa: RET503 (fail)
    deadline = time.monotonic() + UP_TIMEOUT
    while time.monotonic() < deadline:
        status = sup.read_status(s)
        if status is not None and status.get("phase") not in (None, "starting"):
            return status
        if proc.poll() is not None:
            status = sup.read_status(s)
            if status is not None and status.get("phase") != "starting":
                return status
            if proc.returncode == 0 and sup.running_pid(s) is not None:
                time.sleep(0.2)  # a concurrent `up` started it: wait for that one's
                continue
            fail(
                f"the supervisor exited with status {proc.returncode} during bring-up; "
                f"see {s.log_dir / 'supervisor.log'}"
            )
        time.sleep(0.2)
    fail(
        f"the services were not all up within {UP_TIMEOUT:.0f} s; see `agent-vm status` "
        f"and {s.log_dir / 'supervisor.log'}"
    )


def _pending_env_note(status: dict[str, Any]) -> None:
    """Say so when this `up` names settings the running services were not started with."""
    running = status.get("env") or {}
    mine = sup.env_digests(os.environ)
    differ = sorted(k for k in set(running) | set(mine) if running.get(k) != mine.get(k))
    if differ:
        click.echo(
            f"note: the running services were started with other {', '.join(differ)}: "
            "`up` changes nothing while they run (`agent-vm down` then `agent-vm up` "
            "applies them)",
            err=True,
        )
    if "AGENTVM_POOLS" in differ:
        click.echo(
            "note: pool sizes change without a restart: `agent-vm pool set KEY min=N max=N "
            "ttl=SECONDS` (KEY as `agent-vm pool status` shows it)",
            err=True,
        )


@click.command()
@handle_errors
def up() -> None:
    """Start every agent-vm service under a supervisor (idempotent).

    The supervisor restarts a service that exits (after 1 s, doubling with each
    exit in a row up to 60 s) and logs why; `agent-vm status` shows each
    service, `agent-vm down` stops them all.
    """
    s = settings()
    _tls(s)
    try:
        sup.RestartPolicy()
    except ValueError as exc:
        fail(str(exc))
    if sup.running_pid(s) is not None and (status := sup.read_status(s)) is not None:
        for name, info in status["services"].items():
            click.echo(f"{name}: {_running_words(info)}")
        _pending_env_note(status)
        return
    status = _wait_for_bring_up(s, sup.launch(s))
    if status["phase"] == "failed":
        fail(
            f"{status['error']}. The services this `up` started are stopped again; fix the "
            "cause and run `agent-vm up` again"
        )
    for name, info in status["services"].items():
        click.echo(f"{name}: {info['result']}")


def _running_words(info: dict[str, Any]) -> str:
    state = info["state"]
    if state == "running":
        return f"already running (pid {info['pid']}, restarts {info['restarts']})"
    if state == "external":
        return "already running (not started by `agent-vm up`: not supervised)"
    if state == "backoff":
        left = max(0.0, (info["next_start_at"] or 0) - time.time())
        return f"restarting in {left:.0f} s (it exited with {info['last_exit']}; see {info['log']})"
    return str(state)


@click.command()
@handle_errors
def down() -> None:
    """Stop every agent-vm service started by `agent-vm up`, and its supervisor (idempotent)."""
    s = settings()
    pid = sup.running_pid(s)
    results: dict[str, str] = {}
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT
        while services.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if services.alive(pid):
            click.echo(f"supervisor (pid {pid}) did not stop: killed", err=True)
            os.kill(pid, signal.SIGKILL)
        status = sup.read_status(s) or {}
        if status.get("phase") == "stopped":
            results = {n: i["result"] for n, i in status["services"].items()}
    (s.run_dir / sup.STATUS_NAME).unlink(missing_ok=True)
    for spec in reversed(services.service_specs(s)):
        # Whatever the supervisor did not stop (started by an older `up`, or it was killed).
        result = services.stop(s, spec)
        if result == "not running" and spec.name in results:
            result = results[spec.name]
        click.echo(f"{spec.name}: {result}")


def _uptime(since: float | None) -> str:
    if not since:
        return "-"
    left = int(max(0.0, time.time() - since))
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def status_rows(s: Settings) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The supervisor's status (None: none runs) and one row per service."""
    specs = services.service_specs(s)
    with ThreadPoolExecutor(len(specs)) as pool:
        healths = list(pool.map(lambda spec: services.health(s, spec), specs))
    status = sup.read_status(s) if sup.running_pid(s) is not None else None
    rows = []
    for spec, health in zip(specs, healths, strict=True):
        info = (status or {}).get("services", {}).get(spec.name, {})
        pid = info.get("pid") if status else services.read_pid(s, spec)
        rows.append(
            {
                "service": spec.name,
                "status": health,
                "state": info.get("state", "not supervised"),
                "pid": pid,
                "uptime_s": round(time.time() - info["started"], 1)
                if info.get("started") and pid
                else None,
                "restarts": info.get("restarts", 0),
                "last_exit": info.get("last_exit"),
                "next_restart_in_s": round(max(0.0, info["next_start_at"] - time.time()), 1)
                if info.get("next_start_at")
                else None,
                "address": spec.address,
                "log": str(services.log_path(s, spec)),
            }
        )
    return status, rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the services as a JSON object.")
@handle_errors
def status(as_json: bool) -> None:
    """Show each service: health, pid, uptime, restarts, last exit.

    Exit 0 when every service is SERVING, 1 otherwise.
    """
    s = settings()
    supervisor, rows = status_rows(s)
    if as_json:
        sup_view = (
            None
            if supervisor is None
            else {k: supervisor[k] for k in ("pid", "started", "phase", "log")}
        )
        click.echo(json.dumps({"supervisor": sup_view, "services": rows}, indent=2))
    else:
        if supervisor is None:
            where = (
                "systemd runs this host's services (deploy/systemd)"
                if services.systemd_runs_services()
                else "a service that exits stays down; `agent-vm up` starts one"
            )
            click.echo(f"supervisor: not running ({where})")
        else:
            click.echo(
                f"supervisor: pid {supervisor['pid']}, up {_uptime(supervisor['started'])}, "
                f"log {supervisor['log']}"
            )
        print_table(
            ["SERVICE", "STATUS", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"],
            [
                [
                    r["service"],
                    r["status"],
                    r["state"]
                    if r["next_restart_in_s"] is None
                    else f"{r['state']} (restart in {r['next_restart_in_s']:.0f}s)",
                    r["pid"] or "-",
                    _uptime(time.time() - r["uptime_s"] if r["uptime_s"] is not None else None),
                    r["restarts"],
                    r["last_exit"] or "-",
                ]
                for r in rows
            ],
        )
    sys.exit(0 if all(r["status"] == "SERVING" for r in rows) else 1)


@click.command()
@click.argument(
    "service_name", metavar="[SERVICE]", required=False, type=click.Choice(services.NAMES)
)
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=sup.START_TIMEOUT + sup.STOP_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each service to serve again.",
)
@handle_errors
def restart(service_name: str | None, timeout: float) -> None:
    """Restart one service (or all, in start order) under the supervisor of `agent-vm up`.

    Each service stops as at `down` (SIGTERM, its own clean-up) and starts
    again, reconciling its state as at `up`; the others keep running.
    """
    s = settings()
    if sup.running_pid(s) is None:
        if services.systemd_runs_services():
            unit = f"agent-vm-{service_name}" if service_name else "'agent-vm-*'"
            how = f"`systemctl restart {unit}`"
            fail(f"no supervisor of `agent-vm up` runs here: under systemd, {how}")
        fail("no supervisor of `agent-vm up` runs here: start the services with `agent-vm up`")
    names = [service_name] if service_name else list(services.NAMES)
    before = sup.read_status(s) or {"services": {}}
    unsupervised = [n for n in names if before["services"].get(n, {}).get("state") == "external"]
    if unsupervised:
        fail(
            f"{', '.join(unsupervised)} was not started by `agent-vm up` (not supervised): "
            "stop it, then `agent-vm up` starts it supervised"
        )
    old = {n: before["services"].get(n, {}).get("restarts", 0) for n in names}
    request = sup.request_restart(s, names)
    deadline = time.monotonic() + timeout * len(names)
    pending = list(names)
    while pending and time.monotonic() < deadline:
        status = sup.read_status(s) or {"services": {}}
        for name in list(pending):
            info = status["services"].get(name, {})
            if info.get("restarts", 0) > old[name] and info.get("state") in ("running", "backoff"):
                pending.remove(name)
                if info["state"] == "running":
                    click.echo(f"{name}: restarted (pid {info['pid']})")
                else:
                    fail(
                        f"{name} did not start again: it exited with {info['last_exit']}; "
                        f"see {info['log']} (the supervisor keeps trying: `agent-vm status`)"
                    )
        if sup.running_pid(s) is None:
            fail("the supervisor stopped (`agent-vm down`?) before the restart was done")
        time.sleep(0.2)
    request.unlink(missing_ok=True)
    if pending:
        fail(
            f"{', '.join(pending)} did not serve again within {timeout * len(names):.0f} s: "
            "see `agent-vm status` and the service's log"
        )
