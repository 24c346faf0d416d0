"""`agent-vm image` for named images and `--image` (issue 15), through click's CliRunner
against a fake vm-manager stub that records each request and answers as scripted.

Usage errors and bad specs fail before any call (the fake counts calls).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agentvm.cli import image_cmds, image_support, vm_cmds
from agentvm.cli.main import cli
from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.unit.test_cli_run_args import FakeExecutor, _no_stray_env, fake

__all__ = ["_no_stray_env", "fake"]  # fixtures used here by name

ID = "3f5a9c1be0d24e8f" + "0" * 48


def an_image(**kw: Any) -> vm_manager_pb2.Image:
    img = vm_manager_pb2.Image(
        id=ID,
        names=["app", "app:1"],
        kind=vm_manager_pb2.IMAGE_KIND_OCI,
        base="oci-archive:/srv/app.tar",
        size_bytes=3 << 30,
        content_bytes=5 << 30,
        disk_bytes=8 << 30,
        digest="sha256:abc",
        used_by=["vm:agent-vm-1", "pool:app/standard/isolated"],
        config=common_pb2.ImageConfig(
            env={"PATH": "/usr/bin", "LANG": "C.UTF-8"},
            workdir="/srv",
            user="app",
            entrypoint=["/entry"],
            cmd=["serve"],
            labels={"org.opencontainers.image.title": "app"},
        ),
    )
    img.built_at.FromSeconds(1_700_000_000)
    for k, v in kw.items():
        if isinstance(v, list):
            img.ClearField(k)  # type: ignore[arg-type]
            getattr(img, k).extend(v)
        else:
            setattr(img, k, v)
    return img


class FakeVMM:
    """The VMManagerService stub methods `image` calls, recording each request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.build_events: list[vm_manager_pb2.BuildImageResponse] = []
        self.import_events: list[vm_manager_pb2.ImportImageResponse] = []
        self.images: list[vm_manager_pb2.Image] = []
        self.delete = vm_manager_pb2.DeleteImageResponse()
        self.get = vm_manager_pb2.GetImageResponse(present=True, image=an_image())
        self.prune = vm_manager_pb2.PruneImagesResponse()

    def __call__(self) -> FakeVMM:  # stands in for vm_stub()
        return self

    def BuildImage(self, req: Any, timeout: float) -> Iterator[Any]:
        self.calls.append(("BuildImage", req))
        return iter(self.build_events)

    def ImportImage(self, req: Any, timeout: float) -> Iterator[Any]:
        self.calls.append(("ImportImage", req))
        return iter(self.import_events)

    def ListImages(self, req: Any, timeout: float) -> Any:
        self.calls.append(("ListImages", req))
        return vm_manager_pb2.ListImagesResponse(images=self.images)

    def GetImage(self, req: Any, timeout: float) -> Any:
        self.calls.append(("GetImage", req))
        return self.get

    def DeleteImage(self, req: Any, timeout: float) -> Any:
        self.calls.append(("DeleteImage", req))
        return self.delete

    def TagImage(self, req: Any, timeout: float) -> Any:
        self.calls.append(("TagImage", req))
        return vm_manager_pb2.TagImageResponse(image=an_image(names=["app", req.name]))

    def PruneImages(self, req: Any, timeout: float) -> Any:
        self.calls.append(("PruneImages", req))
        return self.prune

    def CreateVM(self, req: Any, timeout: float) -> Any:
        self.calls.append(("CreateVM", req))
        return vm_manager_pb2.CreateVMResponse(vm=common_pb2.VM(name="agent-vm-1"))

    def WaitVM(self, req: Any, timeout: float) -> Any:
        vm = common_pb2.VM(name=req.name, agent_endpoint="unix:/none")
        return vm_manager_pb2.WaitVMResponse(vm=vm)

    def DestroyVM(self, req: Any, timeout: float) -> Any:
        self.calls.append(("DestroyVM", req))
        return vm_manager_pb2.DestroyVMResponse()


