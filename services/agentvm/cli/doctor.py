"""`agent-vm doctor`: check each prerequisite and say how to fix what fails."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentvm.cli.services import health, service_specs
from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.vm_manager.accel import detect
from agentvm.vm_manager.hostcaps import can_raise_memlock
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    # Informational checks never fail the doctor.
    required: bool = True


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


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    conn = LibvirtConnection(settings.libvirt_uri)
    try:
        lv, hv = conn.versions()
        checks.append(Check("libvirt", True, f"{settings.libvirt_uri}: libvirt {lv}, QEMU {hv}"))
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
            "RLIMIT_MEMLOCK); CPU quota and I/O weight still apply",
            required=False,
        )
    )
    checks.append(firewall_check())
    for spec in service_specs(settings):
        status = health(spec.address)
        checks.append(
            Check(
                f"service {spec.name}",
                status == "SERVING",
                f"{status} at {spec.address}",
                "agent-vm up",
            )
        )
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
