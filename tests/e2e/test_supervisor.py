"""`agent-vm up` supervises what it starts: a service that dies is started again.

Each test brings up an installation of its own (run/state/log directories,
sockets, metrics ports and VM prefix of its own; an empty pool, so no VM
boots) through the real CLI, and kills its services for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentvm.cli.services import alive
from tests.installation import Installation, agent_vm, wait_for
from tests.vmharness import REPO, libvirt_domains

pytestmark = pytest.mark.vm

PREFIX = "agent-vm-testsuper-"


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Installation]:
    inst = Installation(tmp_path, PREFIX)
    try:
        up = agent_vm(inst.env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.count("started (pid") == 5, up.stdout
        yield inst
    finally:
        # No pid file when `up` failed before it started a supervisor: `down` still cleans up.
        pid_file = inst.run / "supervisor.pid"
        sup_pid = pid_file.read_text() if pid_file.exists() else ""
        down = agent_vm(inst.env, "down")
        shutil.rmtree(inst.run, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        if sup_pid.strip():
            # (a zombie until init reaps it)
            assert not alive(int(sup_pid)), "the supervisor outlived down"
        assert not libvirt_domains(PREFIX)


def test_a_killed_service_serves_again_and_status_counts_the_restart(inst: Installation) -> None:
    status = inst.status()
    assert status["exit"] == 0
    assert status["supervisor"]["phase"] == "running"
    before = status["by_name"]
    assert all(row["status"] == "SERVING" and row["restarts"] == 0 for row in before.values())
    victim = before["executor"]["pid"]

    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            inst.service("executor")["status"] == "SERVING"
            and inst.service("executor")["pid"] not in (None, victim)
        ),
        60,
        "the executor serves again under a new pid",
    )
    after = inst.status()["by_name"]
    assert after["executor"]["restarts"] == 1
    assert after["executor"]["last_exit"] == "signal 9 (SIGKILL)"
    assert after["executor"]["state"] == "running"
    # Nobody else was touched.
    for name in ("vm-manager", "pool-manager", "monitor"):
        assert after[name]["pid"] == before[name]["pid"]
        assert after[name]["restarts"] == 0
    # The table says it too.
    table = agent_vm(inst.env, "status").stdout.splitlines()
    assert table[1].split() == [
        "SERVICE",
        "STATUS",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST",
        "EXIT",
    ]
    executor_row = next(line for line in table if line.startswith("executor"))
    assert "SERVING" in executor_row
    assert "signal 9 (SIGKILL)" in executor_row
    # A process killed by SIGKILL cannot say so: its log says it anyway.
    log = (inst.log / "executor.log").read_text()
    assert "executor exited with signal 9 (SIGKILL)" in log
    assert "restarts it in 1 s" in log

    # The restart is in the monitor's audit log, reported as the executor.
    def audited() -> list[dict[str, Any]]:
        path = inst.audit / "audit.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r["type"] == "service.restarted"]

    wait_for(lambda: bool(audited()), 30, "a service.restarted record in the audit log")
    record = audited()[0]
    assert record["service"] == "executor"
    assert record["attributes"]["cause"] == "signal 9 (SIGKILL)"
    assert record["attributes"]["serving"] is True


def test_a_crash_lands_in_the_services_log_and_its_callers_are_told_which(
    inst: Installation,
) -> None:
    """SIGSEGV: faulthandler's traceback in the monitor's log; a watching CLI names it."""
    alerts = subprocess.Popen(
        [sys.executable, "-m", "agentvm.cli.main", "alerts"],
        env=inst.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        time.sleep(3)  # its stream is open
        assert alerts.poll() is None, alerts.communicate()
        os.kill(inst.service("monitor")["pid"], signal.SIGSEGV)
        _, err = alerts.communicate(timeout=30)
    finally:
        alerts.kill()
        alerts.wait()
    assert alerts.returncode == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("agent-vm: error: "), err
    assert "monitor" in err
    assert "`agent-vm status`" in err
    wait_for(lambda: inst.service("monitor")["status"] == "SERVING", 60, "monitor serves again")
    monitor = inst.service("monitor")
    assert monitor["restarts"] == 1
    assert monitor["last_exit"] == "signal 11 (SIGSEGV)"
    log = (inst.log / "monitor.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log
    assert "monitor exited with signal 11 (SIGSEGV)" in log


def test_a_service_that_keeps_dying_is_backed_off(inst: Installation) -> None:
    """Killed at every start for 14 s: restarts after 1, 2, 4, 8 s, not a spin."""
    killed: list[int] = []
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        pid = inst.supervised_pid("pool-manager")
        if pid is not None and pid not in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)
    # 1 + 2 + 4 = 7 s of delays fit in the window, the next (8 s) does not:
    # the first kill and three restarts. Without backoff it would be dozens.
    assert len(killed) == 4, killed
    row = inst.service("pool-manager")
    assert row["restarts"] == 3
    assert row["state"] == "backoff"
    assert row["status"] == "UNREACHABLE"
    assert 0 < row["next_restart_in_s"] <= 8
    assert inst.status()["exit"] == 1  # not every service serves
    sup_log = (inst.log / "supervisor.log").read_text()
    delays = [
        json.loads(line)["message"].split("restarts it in ")[1].split(" s")[0]
        for line in sup_log.splitlines()
        if "pool-manager exited" in line
    ]
    assert delays == ["1", "2", "4", "8"]
    # Left alone, it comes back.
    wait_for(lambda: inst.service("pool-manager")["status"] == "SERVING", 30, "pool-manager back")
    assert inst.service("pool-manager")["restarts"] == 4


def test_restart_one_service_and_then_all(inst: Installation) -> None:
    before = inst.status()["by_name"]
    one = agent_vm(inst.env, "restart", "pool-manager")
    assert one.returncode == 0, one.stderr
    after = inst.status()["by_name"]
    assert one.stdout.strip() == f"pool-manager: restarted (pid {after['pool-manager']['pid']})"
    assert after["pool-manager"]["pid"] != before["pool-manager"]["pid"]
    assert after["pool-manager"]["status"] == "SERVING"
    assert after["pool-manager"]["last_exit"] == "stopped by `agent-vm restart`"
    for name in ("vm-manager", "executor", "monitor", "e2b-gateway"):
        assert after[name]["pid"] == before[name]["pid"]
    every = agent_vm(inst.env, "restart")
    assert every.returncode == 0, every.stderr
    assert [line.split(":")[0] for line in every.stdout.splitlines()] == [
        "vm-manager",
        "pool-manager",
        "executor",
        "monitor",
        "e2b-gateway",
    ]
    final = inst.status()
    assert final["exit"] == 0
    for name, row in final["by_name"].items():
        assert row["pid"] != after[name]["pid"], name
    bad = agent_vm(inst.env, "restart", "executer")
    assert bad.returncode == 2
    assert "executor" in bad.stderr  # the choices are named


def test_restart_and_status_without_a_supervisor_say_what_to_run(tmp_path: Path) -> None:
    inst = Installation(tmp_path, PREFIX)
    try:
        restart = agent_vm(inst.env, "restart", "executor")
        assert restart.returncode == 2
        assert "`agent-vm up`" in restart.stderr
        status = agent_vm(inst.env, "status")
        assert status.returncode == 1
        assert status.stdout.startswith("supervisor: not running")
        assert status.stdout.count("UNREACHABLE") == 5
    finally:
        shutil.rmtree(inst.run, ignore_errors=True)


def test_up_that_cannot_start_a_service_says_which_and_leaves_nothing(tmp_path: Path) -> None:
    inst = Installation(tmp_path, PREFIX)
    inst.env["AGENTVM_MONITOR_METRICS_ADDR"] = "127.0.0.1:99999"  # the monitor cannot bind it
    try:
        up = agent_vm(inst.env, "up")
        assert up.returncode == 2
        assert up.stderr.startswith("agent-vm: error: monitor exited with status 1 at start")
        assert str(inst.log / "monitor.log") in up.stderr
        assert "port must be 0-65535" in (inst.log / "monitor.log").read_text()
        status = agent_vm(inst.env, "status")
        assert status.stdout.startswith("supervisor: not running")
        assert status.stdout.count("UNREACHABLE") == 5
        assert not list(inst.run.glob("*.pid"))
    finally:
        agent_vm(inst.env, "down")
        shutil.rmtree(inst.run, ignore_errors=True)


def test_a_killed_supervisor_is_replaced_by_up_which_adopts_the_running_services(
    inst: Installation,
) -> None:
    before = inst.status()["by_name"]
    sup_pid = int((inst.run / "supervisor.pid").read_text())
    os.kill(sup_pid, signal.SIGKILL)
    wait_for(lambda: not alive(sup_pid), 10, "the supervisor is gone")
    # The services outlive it, unsupervised: status and doctor say so.
    orphaned = inst.status()
    assert orphaned["supervisor"] is None
    assert orphaned["exit"] == 0
    assert {row["state"] for row in orphaned["services"]} == {"not supervised"}
    assert [row["pid"] for row in orphaned["services"]] == [r["pid"] for r in before.values()]
    up = agent_vm(inst.env, "up")
    assert up.returncode == 0, up.stderr
    for name, row in before.items():
        assert f"{name}: already running (pid {row['pid']}, now supervised)" in up.stdout
    # Adopted (not its child): its end is noticed all the same, and it is restarted.
    victim = before["executor"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            inst.service("executor")["status"] == "SERVING"
            and inst.service("executor")["pid"] not in (None, victim)
        ),
        60,
        "the adopted executor is restarted",
    )
    row = inst.service("executor")
    assert row["restarts"] == 1
    assert row["last_exit"] == "exit status unknown (not started by this supervisor)"