@pytest.fixture
def vmm(monkeypatch: pytest.MonkeyPatch) -> FakeVMM:
    stub = FakeVMM()
    monkeypatch.setattr(image_cmds, "vm_stub", stub)
    monkeypatch.setattr(vm_cmds, "vm_stub", stub)
    return stub


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def failed(result: Result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("agent-vm: error: "), err
    for word in words:
        assert word in err, err
    return err


def progress(phase: str, done: int, total: int, cached: bool = False) -> Any:
    return vm_manager_pb2.ImageProgress(phase=phase, done=done, total=total, cached=cached)


# -- import ---------------------------------------------------------------------------
def test_import_makes_a_relative_path_absolute_and_shows_progress_then_the_image(
    vmm: FakeVMM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    vmm.import_events = [
        vm_manager_pb2.ImportImageResponse(progress=progress("verify", 1, 3)),
        vm_manager_pb2.ImportImageResponse(progress=progress("layer 1/2", 10, 100)),
        vm_manager_pb2.ImportImageResponse(image=an_image()),
    ]
    result = invoke("image", "import", "docker-archive:out/app.tar", "--name", "app:1")
    assert result.exit_code == 0, result.output
    [(_, req)] = vmm.calls
    assert req.ref == f"docker-archive:{tmp_path}/out/app.tar"
    assert req.name == "app:1"
    assert f"image {ID} imported: app, app:1" in result.stdout
    assert "layer 1/2" in result.stderr  # not a terminal: a line per phase


@pytest.mark.parametrize(
    ("ref", "sent"),
    [
        ("oci-archive:/srv/a.tar", "oci-archive:/srv/a.tar"),
        ("oci:layout:v2", "oci:{cwd}/layout:v2"),
        ("oci:./layout", "oci:{cwd}/layout"),
        ("oci:/srv/layout", "oci:/srv/layout"),
        ("oci:my:dir/layout", "oci:{cwd}/my:dir/layout"),
        ("docker-archive:../a.tar", "docker-archive:{parent}/a.tar"),
        ("docker-archive:b:c.tar", "docker-archive:{cwd}/b:c.tar"),
    ],
)
def test_import_refs_keep_transport_and_tag(
    ref: str, sent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert image_support.absolute_ref(ref) == sent.format(cwd=tmp_path, parent=tmp_path.parent)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("app.tar",), ("oci-archive:PATH", "docker-archive:PATH", "oci:DIR[:TAG]")),
        (("docker:app",), ("TRANSPORT:PATH",)),
        (("oci-archive:",), ("no path",)),
        (("oci-archive:a.tar", "--name", "App"), ("--name 'App'", "lower-case")),
    ],
)
def test_a_bad_import_fails_before_any_call(
    vmm: FakeVMM, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    failed(invoke("image", "import", *args), *words)
    assert not vmm.calls


# -- list, inspect, rm, tag, prune -----------------------------------------------------
def test_list_is_a_table_with_short_ids_and_json_keeps_numbers(vmm: FakeVMM) -> None:
    vmm.images = [an_image(), an_image(id="sha256:" + "b" * 64, names=[], kind=2)]
    result = invoke("image", "list")
    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["NAME(S)", "ID", "KIND", "SIZE", "CREATED"]
    assert first.startswith("app, app:1  3f5a9c1be0d2  oci   3.0 GiB  2023-11-14")
    assert second.split()[:3] == ["-", "bbbbbbbbbbbb", "spec"]
    data = json.loads(invoke("image", "list", "--json").stdout)
    assert data[0]["size_bytes"] == 3 << 30
    assert data[0]["config"]["workdir"] == "/srv"
    vmm.images = []
    assert invoke("image", "list").stdout == "(none)\n"


def test_inspect_shows_every_field_config_and_users(vmm: FakeVMM) -> None:
    result = invoke("image", "inspect", "app")
    assert result.exit_code == 0, result.output
    assert vmm.calls[0][1].name == "app"
    out = result.stdout
    for words in (
        "id:", ID,
        "names:", "app, app:1",
        "kind:", "oci",
        "base:", "oci-archive:/srv/app.tar",
        "disk file 3.0 GiB, content 5.0 GiB, root file system cap 8.0 GiB",
        "used by:", "vm:agent-vm-1, pool:app/standard/isolated",
        "workdir:    /srv", "user:       app", "entrypoint: ['/entry']",
        "cmd:        ['serve']", "env:        LANG=C.UTF-8",
        "label:      org.opencontainers.image.title=app",
    ):  # fmt: skip
        assert words in out, (words, out)
    data = json.loads(invoke("image", "inspect", "app", "--json").stdout)
    assert data["used_by"] == ["vm:agent-vm-1", "pool:app/standard/isolated"]
    assert data["content_bytes"] == 5 << 30
    vmm.get = vm_manager_pb2.GetImageResponse(present=False)
    failed(invoke("image", "inspect", "default"), "image build")


def test_rm_says_what_was_untagged_deleted_and_freed(vmm: FakeVMM) -> None:
    vmm.delete = vm_manager_pb2.DeleteImageResponse(
        id=ID, untagged=["app", "app:1"], deleted=True, freed_bytes=3 << 30
    )
    result = invoke("image", "rm", "app")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "untagged app",
        "untagged app:1",
        f"deleted {ID} (freed 3.0 GiB)",
    ]
    vmm.delete = vm_manager_pb2.DeleteImageResponse(id=ID, untagged=["app:1"])
    assert "kept 3f5a9c1be0d2: other names" in invoke("image", "rm", "app:1").stdout


