"""One service process: spawn it, see whether it serves, stop it (`agent-vm up/down/restart`).

The supervisor (:mod:`.supervisor`) keeps them running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.grpc_util import Caller


@dataclass(frozen=True)
class ServiceSpec:
    """A service process: its name, module and address."""

    name: str
    module: str
    address: str
    # Extra environment of the process (on top of the caller's).
    env: tuple[tuple[str, str], ...] = ()


# The services this version runs, in start order (service_specs' names).
NAMES = ("vm-manager", "pool-manager", "executor", "monitor", "e2b-gateway")


def service_specs(settings: Settings) -> list[ServiceSpec]:
    """The services this version runs, in start order.

    The executor takes its VMs from the pool-manager started next to it, unless
    AGENTVM_EXECUTOR_POOL says otherwise ("" = no pool).
    """
    pool = settings.pool_manager_addr
    if "AGENTVM_EXECUTOR_POOL" in os.environ:
        pool = settings.executor_pool
    return [
        ServiceSpec("vm-manager", "agentvm.vm_manager", settings.vm_manager_addr),
        ServiceSpec("pool-manager", "agentvm.pool_manager", settings.pool_manager_addr),
        ServiceSpec(
            "executor",
            "agentvm.executor",
            settings.executor_addr,
            env=(("AGENTVM_EXECUTOR_POOL", pool),),
        ),
        ServiceSpec("monitor", "agentvm.monitor", settings.monitor_addr),
        ServiceSpec("e2b-gateway", "agentvm.e2b_gateway", settings.e2b_gateway_addr),
    ]


def health(settings: Settings, spec: ServiceSpec, timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE for a service (NO CERTIFICATE: cannot call it)."""
    try:
        caller = Caller.of(settings)
    except AgentVMError as exc:
        return f"NO CERTIFICATE ({exc.message})"
    try:
        with caller.bare(spec.address, spec.name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    except grpc.RpcError:
        return "UNREACHABLE"


# gRPC's words for a connection that could not be made or broke (lower case).
CONNECTION_FAILED = (
    "failed to connect",
    "socket closed",
    "stream removed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "connections to all backends failing",
    "goaway",
    "endpoint closing",
)


# gRPC's words come first (after at most a "syscall:" prefix, as in "recvmsg:Connection
# reset by peer"); a service's own UNAVAILABLE may quote them later (vm-manager's "cannot
# connect to libvirt ...: Failed to connect socket ..."), and then the service is up.
_CONNECTION_FAILED = re.compile(
    r"^(?:\w+:\s*)?(?:" + "|".join(re.escape(w) for w in CONNECTION_FAILED) + ")", re.IGNORECASE
)


def connection_failed(details: str) -> bool:
    """Whether an UNAVAILABLE's details are gRPC's own words for a failed connection."""
    return _CONNECTION_FAILED.match(details) is not None


def unreachable(settings: Settings, details: str, contacted: Mapping[str, str]) -> str:
    """What to tell a caller whose connection to a service failed: which one, what to run.

    The suspects: the service whose address the details name, else those the
    command talked to, else all; the ones that do not answer a health check now
    are named as down.
    """
    specs = service_specs(settings)
    suspects = (
        [spec for spec in specs if spec.address in details]
        or [spec for spec in specs if spec.name in contacted]
        or specs
    )
    with ThreadPoolExecutor(len(suspects)) as pool:
        states = list(pool.map(lambda spec: health(settings, spec), suspects))
    down = [spec for spec, state in zip(suspects, states, strict=True) if state != "SERVING"]
    if down:
        who = ", ".join(f"{spec.name} ({spec.address})" for spec in down)
        return (
            f"{who} {'is' if len(down) == 1 else 'are'} not reachable ({details}): "
            "`agent-vm status` shows each service and its last exit; `agent-vm up` starts them"
        )
    who = " or ".join(spec.name for spec in suspects)
    return (
        f"the connection to {who} broke ({details}), and it serves again now (restarted?): "
        "`agent-vm status` shows restarts and last exits; run the command again"
    )


def pidfile(settings: Settings, spec: ServiceSpec) -> Path:
    return settings.run_dir / f"{spec.name}.pid"


def log_path(settings: Settings, spec: ServiceSpec) -> Path:
    return settings.log_dir / f"{spec.name}.log"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def read_pid(settings: Settings, spec: ServiceSpec) -> int | None:
    try:
        pid = int(pidfile(settings, spec).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def describe_exit(returncode: int | None) -> str:
    """A Popen return code in words: ``status 1``, ``signal 9 (SIGKILL)``."""
    if returncode is None:
        return "exit status unknown (not started by this supervisor)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {-returncode} ({name})"
    return f"status {returncode}"


def note_in_log(settings: Settings, spec: ServiceSpec, level: str, message: str) -> None:
    """Append a line to the service's own log (JSON, as the service writes it).

    A service killed by a signal cannot say so itself: its log then says why it
    ended and what happens next.
    """
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
        "level": level,
        "service": spec.name,
        "logger": "agentvm.supervisor",
        "message": message,
    }
    with contextlib.suppress(OSError), open(log_path(settings, spec), "a") as log:
        log.write(json.dumps(line) + "\n")


def spawn(settings: Settings, spec: ServiceSpec) -> subprocess.Popen[bytes]:
    """Start ``spec``'s process, its stdout and stderr appended to its log.

    PYTHONFAULTHANDLER: a crash below Python (a segfault in a C extension)
    still leaves each thread's Python traceback in the log.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path(settings, spec), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            env={**os.environ, **dict(spec.env), "PYTHONFAULTHANDLER": "1"},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    try:
        pidfile(settings, spec).write_text(f"{proc.pid}\n")
    except OSError:
        # Untracked, it would run on beside the next attempt: take it down again.
        proc.kill()
        proc.wait()
        raise
    return proc


def wait_serving(
    settings: Settings,
    spec: ServiceSpec,
    proc: subprocess.Popen[bytes],
    timeout: float,
    stopping: Callable[[], bool] = lambda: False,
) -> str | None:
    """Wait until ``proc`` serves: None when it does, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if proc.poll() is not None:
            return f"exited with {describe_exit(proc.returncode)} at start"
        if health(settings, spec, 0.5) == "SERVING":
            return None
        time.sleep(0.1)
    if stopping():
        return "stopped while starting"
    return f"did not become healthy within {timeout:.0f} s"


def stop_pid(pid: int, timeout: float = 60.0) -> str:
    """SIGTERM ``pid``, then SIGKILL after ``timeout``; reaps it if it is a child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if not alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return "stopped"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return "killed after the grace period"


def stop(settings: Settings, spec: ServiceSpec, timeout: float = 60.0) -> str:
    """Stop ``spec`` by its pid file (SIGTERM, then SIGKILL after ``timeout``)."""
    pid = read_pid(settings, spec)
    result = "not running" if pid is None else stop_pid(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        pidfile(settings, spec).unlink()
    return result


SYSTEMD_DIR = Path("/run/systemd/system")


def systemd_runs_services(systemd: Path = SYSTEMD_DIR) -> bool:
    """Whether systemd runs this host's agent-vm services (deploy/systemd units active).

    A host booted with systemd is not enough: most are, and run agent-vm with `up`.
    """
    if not systemd.is_dir() or shutil.which("systemctl") is None:
        return False
    try:
        done = subprocess.run(
            ["systemctl", "is-active", "--quiet", "agent-vm-vm-manager.service"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
