"""Programs in an image's root: the agent's side of the guest is gone from their view.

Runs the guest's real Confiner + Pivot on the host (as root, like the agent in
the guest): each child has its own mount namespace, so nothing here mounts
anything in the host's view. The image is a busybox root without Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentvm_guest.confine import Confiner
from agentvm_guest.pivot import Pivot

PROBE = r"""
echo answer=$((6 * 7))
echo root=$(ls / | tr '\n' ' ')
echo hello=$(cat /workspace/hello)
echo written > /workspace/out
echo uid=$(id -u) pwd=$(pwd)
echo resolv=$(cat /etc/resolv.conf)
test -e /proc/1/root/etc/hostname && echo LEAK-proc1-root
test -e /proc/self/root/bin/busybox && echo proc-self-root-is-the-image
test -e /run/agentvm && echo LEAK-agent-dir
cd / && cd .. && echo dotdot=$(ls | tr '\n' ' ')
echo mounts=$(cut -d' ' -f5 /proc/self/mountinfo | tr '\n' ' ')
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "id", "tr", "cut", "pwd", "test"):
        (root / "bin" / tool).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    # What an image (or a program before) may have left at the mount points.
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (root / "proc").symlink_to("/")
    (root / "workspace").write_text("a file where a directory must be")
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir(mode=0o777)
    ws.chmod(0o777)
    (ws / "hello").write_text("from the host")
    return ws


def shell_in(pivot: Pivot, script: str) -> subprocess.CompletedProcess[str]:
    """The image's /bin/sh runs ``script``, confined and pivoted as the agent does it."""
    return subprocess.run(
        ["/bin/sh", "-c", script],
        preexec_fn=Confiner(None, drop_caps=True, hide=(), pivot=pivot),
        env={"PATH": "/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def run_in(image: Path, workspace: Path, resolv: Path, user: dict[str, int]) -> dict[str, str]:
    pivot = Pivot.prepare(
        str(image),
        workspace=str(workspace),
        resolv_conf=str(resolv),
        cwd="/workspace",
        uid=user.get("uid"),
        gid=user.get("gid"),
    )
    proc = shell_in(pivot, PROBE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("LEAK")], proc.stdout
    return dict(ln.split("=", 1) for ln in lines if "=" in ln) | {
        "flags": " ".join(ln for ln in lines if "=" not in ln)
    }


@pytest.mark.parametrize("user", [{}, {"uid": 1000, "gid": 1000}], ids=["root", "uid-1000"])
def test_the_program_sees_the_image_root_and_only_it(
    image: Path, workspace: Path, tmp_path: Path, user: dict[str, int]
) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.2.3")
    got = run_in(image, workspace, resolv, user)
    assert got["answer"] == "42"  # the image's shell ran
    assert got["root"].split() == ["bin", "dev", "etc", "proc", "sys", "tmp", "workspace"]
    assert got["dotdot"].split() == got["root"].split()  # ".." of "/" is "/"
    assert got["hello"] == "from the host"
    assert (workspace / "out").read_text() == "written\n"
    assert got["uid"].split()[0] == str(user.get("uid", 0))
    assert got["uid"].split()[1] == "pwd=/workspace"
    assert got["resolv"] == "nameserver 10.0.2.3"
    assert "proc-self-root-is-the-image" in got["flags"]
    # Exactly what was mounted for it: none of the host's (or the guest's) own mounts.
    points = set(got["mounts"].split())
    assert {"/", "/proc", "/sys", "/dev", "/workspace", "/etc/resolv.conf"} <= points
    assert all(
        p in ("/", "/proc", "/sys", "/workspace", "/etc/resolv.conf") or p.startswith("/dev")
        for p in points
    ), points
    # The hostile leftovers were repaired in the image, not followed out of it.
    assert (image / "proc").is_dir()
    assert not (image / "proc").is_symlink()
    assert (image / "etc" / "resolv.conf").is_file()
    assert not (image / "etc" / "resolv.conf").is_symlink()


def test_an_image_without_etc_gets_no_resolv_conf_and_still_runs(
    image: Path, workspace: Path, tmp_path: Path
) -> None:
    shutil.rmtree(image / "etc")
    (image / "etc").symlink_to("/etc")  # would aim the bind at the host's /etc/resolv.conf
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.2.3")
    before = Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""
    pivot = Pivot.prepare(str(image), workspace=str(workspace), resolv_conf=str(resolv))
    assert not [b for b in pivot.binds if b[1].endswith(b"resolv.conf")]
    assert shell_in(pivot, "echo $((1 + 1))").stdout == "2\n"
    after = Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""
    assert after == before


def test_a_root_that_cannot_be_entered_fails_the_start_not_silently(
    image: Path, workspace: Path
) -> None:
    os.remove(image / "bin" / "sh")
    pivot = Pivot.prepare(str(image), workspace=str(workspace))
    with pytest.raises(FileNotFoundError):
        shell_in(pivot, "true")
