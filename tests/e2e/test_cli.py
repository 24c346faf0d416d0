"""The `agent-vm` command line against a real vm-manager and real VMs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from agentvm.common import tls
from agentvm.common.config import METRICS_PORTS
from tests.installation import agent_vm
from tests.vmharness import (
    REPO,
    ExecutorProcess,
    GatewayProcess,
    PoolManagerProcess,
    VMManagerProcess,
    free_port,
    libvirt_domains,
    net_leftovers,
    wait_for,
)

pytestmark = pytest.mark.vm


def test_vm_run_prints_guest_output_and_exits_with_its_code(vmm: VMManagerProcess) -> None:
    before = set(libvirt_domains(vmm.prefix))
    proc = agent_vm(
        vmm.env,
        "vm",
        "run",
        "--",
        "sh",
        "-c",
        "uname -r; echo oops >&2; exit 3",
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip().endswith("cloud-amd64")
    assert proc.stdout.strip() != os.uname().release
    assert "oops" in proc.stderr
    assert "destroyed" in proc.stderr
    # The run answers before its VM is destroyed; it is gone right after.
    assert wait_for(lambda: set(libvirt_domains(vmm.prefix)) <= before, 60)


def test_example_agent_runs_in_a_vm(vmm: VMManagerProcess) -> None:
    code = (REPO / "examples" / "hello_agent.py").read_text()
    proc = agent_vm(vmm.env, "vm", "run", "--", "python3", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "hello from agent-vm" in proc.stdout
    assert "Debian GNU/Linux 12" in proc.stdout


def test_doctor_passes_with_services_up(vmm: VMManagerProcess, executor: ExecutorProcess) -> None:
    # A pool-manager at the address vmm.env names, with an empty pool.
    pm = PoolManagerProcess(base=vmm.base, prefix=vmm.prefix, pools="standard:min=0,max=1")
    pm.start()
    # And an e2b-gateway at the address vmm.env names.
    gateway = GatewayProcess(base=vmm.base, prefix=vmm.prefix)
    gateway.start()
    try:
        proc = agent_vm(vmm.env, "doctor", "--json")
    finally:
        gateway.stop()
        pm.stop()
    checks = json.loads(proc.stdout)
    failed = [c for c in checks if c["required"] and not c["ok"]]
    assert proc.returncode == 0, failed
    names = {c["name"] for c in checks}
    assert {"libvirt", "accelerator", "guest image", "service vm-manager"} <= names
    assert "service pool-manager" in names
    assert "service e2b-gateway" in names
    firewall = next(c for c in checks if c["name"] == "firewall")
    assert firewall["ok"]
    assert "nftables" in firewall["detail"]


def test_doctor_reports_qemu_confinement(vmm: VMManagerProcess, shared_vm: object) -> None:
    """With a VM running: QEMU's user, seccomp flags, sVirt and cgroups, as this host has them."""
    proc = agent_vm(vmm.env, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(proc.stdout)}
    assert checks["qemu user"]["ok"], checks["qemu user"]
    assert "libvirt-qemu" in checks["qemu user"]["detail"]
    # Read from the running QEMU's command line, not assumed.
    assert checks["qemu seccomp"]["ok"]
    assert checks["qemu seccomp"]["detail"].startswith("-sandbox on,")
    assert "elevateprivileges=deny" in checks["qemu seccomp"]["detail"]
    # These hosts have no AppArmor/SELinux: reported, not required.
    assert not checks["svirt"]["required"]
    assert checks["svirt"]["ok"] == checks["svirt"]["detail"].startswith("security driver")
    # Not met, it is a warning, never a failure.
    assert checks["svirt"]["level"] == ("ok" if checks["svirt"]["ok"] else "warn")
    # The tests' services run without `up`'s supervisor: said, not failed.
    assert checks["supervisor"]["level"] == "warn"
    assert checks["cgroups"]["ok"], checks["cgroups"]


def test_services_down_gives_one_line_and_the_fix(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        AGENTVM_VM_MANAGER_ADDR=f"unix:{tmp_path}/nothing.sock",
        AGENTVM_RUN_DIR=str(tmp_path),
    )
    proc = agent_vm(env, "vm", "list")
    assert proc.returncode == 2
    assert "agent-vm up" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    doctor = agent_vm(env, "doctor")
    assert doctor.returncode == 1
    assert "fix: agent-vm up" in doctor.stdout


def test_bad_cli_input_exits_2(vmm: VMManagerProcess) -> None:
    proc = agent_vm(vmm.env, "vm", "run", "--timeout", "-1", "--", "true")
    assert proc.returncode == 2
    assert "--timeout" in proc.stderr
    proc = agent_vm(vmm.env, "vm", "get", "agent-vm-doesnotexist")
    assert proc.returncode == 2
    assert "NOT_FOUND" in proc.stderr
    env = dict(vmm.env, AGENTVM_ACCEL="warp")
    proc = agent_vm(env, "vm", "list")
    assert proc.returncode == 2
    assert "AGENTVM_ACCEL" in proc.stderr


