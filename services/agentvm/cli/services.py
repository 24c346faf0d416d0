"""Local bring-up: start and stop each service as its own process (`agent-vm up/down`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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


def _pidfile(settings: Settings, spec: ServiceSpec) -> Path:
    return settings.run_dir / f"{spec.name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(settings: Settings, spec: ServiceSpec) -> int | None:
    try:
        pid = int(_pidfile(settings, spec).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def start(settings: Settings, spec: ServiceSpec, timeout: float = 20.0) -> str:
    """Start ``spec`` unless it already serves; returns what was done."""
    if health(settings, spec) == "SERVING":
        return "already running"
    pid = read_pid(settings, spec)
    if pid is not None:
        stop(settings, spec)
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / f"{spec.name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            env={**os.environ, **dict(spec.env)},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    _pidfile(settings, spec).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{spec.name} exited with status {proc.returncode} at start; see {log_path}"
            )
        if health(settings, spec, 0.5) == "SERVING":
            return f"started (pid {proc.pid}, log {log_path})"
        time.sleep(0.1)
    raise RuntimeError(f"{spec.name} did not become healthy within {timeout:.0f} s; see {log_path}")


def stop(settings: Settings, spec: ServiceSpec, timeout: float = 60.0) -> str:
    """Stop ``spec`` (SIGTERM, then SIGKILL after ``timeout``)."""
    pid = read_pid(settings, spec)
    pidfile = _pidfile(settings, spec)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        return "not running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    result = "stopped"
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        result = "killed after the grace period"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    return result
