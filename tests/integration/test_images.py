"""Named images on real VMs: OCI imports, the workload pivoted into them, removal.

The image is a busybox root without Python or libc, made with umoci and
skopeo (tests/ociimages.py): two layers, the upper one deleting /etc/secret
(a whiteout), a config with Env, WorkingDir, User and Entrypoint/Cmd. Its
import boots one build VM; every other test here shares it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import agent_vm
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.imagebuild import build, spec_source
from tests.installation import agent_vm as cli
from tests.ociimages import BASE_LAYER, Entry, Layout, busybox_image, make_layer
from tests.vmharness import (
    ExecutorProcess,
    VMFactory,
    VMManagerProcess,
    execute,
    leftovers,
    libvirt_domains,
    new_leftovers,
    wait_for,
)

pytestmark = pytest.mark.vm

NAME = "busybox-test"


def import_image(
    vmm: VMManagerProcess, ref: str, name: str = ""
) -> tuple[vm_manager_pb2.Image, list[vm_manager_pb2.ImageProgress]]:
    progress: list[vm_manager_pb2.ImageProgress] = []
    image = None
    req = vm_manager_pb2.ImportImageRequest(ref=ref, name=name)
    for ev in vmm.stub().ImportImage(req, timeout=600):
        if ev.HasField("progress"):
            progress.append(ev.progress)
        else:
            image = ev.image
    assert image is not None, "ImportImage ended without the image"
    return image, progress


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return busybox_image(tmp_path_factory.mktemp("busybox-image"))


@pytest.fixture(scope="module")
def imported(vmm: VMManagerProcess, refs: dict[str, str]) -> Iterator[vm_manager_pb2.Image]:
    image, progress = import_image(vmm, refs["oci-archive"], NAME)
    phases = [p.phase for p in progress]
    assert "apply layer 2/2" in phases, phases
    assert "compress" in phases, phases
    yield image
    try:
        vmm.stub().DeleteImage(vm_manager_pb2.DeleteImageRequest(name=image.id), timeout=60)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise


def test_an_oci_image_without_python_runs_with_its_env_workdir_and_user(
    vmm: VMManagerProcess, factory: VMFactory, imported: vm_manager_pb2.Image
) -> None:
    assert imported.kind == vm_manager_pb2.IMAGE_KIND_OCI
    assert NAME in imported.names
    assert imported.config.env["GREETING"] == "hello world"
    assert imported.config.workdir == "/home/app"
    assert imported.config.user == "app"
    assert list(imported.config.entrypoint) == ["/bin/sh"]
    assert imported.config.labels["org.example.team"] == "agents"
    assert (vmm.images_dir / imported.id / "root.qcow2").is_file()

    vm = factory.create(image=NAME)
    vm = factory.wait_ready(vm.name)
    assert vm.workload_image_id == imported.id
    r = execute(
        vm.agent_endpoint,
        "id -u; id -g; pwd; echo $GREETING; cat notes; "
        "test -e /etc/secret && echo SECRET-VISIBLE; "
        "command -v python3 || echo no-python; ls /run/agentvm 2>&1",
    )
    lines = r.stdout.decode().splitlines()
    assert lines[:5] == ["1000", "1000", "/home/app", "hello world", "upper layer"], r
    assert "SECRET-VISIBLE" not in lines  # the upper layer's whiteout
    assert "no-python" in lines  # the agent's python3 is not in the workload's view
    assert r.status.exit_code != 0  # /run/agentvm: the agent's root is out of view
    # Only the image's own files and the mount points the agent makes.
    top = set(execute(vm.agent_endpoint, "ls /").stdout.decode().split())
    assert top == {"bin", "etc", "home", "workspace", "proc", "sys", "dev", "tmp"}, top
    # A request's env and cwd win over the image's; the workspace is there.
    r = execute(vm.agent_endpoint, "echo $GREETING; pwd; ls -d /workspace/work",
                env={"GREETING": "overridden"}, cwd="/etc")  # fmt: skip
    assert r.stdout.decode().splitlines() == ["overridden", "/etc", "/workspace/work"], r


def test_an_image_in_use_is_not_removed_and_a_reimport_is_the_same_image(
    vmm: VMManagerProcess,
    factory: VMFactory,
    imported: vm_manager_pb2.Image,
    refs: dict[str, str],
) -> None:
    vm = factory.create(image=imported.id[:12], start=False)
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().DeleteImage(vm_manager_pb2.DeleteImageRequest(name=NAME), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert vm.name in (err.value.details() or "")
    assert (
        NAME
        in vmm.stub().GetImage(vm_manager_pb2.GetImageRequest(name=NAME), timeout=30).image.names
    )
    factory.destroy(vm.name)
    # The same image from a docker-archive and from the layout: no build VM, same id.
    for kind in ("docker-archive", "oci"):
        again, progress = import_image(vmm, refs[kind], f"{NAME}:{kind}")
        assert again.id == imported.id
        assert not any(p.phase.startswith("apply") for p in progress)
    listed = vmm.stub().ListImages(vm_manager_pb2.ListImagesRequest(), timeout=30).images
    [entry] = [i for i in listed if i.id == imported.id]
    assert {NAME, f"{NAME}:docker-archive", f"{NAME}:oci"} <= set(entry.names)


def test_a_template_of_an_image_restores_clones_each_with_its_own_image_disk(
    vmm: VMManagerProcess, factory: VMFactory, imported: vm_manager_pb2.Image
) -> None:
    stub = vmm.stub()
    left_before = leftovers(vmm)
    req = vm_manager_pb2.PrepareTemplateRequest(
        image=NAME,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
    )
    template = stub.PrepareTemplate(req, timeout=600).template
    clones: list[common_pb2.VM] = []
    try:
        assert template.workload_image_id == imported.id
        assert template.key.endswith(f"-image-{imported.id}")
        listed = stub.ListTemplates(vm_manager_pb2.ListTemplatesRequest(), timeout=30).templates
        assert [t.workload_image_id for t in listed if t.key == template.key] == [imported.id]
        frozen = vmm.state_dir / "templates" / template.key / "image.qcow2"
        before = frozen.read_bytes()
        for _ in range(2):
            create = vm_manager_pb2.CreateVMRequest(
                image=NAME,
                profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                from_template=True,
            )
            vm = stub.CreateVM(create, timeout=300).vm
            factory.names.append(vm.name)
            clones.append(vm)
        a, b = clones
        for vm in clones:
            assert vm.from_template
            assert vm.state == common_pb2.VM_STATE_READY
            assert vm.workload_image_id == imported.id
            print(
                f"image clone {vm.name} restored in {vm.boot_duration.ToNanoseconds() / 1e9:.3f} s"
            )
            r = execute(vm.agent_endpoint, "cat /home/app/notes; id -u; pwd; hostname")
            assert r.stdout.decode().splitlines() == [
                "upper layer",
                "1000",
                "/home/app",
                vm.name,
            ], r
        # Each clone writes its own vdb overlay; the template's layer is never written.
        r = execute(a.agent_endpoint, "echo only-in-a > /home/app/a.txt && sync")
        assert r.status.exit_code == 0, r
        assert execute(a.agent_endpoint, "cat /home/app/a.txt").stdout == b"only-in-a\n"
        assert execute(b.agent_endpoint, "cat /home/app/a.txt").status.exit_code != 0
        assert frozen.read_bytes() == before
        # The image cannot go while its template exists.
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteImage(vm_manager_pb2.DeleteImageRequest(name=imported.id), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"template:{template.key}" in (err.value.details() or "")
    finally:
        for vm in clones:
            factory.destroy(vm.name)
        stub.DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=template.key), timeout=60)
    assert not (vmm.state_dir / "templates" / template.key).exists()
    assert not new_leftovers(vmm, left_before)


def test_a_vm_of_an_unknown_image_is_refused_naming_it(vmm: VMManagerProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().CreateVM(
            vm_manager_pb2.CreateVMRequest(
                image="no-such-image", network_mode=common_pb2.NETWORK_MODE_ISOLATED
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-image" in (err.value.details() or "")


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])
    return dst


def _flipped(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    with tarfile.open(src) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
    data[big.offset_data + big.size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


HOSTILE_LAYERS: dict[str, list[Entry]] = {
    "dotdot": [("../escape", "file", "x")],
    "absolute": [("/etc/passwd", "file", "x")],
    "device": [("dev/mem", "chr", "")],
    "hardlink-out": [("passwd", "hardlink", "/etc/shadow")],
}


@pytest.mark.parametrize("kind", ["truncated", "flipped", *HOSTILE_LAYERS])
def test_a_bad_archive_is_refused_and_leaves_nothing(
    vmm: VMManagerProcess, refs: dict[str, str], tmp_path: Path, kind: str
) -> None:
    src = Path(refs["oci-archive"].split(":", 1)[1])
    if kind == "truncated":
        path = _truncated(src, tmp_path / "bad.tar")
    elif kind == "flipped":
        path = _flipped(src, tmp_path / "bad.tar")
    else:
        layout = Layout(tmp_path / "layout")
        layout.image([BASE_LAYER, make_layer(HOSTILE_LAYERS[kind])])
        path = layout.pack(tmp_path / "bad.tar")
    before = {i.id for i in vmm.stub().ListImages(vm_manager_pb2.ListImagesRequest()).images}
    left_before = leftovers(vmm)
    with pytest.raises(grpc.RpcError) as err:
        import_image(vmm, f"oci-archive:{path}", f"bad-{kind}")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert str(path) in (err.value.details() or "")
    after = vmm.stub().ListImages(vm_manager_pb2.ListImagesRequest()).images
    assert {i.id for i in after} == before
    assert not any(f"bad-{kind}" in i.names for i in after)
    assert not new_leftovers(vmm, left_before)


def test_runs_in_an_image_take_its_default_command_or_one_of_its_programs(
    executor: ExecutorProcess, imported: vm_manager_pb2.Image
) -> None:
    # Entrypoint /bin/sh, Cmd -c 'echo $GREETING', as the image's user in its workdir.
    result = agent_vm.run(image=NAME, network="isolated", timeout=120)
    assert (result.exit_code, result.stdout) == (0, "hello world\n"), result.stderr
    # The run answers before its VM is destroyed; the image is in use until then.
    assert wait_for(lambda: result.vm_name not in libvirt_domains(executor.prefix), 60)
    proc = cli(
        executor.env,
        "run",
        "--image",
        NAME,
        "--network",
        "isolated",
        "--",
        "busybox",
        "cat",
        "notes",
    )
    assert (proc.returncode, proc.stdout) == (0, "upper layer\n"), proc.stderr
    with pytest.raises(agent_vm.InvalidArgumentError, match="args without cmd or code"):
        agent_vm.run(image=NAME, args=["x"])


def test_a_spec_builds_on_an_imported_image_without_debian_or_python(
    vmm: VMManagerProcess,
    factory: VMFactory,
    executor: ExecutorProcess,
    imported: vm_manager_pb2.Image,
    tmp_path: Path,
) -> None:
    (tmp_path / "motd").write_text("from the spec\n")
    spec = tmp_path / "plus.toml"
    spec.write_text(
        f'name = "{NAME}-plus"\n'
        f'base = "image:{NAME}"\n'
        'cmd = ["-c", "echo $GREETING from $EXTRA"]\n'
        'run = ["busybox mkdir -p /opt/tool && echo ran in the build VM > /opt/tool/marker"]\n'
        '[env]\nEXTRA = "the spec"\n'
        '[[files]]\nsrc = "motd"\ndest = "/etc/motd"\nmode = "0604"\n'
    )
    left_before = leftovers(vmm)
    built = build(vmm, spec_source(spec))
    assert built.image is not None
    plus = built.image
    vm: common_pb2.VM | None = None
    try:
        assert plus.base == f"image:{imported.id}"
        assert plus.config.env["GREETING"] == "hello world"  # the base's, kept
        assert plus.config.env["EXTRA"] == "the spec"
        assert (plus.config.workdir, plus.config.user) == ("/home/app", "app")
        assert list(plus.config.entrypoint) == ["/bin/sh"]
        vm = factory.wait_ready(factory.create(image=f"{NAME}-plus").name)
        r = execute(
            vm.agent_endpoint,
            "busybox id -u; pwd; busybox cat notes /etc/motd /opt/tool/marker; "
            "busybox stat -c %a /etc/motd; echo $EXTRA; busybox ls /usr/bin/python3 || true",
        )
        assert r.stdout.decode().splitlines() == [
            "1000",
            "/home/app",
            "upper layer",  # the base image's files are there
            "from the spec",
            "ran in the build VM",
            "604",
            "the spec",
        ], r
        factory.destroy(vm.name)
        vm = None
        result = agent_vm.run(image=f"{NAME}-plus", network="isolated", timeout=120)
        assert (result.exit_code, result.stdout) == (0, "hello world from the spec\n"), result
        # Its VM goes right after the result; the image is in use until then.
        assert wait_for(lambda: result.vm_name not in libvirt_domains(vmm.prefix), 60)
        # Cached: a rebuild runs no step and gives the same image.
        again = build(vmm, spec_source(spec))
        assert again.image is not None
        assert again.image.id == plus.id
        assert again.cached("files")
        assert again.cached("run 1/1")
    finally:
        if vm is not None:
            factory.destroy(vm.name)
        vmm.stub().DeleteImage(vm_manager_pb2.DeleteImageRequest(name=plus.id), timeout=60)
    assert not new_leftovers(vmm, left_before)
