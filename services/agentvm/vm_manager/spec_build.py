"""Build a named image from a spec (docs/IMAGES.md, "Building from a spec").

The host fetches (:mod:`.spec_fetch`: the Debian root as an ext4 qcow2, the
wheels, the npm tree); everything that runs a package's or the user's code
runs in a build VM: the system root, ISOLATED (no NIC), with the layer being
built as its second disk and the agent pivoted into it (``ConfigureRoot``),
so a step sees the image as its ``/`` and the host only as files the
builder wrote to the VM's workspace.

Each in-VM step is a qcow2 layer over the previous one, cached under
``CACHE/build/<key>/layer.qcow2`` where the key chains the previous key and
the step's inputs: editing one step rebuilds it and the ones after it only.
A layer is published (renamed into place, ``done`` written last) only after
its VM shut down cleanly. The image is the last layer flattened into one
compressed qcow2, committed to the store in one rename; a failure anywhere
registers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shlex
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import grpc

from agentvm.common import image_spec
from agentvm.common.errors import FailedPrecondition, InvalidArgument, NotFound
from agentvm.common.grpc_util import guest_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2
from agentvm.vm_manager import spec_fetch
from agentvm.vm_manager.build_vm import build_vm, stop_cleanly
from agentvm.vm_manager.image_manifest import ImageConfigData, ImageManifest, check_name
from agentvm.vm_manager.image_store import ImageStore
from agentvm.vm_manager.workspace import remove_tree

log = logging.getLogger("agentvm.vm_manager.spec_build")

T = TypeVar("T")
Event = vm_manager_pb2.BuildImageResponse
# Bumped when a layer's content changes for the same inputs.
LAYER_VERSION = "1"
MAX_SPEC_FILES_BYTES = 256 << 20
STEP_TIMEOUT_S = 3600.0
MAX_LINE = 4096
TAIL_BYTES = 4096
GUEST_DIR = "build"  # under /workspace in the build VM


class BuildStepFailed(FailedPrecondition):
    """A build step exited non-zero: its output's tail and exit code are in the message."""


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([LAYER_VERSION, *parts]).encode()).hexdigest()


def _line(text: str) -> Event:
    return Event(log_line=text[:MAX_LINE])


def _progress(phase: str, done: int, total: int, cached: bool = False) -> Event:
    return Event(
        progress=vm_manager_pb2.ImageProgress(phase=phase, done=done, total=total, cached=cached)
    )


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One in-VM step: files to put in the VM's workspace, then commands in the image."""

    title: str
    inputs: tuple[Any, ...]
    uploads: tuple[tuple[Path, str], ...] = ()  # (host file, path under /workspace/build)
    commands: tuple[str, ...] = ()


def materialize(source: vm_manager_pb2.ImageSpecSource, into: Path) -> Path:
    """Write the spec and its files as the caller had them; return the spec's path."""
    name = PurePosixPath(source.filename or "image.toml").name
    if not name or name.startswith("."):
        raise InvalidArgument(f"spec.filename {source.filename!r}: give the spec file's name")
    total = 0
    for f in source.files:
        p = PurePosixPath(f.path)
        if not f.path or p.is_absolute() or ".." in p.parts or "\0" in f.path:
            raise InvalidArgument(
                f"spec.files: {f.path[:200]!r} is not a path relative to the spec's directory"
            )
        total += len(f.content)
        if total > MAX_SPEC_FILES_BYTES:
            raise InvalidArgument(
                f"spec.files: over {MAX_SPEC_FILES_BYTES >> 20} MiB in total: copy large "
                "files in a build step from the workspace instead"
            )
        dest = into.joinpath(*p.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.content)
        dest.chmod((f.mode & 0o777) or 0o644)
    spec_path = into / name
    spec_path.write_text(source.toml)
    return spec_path


def parse(source: vm_manager_pb2.ImageSpecSource, into: Path) -> image_spec.ImageSpec:
    """The spec, with messages that name the caller's file, not the scratch copy."""
    path = materialize(source, into)
    try:
        return image_spec.parse(source.toml, path)
    except image_spec.ImageSpecError as exc:
        shown = source.filename or path.name
        raise image_spec.ImageSpecError(str(exc).replace(str(path), shown)) from exc


def config_of(spec: image_spec.ImageSpec, base: ImageConfigData | None = None) -> ImageConfigData:
    """The image's config: the spec's fields over its base image's (``base``), the
    way a Dockerfile's ENV/WORKDIR/USER/CMD override its FROM image's; the base's
    entrypoint and labels are kept."""
    base = base or ImageConfigData()
    return ImageConfigData(
        env={**base.env, **spec.env},
        workdir=spec.workdir or base.workdir,
        user=spec.user or base.user,
        entrypoint=base.entrypoint,
        cmd=tuple(spec.cmd) or base.cmd,
        labels=dict(base.labels),
    )


