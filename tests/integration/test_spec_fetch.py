"""The host's half of a spec build with the real tools: mmdebstrap, mkfs.ext4, qemu-img, pip, npm.

NEEDS THE NETWORK to the Debian, PyPI and npm registries (CI and the
development machines have it; nothing else is contacted). Offline, set
AGENTVM_TESTS_OFFLINE=1 to skip these. Needs root (mmdebstrap's root mode)
and the tools setup.sh installs. No VM is started and nothing is mounted;
every cache directory is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentvm.common.image_spec import ImageSpec, parse_file
from agentvm.vm_manager import spec_fetch
from agentvm.vm_manager.spec_fetch import DiskCapExceeded, PackageNotFound

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("AGENTVM_TESTS_OFFLINE") == "1",
        reason="needs the Debian, PyPI and npm registries (AGENTVM_TESTS_OFFLINE=1)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap's root mode needs root"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def cache() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agentvm-spec-fetch-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


class Log(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


def write_spec(cache: Path, text: str, name: str = "image.toml") -> ImageSpec:
    path = cache / "specs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return parse_file(path)


def build_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "build").iterdir())


def debugfs(raw: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True
    )
    return proc.stdout + proc.stderr


def test_root_builds_an_ext4_qcow2_once_then_comes_from_the_cache(cache: Path) -> None:
    spec = write_spec(cache, 'disk_gib = 1\napt = ["hello"]\n[pip]\npackages = ["six==1.16.0"]\n')
    log = Log()
    root = spec_fetch.root_step(spec, cache, log)
    assert not root.cached
    assert root.key == spec_fetch.root_key(spec)
    assert root.path == cache / "build" / root.key
    assert sorted(p.name for p in root.path.iterdir()) == ["done", "result.json", "root.qcow2"]
    assert build_entries(cache) == [root.key]  # no scratch directory left
    names = {p.partition("=")[0] for p in root.packages}
    assert {"hello", "ca-certificates", "python3", "dpkg"} <= names
    assert not any(n.startswith(("linux-image", "python3-grpcio")) for n in names)

    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(root.disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 1 << 30
    assert "backing-filename" not in info
    raw = cache / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(root.disk), str(raw)], check=True)
    hello = debugfs(raw, "stat /usr/bin/hello")
    assert "Type: regular" in hello
    assert "User:     0   Group:     0" in hello
    assert "Type: regular" in debugfs(raw, "stat /etc/ssl/certs/ca-certificates.crt")
    assert (
        "agentvm-image"
        in subprocess.run(
            ["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True
        ).stdout
    )
    assert "File not found" in debugfs(raw, "stat /boot/vmlinuz")
    assert "Mode:  0755" in debugfs(raw, "stat /")
    raw.unlink()

    again = Log()
    cached = spec_fetch.root_step(spec, cache, again)
    assert cached.cached
    assert (cached.key, cached.packages) == (root.key, root.packages)
    assert any(line.startswith("root: cached") for line in again)
    assert not any("mmdebstrap" in line for line in again)

    # Another pip list: the root stays (cached), only pip runs.
    other = write_spec(
        cache, 'disk_gib = 1\napt = ["hello"]\n[pip]\npackages = ["six==1.15.0"]\n', "other.toml"
    )
    assert spec_fetch.root_step(other, cache, Log()).cached
    pip = spec_fetch.pip_step(other, cache, Log())
    assert not pip.cached
    assert pip.packages == ("six==1.15.0",)


def test_an_unknown_apt_package_or_version_is_named(cache: Path) -> None:
    spec = write_spec(cache, 'apt = ["hello=0.0-nope", "agentvm-no-such-package"]')
    with pytest.raises(PackageNotFound) as err:
        spec_fetch.root_step(spec, cache, Log())
    assert err.value.field == "apt"
    assert set(err.value.packages) == {"agentvm-no-such-package", "hello=0.0-nope"}
    assert str(spec.path) in err.value.message
    assert "apt: not found:" in err.value.message
    assert build_entries(cache) == []


def test_a_root_over_the_disk_cap_names_the_cap_and_the_size_needed(cache: Path) -> None:
    spec = write_spec(cache, "apt = []")
    with pytest.raises(DiskCapExceeded) as err:
        spec_fetch.root_step(spec, cache, Log(), size_mib=48)
    assert err.value.cap_mib == 48
    assert err.value.needed_mib > 48
    assert "disk_gib" in err.value.message
    assert f"its files take {err.value.needed_mib} MiB" in err.value.message
    assert build_entries(cache) == []


def test_pip_downloads_wheels_for_the_image_python(cache: Path) -> None:
    # pyyaml has compiled wheels: they must be CPython 3.11 manylinux ones whatever the host runs.
    spec = write_spec(cache, '[pip]\npackages = ["six==1.16.0", "pyyaml==6.0.2"]\nvenv = "/opt/v"')
    log = Log()
    pip = spec_fetch.pip_step(spec, cache, log)
    assert not pip.cached
    assert pip.packages == ("pyyaml==6.0.2", "six==1.16.0")
    assert pip.venv == "/opt/v"
    assert pip.python_version == "3.11"
    wheels = sorted(p.name for p in pip.wheels.iterdir())
    assert wheels[1] == "six-1.16.0-py2.py3-none-any.whl"
    assert wheels[0].startswith("PyYAML-6.0.2-cp311-cp311-manylinux") or wheels[0].startswith(
        "pyyaml-6.0.2-cp311-cp311-manylinux"
    )
    assert pip.requirements.read_text() == "pyyaml==6.0.2\nsix==1.16.0\n"
    assert pip.pip_wheel is not None
    assert pip.pip_wheel.name.startswith("pip-")
    again = Log()
    assert spec_fetch.pip_step(spec, cache, again).cached
    assert any(line.startswith("pip: cached") for line in again)
    assert not any("download" in line for line in again)


def test_an_unknown_pip_package_or_version_is_named(cache: Path) -> None:
    spec = write_spec(cache, '[pip]\npackages = ["six==99.0"]')
    with pytest.raises(PackageNotFound) as err:
        spec_fetch.pip_step(spec, cache, Log())
    assert err.value.packages == ("six==99.0",)
    assert "[pip] packages" in err.value.message
    assert str(spec.path) in err.value.message
    spec = write_spec(cache, '[pip]\npackages = ["agentvm-no-such-package-4242"]', "b.toml")
    with pytest.raises(PackageNotFound) as err:
        spec_fetch.pip_step(spec, cache, Log())
    assert err.value.packages == ("agentvm-no-such-package-4242",)
    assert build_entries(cache) == []


def test_npm_fetches_the_whole_tree_that_then_runs_offline(cache: Path) -> None:
    # semver 7.5.4 has a bin and needs lru-cache, which needs yallist.
    spec = write_spec(cache, 'npm = ["semver@7.5.4"]')
    npm = spec_fetch.npm_step(spec, cache, Log())
    assert not npm.cached
    assert npm.top == ("semver",)
    assert {"semver@7.5.4", "lru-cache@6.0.0", "yallist@4.0.0"} <= set(npm.packages)
    assert npm.bins == (("semver", "semver/bin/semver.js"),)
    assert npm.scripts == ()
    assert sorted(p.name for p in npm.path.iterdir()) == ["done", "node_modules.tar", "result.json"]
    # What the build VM does, here in a scratch directory: unpack, run the bin with no network.
    lib = cache / "lib"
    lib.mkdir()
    with tarfile.open(npm.tarball) as tar:
        assert all(m.uid == 0 for m in tar.getmembers())
        tar.extractall(lib, filter="tar")
    proc = subprocess.run(
        ["node", str(lib / npm.bins[0][1]), "1.2.3", "-r", ">1.0"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "NODE_PATH": ""},
    )
    assert proc.stdout.strip() == "1.2.3"
    again = Log()
    assert spec_fetch.npm_step(spec, cache, again).cached
    assert any(line.startswith("npm: cached") for line in again)


def test_an_unknown_npm_package_or_version_is_named(cache: Path) -> None:
    spec = write_spec(cache, 'npm = ["agentvm-no-such-package-4242"]')
    with pytest.raises(PackageNotFound) as err:
        spec_fetch.npm_step(spec, cache, Log())
    assert err.value.packages == ("agentvm-no-such-package-4242",)
    assert err.value.field == "npm"
    assert str(spec.path) in err.value.message
    spec = write_spec(cache, 'npm = ["semver@99.0.0"]', "b.toml")
    with pytest.raises(PackageNotFound) as err:
        spec_fetch.npm_step(spec, cache, Log())
    assert err.value.packages == ("semver@99.0.0",)
    assert build_entries(cache) == []
