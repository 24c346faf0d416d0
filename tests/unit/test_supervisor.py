"""The supervisor's rules that need no service: backoff, exit words, whom to blame."""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest

from agentvm.cli import services, supervisor
from agentvm.cli.supervisor import RestartPolicy
from agentvm.common.config import Settings


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    policy = RestartPolicy(first=1, cap=60, stable=60)
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert RestartPolicy(first=0.5, cap=3, stable=1).delay(10) == 3


def test_policy_from_the_environment_refuses_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTVM_RESTART_BACKOFF", "2")
    monkeypatch.setenv("AGENTVM_RESTART_BACKOFF_MAX", "30")
    assert RestartPolicy().delay(5) == 30
    monkeypatch.setenv("AGENTVM_RESTART_BACKOFF", "soon")
    with pytest.raises(ValueError, match="AGENTVM_RESTART_BACKOFF='soon' is not a number"):
        RestartPolicy()
    monkeypatch.setenv("AGENTVM_RESTART_BACKOFF", "0")
    with pytest.raises(ValueError, match="between 0 and 86400"):
        RestartPolicy()


def test_exits_in_words() -> None:
    assert services.describe_exit(1) == "status 1"
    assert services.describe_exit(-signal.SIGKILL) == "signal 9 (SIGKILL)"
    assert services.describe_exit(-signal.SIGSEGV) == "signal 11 (SIGSEGV)"
    assert services.describe_exit(-77) == "signal 77"
    assert "unknown" in services.describe_exit(None)


@pytest.mark.parametrize(
    ("details", "broken"),
    [
        ("failed to connect to all addresses; last error: ...", True),
        ("Stream removed (Socket closed)", True),
        ("Socket closed", True),
        ("recvmsg:Connection reset by peer", True),
        ("connections to all backends failing; last error: UNAVAILABLE", True),
        ("cannot connect to libvirt at qemu:///system (is libvirtd running?)", False),
        (
            "cannot connect to libvirt at qemu+unix:///system?socket=/x: Failed to connect "
            "socket to '/x': No such file or directory. Start libvirtd",
            False,
        ),
        ("no VM is ready in the pool standard/isolated", False),
    ],
)
def test_connection_failures_are_grpcs_words_not_a_services(details: str, broken: bool) -> None:
    assert services.connection_failed(details) is broken


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        vm_manager_addr=f"unix:{tmp_path}/vm-manager.sock",
        pool_manager_addr=f"unix:{tmp_path}/pool-manager.sock",
        executor_addr=f"unix:{tmp_path}/executor.sock",
        monitor_addr=f"unix:{tmp_path}/monitor.sock",
        tls="off",
    )


def test_the_service_a_message_names_is_blamed(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    msg = services.unreachable(s, f"connect failed: addr: {s.executor_addr}", {})
    assert msg.startswith(f"executor ({s.executor_addr}) is not reachable")
    assert "`agent-vm status`" in msg
    assert "`agent-vm up`" in msg


def test_otherwise_the_services_the_command_talked_to_that_are_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path)
    msg = services.unreachable(
        s, "Stream removed (Socket closed)", {"monitor": s.monitor_addr, "executor": "x"}
    )
    assert msg.startswith(f"executor ({s.executor_addr}), monitor ({s.monitor_addr}) are not")
    # Back already (the supervisor restarted it): said so, with what to do.
    monkeypatch.setattr(services, "health", lambda settings, spec, timeout=1.0: "SERVING")
    again = services.unreachable(s, "Socket closed", {"monitor": s.monitor_addr})
    assert again.startswith("the connection to monitor broke (Socket closed)")
    assert "run the command again" in again


def test_the_status_file_keeps_digests_of_settings_not_the_token() -> None:
    env = {"AGENTVM_TOKEN": "s3cret-token", "AGENTVM_POOLS": "x", "HOME": "/root"}
    digests = supervisor.env_digests(env)
    assert set(digests) == {"AGENTVM_TOKEN", "AGENTVM_POOLS"}
    assert "s3cret-token" not in json.dumps(digests)
    assert digests == supervisor.env_digests(dict(env))
    assert digests != supervisor.env_digests({**env, "AGENTVM_POOLS": "y"})


def test_a_pid_file_without_the_lock_is_no_supervisor(tmp_path: Path) -> None:
    s = Settings(run_dir=tmp_path)
    (s.run_dir / supervisor.PID_NAME).write_text(f"{os.getpid()}\n")  # alive, but not it
    assert supervisor.running_pid(s) is None
    with open(s.run_dir / supervisor.LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert supervisor.running_pid(s) == os.getpid()