@dataclasses.dataclass(frozen=True)
class _Root:
    """What the in-VM layers start from: a fetched Debian root or a stored image."""

    key: str
    disk: Path
    packages: tuple[str, ...]
    disk_bytes: int
    config: ImageConfigData
    base: str  # the manifest's base: "debian:bookworm" or "image:ID"


def layers_of(
    spec: image_spec.ImageSpec, pip: spec_fetch.PipResult, npm: spec_fetch.NpmResult
) -> list[_Layer]:
    """The in-VM steps of ``spec``, in order, each with what its cache key depends on."""
    out: list[_Layer] = []
    if pip.packages:
        wheels = sorted(pip.wheels.iterdir())
        uploads = [(w, f"wheels/{w.name}") for w in wheels]
        uploads.append((pip.requirements, "requirements.txt"))
        pip_wheel = pip.pip_wheel
        if pip_wheel is None:
            raise FailedPrecondition("the pip step fetched no wheel of pip itself: rebuild")
        uploads.append((pip_wheel, f"pip/{pip_wheel.name}"))
        d = f"/workspace/{GUEST_DIR}"
        py = "python3"
        cmds = []
        if pip.venv:
            cmds.append(f"python3 -m venv --without-pip {shlex.quote(pip.venv)}")
            py = shlex.quote(pip.venv + "/bin/python")
        extra = "" if pip.venv else " --break-system-packages"
        # A venv gets pip itself too: agents run `pip install` in it.
        own = f" {d}/pip/{pip_wheel.name}" if pip.venv else ""
        cmds.append(
            f"{py} {d}/pip/{pip_wheel.name}/pip install --no-index --no-cache-dir{extra} "
            f"--find-links {d}/wheels{own} -r {d}/requirements.txt"
        )
        out.append(_Layer("pip", ("pip", pip.key, bool(own)), tuple(uploads), tuple(cmds)))
    if npm.packages:
        cmds = [
            "mkdir -p /usr/local/lib/node_modules /usr/local/bin",
            f"tar -xf /workspace/{GUEST_DIR}/node_modules.tar -C /usr/local/lib/node_modules",
        ]
        for bin_name, target in npm.bins:
            t = shlex.quote(f"/usr/local/lib/node_modules/{target}")
            cmds.append(
                f"chmod +x {t} && ln -sfn {shlex.quote('../lib/node_modules/' + target)} "
                f"{shlex.quote('/usr/local/bin/' + bin_name)}"
            )
        out.append(
            _Layer("npm", ("npm", npm.key), ((npm.tarball, "node_modules.tar"),), tuple(cmds))
        )
    if spec.files:
        uploads, cmds, digests = [], [], []
        for i, (src, dest, mode) in enumerate(_copies(spec.files)):
            uploads.append((src, f"files/{i}"))
            # mkdir/rm/cp/chmod, not install(1): busybox images often lack it.
            q = shlex.quote(dest)
            parent = shlex.quote(str(PurePosixPath(dest).parent))
            cmds.append(
                f"mkdir -p {parent} && rm -f {q} && "
                f"cp /workspace/{GUEST_DIR}/files/{i} {q} && chmod {mode:o} {q}"
            )
            digests.append((dest, mode, hashlib.sha256(src.read_bytes()).hexdigest()))
        # One command: a directory of many files costs one Execute.
        script = "set -e\n" + "\n".join(cmds)
        out.append(_Layer("files", ("files", digests), tuple(uploads), (script,)))
    for i, cmd in enumerate(spec.run):
        inputs = ("run", cmd, sorted(spec.env.items()))
        out.append(_Layer(f"run {i + 1}/{len(spec.run)}", inputs, (), (cmd,)))
    return out


