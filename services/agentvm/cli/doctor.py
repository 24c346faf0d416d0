"""`agent-vm doctor`: check each prerequisite and say how to fix what fails."""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentvm.cli.services import health, service_specs, systemd_runs_services
from agentvm.cli.supervisor import running_pid
from agentvm.common import tls
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.vm_manager.accel import detect
from agentvm.vm_manager.hostcaps import can_raise_memlock, io_weight_supported
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    # Optional checks that are not met warn; they never fail the doctor.
    required: bool = True

    @property
    def level(self) -> str:
        """``ok``, ``warn`` (an optional check not met) or ``fail`` (a required one)."""
        if self.ok:
            return "ok"
        return "fail" if self.required else "warn"

    def as_dict(self) -> dict[str, object]:
        """The check as `agent-vm doctor --json` prints it (with its level)."""
        return {**self.__dict__, "level": self.level}


MARKS = {"ok": ("ok  ", "green"), "warn": ("WARN", "yellow"), "fail": ("FAIL", "red")}


def summary(checks: list[Check]) -> tuple[str, int]:
    """The doctor's last line and exit status: 1 only when a required check failed."""
    failed = sum(c.level == "fail" for c in checks)
    warned = sum(c.level == "warn" for c in checks)
    warnings = f"{warned} warning{'s' if warned != 1 else ''}"
    if failed:
        line = f"{failed} problem{'s' if failed != 1 else ''} found"
        return (f"{line} ({warnings})" if warned else line), 1
    return (f"ready ({warnings})" if warned else "ready"), 0


def auth_checks(settings: Settings, now: datetime.datetime | None = None) -> list[Check]:
    """How callers are authenticated: the token, and mutual TLS with its expiry dates."""
    token = (
        "off (AGENTVM_AUTH=none): any process that can open the sockets may call"
        if settings.auth == "none"
        else f"bearer token in {settings.token_file}"
    )
    # Turning either off is the operator's choice: shown, never a failure.
    checks = [
        Check(
            "caller token",
            settings.auth != "none",
            token,
            "unset AGENTVM_AUTH",
            required=settings.auth != "none",
        )
    ]
    if settings.tls == "off":
        checks.append(
            Check(
                "mutual TLS",
                False,
                "off (AGENTVM_TLS=off): services serve plaintext",
                "unset AGENTVM_TLS and run `agent-vm up`",
                required=False,
            )
        )
        return checks
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        files, _ = tls.configured_files(settings.tls_dir, tls.CLIENT)
        left = {
            "CA": (tls.expires(files.ca) - now).days,
            "client": (tls.expires(files.cert) - now).days,
        }
    except (OSError, ValueError, tls.TLSError) as exc:
        return [
            *checks,
            Check(
                "mutual TLS",
                False,
                f"the installation's certificates in {settings.tls_dir} are not usable: {exc}",
                "run `agent-vm up` as the services' user",
            ),
        ]
    soon = min(left.values())
    checks.append(
        Check(
            "mutual TLS",
            soon > 0,
            f"CA {files.ca}; days left: "
            + ", ".join(f"{who} {days}" for who, days in left.items()),
            f"move {settings.tls_dir} away and run `agent-vm up` (new CA)",
        )
    )
    return checks


def workspace_check(settings: Settings, loop_control: Path = Path("/dev/loop-control")) -> Check:
    """Whether shared (virtiofs) workspaces get a size cap of their own."""
    name = "shared workspace cap"
    if settings.workspace_cap == "none":
        return Check(
            name,
            False,
            "off (AGENTVM_WORKSPACE_CAP=none): a guest can fill the state directory "
            "through a shared workspace",
            "unset AGENTVM_WORKSPACE_CAP",
            required=False,
        )
    missing = [
        what
        for what, present in (
            (str(loop_control), loop_control.exists()),
            ("mkfs.ext4", shutil.which("mkfs.ext4") is not None),
            ("debugfs", shutil.which("debugfs") is not None),
            ("root", os.geteuid() == 0),
        )
        if not present
    ]
    return Check(
        name,
        not missing,
        "each shared workspace is a loop-mounted ext4 as large as the VM's disk"
        if not missing
        else f"shared workspaces cannot be made here (missing: {', '.join(missing)})",
        "install e2fsprogs and load the loop module, or use the api workspace mode",
        required=False,
    )


