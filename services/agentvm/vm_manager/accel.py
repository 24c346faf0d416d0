"""Choose the accelerator: KVM where the CPU and /dev/kvm allow it, else TCG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum


class Accel(Enum):
    """Accelerator, with the libvirt domain type that selects it."""

    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        return "kvm" if self is Accel.KVM else "qemu"


@dataclass(frozen=True)
class AccelInfo:
    accel: Accel
    reason: str


def cpu_virt_flag(cpuinfo: str) -> str | None:
    """'vmx' or 'svm' if the CPU flags list hardware virtualization."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            for flag in ("vmx", "svm"):
                if flag in flags:
                    return flag
    return None


def detect(
    setting: str = "auto", cpuinfo_path: str = "/proc/cpuinfo", kvm_path: str = "/dev/kvm"
) -> AccelInfo:
    """Pick the accelerator. ``setting`` is auto, kvm or tcg (AGENTVM_ACCEL)."""
    if setting == "tcg":
        return AccelInfo(Accel.TCG, "forced by AGENTVM_ACCEL=tcg")
    if setting == "kvm":
        return AccelInfo(Accel.KVM, "forced by AGENTVM_ACCEL=kvm")
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as fh:
            flag = cpu_virt_flag(fh.read())
    except OSError:
        flag = None
    if flag is None:
        return AccelInfo(
            Accel.TCG,
            "the CPU has no vmx/svm flag (no hardware virtualization, e.g. a nested VM "
            "without it): using QEMU TCG software emulation",
        )
    if not os.path.exists(kvm_path):
        return AccelInfo(Accel.TCG, f"{kvm_path} is missing (load kvm_intel/kvm_amd): using TCG")
    if not os.access(kvm_path, os.R_OK | os.W_OK):
        return AccelInfo(Accel.TCG, f"{kvm_path} is not usable by this user: using TCG")
    return AccelInfo(Accel.KVM, f"CPU flag {flag} and a usable {kvm_path}")