def test_tag_and_prune(vmm: FakeVMM) -> None:
    result = invoke("image", "tag", "3f5a9c", "app:2")
    assert result.exit_code == 0, result.output
    req = vmm.calls[-1][1]
    assert (req.image, req.name) == ("3f5a9c", "app:2")
    assert result.stdout.startswith(f"app:2 -> {ID}")
    failed(invoke("image", "tag", "app", "Bad Name"), "NAME 'Bad Name'")
    assert invoke("image", "prune").stdout == "nothing to prune\n"
    vmm.prune = vm_manager_pb2.PruneImagesResponse(removed_ids=[ID], freed_bytes=1024)
    assert invoke("image", "prune").stdout == f"deleted {ID}\nfreed 1.0 KiB\n"
    assert not vmm.calls[-1][1].build_cache
    vmm.prune = vm_manager_pb2.PruneImagesResponse(
        build_entries_removed=3, build_cache_freed_bytes=2 << 20
    )
    out = invoke("image", "prune", "--build-cache").stdout
    assert vmm.calls[-1][1].build_cache
    assert out == "removed 3 build cache entries (2.0 MiB)\nfreed 2.0 MiB\n"


def test_a_server_error_is_one_line(vmm: FakeVMM, monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    class InUse(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self) -> str:
            return "image app is used by vm:agent-vm-1"

    def refuse(req: Any, timeout: float) -> Any:
        raise InUse

    monkeypatch.setattr(vmm, "DeleteImage", refuse)
    failed(invoke("image", "rm", "app"), "FAILED_PRECONDITION: image app is used by vm:agent-vm-1")


# -- build ------------------------------------------------------------------------------
SPEC = """
name = "coder"
apt = ["git"]
[[files]]
src = "config/gitconfig"
dest = "/root/.gitconfig"
[[files]]
src = "tools/"
dest = "/opt/tools"
"""


def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gitconfig").write_text("[user]\n")
    (tmp_path / "config" / "gitconfig").chmod(0o600)
    (tmp_path / "tools" / "bin").mkdir(parents=True)
    (tmp_path / "tools" / "bin" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "tools" / "bin" / "run.sh").chmod(0o755)
    (tmp_path / "tools" / "README").write_text("tools\n")
    spec = tmp_path / "coder.toml"
    spec.write_text(SPEC)
    return spec


def test_build_sends_the_spec_with_its_files_and_streams_the_log(
    vmm: FakeVMM, tmp_path: Path
) -> None:
    spec = spec_dir(tmp_path)
    vmm.build_events = [
        vm_manager_pb2.BuildImageResponse(progress=progress("root", 0, 0, cached=True)),
        vm_manager_pb2.BuildImageResponse(log_line="Setting up git ..."),
        vm_manager_pb2.BuildImageResponse(progress=progress("run 1/1", 1, 1)),
        vm_manager_pb2.BuildImageResponse(
            image=an_image(names=["coder"], kind=vm_manager_pb2.IMAGE_KIND_SPEC)
        ),
    ]
    result = invoke("image", "build", str(spec), "--name", "coder:2", "--no-cache")
    assert result.exit_code == 0, result.output
    [(_, req)] = vmm.calls
    assert req.name == "coder:2"
    assert req.no_cache
    assert req.spec.toml == SPEC
    assert req.spec.filename == str(spec)
    files = {f.path: (f.content, f.mode) for f in req.spec.files}
    assert files == {
        "config/gitconfig": (b"[user]\n", 0o600),
        "tools/README": (b"tools\n", 0o644),
        "tools/bin/run.sh": (b"#!/bin/sh\n", 0o755),
    }
    assert result.stdout.splitlines() == [
        "Setting up git ...",
        f"image {ID} built: coder (3.0 GiB)",
    ]
    assert "root (cached)" in result.stderr


def test_build_without_a_file_builds_the_built_in_image(vmm: FakeVMM) -> None:
    vmm.build_events = [
        vm_manager_pb2.BuildImageResponse(log_line="debootstrap ..."),
        vm_manager_pb2.BuildImageResponse(
            image=vm_manager_pb2.Image(id="b1", kernel_release="6.1.0", path="/c/base.qcow2")
        ),
    ]
    result = invoke("image", "build", "--force")
    assert result.exit_code == 0, result.output
    [(_, req)] = vmm.calls
    assert req.force
    assert not req.HasField("spec")
    assert "image b1 ready: kernel 6.1.0" in result.stdout
    failed(invoke("image", "build", "--name", "x"), "need a spec FILE")


def test_a_bad_spec_fails_before_any_call_naming_file_and_field(
    vmm: FakeVMM, tmp_path: Path
) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('apt = ["Not A Package"]\n')
    failed(invoke("image", "build", str(spec)), str(spec), "apt[0]")
    failed(invoke("image", "build", str(tmp_path / "none.toml")), "no such spec file")
    spec.write_text('[[files]]\nsrc = "../x"\ndest = "/x"\n')
    failed(invoke("image", "build", str(spec)), "files[0].src")
    assert not vmm.calls


def test_links_and_special_files_under_a_src_are_refused_by_name(
    vmm: FakeVMM, tmp_path: Path
) -> None:
    spec = spec_dir(tmp_path)
    link = tmp_path / "tools" / "bin" / "link"
    link.symlink_to("run.sh")
    failed(invoke("image", "build", str(spec)), "files[1].src = 'tools/'", str(link), "symbolic")
    link.unlink()
    fifo = tmp_path / "tools" / "pipe"
    os.mkfifo(fifo)
    failed(invoke("image", "build", str(spec)), str(fifo), "a FIFO")
    fifo.unlink()
    # A src that is itself a link (inside the directory) is refused too.
    (tmp_path / "config" / "gitconfig").rename(tmp_path / "config" / "real")
    (tmp_path / "config" / "gitconfig").symlink_to("real")
    failed(invoke("image", "build", str(spec)), "files[0].src", "symbolic link")
    assert not vmm.calls


# -- --image on the commands that make a VM ---------------------------------------------
def test_run_passes_the_image_and_leaves_cwd_to_it(fake: FakeExecutor) -> None:
    result = invoke("run", "--image", "coder:2", "--cmd", "pwd")
    assert result.exit_code == 0, (result.output, result.stderr)
    [req] = fake.requests
    assert req.spec.image == "coder:2"
    assert req.cwd == ""
    invoke("run", "--cmd", "pwd")
    assert fake.requests[1].spec.image == ""


def test_vm_create_and_vm_run_pass_the_image(vmm: FakeVMM, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("vm", "create", "--image", "coder", "--no-wait")
    assert result.exit_code == 0, result.output
    assert vmm.calls[-1][1].image == "coder"
    monkeypatch.setattr(vm_cmds, "_exec", lambda endpoint, argv, timeout: 0)
    result = invoke("vm", "run", "--image", "app:1", "--", "true")
    assert result.exit_code == 0, result.output
    create = next(req for name, req in vmm.calls[1:] if name == "CreateVM")
    assert create.image == "app:1"
    invoke("vm", "create", "--no-wait")
    assert vmm.calls[-1][1].image == ""


@pytest.mark.parametrize("command", [("run",), ("vm", "create"), ("vm", "run")])
def test_the_image_option_says_the_same_everywhere(command: tuple[str, ...]) -> None:
    out = " ".join(invoke(*command, "--help").output.split())
    assert (
        "--image NAME Named image the program runs in (`agent-vm image list`); "
        "default: the built-in image." in out
    ), out
