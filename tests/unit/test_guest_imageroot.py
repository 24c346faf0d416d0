"""Named images in the guest: ConfigureRoot, Execute pivoted into the image, ApplyLayer.

Runs the guest agent's servicer in-process as root on the host, with a real
ext4 disk: a sparse file made by ``mkfs.ext4 -d`` from a busybox root (no
Python in it), attached to a loop device, found by its "serial" in a fake
sysfs this test writes, and mounted by the agent at a temporary mount point.
Every mount and loop device is removed again, also when a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.v1 import common_pb2, guest_agent_pb2
from agentvm_guest import agent, imageroot

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None,
    reason="needs root, mkfs.ext4 and losetup",
)

SERIAL = "img-0123abcd"
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "# a comment, then garbage the parser must skip\n"
    "::::\n"
    "evil:x:notanumber:0::/:/bin/sh\n" + "x" * 70_000 + "\n"
    "app:x:1000:1000::/home/app:/bin/sh\n"
)
GROUP = "root:x:0:\nstaff:x:50:app,other\napp:x:1000:\nwheel:x:10:root\n"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class Context:
    """Just enough of a grpc.ServicerContext for the agent's servicer."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def add_callback(self, callback: Any) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def ctx() -> Any:
    return Context()


def make_root(path: Path) -> None:
    """A busybox root without Python: /bin (busybox applets), /etc, /opt/old."""
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    (path / "bin").mkdir()
    shutil.copy2("/bin/busybox", path / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "id", "pwd", "env", "true", "test"):
        (path / "bin" / tool).symlink_to("busybox")
    (path / "bin" / "only-in-image").write_text("#!/bin/sh\necho from the image\n")
    (path / "bin" / "only-in-image").chmod(0o755)
    (path / "etc").mkdir()
    (path / "etc" / "marker").write_text("image marker\n")
    (path / "etc" / "passwd").write_text(PASSWD)
    (path / "etc" / "group").write_text(GROUP)
    (path / "home" / "app").mkdir(parents=True)
    (path / "srv" / "data").mkdir(parents=True)
    (path / "opt" / "old").mkdir(parents=True)
    (path / "opt" / "old" / "file").write_text("lower layer")


@contextlib.contextmanager
def loop_disk(tmp: Path, name: str, source: Path | None) -> Iterator[str]:
    """A loop device over a 64 MiB sparse file: ext4 of ``source``, or zeros."""
    image = tmp / f"{name}.img"
    with open(image, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    if source is not None:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(source), str(image)],
            check=True,
            capture_output=True,
        )
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def fake_sysfs(tmp: Path, disks: dict[str, tuple[str, str]]) -> Path:
    """/sys/block as the agent reads it: {name: (serial, device node)}."""
    block = tmp / "sys-block"
    block.mkdir()
    for name, (serial, node) in disks.items():
        (block / name).mkdir()
        (block / name / "serial").write_text(serial + "\n")
        if node:
            rdev = os.stat(node).st_rdev
            (block / name / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
    return block


class World:
    """Loop disks, a fake sysfs naming them, and agents whose mounts are undone at the end."""

    def __init__(self, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.tmp = tmp
        src = tmp / "rootfs"
        make_root(src)
        self.dev = stack.enter_context(loop_disk(tmp, "image", src))
        self.zeros = stack.enter_context(loop_disk(tmp, "zeros", None))
        loop, zeros = os.path.basename(self.dev), os.path.basename(self.zeros)
        self.sys_block = fake_sysfs(
            tmp,
            {"vda": ("", ""), loop: (SERIAL, self.dev), zeros: ("blank-disk", self.zeros)},
        )
        self.workspace = tmp / "workspace"
        self.workspace.mkdir(mode=0o777)
        self.workspace.chmod(0o777)
        (self.workspace / "sub").mkdir()
        self.mounts: list[Path] = []

    def agent(self) -> agent.GuestAgent:
        mount_point = self.tmp / f"mnt{len(self.mounts)}" / "root"
        self.mounts.append(mount_point)
        image = imageroot.ImageRoot(str(mount_point), sys_block=str(self.sys_block), dev_dir="/dev")
        return agent.GuestAgent(workspace=str(self.workspace), image=image)

    def unmount(self) -> None:
        for mount_point in self.mounts:
            while os.path.ismount(mount_point):
                if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
                    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        w = World(tmp_path, stack)
        try:
            yield w
        finally:
            w.unmount()


def configure(a: agent.GuestAgent, serial: str = SERIAL, **config: Any) -> str:
    req = guest_agent_pb2.ConfigureRootRequest(
        serial=serial, config=common_pb2.ImageConfig(**config)
    )
    return a.ConfigureRoot(req, ctx()).mount_point


def configured(world: World, **config: Any) -> agent.GuestAgent:
    a = world.agent()
    configure(a, **config)
    return a


def execute(a: agent.GuestAgent, *argv: str, **kw: Any) -> tuple[int, str, str]:
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=list(argv))), **kw
    )
    out, err, code = b"", b"", -1
    for r in a.Execute(req, ctx()):
        kind = r.WhichOneof("event")
        if kind == "output":
            if r.output.stream == common_pb2.OUTPUT_STREAM_STDOUT:
                out += r.output.data
            else:
                err += r.output.data
        elif kind == "exited":
            code = r.exited.exit_code
    return code, out.decode(), err.decode()


