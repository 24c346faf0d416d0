"""Named images on the host (vm_manager/image_store.py) with real files, and the image
RPCs (servicer_images.py) through an in-process vm-manager on libvirt's test driver."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.common.errors import FailedPrecondition, InvalidArgument, NotFound
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.access import OWNER_LABEL, POOL_LABEL, POOL_OWNER
from agentvm.vm_manager.clones import TemplateInfo, TemplateStore
from agentvm.vm_manager.image_store import (
    ImageConfigData,
    ImageManifest,
    ImageStore,
    ImageStoreError,
    StoredImage,
    image_users,
    store_root,
)
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState

from .test_servicers import RecordingSink, fake_image, unit_manager, unit_settings

__all__ = ["fake_image"]  # the fixture, used by name

NOBODY: list[str] = []


def nobody(_image_id: str) -> list[str]:
    return NOBODY


def image_id(n: int) -> str:
    return hashlib.sha256(f"image {n}".encode()).hexdigest()


def manifest(created: float = 1000.0, **kw: Any) -> ImageManifest:
    config = ImageConfigData(
        env={"LANG": "C.UTF-8"},
        workdir="/work",
        user="1000:1000",
        entrypoint=("/bin/sh", "-c"),
        cmd=("echo hi",),
        labels={"org.opencontainers.image.title": "t"},
    )
    fields: dict[str, Any] = {
        "kind": "oci",
        "base": "oci-archive:/srv/app.tar",
        "digest": "sha256:" + "ab" * 32,
        "created": created,
        "config": config,
        "packages": ("busybox=1.36",),
        "content_bytes": 12345,
        "disk_bytes": 64 << 20,
    }
    fields.update(kw)
    return ImageManifest(**fields)


def add(
    store: ImageStore, n: int, *names: str, created: float = 1000.0, qcow2: bool = False
) -> StoredImage:
    with store.staging() as staged:
        disk = staged / "root.qcow2"
        if qcow2:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True
            )
        else:
            disk.write_bytes(b"q" * 8192)
        return store.commit(staged, image_id(n), manifest(created), names)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


# -- manifest ------------------------------------------------------------------------


def test_manifest_round_trips_and_config_through_proto() -> None:
    m = manifest()
    assert ImageManifest.from_json(m.to_json()) == m
    assert ImageConfigData.from_proto(m.config.to_proto()) == m.config
    assert m.config.to_proto().entrypoint == ["/bin/sh", "-c"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("digest"), "digest"),
        (lambda d: d.update(created="yesterday"), "created"),
        (lambda d: d.update(kind="tarball"), "kind"),
        (lambda d: d.update(content_bytes=True), "content_bytes"),
        (lambda d: d.update(disk_bytes=-1), "disk_bytes"),
        (lambda d: d.update(packages=["a", 1]), "packages"),
        (lambda d: d["config"].pop("user"), "user"),
        (lambda d: d["config"].update(env={"A": 1}), "config.env"),
        (lambda d: d["config"].update(cmd="sh"), "cmd"),
    ],
)
def test_manifest_is_strict_and_names_the_field(change: Any, field: str) -> None:
    data = json.loads(manifest().to_json())
    change(data)
    with pytest.raises(ImageStoreError) as err:
        ImageManifest.from_json(json.dumps(data), "m.json")
    assert field in err.value.message
    assert "m.json" in err.value.message


def test_manifest_that_is_not_json_is_an_image_store_error() -> None:
    with pytest.raises(ImageStoreError, match="not JSON"):
        ImageManifest.from_json("{", "x/manifest.json")


# -- commit, names, resolve ------------------------------------------------------------


def test_commit_publishes_the_staged_dir_and_names_it(store: ImageStore) -> None:
    img = add(store, 1, "coder", "coder:1")
    assert img.id == image_id(1)
    assert img.path == store.root / img.id
    assert img.disk.read_bytes() == b"q" * 8192
    assert img.names == ("coder", "coder:1")
    assert img.size_bytes > 0
    assert json.loads((store.root / "names.json").read_text()) == {
        "coder": img.id,
        "coder:1": img.id,
    }
    assert ImageManifest.from_json((img.path / "manifest.json").read_text()) == manifest()
    assert (img.path.stat().st_mode & 0o777) == 0o755
    assert (img.disk.stat().st_mode & 0o777) == 0o644
    assert list((store.root / ".staging").iterdir()) == []
    msg = img.to_proto(["vm:x"])
    assert msg.kind == vm_manager_pb2.IMAGE_KIND_OCI
    assert msg.path == str(img.disk)
    assert list(msg.names) == ["coder", "coder:1"]
    assert list(msg.used_by) == ["vm:x"]
    assert msg.config.env["LANG"] == "C.UTF-8"
    assert msg.built_at.seconds == 1000
    assert msg.disk_bytes == 64 << 20
    assert msg.content_bytes == 12345


def test_the_same_content_twice_keeps_the_files_and_adds_the_names(store: ImageStore) -> None:
    first = add(store, 1, "a")
    stamp = first.disk.stat().st_mtime_ns
    second = add(store, 1, "b")
    assert second.id == first.id
    assert second.names == ("a", "b")
    assert second.disk.stat().st_mtime_ns == stamp
    assert list((store.root / ".staging").iterdir()) == []


def test_a_name_moves_like_docker_tag(store: ImageStore) -> None:
    one = add(store, 1, "app")
    two = add(store, 2, "app")
    assert store.get(one.id).names == ()
    assert store.resolve("app").id == two.id
    moved = store.tag(one.id[:10], "app")
    assert moved.id == one.id
    assert moved.names == ("app",)
    assert store.get(two.id).names == ()
    tagged = store.tag("app", "app:v2")
    assert tagged.names == ("app", "app:v2")


def test_resolve_by_name_id_sha256_and_prefix(store: ImageStore) -> None:
    img = add(store, 1, "coder:1")
    assert store.resolve("coder:1").id == img.id
    assert store.resolve(img.id).id == img.id
    assert store.resolve(f"sha256:{img.id}").id == img.id
    assert store.resolve(img.id[:8]).id == img.id
    assert store.resolve(f"sha256:{img.id[:9]}").id == img.id


def test_resolve_refuses_unknown_ambiguous_malformed_and_default(store: ImageStore) -> None:
    add(store, 1, "first")
    # A 3-digit prefix is below the minimum: not found rather than ambiguous.
    with pytest.raises(NotFound) as nf:
        store.resolve(image_id(1)[:3])
    assert "at least 8" in nf.value.message
    with pytest.raises(NotFound) as nf:
        store.resolve("nosuch")
    assert "nosuch" in nf.value.message
    assert "agent-vm image list" in nf.value.message
    with pytest.raises(NotFound):
        store.resolve("0" * 64)
    for bad in ("UPPER", "a b", "x:", ":tag", "sha256:zz", "a" * 64 + ":t", "a:-t"):
        with pytest.raises(InvalidArgument) as err:
            store.resolve(bad)
        assert "malformed" in err.value.message, bad
    for builtin in ("default", ""):
        with pytest.raises(InvalidArgument, match="default is the built-in image"):
            store.resolve(builtin)


def test_an_ambiguous_prefix_names_the_candidates(store: ImageStore) -> None:
    pair = ("abcdef01" + "0" * 56, "abcdef01" + "1" * 56)
    for i in pair:
        with store.staging() as staged:
            (staged / "root.qcow2").write_bytes(b"x")
            store.commit(staged, i, manifest(), ["n" + i[-4:]])
    with pytest.raises(InvalidArgument) as err:
        store.resolve(pair[0][:8])
    assert "ambiguous" in err.value.message
    assert pair[0][:12] in err.value.message
    assert pair[1][:12] in err.value.message
    assert "n" + pair[0][-4:] in err.value.message


@pytest.mark.parametrize(
    "name", ["default", "default:1", "sha256", "Coder", "-x", "a/b", "x:" + "t" * 129, "a" * 64]
)
def test_commit_and_tag_refuse_bad_names_and_change_nothing(store: ImageStore, name: str) -> None:
    img = add(store, 1, "ok")
    with pytest.raises(InvalidArgument):
        store.tag("ok", name)
    with store.staging() as staged:
        (staged / "root.qcow2").write_bytes(b"x")
        with pytest.raises(InvalidArgument):
            store.commit(staged, image_id(2), manifest(), ["fine", name])
    assert [i.id for i in store.list()] == [img.id]
    assert json.loads((store.root / "names.json").read_text()) == {"ok": img.id}


def test_commit_needs_a_disk_and_a_real_id(store: ImageStore) -> None:
    with store.staging() as staged:
        with pytest.raises(FailedPrecondition, match=r"root\.qcow2"):
            store.commit(staged, image_id(1), manifest(), [])
        (staged / "root.qcow2").write_bytes(b"x")
        with pytest.raises(InvalidArgument, match="64 hex"):
            store.commit(staged, "abc", manifest(), [])
    assert store.list() == []


def test_list_is_newest_first_and_skips_broken_images(
    store: ImageStore, caplog: pytest.LogCaptureFixture
) -> None:
    old = add(store, 1, "old", created=100.0)
    new = add(store, 2, created=200.0)
    broken = add(store, 3, "broken", created=300.0)
    (broken.path / "manifest.json").write_text('{"kind": "oci"}')
    with caplog.at_level(logging.WARNING):
        assert [i.id for i in store.list()] == [new.id, old.id]
    assert "base" in caplog.text
    with pytest.raises(ImageStoreError) as err:
        store.resolve("broken")
    assert str(broken.path / "manifest.json") in err.value.message
    assert "re-import" in err.value.message


def test_staging_is_private_and_removed_on_error_or_without_commit(store: ImageStore) -> None:
    seen: list[Path] = []

    def failed_import() -> None:
        with store.staging() as staged:
            seen.append(staged)
            assert (staged.stat().st_mode & 0o777) == 0o700
            assert staged.parent == store.root / ".staging"
            (staged / "root.qcow2").write_bytes(b"half")
            raise RuntimeError("import failed")

    with pytest.raises(RuntimeError):
        failed_import()
    assert not seen[0].exists()
    with store.staging() as unused:
        (unused / "root.qcow2").write_bytes(b"x")
    assert not unused.exists()
    assert store.list() == []


def test_concurrent_tags_keep_every_name(store: ImageStore) -> None:
    import threading

    img = add(store, 1)
    threads = [threading.Thread(target=store.tag, args=(img.id, f"n{k}")) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(img.id).names == tuple(sorted(f"n{k}" for k in range(16)))


# -- corrupt names.json ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"BAD NAME": "' + "a" * 64 + '"}', '{"ok": "short"}', '{"ok": 5}'],
)
def test_corrupt_names_file_is_a_clear_error(store: ImageStore, text: str) -> None:
    img = add(store, 1, "ok")
    path = store.root / "names.json"
    path.write_text(text)
    for call in (store.list, lambda: store.resolve("ok"), lambda: store.tag(img.id, "n")):
        with pytest.raises(ImageStoreError) as err:
            call()
        assert str(path) in err.value.message
        assert "move it aside" in err.value.message
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert path.read_text() == text
    # recover() logs it and leaves the file for the operator.
    store.recover()
    assert path.read_text() == text


# -- delete and prune --------------------------------------------------------------------


def test_delete_refused_while_used_changes_nothing(store: ImageStore) -> None:
    img = add(store, 1, "coder", "coder:1")
    names_before = (store.root / "names.json").read_bytes()

    def users(i: str) -> list[str]:
        return ["vm:agent-vm-1234", "template:k"] if i == img.id else []

    for ref in ("coder", img.id):
        with pytest.raises(FailedPrecondition) as err:
            store.delete(ref, users)
        msg = err.value.message
        assert "vm:agent-vm-1234" in msg
        assert "template:k" in msg
        assert img.id[:12] in msg
        assert "destroy them first" in msg
    assert (store.root / "names.json").read_bytes() == names_before
    assert store.get(img.id).names == ("coder", "coder:1")


def test_delete_a_name_then_the_last_name_removes_the_files(store: ImageStore) -> None:
    img = add(store, 1, "coder", "coder:1")
    first = store.delete("coder:1", nobody)
    assert (first.id, first.untagged, first.deleted, first.freed_bytes) == (
        img.id,
        ["coder:1"],
        False,
        0,
    )
    assert img.path.is_dir()
    last = store.delete("coder", nobody)
    assert last.deleted
    assert last.untagged == ["coder"]
    assert last.freed_bytes > 0
    assert not img.path.exists()
    assert list((store.root / ".staging").iterdir()) == []
    assert json.loads((store.root / "names.json").read_text()) == {}
    with pytest.raises(NotFound):
        store.resolve("coder")


def test_delete_by_id_removes_every_name(store: ImageStore) -> None:
    img = add(store, 1, "a", "b")
    other = add(store, 2, "c")
    result = store.delete(img.id[:12], nobody)
    assert result.deleted
    assert sorted(result.untagged) == ["a", "b"]
    assert [i.id for i in store.list()] == [other.id]
    unnamed = add(store, 3)
    result = store.delete(unnamed.id, nobody)
    assert result.deleted
    assert result.untagged == []


def test_prune_removes_unnamed_unused_images_only(store: ImageStore) -> None:
    named = add(store, 1, "keep")
    used = add(store, 2)
    dangling = add(store, 3)
    moved = add(store, 4, "app")
    add(store, 5, "app")  # "app" moves away from image 4

    def users(i: str) -> list[str]:
        return ["vm:agent-vm-x"] if i == used.id else []

    result = store.prune(users)
    assert sorted(result.removed_ids) == sorted([dangling.id, moved.id])
    assert result.freed_bytes > 0
    left = {i.id for i in store.list()}
    assert named.id in left
    assert used.id in left
    assert dangling.id not in left
    assert store.prune(users).removed_ids == []


# -- recover -------------------------------------------------------------------------------


def test_recover_clears_staging_and_names_of_missing_images(
    store: ImageStore, caplog: pytest.LogCaptureFixture
) -> None:
    img = add(store, 1, "here")
    gone = image_id(9)
    names = json.loads((store.root / "names.json").read_text())
    names["gone"] = gone
    (store.root / "names.json").write_text(json.dumps(names))
    leftover = store.root / ".staging" / "new-abc"
    leftover.mkdir()
    (leftover / "root.qcow2").write_bytes(b"half")
    (store.root / ".staging" / f"trash-{gone}-1").mkdir()
    unreadable = store.root / image_id(7)
    unreadable.mkdir()
    (unreadable / "manifest.json").write_text("garbage")
    with caplog.at_level(logging.WARNING):
        store.recover()
    assert list((store.root / ".staging").iterdir()) == []
    assert json.loads((store.root / "names.json").read_text()) == {"here": img.id}
    assert "gone" in caplog.text
    assert image_id(7) in caplog.text
    assert unreadable.is_dir()  # left for the operator, not listed
    assert [i.id for i in store.list()] == [img.id]
    with pytest.raises(NotFound):
        store.resolve("gone")


def test_recover_and_list_of_an_empty_store(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "none")
    store.recover()
    assert store.list() == []
    assert not (tmp_path / "none").exists()


# -- who uses an image ---------------------------------------------------------------


def make_vm(name: str, workload: str, **labels: str) -> VM:
    return VM(
        name=name,
        uuid="u",
        profile=ResourceProfile.STANDARD,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources(1, 512, 1024),
        accel=Accel.TCG,
        image_id="builtin",
        vm_dir=Path("/nonexistent"),
        run_dir=Path("/nonexistent"),
        labels=labels,
        state=VMState.READY,
        workload_image_id=workload,
    )


def template(key: str, workload: str = "") -> TemplateInfo:
    return TemplateInfo(
        key=key,
        image_id="builtin",
        profile="STANDARD",
        vcpus=1,
        memory_mib=512,
        disk_mib=1024,
        accel="tcg",
        created_at=0.0,
        build_s=1.0,
        qemu_version="q",
        memory_state_bytes=1,
        disk_bytes=1,
        boot_name="b",
        workload_image_id=workload,
    )


def test_image_users_names_vms_pool_vms_and_templates() -> None:
    i = image_id(1)
    vms = [
        make_vm("agent-vm-a", i),
        make_vm("agent-vm-b", image_id(2)),
        make_vm("agent-vm-p", i, **{OWNER_LABEL: POOL_OWNER, POOL_LABEL: "coder/standard"}),
    ]
    gone = make_vm("agent-vm-d", i)
    gone.state = VMState.DESTROYED
    users = image_users(i, [*vms, gone], [template("t1", i), template("t2")])
    assert users == ["vm:agent-vm-a", "vm:agent-vm-p (pool coder/standard)", "template:t1"]
    assert image_users(image_id(3), vms, []) == []


def test_old_template_records_without_a_workload_image_still_load(tmp_path: Path) -> None:
    templates = TemplateStore(tmp_path)
    d = tmp_path / "k1"
    d.mkdir()
    record = {k: v for k, v in template("k1").__dict__.items() if k != "workload_image_id"}
    (d / "template.json").write_text(json.dumps(record))
    (d / "memory.state").write_bytes(b"m")
    (d / "disk.qcow2").write_bytes(b"d")
    info = templates.load("k1")
    assert info is not None
    assert info.workload_image_id == ""


# -- the RPCs through vm-manager on libvirt's test driver -------------------------------------


def test_image_rpcs_on_the_test_driver(tmp_path: Path, fake_image: Path) -> None:
    settings = unit_settings(tmp_path, fake_image)
    sink = RecordingSink()

    async def main() -> None:
        from agentvm.common.grpc_util import SERVER_OPTIONS, aio_channel
        from agentvm.vm_manager.image import ImageStore as BuiltinImages
        from agentvm.vm_manager.libvirt_conn import LibvirtConnection
        from agentvm.vm_manager.servicer import VMManagerServicer

        conn = LibvirtConnection(settings.libvirt_uri)
        manager = unit_manager(settings, conn, events=sink)
        assert manager.image_store.root == store_root(settings)
        add(manager.image_store, 1, "coder", "coder:1", qcow2=True, created=200.0)
        other = add(manager.image_store, 2, "tool", qcow2=True, created=100.0)
        (manager.image_store.root / ".staging" / "new-left").mkdir()
        await manager.recover()
        assert list((manager.image_store.root / ".staging").iterdir()) == []
        server = grpc.aio.server(options=SERVER_OPTIONS)
        vm_manager_pb2_grpc.add_VMManagerServiceServicer_to_server(
            VMManagerServicer(manager, BuiltinImages(settings.cache_dir)), server
        )
        address = f"unix:{tmp_path}/vmm.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with aio_channel(address, "vm-manager") as channel:
                stub = vm_manager_pb2_grpc.VMManagerServiceStub(channel)
                await rpcs(stub, manager, other)
        finally:
            await server.stop(None)
            conn.close()

    async def rpcs(stub: Any, manager: Any, other: StoredImage) -> None:
        coder = image_id(1)
        listed = (await stub.ListImages(vm_manager_pb2.ListImagesRequest())).images
        assert [i.id for i in listed] == [coder, other.id]
        assert list(listed[0].names) == ["coder", "coder:1"]
        assert listed[0].kind == vm_manager_pb2.IMAGE_KIND_OCI
        assert listed[0].size_bytes > 0
        # GetImage: empty and "default" still describe the built-in image.
        for name in ("", "default"):
            builtin = await stub.GetImage(vm_manager_pb2.GetImageRequest(name=name))
            assert builtin.present
            assert builtin.image.kernel_release == "6.1.0-test"
            assert builtin.image.kind == vm_manager_pb2.IMAGE_KIND_BUILTIN
        got = await stub.GetImage(vm_manager_pb2.GetImageRequest(name=coder[:10]))
        assert got.present
        assert got.image.id == coder
        assert got.image.config.workdir == "/work"
        for name, code in (
            ("nosuch", grpc.StatusCode.NOT_FOUND),
            ("BAD NAME", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetImage(vm_manager_pb2.GetImageRequest(name=name))
            assert err.value.code() == code
        # A VM that uses the image: DeleteImage names it, ListImages shows it.
        vm = await manager.create(
            profile=ResourceProfile.STANDARD,
            network_mode=NetworkMode.ISOLATED,
            resources=Resources.for_profile(ResourceProfile.STANDARD, 0, 0, 0),
            labels={},
            start=False,
            shared_workspace=False,
        )
        manager._vms[vm.name].workload_image_id = coder
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name="coder"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"vm:{vm.name}" in (err.value.details() or "")
        listed = (await stub.ListImages(vm_manager_pb2.ListImagesRequest())).images
        assert list(listed[0].used_by) == [f"vm:{vm.name}"]
        pruned = await stub.PruneImages(vm_manager_pb2.PruneImagesRequest())
        assert list(pruned.removed_ids) == []
        await manager.destroy(vm.name, "test")
        # Tag, then delete names until the files go.
        tagged = await stub.TagImage(vm_manager_pb2.TagImageRequest(image="coder", name="c:2"))
        assert list(tagged.image.names) == ["c:2", "coder", "coder:1"]
        for bad in (
            vm_manager_pb2.TagImageRequest(image="coder", name="default"),
            vm_manager_pb2.TagImageRequest(image="", name="x"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.TagImage(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        deleted = await stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name="coder"))
        assert (deleted.id, list(deleted.untagged), deleted.deleted) == (coder, ["coder"], False)
        deleted = await stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name=coder))
        assert deleted.deleted
        assert sorted(deleted.untagged) == ["c:2", "coder:1"]
        assert deleted.freed_bytes > 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name="default"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # "tool" loses its name to nothing: prune removes the dangling image.
        await stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name="tool"))
        assert not other.path.exists()
        with manager.image_store.staging() as staged:
            (staged / "root.qcow2").write_bytes(b"x")
            manager.image_store.commit(staged, image_id(3), manifest(), [])
        pruned = await stub.PruneImages(vm_manager_pb2.PruneImagesRequest())
        assert list(pruned.removed_ids) == [image_id(3)]
        assert (await stub.ListImages(vm_manager_pb2.ListImagesRequest())).images == []

    asyncio.run(main())
    types = [e[0] for e in sink.events if e[0].startswith("image.")]
    assert types == [
        "image.tagged",
        "image.deleted",
        "image.deleted",
        "image.deleted",
        "image.pruned",
    ]
    tagged = next(e[2] for e in sink.events if e[0] == "image.tagged")
    assert tagged["name"] == "c:2"
    assert tagged["image"] == image_id(1)


def test_template_proto_carries_the_workload_image() -> None:
    from agentvm.vm_manager.servicer import template_to_proto

    msg = template_to_proto(template("k", image_id(1)))
    assert msg.workload_image_id == image_id(1)
    assert msg.network_mode == common_pb2.NETWORK_MODE_ISOLATED
