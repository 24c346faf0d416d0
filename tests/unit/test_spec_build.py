"""The host-side logic of spec builds and imports (spec_build.py, importer.py), without VMs.

What runs in the build VMs is proven on real VMs in
tests/integration/test_image_build.py and test_images.py; here: how a spec
sent over the wire is written back, which steps and commands a spec gives,
what their cache keys depend on, and an import's id, config and disk size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentvm.common import image_spec
from agentvm.common.errors import InvalidArgument, ResourceExhausted
from agentvm.v1 import vm_manager_pb2
from agentvm.vm_manager import importer, oci, spec_build
from agentvm.vm_manager.image_manifest import ImageConfigData
from agentvm.vm_manager.spec_fetch import NpmResult, PipResult

SPEC = """
name = "demo"
apt = ["git"]
npm = ["semver@7.6.3"]
run = ["echo one", "echo two"]

[env]
LANG = "C.UTF-8"

[pip]
venv = "/opt/venv"
packages = ["six==1.16.0"]

[[files]]
src = "conf/app.ini"
dest = "/etc/app.ini"
mode = "0600"

[[files]]
src = "tree"
dest = "/opt/tree/"
"""


def source(**over: object) -> vm_manager_pb2.ImageSpecSource:
    files = [
        vm_manager_pb2.SpecFile(path="conf/app.ini", content=b"[app]\n", mode=0o644),
        vm_manager_pb2.SpecFile(path="tree/a.txt", content=b"a", mode=0o644),
        vm_manager_pb2.SpecFile(path="tree/sub/run.sh", content=b"#!/bin/sh\n", mode=0o755),
    ]
    msg = vm_manager_pb2.ImageSpecSource(toml=SPEC, filename="images/demo.toml", files=files)
    for key, value in over.items():
        setattr(msg, key, value)
    return msg


def fetched(
    tmp_path: Path, pip: tuple[str, ...], npm: tuple[str, ...]
) -> tuple[PipResult, NpmResult]:
    p = tmp_path / "pip-step"
    (p / "wheels").mkdir(parents=True)
    (p / "pip").mkdir()
    (p / "wheels" / "six-1.16.0-py2.py3-none-any.whl").write_bytes(b"w")
    (p / "pip" / "pip-26.3-py3-none-any.whl").write_bytes(b"p")
    (p / "requirements.txt").write_text("six==1.16.0\n")
    n = tmp_path / "npm-step"
    n.mkdir()
    (n / "node_modules.tar").write_bytes(b"t")
    return (
        PipResult("pipkey", p, False, pip, python_version="3.11", venv="/opt/venv"),
        NpmResult(
            "npmkey", n, False, npm, top=("semver",), bins=(("semver", "semver/bin/semver.js"),),
            scripts=(),
        ),
    )  # fmt: skip


def test_a_spec_from_the_wire_is_written_back_as_the_caller_had_it(tmp_path: Path) -> None:
    spec = spec_build.parse(source(), tmp_path)
    assert spec.name == "demo"
    assert spec.path == tmp_path / "demo.toml"
    assert (tmp_path / "tree" / "sub" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert [c.dest for c in spec.files] == ["/etc/app.ini", "/opt/tree"]


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", ""])
def test_a_spec_file_outside_the_spec_directory_is_refused(tmp_path: Path, bad: str) -> None:
    msg = source()
    msg.files.add(path=bad, content=b"x")
    with pytest.raises(InvalidArgument, match="not a path relative to the spec's directory"):
        spec_build.materialize(msg, tmp_path)


def test_spec_errors_name_the_callers_file_not_the_scratch_copy(tmp_path: Path) -> None:
    msg = source(toml=SPEC.replace('name = "demo"', 'name = "demo"\ncolour = "blue"'))
    with pytest.raises(image_spec.ImageSpecError) as err:
        spec_build.parse(msg, tmp_path)
    assert "images/demo.toml" in str(err.value)
    assert "colour" in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_steps_in_order_with_their_commands(tmp_path: Path) -> None:
    spec = spec_build.parse(source(), tmp_path / "spec")
    pip, npm = fetched(tmp_path, ("six==1.16.0",), ("semver@7.6.3",))
    layers = spec_build.layers_of(spec, pip, npm)
    assert [layer.title for layer in layers] == ["pip", "npm", "files", "run 1/2", "run 2/2"]
    pip_layer, npm_layer, files_layer = layers[:3]
    assert pip_layer.commands[0] == "python3 -m venv --without-pip /opt/venv"
    # The venv gets pip itself (agents `pip install` in it), from the wheel fetched on the host.
    assert "/pip/pip-26.3-py3-none-any.whl -r" in pip_layer.commands[1]
    assert "--break-system-packages" not in pip_layer.commands[1]
    assert (
        "ln -sfn ../lib/node_modules/semver/bin/semver.js /usr/local/bin/semver"
        in (npm_layer.commands[2])
    )
    [script] = files_layer.commands
    assert (
        "mkdir -p /etc && rm -f /etc/app.ini && cp /workspace/build/files/0 /etc/app.ini "
        "&& chmod 600 /etc/app.ini"
    ) in script
    assert "cp /workspace/build/files/1 /opt/tree/a.txt && chmod 644 /opt/tree/a.txt" in script
    assert "mkdir -p /opt/tree/sub && rm -f /opt/tree/sub/run.sh" in script
    assert "chmod 755 /opt/tree/sub/run.sh" in script
    assert [rel for _, rel in files_layer.uploads] == ["files/0", "files/1", "files/2"]


def test_empty_steps_are_skipped_and_pip_without_venv_uses_the_system_python(
    tmp_path: Path,
) -> None:
    text = 'name = "bare"\nrun = ["true"]\n[pip]\npackages = ["six==1.16.0"]\n'
    spec = image_spec.parse(text, tmp_path / "bare.toml")
    pip, npm = fetched(tmp_path, ("six==1.16.0",), ())
    pip = PipResult("k", pip.path, False, pip.packages, python_version="3.11", venv="")
    layers = spec_build.layers_of(spec, pip, npm)
    assert [layer.title for layer in layers] == ["pip", "run 1/1"]
    [cmd] = layers[0].commands
    assert cmd.startswith("python3 ")
    assert "--break-system-packages" in cmd
    assert "pip-26.3-py3-none-any.whl -r" not in cmd


def test_a_step_key_changes_with_its_inputs_only(tmp_path: Path) -> None:
    pip, npm = fetched(tmp_path, (), ())

    def keys(text: str) -> list[str]:
        spec = image_spec.parse(text, tmp_path / "s.toml")
        key, out = "root", []
        for layer in spec_build.layers_of(spec, pip, npm):
            key = spec_build._key(key, layer.inputs)
            out.append(key)
        return out

    one = keys('run = ["echo a", "echo b"]\n')
    two = keys('run = ["echo a", "echo c"]\n')
    assert one[0] == two[0]  # the first step did not change: cached
    assert one[1] != two[1]
    env = keys('run = ["echo a", "echo b"]\n[env]\nX = "1"\n')
    assert env[0] != one[0]  # a run step sees the env


def test_a_symlink_in_a_copied_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "link").symlink_to("/etc/passwd")
    copy = image_spec.FileCopy(tmp_path / "tree", "/opt/tree")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        spec_build._copies((copy,))


def test_an_import_takes_the_oci_config_and_is_identified_by_content() -> None:
    config = oci.ImageConfig(
        env=("PATH=/bin", "EMPTY=", "BROKEN"),
        workdir="/app",
        user="app",
        entrypoint=("/bin/sh",),
        cmd=("-c", "true"),
        labels={"team": "agents"},
    )
    data = importer.config_data(config)
    assert data.env == {"PATH": "/bin", "EMPTY": ""}
    assert (data.workdir, data.user, data.entrypoint, data.cmd) == (
        "/app", "app", ("/bin/sh",), ("-c", "true"),
    )  # fmt: skip
    one = importer.image_id(("sha256:" + "a" * 64,), data)
    assert one == importer.image_id(("sha256:" + "a" * 64,), data)
    assert one != importer.image_id(("sha256:" + "b" * 64,), data)
    assert len(one) == 64


def test_an_import_over_the_disk_cap_is_refused_naming_it() -> None:
    layer = oci.Layer(path="blobs/x", size=10, digest="", diff_id="sha256:" + "a" * 64)
    image = oci.Image(
        ref=oci.parse_ref("oci-archive:/srv/big.tar"),
        config=oci.ImageConfig(),
        layers=[layer],
        _store=None,  # type: ignore[arg-type]
    )
    run = importer.ImageImporter(manager=None, store=None, max_disk_bytes=1 << 30)  # type: ignore[arg-type]
    plan = run._plan(image, (100 << 20,))
    assert plan.disk_bytes == (512 << 20)  # the floor
    with pytest.raises(ResourceExhausted, match="AGENTVM_MAX_IMAGE_DISK_MIB"):
        run._plan(image, (2 << 30,))


def test_a_spec_on_an_image_base_overrides_its_config_like_a_dockerfile(tmp_path: Path) -> None:
    base = ImageConfigData(
        env={"PATH": "/bin", "A": "1"},
        workdir="/home/app",
        user="app",
        entrypoint=("/bin/sh",),
        cmd=("-c", "echo base"),
        labels={"team": "agents"},
    )
    spec = image_spec.parse(
        'base = "image:busybox"\ncmd = ["-c", "echo spec"]\n[env]\nA = "2"', tmp_path / "s.toml"
    )
    assert spec_build.config_of(spec, base) == ImageConfigData(
        env={"PATH": "/bin", "A": "2"},
        workdir="/home/app",
        user="app",
        entrypoint=("/bin/sh",),
        cmd=("-c", "echo spec"),
        labels={"team": "agents"},
    )
    # The spec's own fields win; with no base (Debian) only the spec's are there.
    plain = image_spec.parse('workdir = "/w"\nuser = "root"', tmp_path / "p.toml")
    assert spec_build.config_of(plain, base).workdir == "/w"
    assert spec_build.config_of(plain) == ImageConfigData(workdir="/w", user="root")
