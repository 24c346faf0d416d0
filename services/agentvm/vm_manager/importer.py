"""Import an OCI image as a named image (docs/IMAGES.md, "Importing an OCI image").

On the host nothing is extracted: :mod:`.oci` reads the archive and
:mod:`.oci_scan` verifies every blob and refuses hostile entries. Then a
build VM (the system root, ISOLATED, no NIC) gets a fresh raw ext4 disk as
``vdb`` and its agent applies the layers in order (``ApplyLayer``, the
guest's ``layers.py``: whiteouts, opaque directories, every path resolved
inside the image's root). The VM is shut down cleanly, the disk becomes a
compressed qcow2 and the image is committed to the store in one rename.
Any failure destroys the VM and the staging directory: nothing partial is
registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc

from agentvm.common.errors import FailedPrecondition, ResourceExhausted
from agentvm.common.grpc_util import guest_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2
from agentvm.vm_manager import oci, oci_scan
from agentvm.vm_manager.build_vm import build_vm, stop_cleanly
from agentvm.vm_manager.image_manifest import ImageConfigData, ImageManifest, check_name
from agentvm.vm_manager.image_store import ImageStore, StoredImage

if TYPE_CHECKING:
    from agentvm.vm_manager.manager import VMManager

log = logging.getLogger("agentvm.vm_manager.importer")

CHUNK = 1 << 20
MIN_DISK = 512 << 20
# Room for ext4's own metadata (inodes, journal) over the layers' bytes.
SLACK = 1.25
EXTRA = 128 << 20


@dataclass(frozen=True)
class _Plan:
    image_id: str
    diff_ids: tuple[str, ...]
    sizes: tuple[int, ...]
    content_bytes: int
    disk_bytes: int
    config: ImageConfigData


def _progress(phase: str, done: int, total: int) -> vm_manager_pb2.ImportImageResponse:
    return vm_manager_pb2.ImportImageResponse(
        progress=vm_manager_pb2.ImageProgress(phase=phase, done=done, total=total)
    )


def config_data(config: oci.ImageConfig) -> ImageConfigData:
    """The OCI config's fields agent-vm honours (Env is "NAME=value" there)."""
    env: dict[str, str] = {}
    for item in config.env:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    return ImageConfigData(
        env=env,
        workdir=config.workdir,
        user=config.user,
        entrypoint=tuple(config.entrypoint),
        cmd=tuple(config.cmd),
        labels=dict(config.labels),
    )


def image_id(diff_ids: tuple[str, ...], config: ImageConfigData) -> str:
    """Same layers and same config: same id (importing twice registers one image)."""
    doc = json.dumps(
        {
            "kind": "oci",
            "diff_ids": list(diff_ids),
            "config": dataclasses.asdict(config),
        },
        sort_keys=True,
    )
    return hashlib.sha256(doc.encode()).hexdigest()