def _traversable_by_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that QEMU's user cannot traverse."""
    for parent in [*reversed(path.parents), path]:
        if not parent.exists():
            return None
        if parent.is_dir() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def firewall_check() -> Check:
    """The firewall backend of NAT_FILTERED networks (nftables), and libvirt's NAT helpers."""
    nft = shutil.which("nft")
    if nft is None:
        return Check(
            "firewall",
            False,
            "nft not found: NAT_FILTERED networks (the default) need nftables",
            "apt-get install nftables (./setup.sh does)",
        )
    out = subprocess.run([nft, "--version"], capture_output=True, text=True, check=False)
    version = (out.stdout or out.stderr).strip() or "unknown version"
    usable = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=False)
    if usable.returncode != 0:
        return Check(
            "firewall",
            False,
            f"{version} cannot read the ruleset: {usable.stderr.strip()}",
            "run the services as root (CAP_NET_ADMIN) on a kernel with nf_tables",
        )
    missing = [b for b in ("iptables", "ebtables", "conntrack") if shutil.which(b) is None]
    if missing:
        return Check(
            "firewall",
            False,
            f"{version}; libvirt's NAT and clean-traffic filter, and cutting connections "
            f"when a policy changes, need {', '.join(missing)}",
            f"apt-get install {' '.join(missing)} (./setup.sh does)",
        )
    return Check("firewall", True, f"nftables: {version} (with iptables, ebtables, conntrack)")


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
V1_NAMES = {"blkio": "io"}
CGROUP_FLAGS = {"cpu", "cpuacct", "cpuset", "memory", "blkio", "pids", "devices", "freezer"}


def _conf_value(conf: str, key: str) -> str | None:
    """The last uncommented ``key = value`` of a libvirt config file, unquoted."""
    found = None
    for m in re.finditer(rf"^\s*{key}\s*=\s*(.+?)\s*$", conf, re.MULTILINE):
        found = m.group(1).strip().strip('"')
    return found


def _user_name(label: str) -> str:
    """``+64055:+64055`` -> ``libvirt-qemu (uid 64055)``."""
    uid = label.split(":", 1)[0].lstrip("+")
    try:
        return f"{pwd.getpwuid(int(uid)).pw_name} (uid {uid})"
    except (KeyError, ValueError):
        return f"uid {uid}"


def qemu_confinement(
    caps_xml: str | None, qemu_conf: str, qemu_cmdlines: list[str], controllers: set[str]
) -> list[Check]:
    """How QEMU is confined here: its user, seccomp, sVirt, cgroup controllers.

    Pure (the inputs are libvirt's capabilities XML, qemu.conf, the command
    lines of running QEMUs, the cgroup controllers mounted) so that every
    branch is tested.
    """
    checks: list[Check] = []
    models: list[str] = []
    label = ""
    if caps_xml:
        root = ET.fromstring(caps_xml)  # noqa: S314 (libvirt's own capabilities XML)
        for sec in root.iterfind("host/secmodel"):
            model = sec.findtext("model") or ""
            models.append(model)
            if model == "dac":
                for base in sec.iterfind("baselabel"):
                    if base.get("type") in ("kvm", "qemu"):
                        label = base.text or ""
    user = _conf_value(qemu_conf, "user")
    if label:
        root_user = label.split(":", 1)[0] in ("+0", "0", "root")
        checks.append(
            Check(
                "qemu user",
                not root_user,
                f"QEMU runs as {_user_name(label)}",
                "set user and group in /etc/libvirt/qemu.conf to an unprivileged user "
                '(Debian: "libvirt-qemu") and restart libvirtd',
            )
        )
    elif user in ("root", "+0", "0"):
        checks.append(
            Check("qemu user", False, "qemu.conf runs QEMU as root", "set user in qemu.conf")
        )
    sandbox = _conf_value(qemu_conf, "seccomp_sandbox")
    on = [c for c in qemu_cmdlines if "-sandbox on" in c]
    if sandbox == "0":
        checks.append(
            Check(
                "qemu seccomp",
                False,
                "seccomp_sandbox = 0 in /etc/libvirt/qemu.conf",
                "remove that line (libvirt's default is 1) and restart libvirtd",
            )
        )
    elif qemu_cmdlines and len(on) < len(qemu_cmdlines):
        checks.append(
            Check(
                "qemu seccomp",
                False,
                f"{len(qemu_cmdlines) - len(on)} running QEMU(s) without -sandbox on",
                "install a QEMU built with seccomp and restart libvirtd",
            )
        )
    else:
        flags = next(
            (m.group(0) for c in on if (m := re.search(r"-sandbox \S+", c))),
            "libvirt's default seccomp_sandbox = 1",
        )
        checks.append(Check("qemu seccomp", True, flags))
    svirt = [m for m in models if m not in ("none", "dac", "")]
    checks.append(
        Check(
            "svirt",
            bool(svirt),
            f"security driver {', '.join(svirt)}"
            if svirt
            else "no AppArmor/SELinux security driver: QEMU is confined by its own user "
            "(DAC) and seccomp only",
            "enable AppArmor (or SELinux) on the host and restart libvirtd",
            required=False,
        )
    )
    want = {"cpu", "io", "memory"}
    checks.append(
        Check(
            "cgroups",
            want <= controllers,
            f"controllers: {' '.join(sorted(controllers)) or 'none'}",
            f"mount the {' '.join(sorted(want - controllers))} cgroup controller(s) and restart "
            "libvirtd: the domains' CPU quota, I/O weight and memory limit need them",
            required=False,
        )
    )
    return checks


