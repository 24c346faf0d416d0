"""Shared workspaces: mount bookkeeping and the uncapped fallback (the loop-mounted
file system itself is proven on a real VM in test_hostile_code.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.vm_manager import workspace

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 7:0 / /var/lib/agent-vm/vms/agent-vm-a/workspace rw,nosuid,nodev - ext4 /dev/loop0 rw
91 22 7:1 / /var/lib/agent-vm/vms/agent-vm-a\\040b/workspace rw - ext4 /dev/loop1 rw
92 90 0:50 / /var/lib/agent-vm/vms/agent-vm-a/workspace/deeper rw - tmpfs tmpfs rw
93 22 7:2 / /var/lib/agent-vm/vms/agent-vm-ab/workspace rw - ext4 /dev/loop2 rw
94 22 7:3 / /srv/caf\xc3\xa9/workspace rw - ext4 /dev/loop3 rw
95 22 7:4 / /srv/odd\xff/workspace rw - ext4 /dev/loop4 rw
""".encode("latin-1")


def test_mounts_under_finds_nested_mounts_deepest_first_and_only_below_the_path() -> None:
    got = workspace.mounts_under(Path("/var/lib/agent-vm/vms/agent-vm-a"), MOUNTINFO)
    assert got == [
        Path("/var/lib/agent-vm/vms/agent-vm-a/workspace/deeper"),
        Path("/var/lib/agent-vm/vms/agent-vm-a/workspace"),
    ]
    spaced = workspace.mounts_under(Path("/var/lib/agent-vm/vms/agent-vm-a b"), MOUNTINFO)
    assert spaced == [Path("/var/lib/agent-vm/vms/agent-vm-a b/workspace")]
    assert workspace.mounts_under(Path("/srv/café"), MOUNTINFO) == [Path("/srv/café/workspace")]
    # A mount point that is not valid UTF-8 anywhere on the host breaks nothing.
    assert workspace.mounts_under(Path("/opt"), MOUNTINFO) == []


def test_uncapped_workspace_is_a_private_directory(tmp_path: Path) -> None:
    ws = tmp_path / "vm" / "workspace"
    ws.parent.mkdir()
    workspace.create(ws, 2048, "none")
    assert ws.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in ws.iterdir()) == ["input", "output", "work"]
    assert not (tmp_path / "vm" / workspace.IMAGE_NAME).exists()
    workspace.remove_tree(ws.parent)
    assert not ws.parent.exists()


def test_a_workspace_that_cannot_be_made_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no mkfs.ext4, no mount
    ws = tmp_path / "vm" / "workspace"
    ws.parent.mkdir()
    with pytest.raises(FailedPrecondition) as err:
        workspace.create(ws, 2048, "loop")
    assert "api workspace mode" in err.value.message
    assert "AGENTVM_WORKSPACE_CAP=none" in err.value.message


def test_settings_refuse_an_unknown_workspace_cap() -> None:
    with pytest.raises(InvalidArgument, match="AGENTVM_WORKSPACE_CAP='xfs': use loop or none"):
        Settings(workspace_cap="xfs")


def test_a_private_mount_namespace_is_refused_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd's PrivateTmp= a loop mount would be vm-manager's alone: virtiofsd
    would share the empty directory beneath it, uncapped."""
    monkeypatch.setattr(workspace, "_own_mount_namespace", lambda: True)
    ws = tmp_path / "vm" / "workspace"
    ws.parent.mkdir()
    with pytest.raises(FailedPrecondition, match="mount namespace of its own"):
        workspace.create(ws, 2048, "loop")
    assert list(ws.parent.iterdir()) == []


def test_a_vm_directory_of_any_depth_is_removed(deep_tmp: Path) -> None:
    """A guest's 1,500-level tree in an uncapped workspace cannot stop a VM's removal."""
    vm_dir = deep_tmp / "vms" / "agent-vm-deep"
    (vm_dir / "workspace").mkdir(parents=True)
    host = deep_tmp / "host-dir"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    fd = os.open(vm_dir / "workspace", os.O_DIRECTORY)
    try:
        for _ in range(1500):
            os.mkdir("d", dir_fd=fd)
            os.symlink(str(host), "link", dir_fd=fd)
            nxt = os.open("d", os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    workspace.remove_tree(vm_dir)
    assert not vm_dir.exists()
    assert (host / "keep").read_text() == "host file\n"
    workspace.remove_tree(vm_dir)  # gone already: nothing to do