def sh(a: agent.GuestAgent, script: str, **kw: Any) -> str:
    code, out, err = execute(a, "/bin/sh", "-c", script, **kw)
    assert code == 0, (code, out, err)
    return out


def aborted(fn: Any, *args: Any, **kw: Any) -> Aborted:
    """The abort of a call (a streamed answer is read to its end)."""

    def call() -> None:
        result = fn(*args, **kw)
        if isinstance(result, Iterator):
            list(result)

    with pytest.raises(Aborted) as info:
        call()
    return info.value


# -- ConfigureRoot -----------------------------------------------------------------------
def test_configure_mounts_the_disk_found_by_serial(world: World) -> None:
    a = world.agent()
    mount_point = configure(a, workdir="/srv")
    assert mount_point == str(world.mounts[0])
    assert os.path.ismount(mount_point)
    assert (Path(mount_point) / "etc" / "marker").read_text() == "image marker\n"
    options = next(
        ln.split()[5]
        for ln in Path("/proc/self/mountinfo").read_text().splitlines()
        if ln.split()[4] == mount_point
    )
    assert {"rw", "nosuid", "nodev"} <= set(options.split(","))
    # Under the mount: the mount point itself is root's and 0700.
    st = os.stat(Path(mount_point).parent / "root", follow_symlinks=False)
    assert (st.st_uid, st.st_gid) == (0, 0)
    # The same call again (a restored clone): a no-op.
    assert configure(a, workdir="/srv") == mount_point
    # Another disk, or another config, in the same boot: refused.
    exc = aborted(configure, a, "blank-disk")
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert SERIAL in exc.details
    assert "blank-disk" in exc.details
    exc = aborted(configure, a, SERIAL)
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "another config" in exc.details


def test_configure_errors_name_what_is_wrong(world: World) -> None:
    a = world.agent()
    exc = aborted(configure, a, "no-such-disk")
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'no-such-disk'" in exc.details
    assert "vda (serial '')" in exc.details
    assert f"(serial '{SERIAL}')" in exc.details
    exc = aborted(configure, a, "blank-disk")
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot mount" in exc.details
    assert "errno" in exc.details
    for serial in ("", "a" * 21, "a/b", "a b"):
        assert aborted(configure, a, serial).code == grpc.StatusCode.INVALID_ARGUMENT
    for config, field in (
        ({"workdir": "relative"}, "workdir"),
        ({"user": "a b"}, "user"),
        ({"user": "a:b:c"}, "user"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"1X": "x"}}, "env"),
        ({"env": {"X": "a\0b"}}, "env"),
        ({"cmd": ["x"] * 2000}, "cmd"),
    ):
        exc = aborted(configure, a, SERIAL, **config)
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, config
        assert f"config.{field}" in exc.details
    # Nothing was mounted by any of these; then a good call still works.
    assert not os.path.ismount(world.mounts[0])
    configure(a)
    assert os.path.ismount(world.mounts[0])


