"""Accelerator detection (vm_manager.accel) with fake cpuinfo files and device paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentvm.vm_manager import accel
from agentvm.vm_manager.accel import Accel

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae vmx ept sse sse2
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae vmx ept sse sse2
"""
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm npt sse2\n"
NONE = "processor\t: 0\nflags\t\t: fpu vme hypervisor sse2 vmxsomething svm_lock\n"


@pytest.fixture
def kvm(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.write_text("")
    dev.chmod(0o660)
    return dev


def cpuinfo(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_cpu_virt_flag() -> None:
    assert accel.cpu_virt_flag(INTEL) == "vmx"
    assert accel.cpu_virt_flag(AMD) == "svm"
    assert accel.cpu_virt_flag(NONE) is None  # whole words only
    assert accel.cpu_virt_flag("") is None


def test_no_virt_flag_means_tcg(tmp_path: Path, kvm: Path) -> None:
    info = accel.detect(cpuinfo_path=cpuinfo(tmp_path, NONE), kvm_path=str(kvm))
    assert info.accel is Accel.TCG
    assert "vmx/svm" in info.reason


def test_vmx_and_usable_device_means_kvm(tmp_path: Path, kvm: Path) -> None:
    info = accel.detect(cpuinfo_path=cpuinfo(tmp_path, INTEL), kvm_path=str(kvm))
    assert info.accel is Accel.KVM
    assert "vmx" in info.reason
    assert info.accel.domain_type == "kvm"


def test_svm_and_missing_device_means_tcg(tmp_path: Path) -> None:
    missing = tmp_path / "no-kvm"
    info = accel.detect(cpuinfo_path=cpuinfo(tmp_path, AMD), kvm_path=str(missing))
    assert info.accel is Accel.TCG
    assert str(missing) in info.reason
    assert "missing" in info.reason
    assert info.accel.domain_type == "qemu"


def test_unusable_device_means_tcg(
    tmp_path: Path, kvm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tests run as root, for whom os.access always succeeds: fake a plain user.
    def no_access(path: str, mode: int) -> bool:
        return path != str(kvm)

    monkeypatch.setattr(os, "access", no_access)
    info = accel.detect(cpuinfo_path=cpuinfo(tmp_path, AMD), kvm_path=str(kvm))
    assert info.accel is Accel.TCG
    assert "not usable" in info.reason


def test_unreadable_cpuinfo_means_tcg(tmp_path: Path, kvm: Path) -> None:
    info = accel.detect(cpuinfo_path=str(tmp_path / "missing"), kvm_path=str(kvm))
    assert info.accel is Accel.TCG


def test_forced_kvm_ignores_the_host(tmp_path: Path) -> None:
    info = accel.detect(
        "kvm", cpuinfo_path=cpuinfo(tmp_path, NONE), kvm_path=str(tmp_path / "missing")
    )
    assert info.accel is Accel.KVM
    assert "AGENTVM_ACCEL=kvm" in info.reason


def test_forced_tcg_ignores_the_host(tmp_path: Path, kvm: Path) -> None:
    info = accel.detect("tcg", cpuinfo_path=cpuinfo(tmp_path, INTEL), kvm_path=str(kvm))
    assert info.accel is Accel.TCG
    assert "AGENTVM_ACCEL=tcg" in info.reason
