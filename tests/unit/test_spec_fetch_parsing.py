"""The host's half of a spec build without the tools: keys, the step cache, tool output, npm trees.

The real mmdebstrap/pip/npm runs are in tests/integration/test_spec_fetch.py;
the outputs below are what those tools printed there (apt 2.6, pip 26, npm 11).
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.common.image_spec import ImageSpec, parse
from agentvm.vm_manager import build_cache, fetch_errors, npm_tree, spec_fetch
from agentvm.vm_manager.fetch_errors import PackageNotFound


def spec(text: str) -> ImageSpec:
    return parse(text, Path("/specs/image.toml"))


def done(output: str, rc: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["tool"], rc, output, None)


BASE = 'apt = ["hello"]\nnpm = ["is-odd@3.0.1"]\n[pip]\npackages = ["six==1.16.0"]\n'


def test_changing_apt_changes_every_key() -> None:
    a, b = spec(BASE), spec(BASE.replace('"hello"', '"hello", "jq"'))
    assert spec_fetch.root_key(a) != spec_fetch.root_key(b)
    assert spec_fetch.pip_key(a) != spec_fetch.pip_key(b)
    assert spec_fetch.npm_key(a) != spec_fetch.npm_key(b)


def test_changing_pip_alone_keeps_the_root() -> None:
    a, b = spec(BASE), spec(BASE.replace("1.16.0", "1.15.0"))
    assert spec_fetch.root_key(a) == spec_fetch.root_key(b)
    assert spec_fetch.pip_key(a) != spec_fetch.pip_key(b)
    # The build VM's layers stack root -> pip -> npm: npm's key follows pip's.
    assert spec_fetch.npm_key(a) != spec_fetch.npm_key(b)


def test_changing_npm_alone_keeps_root_and_pip() -> None:
    a, b = spec(BASE), spec(BASE.replace("3.0.1", "3.0.0"))
    assert spec_fetch.pip_key(a) == spec_fetch.pip_key(b)
    assert spec_fetch.npm_key(a) != spec_fetch.npm_key(b)


def test_keys_ignore_list_order_and_follow_the_disk_size() -> None:
    a = spec('apt = ["jq", "hello"]')
    assert spec_fetch.root_key(a) == spec_fetch.root_key(spec('apt = ["hello", "jq"]'))
    assert spec_fetch.root_key(a) != spec_fetch.root_key(
        spec('disk_gib = 9\napt = ["jq", "hello"]')
    )
    assert spec_fetch.root_key(a) != spec_fetch.root_key(a, size_mib=64)


def test_the_root_gets_what_the_later_steps_need() -> None:
    assert spec_fetch.root_packages(spec('apt = ["hello"]')) == ("ca-certificates", "hello")
    full = spec(BASE + 'venv = "/opt/venv"\n')
    assert spec_fetch.root_packages(full) == (
        "ca-certificates",
        "hello",
        "nodejs",
        "python3",
        "python3-venv",
    )
    pinned = spec('apt = ["nodejs=18.19.0+dfsg-6~deb12u2"]\nnpm = ["x"]')
    assert spec_fetch.root_packages(pinned) == ("ca-certificates", "nodejs=18.19.0+dfsg-6~deb12u2")
    assert not any(p.startswith("linux-image") for p in spec_fetch.root_packages(full))


APT_OUTPUT = """I: installing remaining packages inside the chroot...
Reading package lists...
E: Unable to locate package nonexistent-pkg-xyz
E: Version '9.9' for 'libc6' was not found
E: Package 'exim' has no installation candidate
E: setup failed: E: apt-get ... install ca-certificates nonexistent-pkg-xyz libc6=9.9 failed
E: mmdebstrap failed to run
"""


def test_apt_errors_name_the_packages_the_file_and_the_field() -> None:
    err = fetch_errors.apt_error(spec("apt = []"), done(APT_OUTPUT))
    assert isinstance(err, PackageNotFound)
    assert isinstance(err, InvalidArgument)
    assert err.packages == ("nonexistent-pkg-xyz", "exim", "libc6=9.9")
    assert err.field == "apt"
    assert "/specs/image.toml: apt: not found: nonexistent-pkg-xyz, exim, libc6=9.9" in err.message


def test_other_tool_failures_carry_the_end_of_the_output() -> None:
    err = fetch_errors.apt_error(spec(""), done("E: Failed to fetch http://deb.debian.org/x\n"))
    assert isinstance(err, FailedPrecondition)
    assert "mmdebstrap failed (exit 1)" in err.message
    assert "Failed to fetch" in err.message


def test_pip_errors_name_the_requirement() -> None:
    out = (
        "ERROR: Could not find a version that satisfies the requirement six==99.0 (from versions: "
        "1.15.0, 1.16.0)\nERROR: No matching distribution found for six==99.0\n"
    )
    err = fetch_errors.pip_error(spec(""), done(out), "3.11")
    assert isinstance(err, PackageNotFound)
    assert err.packages == ("six==99.0",)
    assert err.field == "[pip] packages"
    assert "CPython 3.11" in err.message


def test_npm_errors_name_the_package_also_when_scoped() -> None:
    out = (
        "npm error code E404\n"
        "npm error 404 Not Found - GET https://registry.npmjs.org/@bufbuild%2fnope\n"
        "npm error 404  The requested resource '@bufbuild/nope@*' could not be found\n"
    )
    err = fetch_errors.npm_error(spec(""), done(out))
    assert isinstance(err, PackageNotFound)
    assert err.packages == ("@bufbuild/nope",)
    old = "npm ERR! 404 Not Found - GET https://registry.npmjs.org/left-padx - Not found\n"
    err = fetch_errors.npm_error(spec(""), done(old))
    assert isinstance(err, PackageNotFound)
    assert err.packages == ("left-padx",)
    etarget = "npm error notarget No matching version found for is-odd@99.0.0.\n"
    err = fetch_errors.npm_error(spec(""), done(etarget))
    assert isinstance(err, PackageNotFound)
    assert err.packages == ("is-odd@99.0.0",)
    assert err.field == "npm"


def test_a_step_is_built_once_then_cached(tmp_path: Path) -> None:
    runs: list[Path] = []
    logs: list[str] = []

    def build(out: Path) -> dict[str, Any]:
        runs.append(out)
        (out / "artifact").write_text("x")
        return {"packages": ["a"]}

    first = build_cache.run_step(tmp_path, "k1", "demo", logs.append, build)
    again = build_cache.run_step(tmp_path, "k1", "demo", logs.append, build)
    assert first == (tmp_path / "build" / "k1", {"packages": ["a"]}, False)
    assert again == (tmp_path / "build" / "k1", {"packages": ["a"]}, True)
    assert len(runs) == 1
    assert runs[0].name.startswith("k1.tmp-")
    assert "demo: cached (k1)" in logs
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["k1"]
    assert (tmp_path / "build" / "k1" / "done").exists()


def test_a_failed_step_leaves_nothing_and_a_leftover_is_replaced(tmp_path: Path) -> None:
    def broken(out: Path) -> dict[str, Any]:
        (out / "half").write_text("x")
        raise FailedPrecondition("tool failed")

    with pytest.raises(FailedPrecondition):
        build_cache.run_step(tmp_path, "k2", "demo", lambda _m: None, broken)
    assert list((tmp_path / "build").iterdir()) == []
    (tmp_path / "build" / "k2").mkdir()  # no done marker: not a finished step
    (tmp_path / "build" / "k2" / "junk").write_text("x")
    path, _meta, cached = build_cache.run_step(
        tmp_path, "k2", "demo", lambda _m: None, lambda out: {}
    )
    assert not cached
    assert sorted(p.name for p in path.iterdir()) == ["done", "result.json"]


def test_empty_pip_and_npm_steps_fetch_nothing(tmp_path: Path) -> None:
    s = spec('apt = ["hello"]')
    pip = spec_fetch.pip_step(s, tmp_path, lambda _m: None)
    assert pip.packages == ()
    assert pip.pip_wheel is None
    assert pip.requirements.read_text() == ""
    npm = spec_fetch.npm_step(s, tmp_path, lambda _m: None)
    assert npm.packages == ()
    assert npm.bins == ()
    with tarfile.open(npm.tarball) as tar:
        assert tar.getnames() == []
    assert pip.key == spec_fetch.pip_key(s)
    assert npm.key == spec_fetch.npm_key(s)


def make_tree(root: Path, packages: dict[str, dict[str, Any]]) -> Path:
    nm = root / "node_modules"
    lock: dict[str, Any] = {"packages": {}}
    for rel, manifest in packages.items():
        (nm / rel).mkdir(parents=True)
        (nm / rel / "package.json").write_text(json.dumps(manifest))
        entry: dict[str, Any] = {"version": manifest.get("version", "1.0.0")}
        if manifest.get("scripts"):
            entry["hasInstallScript"] = True
        lock["packages"]["node_modules/" + rel] = entry
    lock["packages"]["node_modules/gone"] = {"version": "1.0.0"}  # not installed (other OS)
    (nm / ".bin").mkdir()
    (nm / ".package-lock.json").write_text(json.dumps(lock))
    return nm


def test_npm_tree_bins_scripts_and_tar(tmp_path: Path) -> None:
    nm = make_tree(
        tmp_path,
        {
            "tool": {"version": "2.0.0", "bin": "cli.js"},
            "tool/node_modules/dep": {"version": "1.1.0", "scripts": {"install": "x"}},
            "@s/kit": {"version": "3.0.0", "bin": {"kit": "./bin/kit.js", "kit2": "b.js"}},
        },
    )
    tree = npm_tree.read(nm)
    assert tree.top == ["@s/kit", "tool"]
    assert tree.packages == ["@s/kit@3.0.0", "dep@1.1.0", "tool@2.0.0"]
    assert tree.bins == [
        ["kit", "@s/kit/bin/kit.js"],
        ["kit2", "@s/kit/b.js"],
        ["tool", "tool/cli.js"],
    ]
    assert tree.scripts == ["tool/node_modules/dep"]
    npm_tree.write_tar(nm, tmp_path / "t.tar")
    with tarfile.open(tmp_path / "t.tar") as tar:
        names = tar.getnames()
        assert all(m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert "tool/node_modules/dep/package.json" in names
    assert "@s/kit/package.json" in names
    assert not any(n.startswith(".") for n in names)


@pytest.mark.parametrize(
    "manifests",
    [
        {"evil": {"bin": {"x": "../../etc/passwd"}}},
        {"evil": {"bin": {"../x": "a.js"}}},
        {"evil": {"bin": {"x": "/bin/sh"}}},
        {"a": {"bin": {"same": "a.js"}}, "b": {"bin": {"same": "b.js"}}},
    ],
)
def test_npm_tree_refuses_bins_outside_or_clashing(
    tmp_path: Path, manifests: dict[str, dict[str, Any]]
) -> None:
    with pytest.raises(npm_tree.TreeError):
        npm_tree.read(make_tree(tmp_path, manifests))