def cgroup_controllers(mounts: str, read: Callable[[Path], str]) -> set[str]:
    """Controllers mounted (cgroup v1 hierarchies and the v2 one), v2 names."""
    found: set[str] = set()
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup2":
            found |= set(read(Path(parts[1]) / "cgroup.controllers").split())
        elif parts[2] == "cgroup":
            found |= {V1_NAMES.get(o, o) for o in parts[3].split(",") if o in CGROUP_FLAGS}
    return found


def _running_qemu_cmdlines() -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in raw.split(b"\0", 1)[0]:
            out.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def supervisor_check(
    settings: Settings, serving: int, systemd: Callable[[], bool] = systemd_runs_services
) -> Check:
    """Whether something restarts a service that exits (`up`'s supervisor, or systemd)."""
    pid = running_pid(settings)
    if pid is not None:
        return Check(
            "supervisor",
            True,
            f"pid {pid} restarts a service that exits (`agent-vm status` shows restarts)",
            required=False,
        )
    if systemd():
        return Check("supervisor", True, "systemd (deploy/systemd units)", required=False)
    return Check(
        "supervisor",
        False,
        f"none: {serving} service(s) run unsupervised, one that exits stays down"
        if serving
        else "not running",
        "agent-vm up (it supervises services already running, too)",
        required=False,
    )


KSM = Path("/sys/kernel/mm/ksm")


