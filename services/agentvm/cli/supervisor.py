"""The supervisor `agent-vm up` starts: it runs the services and restarts one that exits.

Without systemd nothing else would: a service that crashed stayed down and its
callers got ``UNAVAILABLE``. One supervisor per installation (a lock in the
run directory), daemonized by `up` (`python -m agentvm.cli.supervisor`),
stopped by `down` (SIGTERM: it stops the services, last started first).

A service that exits is started again after a delay that doubles with each
exit in a row (:class:`RestartPolicy`: 1 s, 2 s, 4 s ... at most 60 s; a run
longer than a minute ends the series), so a crash loop never spins. Each
restart is logged (here and in the service's own log, with the exit status or
signal) and reported to the monitor as a ``service.restarted`` event (in the
audit log). Files, in the run directory unless named:

* ``supervisor.pid``, ``supervisor.lock``;
* ``supervisor.json``: the state of each service (`agent-vm status` reads it);
* ``supervisor.requests/``: restarts asked for by `agent-vm restart`;
* ``LOG_DIR/supervisor.log``: its own log (JSON lines).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from agentvm.cli.services import (
    ServiceSpec,
    alive,
    describe_exit,
    health,
    log_path,
    note_in_log,
    pidfile,
    read_pid,
    service_specs,
    spawn,
    stop_pid,
    wait_serving,
)
from agentvm.common import logging as jsonlog
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.events import make_event
from agentvm.common.grpc_util import Caller
from agentvm.v1 import monitor_pb2, monitor_pb2_grpc

log = logging.getLogger("agentvm.supervisor")

STATUS_NAME = "supervisor.json"
PID_NAME = "supervisor.pid"
LOCK_NAME = "supervisor.lock"
REQUESTS_NAME = "supervisor.requests"
# Seconds a service may take from its start to SERVING.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# Events kept for the monitor while it cannot be reached.
MAX_PENDING_EVENTS = 1000


def _seconds(name: str, default: str) -> float:
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise ValueError(f"{name}={raw}: use a number of seconds between 0 and 86400")
    return value


@dataclass(frozen=True)
class RestartPolicy:
    """When a service that exited is started again (environment defaults)."""

    # AGENTVM_RESTART_BACKOFF: seconds before the first restart.
    first: float = field(default_factory=lambda: _seconds("AGENTVM_RESTART_BACKOFF", "1"))
    # AGENTVM_RESTART_BACKOFF_MAX: the delay doubles with each exit in a row, up to this.
    cap: float = field(default_factory=lambda: _seconds("AGENTVM_RESTART_BACKOFF_MAX", "60"))
    # AGENTVM_RESTART_STABLE: a run this long ends a series of exits in a row.
    stable: float = field(default_factory=lambda: _seconds("AGENTVM_RESTART_STABLE", "60"))

    def delay(self, exits_in_a_row: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(0, exits_in_a_row - 1)))


@dataclass
class Child:
    """One service as the supervisor knows it."""

    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    # A process started before this supervisor (adopted): watched by its pid.
    pid: int | None = None
    # starting | running | backoff | external (serving, not ours) | stopped
    state: str = "stopped"
    started: float = 0.0  # wall clock
    started_mono: float = 0.0
    restarts: int = 0
    exits_in_a_row: int = 0
    last_exit: str = ""
    last_exit_time: float = 0.0
    next_start: float = 0.0  # monotonic, while in backoff
    result: str = ""  # what `agent-vm up` / `down` print for it

    def exited(self) -> tuple[bool, int | None]:
        """Whether its process is gone, and its return code when known."""
        if self.proc is not None:
            rc = self.proc.poll()
            return rc is not None, rc
        if self.pid is not None:
            return not alive(self.pid), None
        return True, None

    def view(self, settings: Settings) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "started": self.started or None,
            "restarts": self.restarts,
            "last_exit": self.last_exit or None,
            "last_exit_time": self.last_exit_time or None,
            "next_start_at": time.time() + max(0.0, self.next_start - time.monotonic())
            if self.state == "backoff"
            else None,
            "log": str(log_path(settings, self.spec)),
            "result": self.result,
        }


class EventSender:
    """``service.restarted`` events to the monitor, each as the service it is about.

    Under mutual TLS a service reports its own events only; the supervisor
    holds every service's certificate (made by `up`) and reports a restart of
    the executor as the executor. Events wait while the monitor is down.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pending: list[monitor_pb2.Event] = []
        self._prefix = f"supervisor-{uuid.uuid4().hex[:12]}"
        self._n = 0
        self._next_try = 0.0

    def add(self, service: str, type_: str, severity: str, **attrs: Any) -> None:
        if not self.settings.monitor_addr:
            return
        self._n += 1
        event_id = f"{service}/{self._prefix}/{self._n}"
        self.pending.append(make_event(service, event_id, type_, severity=severity, attrs=attrs))
        del self.pending[:-MAX_PENDING_EVENTS]
        self._next_try = 0.0

    def flush(self) -> None:
        if not self.pending or time.monotonic() < self._next_try:
            return
        for service in sorted({ev.service for ev in self.pending}):
            batch = [ev for ev in self.pending if ev.service == service]
            try:
                caller = Caller.of(self.settings, service)
                with caller.channel(self.settings.monitor_addr, "monitor") as channel:
                    monitor_pb2_grpc.MonitorServiceStub(channel).ReportEvents(
                        monitor_pb2.ReportEventsRequest(events=batch), timeout=5
                    )
            except grpc.RpcError as exc:
                log.warning("monitor not reachable (%s): %d event(s) wait", exc.code(), len(batch))
                self._next_try = time.monotonic() + 5
                return
            except AgentVMError as exc:
                log.error(  # noqa: TRY400 (the message says it all)
                    "cannot report %s's events to the monitor: %s", service, exc.message
                )
            sent = {ev.id for ev in batch}
            self.pending = [ev for ev in self.pending if ev.id not in sent]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        policy: RestartPolicy,
        specs: list[ServiceSpec],
        tick: float = 0.2,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.children = [Child(spec) for spec in specs]
        self.tick = tick
        self.stopping = False
        self.phase = "starting"
        self.error = ""
        self.started = time.time()
        self.events = EventSender(settings)

    # -- files -------------------------------------------------------------
    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "started": self.started,
            "phase": self.phase,
            "error": self.error,
            "log": str(self.settings.log_dir / "supervisor.log"),
            # Digests, not values: AGENTVM_TOKEN is a secret (`up` only compares them).
            "env": env_digests(os.environ),
            "services": {c.spec.name: c.view(self.settings) for c in self.children},
        }
        path = self.settings.run_dir / STATUS_NAME
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(status, indent=1))
            tmp.replace(path)
        except OSError as exc:  # status goes stale; supervising goes on
            log.error("cannot write %s: %s", path, exc)  # noqa: TRY400 (no traceback needed)

    # -- starting and stopping one service ------------------------------------
    def _start(self, child: Child) -> str | None:
        """Start ``child`` and wait until it serves: None, or why it does not."""
        child.started, child.started_mono = time.time(), time.monotonic()
        try:
            proc = spawn(self.settings, child.spec)
        except OSError as exc:  # e.g. its log cannot be opened
            child.proc, child.pid = None, None
            return f"could not be started: {exc}"
        child.proc, child.pid = proc, proc.pid
        child.state = "starting"
        self.write_status()
        why = wait_serving(
            self.settings, child.spec, proc, START_TIMEOUT, stopping=lambda: self.stopping
        )
        if why is None:
            child.state = "running"
        elif proc.poll() is None:
            self._stop(child)
        self.write_status()
        return why

    def _stop(self, child: Child) -> str:
        if child.proc is not None:
            child.proc.terminate()
            try:
                child.proc.wait(STOP_TIMEOUT)
                result = "stopped"
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
                result = "killed after the grace period"
        elif child.pid is not None:
            result = stop_pid(child.pid, STOP_TIMEOUT)
        else:
            result = "not running"
        with contextlib.suppress(FileNotFoundError):
            pidfile(self.settings, child.spec).unlink()
        return result

    # -- bring-up ---------------------------------------------------------------
    def bring_up(self) -> bool:
        """Start every service in order (adopting those already serving)."""
        for child in self.children:
            spec = child.spec
            if self.stopping:
                self.error = "stopped during bring-up"
                return False
            pid = read_pid(self.settings, spec)
            if health(self.settings, spec) == "SERVING":
                if pid is None:
                    child.state = "external"
                    child.result = "already running (not started by `agent-vm up`: not supervised)"
                    continue
                child.pid, child.state = pid, "running"
                child.started = pidfile(self.settings, spec).stat().st_mtime
                child.started_mono = time.monotonic() - (time.time() - child.started)
                child.result = f"already running (pid {pid}, now supervised)"
                continue
            if pid is not None:
                log.warning("%s (pid %d) does not serve: stopping it", spec.name, pid)
                stop_pid(pid, STOP_TIMEOUT)
            why = self._start(child)
            if why is not None:
                self.error = f"{spec.name} {why}; see {log_path(self.settings, spec)}"
                return False
            child.result = f"started (pid {child.pid}, log {log_path(self.settings, spec)})"
            log.info("%s started (pid %s)", spec.name, child.pid)
        return True

    # -- the loop ------------------------------------------------------------------
    def run(self) -> int:
        self.write_status()
        if not self.bring_up():
            log.error("bring-up failed: %s", self.error)
            for child in reversed(self.children):
                if child.proc is not None:  # only what this supervisor started
                    child.result = self._stop(child)
                    child.state = "stopped"
            self.phase = "failed"
            self.write_status()
            return 1
        self.phase = "running"
        self.write_status()
        while not self.stopping:
            try:
                self.check_children()
                self.handle_requests()
                self.events.flush()
            except Exception:  # the supervisor must outlive its own bugs
                log.exception("supervisor loop failed; going on")
            time.sleep(self.tick)
        self.shut_down()
        return 0

    def check_children(self) -> None:
        for child in self.children:
            if self.stopping:
                return
            if child.state == "running":
                gone, rc = child.exited()
                if gone:
                    self._exited(child, rc)
            elif child.state == "backoff" and time.monotonic() >= child.next_start:
                self._restart(child, reason="")

    def _exited(self, child: Child, rc: int | None, how: str = "") -> None:
        spec = child.spec
        ran = time.monotonic() - child.started_mono
        child.exits_in_a_row = child.exits_in_a_row + 1 if ran < self.policy.stable else 1
        delay = self.policy.delay(child.exits_in_a_row)
        child.last_exit, child.last_exit_time = how or describe_exit(rc), time.time()
        child.proc, child.pid = None, None
        child.state, child.next_start = "backoff", time.monotonic() + delay
        with contextlib.suppress(FileNotFoundError):
            pidfile(self.settings, spec).unlink()
        what = how or f"exited with {child.last_exit}"
        message = (
            f"{spec.name} {what} after {ran:.1f} s; the supervisor restarts it in "
            f"{delay:g} s (exit {child.exits_in_a_row} in a row)"
        )
        log.warning(message)
        note_in_log(self.settings, spec, "error", message)
        self.write_status()

    def _restart(self, child: Child, reason: str) -> None:
        spec = child.spec
        child.restarts += 1
        why = self._start(child)
        cause = reason or child.last_exit
        if why is None:
            message = f"{spec.name} restarted (pid {child.pid}, restart {child.restarts}): {cause}"
            log.info(message)
            note_in_log(self.settings, spec, "info", message)
        else:
            log.error("%s restart %d failed: %s", spec.name, child.restarts, why)
        self.events.add(
            spec.name,
            "service.restarted",
            "warning" if not reason else "info",
            cause=cause,
            restarts=child.restarts,
            pid=child.pid or 0,
            serving=why is None,
            by="agent-vm up (supervisor)",
        )
        if why is not None and not self.stopping:
            # Why it does not serve (it could not be spawned, it exited before serving,
            # or it did not serve in time and was stopped here: not "SIGTERM").
            self._exited(child, child.proc.returncode if child.proc else None, how=why)

    def handle_requests(self) -> None:
        """Restarts asked for by `agent-vm restart` (one JSON file each)."""
        folder = self.settings.run_dir / REQUESTS_NAME
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            try:
                names = set(json.loads(path.read_text())["services"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable restart request %s", path)
                names = set()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            for child in self.children:
                if child.spec.name not in names or self.stopping:
                    continue
                if child.state == "external":
                    log.warning("%s is not supervised: not restarting it", child.spec.name)
                    continue
                log.info("%s: restart requested by `agent-vm restart`", child.spec.name)
                self._stop(child)
                child.proc, child.pid = None, None
                child.exits_in_a_row = 0
                child.last_exit = "stopped by `agent-vm restart`"
                child.last_exit_time = time.time()
                self._restart(child, reason="agent-vm restart")

    def shut_down(self) -> None:
        self.phase = "stopping"
        self.write_status()
        for child in reversed(self.children):
            if child.state == "external":
                child.result = "not started by `agent-vm up`: left running"
                continue
            child.result = self._stop(child)
            child.proc, child.pid, child.state = None, None, "stopped"
            log.info("%s %s", child.spec.name, child.result)
            self.write_status()
        self.events.flush()
        self.phase = "stopped"
        self.write_status()


def main() -> None:
    settings = Settings()
    jsonlog.setup("supervisor", settings.log_level)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    lock = open(settings.run_dir / LOCK_NAME, "a")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another supervisor runs this installation: exiting")
        sys.exit(0)
    (settings.run_dir / PID_NAME).write_text(f"{os.getpid()}\n")
    requests = settings.run_dir / REQUESTS_NAME
    requests.mkdir(exist_ok=True, mode=0o700)
    # Restart requests left by an earlier supervisor are not this one's to act on.
    for stale in requests.iterdir():
        with contextlib.suppress(OSError):
            stale.unlink()
    supervisor = Supervisor(settings, RestartPolicy(), service_specs(settings))

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping the services", signal.Signals(signum).name)
        supervisor.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    log.info("supervisor started (pid %d)", os.getpid())
    try:
        code = supervisor.run()
    finally:
        with contextlib.suppress(FileNotFoundError):
            (settings.run_dir / PID_NAME).unlink()
    sys.exit(code)


def env_digests(env: Mapping[str, str]) -> dict[str, str]:
    """Each AGENTVM_* setting as a digest of its value: comparable, not readable."""
    return {
        k: hashlib.sha256(v.encode()).hexdigest()[:16]
        for k, v in env.items()
        if k.startswith("AGENTVM_")
    }


def running_pid(settings: Settings) -> int | None:
    """The pid of this installation's supervisor, None when none runs.

    The pid file alone is not trusted (a supervisor killed with SIGKILL leaves
    it, and its pid may be reused): a running supervisor holds the lock.
    """
    try:
        pid = int((settings.run_dir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(settings.run_dir / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid if alive(pid) else None
    except OSError:
        return pid if alive(pid) else None  # cannot tell (e.g. not root): the pid file
    return None  # nobody holds the lock: no supervisor runs, whatever the pid file says


def read_status(settings: Settings) -> dict[str, Any] | None:
    try:
        status = json.loads((settings.run_dir / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def request_restart(settings: Settings, names: list[str]) -> Path:
    folder = settings.run_dir / REQUESTS_NAME
    path = folder / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"services": names}))
    tmp.replace(path)
    return path


def launch(settings: Settings) -> subprocess.Popen[bytes]:
    """Start the supervisor as a daemon (its own session, its log file)."""
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        (settings.run_dir / STATUS_NAME).unlink()
    with open(settings.log_dir / "supervisor.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agentvm.cli.supervisor"],
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )


if __name__ == "__main__":
    main()