# -- Execute in the image ------------------------------------------------------------------
def test_execute_runs_in_the_image_with_its_defaults(world: World) -> None:
    a = configured(world, workdir="/srv/data", env={"FROM_IMAGE": "image", "BOTH": "image"})
    assert sh(a, "id -u; pwd; cat /etc/marker").splitlines() == ["0", "/srv/data", "image marker"]
    # The agent's root is gone from the program's view.
    code, _, err = execute(a, "ls", "/run/agentvm")
    assert code != 0
    assert "No such file" in err
    assert "busybox" in sh(a, "ls /bin")
    assert "usr" not in sh(a, "ls /").split()  # the host's (the agent's) /usr
    assert not os.path.exists("/bin/only-in-image")
    assert sh(a, "only-in-image") == "from the image\n"
    # The agent's environment defaults, the image's, then the request's.
    env = dict(
        ln.split("=", 1)
        for ln in sh(a, "env", env={"BOTH": "request", "OWN": "1"}).splitlines()
        if "=" in ln
    )
    assert env["FROM_IMAGE"] == "image"
    assert env["BOTH"] == "request"
    assert env["OWN"] == "1"
    assert env["PATH"] == agent.DEFAULT_ENV["PATH"]
    assert env["HOME"] == "/root"
    # The request's cwd wins, also in the workspace (bound in by the pivot).
    assert sh(a, "pwd", cwd="/etc") == "/etc\n"
    assert sh(a, "pwd", cwd="/workspace/sub") == "/workspace/sub\n"
    sh(a, "echo hi > /workspace/sub/out")
    assert (world.workspace / "sub" / "out").read_text() == "hi\n"


def test_execute_cwd_and_program_errors(world: World) -> None:
    a = configured(world)
    assert sh(a, "pwd") == "/\n"
    for cwd in ("/nowhere", "/etc/marker", "relative", "/workspace/nowhere"):
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])), cwd=cwd
        )
        exc = aborted(a.Execute, req, ctx())
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, cwd
        assert repr(cwd) in exc.details
    # The agent's own Python is not in the image: argv[0] is looked up after the pivot.
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["python3", "-c", "pass"]))
    )
    exc = aborted(a.Execute, req, ctx())
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "python3" in exc.details


def test_execute_as_the_images_user(world: World) -> None:
    a = configured(world, user="app")
    out = sh(a, "id -u; id -g; id -G; echo $HOME; pwd")
    assert out.splitlines() == ["1000", "1000", "1000 50", "/home/app", "/"]
    b = configured(world, user="1000:10", env={"HOME": "/tmp"})
    assert sh(b, "id -u; id -g; id -G; echo $HOME").splitlines() == ["1000", "10", "10", "/tmp"]
    c = configured(world, user="4242")  # a uid the image does not list
    assert sh(c, "id -u; id -g; echo $HOME").splitlines() == ["4242", "0", "/"]
    d = configured(world, user="app:wheel")
    assert sh(d, "id -u; id -g").splitlines() == ["1000", "10"]


@pytest.mark.parametrize(
    ("user", "missing"), [("nobody", "/etc/passwd"), ("app:nogroup", "/etc/group")]
)
def test_an_unknown_user_fails_the_execute(world: World, user: str, missing: str) -> None:
    a = configured(world, user=user)
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
    )
    exc = aborted(a.Execute, req, ctx())
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert repr(user.rsplit(":", maxsplit=1)[-1]) in exc.details
    assert missing in exc.details


