"""A coding agent's workflow in the `coder` image, checked byte for byte against the host.

The agent clones a git repository (a bare one made here), edits a file,
runs a Node.js program that requires a package installed with npm from a
local tarball, installs a local wheel into a venv with pip and imports it,
commits, and hands back `git log`/`git diff` output and an output file. The
same script runs on the host (Debian bookworm's git, node, npm and python3,
the versions coder has) in a directory laid out like /workspace, with a venv
of its own first on PATH as coder's /opt/venv is; every path in the script
is relative, so the commit hashes match when the content does.
Once through the Python client and once through `agent-vm run --image`.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

import agent_vm
from agentvm.v1 import vm_manager_pb2
from tests.installation import agent_vm as cli
from tests.vmharness import ExecutorProcess

pytestmark = pytest.mark.vm

DATE = "2026-01-02T03:04:05+00:00"
SCRIPT = rf"""set -e
export GIT_AUTHOR_DATE="{DATE}" GIT_COMMITTER_DATE="{DATE}" HOME="$PWD/work"
cd work
tar -xf ../input/repo.tar
git clone -q repo.git repo
cd repo
git config user.name agent && git config user.email agent@example.invalid
printf 'edited by the agent\n' >> README.md
mkdir app && cd app
printf '{{"name": "app", "version": "1.0.0", "private": true}}\n' > package.json
npm install --offline --no-audit --no-fund --silent ../../../input/leftpad-local-1.0.0.tgz
node -e 'console.log(require("leftpad-local")("7", 3))' > ../node.txt
cd ..
printf 'node_modules/\n' > .gitignore
pip install -q --no-index --disable-pip-version-check ../../input/greet-1.0-py3-none-any.whl
python -c 'import greet; print(greet.hello("agent"))' > py.txt
git add -A
git commit -q -m "agent: edit, node, python"
git log --format='%H %an <%ae> %s'
git diff HEAD~1 --stat
git diff HEAD~1 -- README.md node.txt py.txt app/package.json
git log --oneline > ../../output/log.txt
"""


def _bare_repo(base: Path) -> bytes:
    """A bare repository with one commit, as a tar of repo.git."""
    env = {**os.environ, "GIT_AUTHOR_DATE": DATE, "GIT_COMMITTER_DATE": DATE, "HOME": str(base)}

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    src = base / "src"
    src.mkdir()
    git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("# project\n")
    git("add", "README.md", cwd=src)
    git("-c", "user.name=dev", "-c", "user.email=dev@example.invalid",
        "commit", "-q", "-m", "initial", cwd=src)  # fmt: skip
    git("clone", "-q", "--bare", str(src), str(base / "repo.git"), cwd=base)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(base / "repo.git", arcname="repo.git")
    return buf.getvalue()


def _npm_tarball() -> bytes:
    """What `npm pack` makes of a one-file package: package/ with package.json and index.js."""
    files = {
        "package/package.json": (
            b'{"name": "leftpad-local", "version": "1.0.0", "main": "index.js"}\n'
        ),
        "package/index.js": (b"module.exports = (s, n) => String(s).padStart(n, '0');\n"),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wheel() -> bytes:
    """A pure-Python wheel: greet/__init__.py and its dist-info."""
    files = {
        "greet/__init__.py": "def hello(who):\n    return f'hello, {who}'\n",
        "greet-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: greet\nVersion: 1.0\n",
        "greet-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "greet-1.0.dist-info/RECORD,,\n"
    files["greet-1.0.dist-info/RECORD"] = record
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("workflow")
    return {
        "repo.tar": _bare_repo(base),
        "leftpad-local-1.0.0.tgz": _npm_tarball(),
        "greet-1.0-py3-none-any.whl": _wheel(),
    }


@pytest.fixture(scope="module")
def on_host(
    inputs: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, bytes]:
    """The script's stdout and output/log.txt on the host, in a /workspace-like layout."""
    ws = tmp_path_factory.mktemp("host-workspace")
    venv = ws / "host-venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
    for d in ("input", "work", "output"):
        (ws / d).mkdir()
    for name, data in inputs.items():
        (ws / "input" / name).write_bytes(data)
    proc = subprocess.run(
        ["sh", "-c", SCRIPT],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, (ws / "output" / "log.txt").read_bytes()


def _expected_shape(stdout: str) -> None:
    assert "agent <agent@example.invalid> agent: edit, node, python" in stdout
    assert "+edited by the agent" in stdout
    assert "+007" in stdout  # node ran leftpad from the npm tarball
    assert "+hello, agent" in stdout  # the wheel's module, imported from the venv


def test_the_workflow_through_the_python_client_matches_the_host(
    executor: ExecutorProcess,
    coder_image: vm_manager_pb2.Image,
    inputs: dict[str, bytes],
    on_host: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    host_out, host_log = on_host
    _expected_shape(host_out)
    result = agent_vm.run(
        cmd=f"cd /workspace && {SCRIPT}",
        inputs=inputs,
        image="coder",
        network="isolated",
        outputs_dir=tmp_path / "out",
        timeout=600,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == host_out
    assert (tmp_path / "out" / "log.txt").read_bytes() == host_log


def test_the_workflow_through_agent_vm_run_matches_the_host(
    executor: ExecutorProcess,
    coder_image: vm_manager_pb2.Image,
    inputs: dict[str, bytes],
    on_host: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    host_out, host_log = on_host
    args = ["run", "--image", "coder", "--network", "isolated", "--timeout", "600"]
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        args += ["--input", str(tmp_path / name)]
    args += ["--output", str(tmp_path / "out"), "--cmd", f"cd /workspace && {SCRIPT}"]
    proc = cli(executor.env, *args, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == host_out
    assert (tmp_path / "out" / "log.txt").read_bytes() == host_log
