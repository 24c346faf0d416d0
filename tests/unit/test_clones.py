"""Memory template keys and the template store's files (vm_manager.clones), host side only."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from agentvm.common.errors import FailedPrecondition, ResourceExhausted
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager import clones
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.clones import (
    DISK,
    IMAGE_DISK,
    KEY_RE,
    MEMORY,
    TemplateInfo,
    TemplateSpec,
    TemplateStore,
    freeze_layers,
)
from agentvm.vm_manager.templates import Resources

BUILTIN = "0123456789abcdef"
CODER = "c0de" * 16


def spec(workload: str = "", network: NetworkMode = NetworkMode.ISOLATED) -> TemplateSpec:
    res = Resources(1, 512, 4096)
    return TemplateSpec(BUILTIN, ResourceProfile.STANDARD, res, Accel.TCG, network, workload)


def test_a_named_images_template_has_a_key_of_its_own_and_built_in_keys_are_unchanged() -> None:
    assert spec().key == f"{BUILTIN}-standard-1c-512m-4096d-tcg"
    assert spec(network=NetworkMode.NAT_FILTERED).key == f"{BUILTIN}-standard-1c-512m-4096d-tcg-nat"
    named = spec(CODER)
    assert named.key == f"{BUILTIN}-standard-1c-512m-4096d-tcg-image-{CODER}"
    nat = spec(CODER, NetworkMode.NAT_FILTERED)
    assert nat.key == f"{BUILTIN}-standard-1c-512m-4096d-tcg-nat-image-{CODER}"
    keys = {spec().key, named.key, nat.key, spec("f" * 64).key}
    assert len(keys) == 4
    for key in keys:
        assert KEY_RE.fullmatch(key), key
        assert "/" not in key


def info(s: TemplateSpec) -> TemplateInfo:
    return TemplateInfo(
        key=s.key,
        image_id=s.image_id,
        profile=s.profile.name,
        vcpus=1,
        memory_mib=512,
        disk_mib=4096,
        accel=s.accel.value,
        created_at=0.0,
        build_s=1.0,
        qemu_version="7.2.0",
        memory_state_bytes=1,
        disk_bytes=1,
        boot_name="agent-vm-x",
        workload_image_id=s.workload_image_id,
    )


def test_a_named_images_template_keeps_its_frozen_image_layer_and_its_image_id(
    tmp_path: Path,
) -> None:
    store = TemplateStore(tmp_path / "templates")
    s = spec(CODER)
    staging = store.staging(s.key)
    vm = tmp_path / "vm"
    vm.mkdir()
    for name in ("overlay.qcow2", "image.qcow2"):
        (vm / name).write_text(name)
    (staging / MEMORY).write_text("ram")
    disk = freeze_layers(staging, vm / "overlay.qcow2", vm / "image.qcow2")
    assert disk == staging / DISK
    assert not (vm / "overlay.qcow2").exists()
    assert not (vm / "image.qcow2").exists()
    assert (staging / IMAGE_DISK).read_text() == "image.qcow2"
    assert (staging / IMAGE_DISK).stat().st_mode & 0o777 == 0o644
    store.publish(staging, info(s))
    loaded = store.load(s.key)
    assert loaded is not None
    assert loaded.workload_image_id == CODER
    assert store.image_disk(s.key) == tmp_path / "templates" / s.key / IMAGE_DISK
    assert (
        json.loads((tmp_path / "templates" / s.key / "template.json").read_text())[
            "workload_image_id"
        ]
        == CODER
    )
    assert store.current(s, "7.2.0") == loaded
    # Without its image layer the template is incomplete (rebuilt, never restored).
    store.image_disk(s.key).unlink()
    assert store.load(s.key) is None


def test_a_built_in_template_needs_no_image_layer_and_old_records_still_load(
    tmp_path: Path,
) -> None:
    store = TemplateStore(tmp_path / "templates")
    s = spec()
    staging = store.staging(s.key)
    (tmp_path / "overlay.qcow2").write_text("disk")
    (staging / MEMORY).write_text("ram")
    freeze_layers(staging, tmp_path / "overlay.qcow2", None)
    assert not (staging / IMAGE_DISK).exists()
    store.publish(staging, info(s))
    # A record written before named images existed has no workload_image_id.
    record = tmp_path / "templates" / s.key / "template.json"
    data = asdict(info(s))
    del data["workload_image_id"]
    record.write_text(json.dumps(data))
    loaded = store.load(s.key)
    assert loaded == replace(info(s), workload_image_id="")


class _Dom:
    def name(self) -> str:
        return "agent-vm-x"


def _failed_migration(monkeypatch: pytest.MonkeyPatch, desc: str) -> None:
    def qmp(_dom: object, command: str, **_arguments: object) -> dict[str, str]:
        assert command == "query-migrate"
        return {"status": "failed", "error-desc": desc}

    monkeypatch.setattr(clones, "qmp", qmp)


def test_a_save_on_a_full_disk_is_resource_exhausted_and_says_to_free_space(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What QEMU answered in the soak when the state disk filled during a pause.
    _failed_migration(monkeypatch, "Unable to write to file: No space left on device")
    with pytest.raises(ResourceExhausted, match="file system of /state/vms/x is full; free space"):
        clones._wait_migration(
            _Dom(), "saving the memory of x", 1.0, "again", Path("/state/vms/x/suspended.state")
        )


def test_another_failed_save_says_the_remedy_its_caller_gave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _failed_migration(monkeypatch, "Unable to write to file: Input/output error")
    with pytest.raises(FailedPrecondition, match="Input/output error; kill it") as caught:
        clones._wait_migration(_Dom(), "saving", 1.0, "kill it", Path("/state/x"))
    assert not isinstance(caught.value, ResourceExhausted)
    assert "DeleteTemplate" in clones.REBUILD_TEMPLATE