class ImageImporter:
    """Runs imports; one build VM per import."""

    def __init__(self, manager: VMManager, store: ImageStore, max_disk_bytes: int) -> None:
        self.manager = manager
        self.store = store
        self.max_disk_bytes = max_disk_bytes

    async def run(self, ref: str, name: str) -> AsyncIterator[vm_manager_pb2.ImportImageResponse]:
        if name:
            check_name(name)
        image = await asyncio.to_thread(oci.open_image, ref)
        # Without a name the archive's own (docker save's RepoTags, containerd's
        # image name) is taken, as `docker load` does.
        name = name or image.name
        try:
            scanner = oci_scan.Scanner(image.ref)
            sizes: list[int] = []
            for i in range(len(image.layers)):
                yield _progress(f"verify layer {i + 1}/{len(image.layers)}", i, len(image.layers))
                scan = await asyncio.to_thread(scanner.scan, image, i)
                sizes.append(scan.uncompressed_bytes)
            plan = self._plan(image, tuple(sizes))
            existing = self._existing(plan.image_id)
            if existing is not None:
                stored = self.store.tag(existing.id, name) if name else existing
                log.info("image %s is already imported", plan.image_id[:12])
            else:
                with self.store.staging() as staged:
                    async for event in self._build(image, plan, staged):
                        yield event
                    manifest = ImageManifest(
                        kind="oci",
                        base=str(image.ref),
                        digest="sha256:" + plan.image_id,
                        created=time.time(),
                        config=plan.config,
                        packages=(),
                        content_bytes=plan.content_bytes,
                        disk_bytes=plan.disk_bytes,
                    )
                    stored = self.store.commit(
                        staged, plan.image_id, manifest, [name] if name else []
                    )
        finally:
            image.close()
        self.manager.events.emit(
            "image.imported", image=stored.id, names=list(stored.names), ref=str(ref)
        )
        yield vm_manager_pb2.ImportImageResponse(
            image=stored.to_proto(self.manager.image_users(stored.id))
        )

    def _existing(self, image_id: str) -> StoredImage | None:
        with contextlib.suppress(Exception):
            return self.store.get(image_id)
        return None

    def _plan(self, image: oci.Image, sizes: tuple[int, ...]) -> _Plan:
        config = config_data(image.config)
        diff_ids = tuple(layer.diff_id for layer in image.layers)
        content = sum(sizes)
        disk = max(MIN_DISK, int(content * SLACK) + EXTRA)
        disk = (disk + (1 << 20) - 1) & ~((1 << 20) - 1)
        if disk > self.max_disk_bytes:
            raise ResourceExhausted(
                f"{image.ref}: its layers hold {content >> 20} MiB, which needs a "
                f"{disk >> 20} MiB disk; the cap is {self.max_disk_bytes >> 20} MiB "
                "(AGENTVM_MAX_IMAGE_DISK_MIB): raise it or make the image smaller"
            )
        return _Plan(image_id(diff_ids, config), diff_ids, sizes, content, disk, config)

    async def _build(
        self, image: oci.Image, plan: _Plan, staged: Path
    ) -> AsyncIterator[vm_manager_pb2.ImportImageResponse]:
        raw = staged / "root.raw"
        # QEMU runs as its own user: it must reach the disk (libvirt chowns the
        # file itself); traverse only, no listing.
        for d in (staged.parent, staged):
            d.chmod(0o711)
        yield _progress("make file system", 0, 1)
        await asyncio.to_thread(_mkfs, raw, plan.disk_bytes)
        yield _progress("boot build VM", 0, 1)
        async with build_vm(self.manager, raw, "import", common_pb2.ImageConfig()) as vm:
            n = len(image.layers)
            for i in range(n):
                yield _progress(f"apply layer {i + 1}/{n}", i, n)
                await self._apply(vm.agent_endpoint, image, i, plan)
            yield _progress("shut down build VM", n, n)
            await stop_cleanly(self.manager, vm, f"importing {image.ref}")
        yield _progress("compress", 0, 1)
        await asyncio.to_thread(_compress, raw, staged / "root.qcow2")

    async def _apply(self, endpoint: str, image: oci.Image, index: int, plan: _Plan) -> None:
        size = plan.sizes[index]
        # Under TCG the guest applies a few MiB/s: give every layer time by its size.
        timeout = 120.0 + size / (1 << 20)
        with image.open_layer(index) as stream:

            async def requests() -> AsyncIterator[guest_agent_pb2.ApplyLayerRequest]:
                yield guest_agent_pb2.ApplyLayerRequest(
                    header=guest_agent_pb2.ApplyLayerHeader(diff_id=plan.diff_ids[index], size=size)
                )
                for chunk in _chunks(stream):
                    yield guest_agent_pb2.ApplyLayerRequest(chunk=await asyncio.to_thread(chunk))

            async with guest_channel(endpoint) as channel:
                stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
                try:
                    await stub.ApplyLayer(requests(), timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    raise FailedPrecondition(
                        f"{image.ref}: the build VM could not apply layer {index + 1} "
                        f"({plan.diff_ids[index]}): {exc.details() or exc.code().name}"
                    ) from exc


def _chunks(stream: IO[bytes]) -> Iterator[_Reader]:
    """Readers of the next chunk, until the stream ends (each read runs in a thread)."""
    while True:
        reader = _Reader(stream)
        yield reader
        if reader.eof:
            return


class _Reader:
    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.eof = False

    def __call__(self) -> bytes:
        data = self.stream.read(CHUNK)
        if len(data) < CHUNK:
            self.eof = True
        return data


def _run(argv: list[str], what: str, timeout: float) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise FailedPrecondition(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")


def _mkfs(raw: Path, size: int) -> None:
    """An empty ext4 in a sparse file, owned by root, no reserved blocks; nothing mounted."""
    with raw.open("wb") as f:
        f.truncate(size)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-L",
            "agentvm-image",
            "-E",
            "root_owner=0:0",
            str(raw),
        ],
        "making the image's file system (mkfs.ext4)",
        120,
    )
    # mkfs's lost+found is not the image's: the workload sees exactly the layers.
    _run(
        ["debugfs", "-w", "-R", "rmdir lost+found", str(raw)],
        "removing lost+found from the image's file system (debugfs)",
        60,
    )


def _compress(raw: Path, out: Path) -> None:
    _run(
        ["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
        "compressing the image (qemu-img convert)",
        1800,
    )
    raw.unlink()