def test_user_databases_are_read_inside_the_root_as_hostile_input(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwd").write_text("ghost:x:7:7::/ghost:/bin/sh\n")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        # A symlink out of the root resolves inside it: to nothing.
        (root / "etc" / "passwd").symlink_to(f"../../../../../../..{outside}/passwd")
        with pytest.raises(imageroot.RootError, match="'ghost' is not in the image's"):
            imageroot.resolve_user(fd, "ghost")
        # A FIFO is not read (it would block), a directory neither.
        (root / "etc" / "passwd").unlink()
        os.mkfifo(root / "etc" / "passwd")
        assert imageroot.read_db(fd, "passwd") == []
        (root / "etc" / "passwd").unlink()
        # Huge: only the first 4 MiB count.
        line = b"u:x:1:1::/:/bin/sh\n"
        (root / "etc" / "passwd").write_bytes(
            b"\xff\xfe garbage\n" + b"y" * (5 * 1024 * 1024) + b"\n" + line
        )
        with pytest.raises(imageroot.RootError):
            imageroot.resolve_user(fd, "u")
        (root / "etc" / "passwd").write_bytes(b"\xff\xfe garbage\n" + line)
        assert imageroot.resolve_user(fd, "u") == imageroot.User(1, 1, (), "/")
        # No passwd at all: root by default, and numeric ids.
        (root / "etc" / "passwd").unlink()
        assert imageroot.resolve_user(fd, "") == imageroot.User(0, 0, (), "/")
        assert imageroot.resolve_user(fd, "5:6") == imageroot.User(5, 6, (), "/")
    finally:
        os.close(fd)


# -- ApplyLayer ----------------------------------------------------------------------------
def tar_layer(entries: Iterable[tuple[str, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content == "/":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content.encode()))
    return buf.getvalue()


def messages(
    data: bytes, diff_id: str | None = None, size: int | None = None, chunk: int = 1000
) -> Iterator[guest_agent_pb2.ApplyLayerRequest]:
    header = guest_agent_pb2.ApplyLayerHeader(
        diff_id=diff_id or "sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data) if size is None else size,
    )
    yield guest_agent_pb2.ApplyLayerRequest(header=header)
    for i in range(0, len(data), chunk):
        yield guest_agent_pb2.ApplyLayerRequest(chunk=data[i : i + chunk])


LAYER = [
    ("etc/.wh.marker", ""),
    ("opt/", "/"),
    ("opt/.wh..wh..opq", ""),
    ("opt/new", "upper layer"),
    ("etc/added", "added by the layer\n"),
]


def test_apply_layer_then_execute_sees_it(world: World) -> None:
    a = configured(world)
    data = tar_layer(LAYER)
    resp = a.ApplyLayer(messages(data), ctx())
    assert (resp.entries, resp.whiteouts) == (5, 2)
    assert sh(a, "cat /etc/added; ls /opt") == "added by the layer\nnew\n"
    code, _, err = execute(a, "cat", "/etc/marker")
    assert code != 0
    assert "No such file" in err


def test_apply_layer_errors(world: World) -> None:
    a = world.agent()
    data = tar_layer(LAYER)
    exc = aborted(a.ApplyLayer, messages(data), ctx())
    assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "ConfigureRoot" in exc.details
    configure(a)

    def chunk_first() -> Iterator[guest_agent_pb2.ApplyLayerRequest]:
        yield guest_agent_pb2.ApplyLayerRequest(chunk=data)

    exc = aborted(a.ApplyLayer, chunk_first(), ctx())
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in exc.details
    exc = aborted(a.ApplyLayer, messages(data, diff_id="sha256:abc"), ctx())
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "diff_id" in exc.details
    wrong = "sha256:" + "0" * 64
    exc = aborted(a.ApplyLayer, messages(data, diff_id=wrong), ctx())
    assert exc.code == grpc.StatusCode.DATA_LOSS
    assert wrong in exc.details
    exc = aborted(a.ApplyLayer, messages(data, size=len(data) + 1), ctx())
    assert exc.code == grpc.StatusCode.DATA_LOSS
    assert "ended after" in exc.details
    exc = aborted(a.ApplyLayer, messages(data, size=len(data) - 1), ctx())
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer" in exc.details
    # A layer the applier refuses (its bytes are what the header says).
    bad = tar_layer([("../escape", "x")])
    exc = aborted(a.ApplyLayer, messages(bad), ctx())
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaves the image" in exc.details
    assert not (world.tmp / "mnt0" / "escape").exists()


def test_one_layer_at_a_time(world: World) -> None:
    a = configured(world)
    data = tar_layer([("etc/slow", "x")])
    release = threading.Event()
    started = threading.Event()

    def slow() -> Iterator[guest_agent_pb2.ApplyLayerRequest]:
        it = messages(data, chunk=512)
        yield next(it)
        started.set()
        release.wait(10)
        yield from it

    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(a.ApplyLayer(slow(), ctx())))
    t.start()
    try:
        assert started.wait(10)
        exc = aborted(a.ApplyLayer, messages(data), ctx())
        assert exc.code == grpc.StatusCode.ABORTED
    finally:
        release.set()
        t.join(10)
    assert results
    assert results[0].entries == 1
    assert sh(a, "cat /etc/slow") == "x"
