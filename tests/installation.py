"""An installation of agent-vm of a test's own, brought up through the real CLI.

Run, state, log, audit and TLS directories, sockets, metrics ports and VM
prefix of its own, so it never meets the machine's installation or another
test's. Used by the e2e tests of `agent-vm up` (test_supervisor) and of
`agent-vm soak` (test_soak).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentvm.common.config import METRICS_PORTS
from tests.vmharness import REPO, free_port


def agent_vm(
    env: dict[str, str], *args: str, stdin: bytes = b"", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; ``stdin`` is a pipe (never a terminal)."""
    proc = subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


class Installation:
    """Its settings (``env``) and a view of its services; ``pools`` as AGENTVM_POOLS."""

    def __init__(self, base: Path, prefix: str, pools: str = "standard:min=0,max=1") -> None:
        self.run = Path("/run/agent-vm-tests") / secrets.token_hex(4)
        self.log = base / "log"
        self.audit = base / "audit"
        self.env = dict(
            os.environ,
            AGENTVM_RUN_DIR=str(self.run),
            AGENTVM_VM_MANAGER_ADDR=f"unix:{self.run}/vm-manager.sock",
            AGENTVM_POOL_MANAGER_ADDR=f"unix:{self.run}/pool-manager.sock",
            AGENTVM_EXECUTOR_ADDR=f"unix:{self.run}/executor.sock",
            AGENTVM_MONITOR_ADDR=f"unix:{self.run}/monitor.sock",
            AGENTVM_E2B_GATEWAY_ADDR=f"unix:{self.run}/e2b-gateway.sock",
            # Not the default E2B port: a running installation may hold it.
            AGENTVM_E2B_HTTP_ADDR=f"127.0.0.1:{free_port()}",
            AGENTVM_LOG_DIR=str(self.log),
            AGENTVM_STATE_DIR=str(base / "state"),
            AGENTVM_VM_PREFIX=prefix,
            AGENTVM_POOLS=pools,
            AGENTVM_AUDIT_DIR=str(self.audit),
            AGENTVM_TOKEN_FILE=str(base / "token"),
            AGENTVM_TLS_DIR=str(base / "tls"),
            AGENTVM_RESTART_BACKOFF="1",
            AGENTVM_RESTART_BACKOFF_MAX="8",
        )
        for service in METRICS_PORTS:
            name = service.upper().replace("-", "_")
            self.env[f"AGENTVM_{name}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"

    def status(self) -> dict[str, Any]:
        proc = agent_vm(self.env, "status", "--json")
        out: dict[str, Any] = json.loads(proc.stdout)
        out["exit"] = proc.returncode
        out["by_name"] = {row["service"]: row for row in out["services"]}
        return out

    def service(self, name: str) -> dict[str, Any]:
        row: dict[str, Any] = self.status()["by_name"][name]
        return row

    def supervised_pid(self, name: str) -> int | None:
        """The pid the supervisor has now (read from its file, no health check)."""
        try:
            data = json.loads((self.run / "supervisor.json").read_text())
        except (OSError, ValueError):
            return None
        pid = data["services"][name]["pid"]
        return int(pid) if pid else None


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")
