"""The guest's boot-time setup (agentvm_guest/sysinit.py) on the host: the parts that
can run outside a VM. The whole setup runs in every VM the real-VM tests boot
(mounts, cgroup2, the grown root, the hostname: test_profiles, test_templates,
test_hostile_code, test_guest_agent)."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from agentvm_guest import sysinit


def test_the_root_grows_by_one_online_resize_request_for_the_disks_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kernel is asked: EXT4_IOC_RESIZE_FS with the disk's size in blocks.
    (The resize itself needs CAP_SYS_RESOURCE, which these hosts' root lacks; every
    real VM does it: test_profiles checks the grown file system.)"""
    asked: list[tuple[int, bytes]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        asked.append((request, arg))
        return arg

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    blocks = sysinit.grow_root(4096 * 2048, str(tmp_path))  # a 4 GiB disk
    block = os.statvfs(tmp_path).f_frsize
    assert blocks == (4 << 30) // block
    assert asked == [(0x40086610, struct.pack("=Q", blocks))]


def test_a_resize_the_kernel_refuses_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):  # not ext4 here (or no CAP_SYS_RESOURCE): resize2fs next
        sysinit.grow_root(1 << 30, str(tmp_path))


def test_the_vm_name_comes_from_the_kernel_command_line() -> None:
    line = "console=ttyS0 quiet panic=-1 agentvm.name=agent-vm-1234abcd\n"
    assert sysinit.boot_name(line) == "agent-vm-1234abcd"
    assert sysinit.boot_name("console=ttyS0 quiet") is None
    assert sysinit.boot_name("agentvm.name=") is None


def test_a_virtiofs_device_is_found_among_the_virtio_devices(tmp_path: Path) -> None:
    for name, dev_id in (("virtio0", "0x0001"), ("virtio1", "0x0003")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(dev_id + "\n")
    assert not sysinit.has_virtiofs(tmp_path)
    (tmp_path / "virtio2").mkdir()
    (tmp_path / "virtio2" / "device").write_text("0x001a\n")
    assert sysinit.has_virtiofs(tmp_path)


def test_the_setup_runs_once_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A respawned agent finds the setup done and touches nothing (a clone keeps the
    hostname and machine id Reidentify gave it)."""
    done = tmp_path / "agentvm-setup.done"
    done.touch()

    def refuse(*args: object) -> None:
        raise AssertionError(f"the setup ran again: {args}")

    monkeypatch.setattr(sysinit, "_ensure_mount", refuse)
    monkeypatch.setattr(sysinit, "_identity", refuse)
    assert sysinit.run(done) == []