def _copies(files: tuple[image_spec.FileCopy, ...]) -> list[tuple[Path, str, int]]:
    """(host file, destination, mode) of every file to copy; a directory's files
    land under its destination with their relative paths (regular files only)."""
    out: list[tuple[Path, str, int]] = []
    for copy in files:
        if not copy.src.is_dir():
            mode = copy.mode if copy.mode is not None else copy.src.stat().st_mode & 0o7777
            out.append((copy.src, copy.dest, mode))
            continue
        for path in sorted(copy.src.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise InvalidArgument(
                    f"{copy.src}: {path.relative_to(copy.src)} is not a regular file or "
                    "directory: copy its target instead"
                )
            if path.is_file():
                mode = copy.mode if copy.mode is not None else path.stat().st_mode & 0o7777
                rel = path.relative_to(copy.src).as_posix()
                out.append((path, f"{copy.dest.rstrip('/')}/{rel}", mode))
    return out


class SpecBuilder:
    """Runs spec builds: host fetches, then one build VM per uncached layer."""

    def __init__(self, manager: Any, store: ImageStore, cache_dir: Path) -> None:
        self.manager = manager
        self.store = store
        self.cache_dir = cache_dir
        # spec_fetch keeps its steps in CACHE/build/<key>/; the in-VM layers live beside them.
        self.build_dir = cache_dir / "build"

    async def run(
        self, source: vm_manager_pb2.ImageSpecSource, name: str, no_cache: bool
    ) -> AsyncIterator[Event]:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.build_dir.chmod(0o755)
        with tempfile.TemporaryDirectory(prefix="spec-", dir=self.build_dir) as scratch:
            spec = parse(source, Path(scratch))
            name = name or spec.name
            if name:
                check_name(name)
            yield _progress("fetch", 0, 3)
            if spec.base_image:
                root = self._image_root(spec)
                yield _line(f"root: image {spec.base_image} ({root.key[:12]})")
                yield _progress("fetch", 1, 3, True)
            else:
                roots: list[spec_fetch.RootResult] = []
                async for ev in self._in_thread(
                    lambda lg: spec_fetch.root_step(spec, self.cache_dir, lg), roots
                ):
                    yield ev
                fetched = roots[0]
                root = _Root(
                    fetched.key,
                    fetched.disk,
                    tuple(fetched.packages),
                    fetched.size_mib << 20,
                    ImageConfigData(),
                    spec.base,
                )
                yield _progress("fetch", 1, 3, fetched.cached)
            pips: list[spec_fetch.PipResult] = []
            async for ev in self._in_thread(
                lambda lg: spec_fetch.pip_step(spec, self.cache_dir, lg),
                pips,
            ):
                yield ev
            pip = pips[0]
            yield _progress("fetch", 2, 3, pip.cached)
            npms: list[spec_fetch.NpmResult] = []
            async for ev in self._in_thread(
                lambda lg: spec_fetch.npm_step(spec, self.cache_dir, lg),
                npms,
            ):
                yield ev
            npm = npms[0]
            yield _progress("fetch", 3, 3, npm.cached)
            layers = layers_of(spec, pip, npm)
            config = config_of(spec, root.config)
            key, disk = root.key, root.disk
            for i, layer in enumerate(layers):
                key = _key(key, layer.inputs)
                cached = (self.build_dir / key / "done").exists() and not no_cache
                yield _progress(layer.title, i, len(layers), cached)
                if not cached:
                    async for ev in self._build_layer(spec, config.env, key, disk, layer):
                        yield ev
                disk = self.build_dir / key / "layer.qcow2"
            image_id = _key(key, dataclasses.asdict(config))
            existing = None
            with contextlib.suppress(Exception):
                existing = self.store.get(image_id)
            if existing is not None:
                stored = self.store.tag(image_id, name) if name else existing
            else:
                with self.store.staging() as staged:
                    yield _progress("compress", 0, 1)
                    await asyncio.to_thread(_flatten, disk, staged / "root.qcow2")
                    manifest = ImageManifest(
                        kind="spec",
                        base=root.base,
                        digest="sha256:" + key,
                        created=time.time(),
                        config=config,
                        packages=(*root.packages, *pip.packages, *npm.packages),
                        content_bytes=await asyncio.to_thread(_used_bytes, disk),
                        disk_bytes=root.disk_bytes,
                    )
                    stored = self.store.commit(staged, image_id, manifest, [name] if name else [])
        self.manager.events.emit("image.built", image=stored.id, names=list(stored.names))
        yield Event(image=stored.to_proto(self.manager.image_users(stored.id)))

    async def _in_thread(
        self, fn: Callable[[Callable[[str], None]], T], out: list[T]
    ) -> AsyncIterator[Event]:
        """Run a blocking step in a thread; its log lines become events as they come,
        and its result is appended to ``out``."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, text)

        task = asyncio.ensure_future(asyncio.to_thread(fn, emit))
        # Runs after every line the thread sent (both go through the loop in order).
        task.add_done_callback(lambda _t: lines.put_nowait(None))
        while (text := await lines.get()) is not None:
            yield _line(text)
        out.append(await task)

    def _image_root(self, spec: image_spec.ImageSpec) -> _Root:
        """``base = "image:REF"``: the stored image's disk is the first layer's parent;
        its id (which covers its content and config) keys the layers above it."""
        try:
            base = self.store.resolve(spec.base_image)
        except (InvalidArgument, NotFound) as exc:
            raise type(exc)(f"{spec.path}: base = {spec.base!r}: {exc.message}") from exc
        m = base.manifest
        key = _key("image", base.id)
        return _Root(key, base.disk, m.packages, m.disk_bytes, m.config, f"image:{base.id}")

    async def _build_layer(
        self,
        spec: image_spec.ImageSpec,
        env: dict[str, str],
        key: str,
        parent: Path,
        layer: _Layer,
    ) -> AsyncIterator[Event]:
        final = self.build_dir / key
        tmp = self.build_dir / f"{key}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        try:
            disk = tmp / "layer.qcow2"
            await asyncio.to_thread(_overlay, parent, disk)
            async for ev in self._in_vm(spec, env, disk, layer):
                yield ev
            (tmp / "done").write_text(f"{time.time():.3f}\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "done").exists():
                    raise
                # Another build of the same step finished first: its layer is as good.
        finally:
            if tmp.exists():
                await asyncio.to_thread(remove_tree, tmp)

    async def _in_vm(
        self, spec: image_spec.ImageSpec, env: dict[str, str], disk: Path, layer: _Layer
    ) -> AsyncIterator[Event]:
        config = common_pb2.ImageConfig(env=env, workdir="/", user="root")
        async with build_vm(self.manager, disk, "spec", config) as vm:
            async with guest_channel(vm.agent_endpoint) as channel:
                stub: guest_agent_pb2_grpc.GuestAgentServiceAsyncStub = (
                    guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
                )
                for host_path, rel in layer.uploads:
                    await _upload(stub, host_path, f"{GUEST_DIR}/{rel}")
                for cmd in layer.commands:
                    yield _line(f"{layer.title}: $ {cmd}")
                    async for ev in _execute(stub, spec, layer.title, cmd):
                        yield ev
            await stop_cleanly(self.manager, vm, f"{spec.path}: {layer.title}")


async def _upload(
    stub: guest_agent_pb2_grpc.GuestAgentServiceAsyncStub, src: Path, rel: str
) -> None:
    digest = hashlib.sha256()

    async def requests() -> AsyncIterator[guest_agent_pb2.GuestAgentServiceWriteFileRequest]:
        yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(path=rel, mode=0o644)
        with src.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                digest.update(chunk)
                yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(chunk=chunk)
        yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(sha256=digest.hexdigest())

    try:
        await stub.WriteFile(requests(), timeout=STEP_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise FailedPrecondition(
            f"copying {src.name} into the build VM failed: {exc.details() or exc.code().name}"
        ) from exc


async def _execute(
    stub: guest_agent_pb2_grpc.GuestAgentServiceAsyncStub,
    spec: image_spec.ImageSpec,
    title: str,
    cmd: str,
) -> AsyncIterator[Event]:
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_SHELL, source=cmd)
        ),
        cwd="/",
    )
    req.timeout.FromSeconds(int(STEP_TIMEOUT_S))
    tail = bytearray()
    pending = b""
    exit_code: int | None = None
    signal = 0
    try:
        async for ev in stub.Execute(req, timeout=STEP_TIMEOUT_S + 60):
            if ev.HasField("output"):
                tail.extend(ev.output.data)
                del tail[:-TAIL_BYTES]
                pending += ev.output.data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield _line(line.decode("utf-8", "replace"))
                if len(pending) > MAX_LINE:
                    yield _line(pending.decode("utf-8", "replace"))
                    pending = b""
            elif ev.HasField("exited"):
                exit_code, signal = ev.exited.exit_code, ev.exited.signal
    except grpc.aio.AioRpcError as exc:
        raise FailedPrecondition(
            f"{spec.path}: {title}: `{cmd}` could not run in the build VM: "
            f"{exc.details() or exc.code().name}"
        ) from exc
    if pending:
        yield _line(pending.decode("utf-8", "replace"))
    if exit_code != 0 or signal:
        out = tail.decode("utf-8", "replace").strip()
        hint = ""
        if "No space left on device" in out:
            hint = f" The image's disk is full: raise disk_gib (now {spec.disk_gib}) in the spec."
        status = f"signal {signal}" if signal else f"exit code {exit_code}"
        raise BuildStepFailed(
            f"{spec.path}: {title}: `{cmd}` failed with {status}.{hint} "
            f"Its output ends with:\n{out[-TAIL_BYTES:]}"
        )


def _overlay(parent: Path, disk: Path) -> None:
    _qemu_img(["create", "-q", "-f", "qcow2", "-b", str(parent), "-F", "qcow2", str(disk)])


def _flatten(disk: Path, out: Path) -> None:
    _qemu_img(["convert", "-q", "-c", "-O", "qcow2", str(disk), str(out)])


def _used_bytes(disk: Path) -> int:
    """Bytes the layer chain holds (qemu-img's allocated size of the whole chain)."""
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", "--backing-chain", str(disk)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        return 0
    try:
        return sum(int(layer.get("actual-size", 0)) for layer in json.loads(proc.stdout))
    except (ValueError, TypeError, AttributeError):
        return 0


def _qemu_img(args: list[str]) -> None:
    proc = subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, check=False, timeout=1800
    )
    if proc.returncode != 0:
        raise FailedPrecondition(f"qemu-img {args[0]} failed: {proc.stderr.strip()[-800:]}")