def test_up_and_down_are_idempotent(tmp_path: Path) -> None:
    run = Path("/run/agent-vm-tests") / secrets.token_hex(4)
    env = dict(
        os.environ,
        AGENTVM_RUN_DIR=str(run),
        AGENTVM_VM_MANAGER_ADDR=f"unix:{run}/vm-manager.sock",
        AGENTVM_POOL_MANAGER_ADDR=f"unix:{run}/pool-manager.sock",
        AGENTVM_EXECUTOR_ADDR=f"unix:{run}/executor.sock",
        AGENTVM_LOG_DIR=str(tmp_path / "log"),
        AGENTVM_STATE_DIR=str(tmp_path / "state"),
        AGENTVM_VM_PREFIX="agent-vm-testupdown-",
        # Not the default NAT pool: outside the test world a test must not put
        # VMs on the host's real uplink.
        AGENTVM_POOLS="standard:min=1,max=2",
        AGENTVM_MONITOR_ADDR=f"unix:{run}/monitor.sock",
        AGENTVM_E2B_GATEWAY_ADDR=f"unix:{run}/e2b-gateway.sock",
        # Not the default E2B port: a running installation may hold it.
        AGENTVM_E2B_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        AGENTVM_AUDIT_DIR=str(tmp_path / "audit"),
        AGENTVM_TOKEN_FILE=str(tmp_path / "token"),
        AGENTVM_TLS_DIR=str(tmp_path / "tls"),
    )
    # Not the default metrics ports: a running installation may hold them.
    for service in METRICS_PORTS:
        name = service.upper().replace("-", "_")
        env[f"AGENTVM_{name}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    try:
        first = agent_vm(env, "up", timeout=60)
        assert first.returncode == 0, first.stderr
        assert "started" in first.stdout
        # The first `up` makes the installation's CA and every identity's certificate.
        assert f"tls: certificates for {', '.join(tls.IDENTITIES)}" in first.stdout
        second = agent_vm(env, "up", timeout=60)
        assert "already running" in second.stdout
        assert "tls:" not in second.stdout
        down = agent_vm(env, "down", timeout=60)
        assert "stopped" in down.stdout
        again = agent_vm(env, "down", timeout=60)
        assert "not running" in again.stdout
        # down stopped the supervisor too.
        assert not (run / "supervisor.pid").exists()
        assert agent_vm(env, "status").stdout.startswith("supervisor: not running")
        assert not (run / "vm-manager.sock").exists()
        assert not (run / "pool-manager.sock").exists()
        assert not (run / "monitor.sock").exists()
        # The monitor wrote its audit log, and it verifies.
        verified = agent_vm(env, "audit", "verify", str(tmp_path / "audit"), timeout=60)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # The pool started warming (template build) and was stopped at once:
        # nothing of it may be left in libvirt.
        assert not libvirt_domains("agent-vm-testupdown-")
        assert not net_leftovers("agent-vm-testupdown-")
    finally:
        agent_vm(env, "down", timeout=60)
        shutil.rmtree(run, ignore_errors=True)


def test_run_file_with_args_inputs_and_outputs(executor: ExecutorProcess, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys, pathlib\n"
        "data = pathlib.Path('/workspace/input/data/a.txt').read_text()\n"
        "pathlib.Path('/workspace/output/sub').mkdir()\n"
        "pathlib.Path('/workspace/output/sub/r.txt').write_text(data * 2)\n"
        "print('args', sys.argv[1:])\n"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("ab")
    out = tmp_path / "out"
    proc = agent_vm(
        executor.env,
        "run",
        str(script),
        "--input",
        str(tmp_path / "data"),
        "--output",
        str(out),
        "--",
        "x",
        "y z",
    )
    assert proc.returncode == 0, proc.stderr
    assert "args ['x', 'y z']" in proc.stdout
    assert (out / "sub" / "r.txt").read_text() == "abab"


def test_run_json_reports_the_guest_kernel(executor: ExecutorProcess) -> None:
    proc = agent_vm(
        executor.env,
        "run",
        "--json",
        "-c",
        "import os; print(os.uname().release)",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stdout"].strip().endswith("cloud-amd64")
    assert doc["stdout"].strip() != os.uname().release
    assert set(doc) >= {
        "exit_code",
        "stdout",
        "stderr",
        "timed_out",
        "duration_s",
        "boot_s",
        "vm",
        "output_files",
    }
    assert doc["boot_s"] > 0


def test_run_is_nat_filtered_by_default_and_json_carries_the_egress_log(
    executor: ExecutorProcess,
) -> None:
    """The default run reaches only allowlisted names; --json lists every attempt."""
    code = (
        "import socket\n"
        "for name in ('allowed.test', 'other.test'):\n"
        "    try:\n"
        "        ip = socket.gethostbyname(name)\n"
        "        s = socket.create_connection((ip, 80), timeout=5)\n"
        "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(name, s.recv(20))\n"
        "    except OSError as exc:\n"
        "        print(name, 'failed', type(exc).__name__)\n"
    )
    proc = agent_vm(executor.env, "run", "--json", "--allow-domain", "allowed.test", "-c", code)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert "allowed.test b'HTTP/1.0 200 OK" in doc["stdout"], doc
    assert "other.test failed" in doc["stdout"], doc
    log = {(r["kind"], r["name"], r["verdict"]) for r in doc["network_log"]}
    assert ("dns", "allowed.test", "allowed") in log
    assert ("dns", "other.test", "denied") in log
    assert ("connect", "allowed.test", "allowed") in log
    bad = agent_vm(executor.env, "run", "--network", "isolated", "--allow-domain", "x.test",
                   "--cmd", "true")  # fmt: skip
    assert bad.returncode == 2
    assert "--network nat-filtered" in bad.stderr


def test_run_timeout_exits_124_and_bad_usage_exits_2(executor: ExecutorProcess) -> None:
    proc = agent_vm(
        executor.env,
        "run",
        "--timeout",
        "2",
        "--cmd",
        "echo partial; sleep 60",
    )
    assert proc.returncode == 124
    assert proc.stdout == "partial\n"
    assert "timed out" in proc.stderr
    proc = agent_vm(executor.env, "run", "-c", "print(1)", "--cmd", "true")
    assert proc.returncode == 2
    assert "exactly one" in proc.stderr
    proc = agent_vm(executor.env, "run", "--input", "/nonexistent/file", "--cmd", "true")
    assert proc.returncode == 2
    assert "/nonexistent/file" in proc.stderr
