"""Sandboxes that live for a session (docs/SANDBOXES.md): metadata, the default
environment and its secrets, moving a sandbox's end, and `agent-vm sandbox`,
on real VMs through the executor."""

from __future__ import annotations

import json
import os
import secrets
import time

import pytest

import agent_vm
from tests.installation import agent_vm as cli
from tests.integration.test_monitor import audit_records, wait_records
from tests.vmharness import ExecutorProcess, MonitorProcess, wait_for

pytestmark = pytest.mark.vm


def test_metadata_and_a_default_environment_whose_secret_only_programs_see(
    executor: ExecutorProcess, monitor_proc: MonitorProcess
) -> None:
    run_id = secrets.token_hex(4)
    secret = "s3cr3t-" + secrets.token_hex(8)
    with agent_vm.Sandbox.create(
        network="isolated",
        lifetime=600,
        metadata={"team": "agents", "run": run_id},
        envs={"GREETING": "hello"},
        secret_envs={"TOKEN": secret},
    ) as sb:
        assert sb.metadata == {"team": "agents", "run": run_id}
        assert sb.envs == {"GREETING": "hello"}
        assert sb.info().secret_env_names == ("TOKEN",)
        # The program gets both; its own env wins over the default.
        r = sb.run('echo "$GREETING $TOKEN"')
        assert r.stdout == f"hello {secret}\n", r
        assert sb.run("echo $GREETING", env={"GREETING": "own"}).stdout == "own\n"
        # Listed with its metadata, filterable, never with the secret.
        listed = agent_vm.Sandbox.list(metadata={"run": run_id})
        assert [i.id for i in listed] == [sb.id]
        assert listed[0].envs == {"GREETING": "hello"}
        assert secret not in repr(listed)
        assert agent_vm.Sandbox.list(metadata={"run": run_id, "team": "other"}) == []
        # An error that would echo the value names the variable instead.
        with pytest.raises(agent_vm.AgentVMError) as err:
            sb.run("true", cwd=f"/nowhere/{secret}")
        assert secret not in str(err.value)
        assert "[secret TOKEN]" in str(err.value), err.value
        # A command that holds the value runs with it; its audit record does not.
        assert sb.run(["echo", secret]).stdout == f"{secret}\n"
        started = wait_records(
            monitor_proc,
            lambda r: (
                r.get("sandbox") == sb.id
                and r.get("type") == "execution.started"
                and "[secret TOKEN]" in str(r["attributes"].get("command"))
            ),
        )
        assert started[0]["attributes"]["command"] == "echo [secret TOKEN]"
    # The last record (sandbox.closed: its VM is gone) reaches the log.
    wait_records(
        monitor_proc, lambda r: r.get("sandbox") == sb.id and r.get("type") == "sandbox.closed"
    )
    assert secret not in json.dumps(audit_records(monitor_proc))


def test_a_sandbox_ends_when_set_timeout_says(executor: ExecutorProcess) -> None:
    with agent_vm.Sandbox.create(network="isolated", lifetime=60) as sb:
        t0 = time.time()
        sb.set_timeout(3600)
        assert abs(sb.expires_at - (t0 + 3600)) < 30
        with pytest.raises(agent_vm.InvalidArgumentError, match="between 1 and 86400"):
            sb.set_timeout(2 * 86400)
        assert sb.run("echo still here").stdout == "still here\n"
        sb.set_timeout(2)

        def gone() -> bool:
            try:
                sb.run("true")
            except agent_vm.SandboxExpiredError:
                return True
            return False

        assert wait_for(gone, 60, interval=1), "the sandbox outlived its new timeout"
        assert sb.id not in {i.id for i in agent_vm.Sandbox.list()}


def test_the_sandbox_commands_of_the_cli(executor: ExecutorProcess) -> None:
    run_id = secrets.token_hex(4)
    secret = "cli-" + secrets.token_hex(8)
    env = {**executor.env, "TOKEN": secret}
    proc = cli(
        env,
        "sandbox", "create", "--network", "isolated", "--timeout", "10m",
        "--metadata", f"run={run_id}", "--env", "A=1", "--secret-env", "TOKEN", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout
    created = json.loads(proc.stdout)
    sid = created["id"]
    try:
        assert created["metadata"] == {"run": run_id}
        assert created["secret_env"] == ["TOKEN"]
        p = cli(env, "sandbox", "exec", sid, "--", "sh", "-c", 'echo "$A $TOKEN"; exit 7')
        assert (p.returncode, p.stdout) == (7, f"1 {secret}\n"), p.stderr
        p = cli(env, "sandbox", "list", "--metadata", f"run={run_id}", "--json")
        assert [s["id"] for s in json.loads(p.stdout)] == [sid], p.stderr
        p = cli(env, "sandbox", "get", sid)
        assert "TOKEN=(secret)" in p.stdout
        assert secret not in p.stdout
        p = cli(env, "sandbox", "set-timeout", sid, "2h")
        assert p.returncode == 0, p.stderr
        left = float(p.stdout.rsplit(" ", 1)[1].rstrip("s\n"))
        assert 7000 < left <= 7200, p.stdout
        p = cli(env, "sandbox", "create", "--secret-env", "NOT_SET_ANYWHERE")
        assert p.returncode == 2
        assert "NOT_SET_ANYWHERE: no such variable" in p.stderr
        # A network policy is a nat-filtered sandbox's only.
        p = cli(env, "sandbox", "set-policy", sid, "--allow-domain", "pypi.org")
        assert p.returncode != 0
        assert f"sandbox {sid} is isolated: only nat-filtered sandboxes" in p.stderr
        p = cli(env, "sandbox", "create", "--network", "isolated", "--allow-port", "80")
        assert p.returncode == 2
        assert "--allow-port need --network nat-filtered" in p.stderr
    finally:
        p = cli(env, "sandbox", "rm", sid)
        assert p.returncode == 0, p.stderr
    p = cli(env, "sandbox", "get", sid)
    assert p.returncode != 0
    assert f"no sandbox '{sid}'" in p.stderr


def test_bad_metadata_and_env_are_refused_naming_them(executor: ExecutorProcess) -> None:
    secret = "bad-" + secrets.token_hex(8)
    with pytest.raises(agent_vm.InvalidArgumentError, match="metadata key 'a b'"):
        agent_vm.Sandbox.create(metadata={"a b": "x"})
    with pytest.raises(agent_vm.InvalidArgumentError, match="env name '1X'") as err:
        agent_vm.Sandbox.create(secret_envs={"1X": secret})
    assert secret not in str(err.value)
    with pytest.raises(agent_vm.InvalidArgumentError, match="in both envs and secret_envs"):
        agent_vm.Sandbox.create(envs={"T": "1"}, secret_envs={"T": "2"})
    assert os.environ.get("AGENTVM_EXECUTOR_ADDR") == executor.address