def ksm_check(ksm: Path = KSM) -> Check:
    """Kernel same-page merging: pool VMs restored from one template share most of
    their memory, which KSM folds (docs/BENCHMARKS.md: 282 -> about 168 MiB per
    idle 512 MiB pool VM here). Optional: its scans cost host CPU."""
    try:
        run = (ksm / "run").read_text().strip()
    except OSError:
        return Check("memory merging", False, "this kernel has no KSM", required=False)
    if run == "1":
        saved = int((ksm / "pages_sharing").read_text().strip() or 0) * 4096 // 2**20
        return Check("memory merging", True, f"KSM on ({saved} MiB merged now)", required=False)
    return Check(
        "memory merging",
        False,
        "KSM off: every pool VM keeps its own copy of the memory it shares with the others",
        f"echo 1 > {ksm}/run (QEMU marks guest memory mergeable; ksmd costs some CPU)",
        required=False,
    )


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    conn = LibvirtConnection(settings.libvirt_uri)
    caps_xml = None
    try:
        lv, hv = conn.versions()
        checks.append(Check("libvirt", True, f"{settings.libvirt_uri}: libvirt {lv}, QEMU {hv}"))
        caps_xml = conn.get().getCapabilities()
    except AgentVMError as exc:
        checks.append(
            Check(
                "libvirt",
                False,
                exc.message,
                "start it: `virtlogd -d && libvirtd -d` "
                "(or `systemctl start libvirtd` under systemd); ./setup.sh does this",
            )
        )
    finally:
        conn.close()
    virtlogd = Path("/run/libvirt/virtlogd-sock").exists()
    checks.append(
        Check(
            "virtlogd",
            virtlogd,
            "socket present" if virtlogd else "not running",
            "start it: `virtlogd -d`",
        )
    )
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
        checks.append(Check("qemu", True, out.stdout.splitlines()[0] if out.stdout else qemu))
    else:
        checks.append(
            Check(
                "qemu",
                False,
                "qemu-system-x86_64 not found",
                "apt-get install qemu-system-x86 qemu-utils",
            )
        )
    accel = detect(settings.accel)
    checks.append(
        Check("accelerator", True, f"{accel.accel.value}: {accel.reason}", required=False)
    )
    kvm = Path("/dev/kvm")
    if kvm.exists():
        st = kvm.stat()
        try:
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            kvm_gid = -1
        ok = st.st_gid == kvm_gid and bool(st.st_mode & stat.S_IRGRP and st.st_mode & stat.S_IWGRP)
        checks.append(
            Check(
                "/dev/kvm permissions",
                ok,
                f"group {st.st_gid}, mode {stat.filemode(st.st_mode)}",
                "chgrp kvm /dev/kvm && chmod 660 /dev/kvm, then restart libvirtd "
                "(otherwise libvirt re-probes QEMU at every start: ~50 s per VM)",
            )
        )
    for tool, pkg in (
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-img", "qemu-utils"),
        ("mke2fs", "e2fsprogs"),
        ("virt-xml-validate", "libvirt-clients"),
    ):
        found = shutil.which(tool)
        checks.append(
            Check(f"tool {tool}", found is not None, found or "missing", f"apt-get install {pkg}")
        )
    images = ImageStore(settings.cache_dir)
    try:
        current = images.current()
        if current is not None:
            m = current.load_manifest()
            checks.append(
                Check("guest image", True, f"{m.id} (kernel {m.kernel_release}) in {current.root}")
            )
        else:
            checks.append(
                Check(
                    "guest image",
                    False,
                    f"none built for this version in {settings.cache_dir}",
                    "agent-vm image build",
                )
            )
    except AgentVMError as exc:
        checks.append(Check("guest image", False, exc.message, "./setup.sh"))
    for path in (settings.state_dir, settings.cache_dir):
        blocked = _traversable_by_others(path)
        checks.append(
            Check(
                f"QEMU can reach {path}",
                blocked is None,
                "ok" if blocked is None else f"{blocked} is not searchable by other users",
                f"chmod o+x {blocked} or move the directory (AGENTVM_STATE_DIR/AGENTVM_CACHE_DIR)",
            )
        )
    memlock = can_raise_memlock()
    checks.append(
        Check(
            "memory hard limit",
            True,
            "available"
            if memlock
            else "unavailable here (no CAP_SYS_RESOURCE to raise "
            "RLIMIT_MEMLOCK); the CPU quota still applies",
            required=False,
        )
    )
    io_weight = io_weight_supported()
    checks.append(
        Check(
            "I/O weight",
            io_weight,
            "available"
            if io_weight
            else "unavailable here (cgroup v1 blkio without bfq: the block scheduler has no "
            "weights); VMs run without an I/O weight, so one VM's disk I/O can crowd others",
            "use the bfq scheduler for the disk under AGENTVM_STATE_DIR "
            "(echo bfq > /sys/block/DEV/queue/scheduler) or boot with cgroup v2",
            required=False,
        )
    )
    checks.append(firewall_check())
    checks.append(ksm_check())
    if caps_xml is not None:
        controllers = cgroup_controllers(_read(Path("/proc/self/mounts")), _read)
        checks += qemu_confinement(
            caps_xml, _read(QEMU_CONF), _running_qemu_cmdlines(), controllers
        )
    checks += auth_checks(settings)
    checks.append(workspace_check(settings))
    serving = 0
    for spec in service_specs(settings):
        status = health(settings, spec)
        serving += status == "SERVING"
        checks.append(
            Check(
                f"service {spec.name}",
                status == "SERVING",
                f"{status} at {spec.address}",
                "agent-vm up",
            )
        )
    checks.append(supervisor_check(settings, serving))
    if os.geteuid() != 0:
        checks.append(
            Check(
                "privileges",
                True,
                "not root: qemu:///system needs libvirt group membership",
                required=False,
            )
        )
    return checks
