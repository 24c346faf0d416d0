"""agent-vm doctor's confinement checks, from the inputs libvirt and the host give it."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agentvm.cli import doctor, main, services
from agentvm.cli.doctor import Check, cgroup_controllers, qemu_confinement
from agentvm.common import tls
from agentvm.common.config import Settings

CAPS = """<capabilities><host>
  <secmodel><model>{model}</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>{label}</baselabel><baselabel type='qemu'>{label}</baselabel>
  </secmodel>
</host></capabilities>"""
SANDBOX = "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
ALL = {"cpu", "io", "memory", "pids"}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_this_hosts_shape_unprivileged_seccomp_no_svirt() -> None:
    caps = CAPS.format(model="none", label="+64055:+64055")
    checks = by_name(
        qemu_confinement(caps, '#user = "root"\n', [f"qemu-system-x86_64 {SANDBOX}"], ALL)
    )
    assert checks["qemu user"].ok
    assert "uid 64055" in checks["qemu user"].detail
    assert checks["qemu seccomp"].ok
    assert checks["qemu seccomp"].detail == SANDBOX
    assert not checks["svirt"].ok
    assert not checks["svirt"].required
    assert "AppArmor" in checks["svirt"].fix
    assert checks["cgroups"].ok


def test_root_qemu_and_seccomp_off_fail_with_the_fix() -> None:
    caps = CAPS.format(model="none", label="+0:+0")
    conf = 'user = "root"\nseccomp_sandbox = 0\n'
    checks = by_name(qemu_confinement(caps, conf, [], ALL))
    assert not checks["qemu user"].ok
    assert "qemu.conf" in checks["qemu user"].fix
    assert not checks["qemu seccomp"].ok
    assert "seccomp_sandbox = 0" in checks["qemu seccomp"].detail


def test_a_running_qemu_without_sandbox_fails() -> None:
    caps = CAPS.format(model="none", label="+64055:+64055")
    checks = by_name(
        qemu_confinement(
            caps, "", ["qemu-system-x86_64 -name a", f"qemu-system-x86_64 {SANDBOX}"], ALL
        )
    )
    assert not checks["qemu seccomp"].ok
    assert "1 running QEMU" in checks["qemu seccomp"].detail


def test_apparmor_is_svirt_and_missing_controllers_are_named() -> None:
    caps = CAPS.format(model="apparmor", label="+64055:+64055")
    checks = by_name(qemu_confinement(caps, "", [], {"cpu", "pids"}))
    assert checks["svirt"].ok
    assert "apparmor" in checks["svirt"].detail
    assert not checks["cgroups"].ok
    assert "io memory" in checks["cgroups"].fix


def test_cgroup_controllers_from_v1_and_v2_mounts(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    v2 = f"cgroup2 {tmp_path} cgroup2 rw,nsdelegate 0 0\n"
    assert cgroup_controllers(v2, lambda p: p.read_text()) == ALL
    v1 = (
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0\n"
        "cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0\n"
        "proc /proc proc rw 0 0\n"
    )
    assert cgroup_controllers(v1, lambda p: "") == {"cpu", "io"}


def test_auth_checks_report_token_and_certificate_expiry(tmp_path: Path) -> None:
    tls.ensure(tmp_path / "tls")
    settings = Settings(tls="mutual", tls_dir=tmp_path / "tls", token_file=tmp_path / "token")
    token, mtls = doctor.auth_checks(settings)
    assert token.ok
    assert str(tmp_path / "token") in token.detail
    assert mtls.ok
    assert "CA 3649" in mtls.detail or "CA 3650" in mtls.detail
    assert "client 82" in mtls.detail  # 825 days
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=900)
    _, expired = doctor.auth_checks(settings, now=later)
    assert not expired.ok
    assert expired.required
    assert "new CA" in expired.fix


def test_auth_checks_name_missing_certificates_and_show_opt_outs(tmp_path: Path) -> None:
    _, missing = doctor.auth_checks(Settings(tls="mutual", tls_dir=tmp_path / "none"))
    assert not missing.ok
    assert "agent-vm up" in missing.fix
    token, plain = doctor.auth_checks(Settings(tls="off", auth="none"))
    assert not token.ok
    assert not token.required
    assert not plain.ok
    assert not plain.required


def test_workspace_check_names_what_is_missing(tmp_path: Path) -> None:
    off = doctor.workspace_check(Settings(workspace_cap="none"))
    assert not off.ok
    assert not off.required
    missing = doctor.workspace_check(Settings(), loop_control=tmp_path / "loop-control")
    assert not missing.ok
    assert str(tmp_path / "loop-control") in missing.detail
    present = tmp_path / "here"
    present.touch()
    assert doctor.workspace_check(Settings(), loop_control=present).ok == (
        os.geteuid() == 0
        and shutil.which("mkfs.ext4") is not None
        and shutil.which("debugfs") is not None
    )


SVIRT_MISSING = Check("svirt", False, "no AppArmor/SELinux", "enable AppArmor", required=False)
LIBVIRT_OK = Check("libvirt", True, "libvirt 9.0")
LIBVIRT_DOWN = Check("libvirt", False, "cannot connect", "libvirtd -d")


def _doctor(monkeypatch: pytest.MonkeyPatch, checks: list[Check], *args: str) -> Result:
    monkeypatch.setattr(doctor, "run_checks", lambda settings: checks)
    return CliRunner().invoke(main.cli, ["doctor", *args])


def test_levels_ok_warn_fail() -> None:
    assert LIBVIRT_OK.level == "ok"
    assert SVIRT_MISSING.level == "warn"
    assert LIBVIRT_DOWN.level == "fail"
    assert Check("x", True, "", required=False).level == "ok"


def test_an_unmet_optional_check_warns_and_the_doctor_stays_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = _doctor(monkeypatch, [LIBVIRT_OK, SVIRT_MISSING])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "WARN svirt: no AppArmor/SELinux" in lines
    assert "     fix: enable AppArmor" in lines
    assert "FAIL" not in result.output
    assert lines[-1] == "ready (1 warning)"
    assert _doctor(monkeypatch, [LIBVIRT_OK]).output.splitlines()[-1] == "ready"


def test_a_failed_required_check_exits_1_and_counts_both(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _doctor(monkeypatch, [LIBVIRT_DOWN, SVIRT_MISSING, SVIRT_MISSING])
    assert result.exit_code == 1
    assert "FAIL libvirt: cannot connect" in result.output
    assert result.output.splitlines()[-1] == "1 problem found (2 warnings)"


def test_json_has_a_level_per_check(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _doctor(monkeypatch, [LIBVIRT_OK, SVIRT_MISSING, LIBVIRT_DOWN], "--json")
    assert result.exit_code == 1
    levels = [(c["name"], c["level"], c["required"]) for c in json.loads(result.output)]
    assert levels == [("libvirt", "ok", True), ("svirt", "warn", False), ("libvirt", "fail", True)]


def test_supervisor_check_warns_when_nothing_restarts_the_services(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path)

    def no_systemd() -> bool:
        return False

    none = doctor.supervisor_check(settings, 3, systemd=no_systemd)
    assert none.level == "warn"
    assert "3 service(s) run unsupervised" in none.detail
    assert none.fix.startswith("agent-vm up")
    (tmp_path / "supervisor.pid").write_text(f"{os.getpid()}\n")
    # A pid file alone (a supervisor killed with SIGKILL leaves one) is not a supervisor.
    assert not doctor.supervisor_check(settings, 4, systemd=no_systemd).ok
    with open(tmp_path / "supervisor.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a running supervisor holds
        running = doctor.supervisor_check(settings, 4, systemd=no_systemd)
    assert running.ok
    assert f"pid {os.getpid()}" in running.detail
    (tmp_path / "supervisor.pid").unlink()
    assert doctor.supervisor_check(settings, 4, systemd=lambda: True).ok  # systemd's job


def test_a_host_booted_with_systemd_is_not_one_whose_services_systemd_runs(
    tmp_path: Path,
) -> None:
    # This machine's systemctl (if any) has no agent-vm units active.
    assert not services.systemd_runs_services(tmp_path)
    assert not services.systemd_runs_services(tmp_path / "absent")


def test_ksm_check_says_how_to_turn_it_on_and_what_it_merges(tmp_path: Path) -> None:
    assert not doctor.ksm_check(tmp_path / "none").ok  # no KSM in this kernel
    (tmp_path / "run").write_text("0\n")
    off = doctor.ksm_check(tmp_path)
    assert (off.ok, off.required) == (False, False)
    assert (
        off.fix
        == f"echo 1 > {tmp_path}/run (QEMU marks guest memory mergeable; ksmd costs some CPU)"
    )
    (tmp_path / "run").write_text("1\n")
    (tmp_path / "pages_sharing").write_text("2560\n")
    on = doctor.ksm_check(tmp_path)
    assert on.ok
    assert "10 MiB merged" in on.detail
