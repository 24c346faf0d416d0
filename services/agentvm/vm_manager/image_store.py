"""Named images on the host: the store of root file systems workloads run in.

Layout (docs/IMAGES.md)::

    <root>/<id>/root.qcow2       read-only base of every VM's second disk (vdb)
    <root>/<id>/manifest.json    kind, base, digest, created, config, packages, sizes
    <root>/names.json            {"coder": "<id>", "coder:1": "<id>"} (atomic replace)
    <root>/.staging/             imports and builds in progress; trash being removed

``<root>`` is ``$AGENTVM_IMAGES_DIR``, by default ``$AGENTVM_CACHE_DIR/named-images``: the
built-in image's own ``images/`` directory is pruned by its builder (it keeps
the newest three directories there), so named images cannot live beside it.

An image appears only by an atomic rename of its complete staged directory,
and goes by a rename into ``.staging`` before its files are removed, so a
crash never leaves a half-written or half-deleted image registered;
:meth:`ImageStore.recover` clears what a crash left. Names and manifests are
read as possibly corrupt: an error names the file and what to do about it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition, InvalidArgument, NotFound
from agentvm.v1 import vm_manager_pb2
from agentvm.vm_manager import access
from agentvm.vm_manager.clones import TemplateInfo
from agentvm.vm_manager.image_manifest import (
    BUILTIN,
    HEX_RE,
    ID_RE,
    KINDS,
    MIN_PREFIX,
    NAME_SYNTAX,
    ImageConfigData,
    ImageManifest,
    ImageStoreError,
    check_name,
)
from agentvm.vm_manager.vm import VM, VMState

# The manifest types are part of this module's API (image_manifest.py holds them).
__all__ = [
    "DeleteResult",
    "ImageConfigData",
    "ImageManifest",
    "ImageStore",
    "ImageStoreError",
    "PruneResult",
    "StoredImage",
    "check_name",
    "image_users",
    "store_root",
]

log = logging.getLogger("agentvm.vm_manager.image_store")

DISK = "root.qcow2"
MANIFEST = "manifest.json"
NAMES = "names.json"
STAGING = ".staging"
# Who uses an image: "vm:NAME", "template:KEY" (image_users); empty when nobody.
UsedBy = Callable[[str], list[str]]
KIND_PROTO = {"oci": vm_manager_pb2.IMAGE_KIND_OCI, "spec": vm_manager_pb2.IMAGE_KIND_SPEC}


def store_root(settings: Settings) -> Path:
    """Where vm-manager keeps named images (AGENTVM_IMAGES_DIR)."""
    return settings.images_dir


def _short(image_id: str) -> str:
    return image_id[:12]


@dataclass(frozen=True)
class StoredImage:
    """One complete image in the store."""

    id: str
    path: Path
    manifest: ImageManifest
    names: tuple[str, ...] = ()

    @property
    def disk(self) -> Path:
        return self.path / DISK

    @property
    def size_bytes(self) -> int:
        """Bytes the disk file occupies (allocated, not its apparent size)."""
        try:
            return self.disk.stat().st_blocks * 512
        except OSError:
            return 0

    def to_proto(self, used_by: Sequence[str] = ()) -> vm_manager_pb2.Image:
        m = self.manifest
        msg = vm_manager_pb2.Image(
            id=self.id,
            packages=list(m.packages),
            path=str(self.disk),
            size_bytes=self.size_bytes,
            names=list(self.names),
            kind=KIND_PROTO.get(m.kind, vm_manager_pb2.IMAGE_KIND_UNSPECIFIED),
            base=m.base,
            config=m.config.to_proto(),
            digest=m.digest,
            content_bytes=m.content_bytes,
            used_by=list(used_by),
            disk_bytes=m.disk_bytes,
        )
        msg.built_at.FromNanoseconds(int(m.created * 1e9))
        return msg


@dataclass(frozen=True)
class DeleteResult:
    id: str
    untagged: list[str]
    deleted: bool
    freed_bytes: int


@dataclass(frozen=True)
class PruneResult:
    removed_ids: list[str]
    freed_bytes: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text``: temporary file, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def allocated_bytes(path: Path) -> int:
    """Bytes a file or a directory tree occupies on disk (allocated blocks)."""
    total = 0
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            total += p.lstat().st_blocks * 512
    return total


class ImageStore:
    """Named images under ``root``; every method is thread-safe."""

    check_name = staticmethod(check_name)

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.RLock()

    # -- files -------------------------------------------------------------------------
    @property
    def _names_file(self) -> Path:
        return self.root / NAMES

    @property
    def _staging_dir(self) -> Path:
        return self.root / STAGING

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # QEMU (another user under qemu:///system) reads the images' disks.
            os.chmod(self.root, 0o755)
            self._staging_dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FailedPrecondition(
                f"image store {self.root} is not usable ({exc}): set AGENTVM_IMAGES_DIR (or "
                "AGENTVM_CACHE_DIR) to a writable directory"
            ) from exc

    def _read_names(self) -> dict[str, str]:
        path = self._names_file
        fix = (
            "repair it or move it aside (images stay reachable by id; `agent-vm image tag` "
            "names them again)"
        )
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ImageStoreError(f"image names file {path} is unreadable ({exc}): {fix}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ImageStoreError(f"image names file {path} is corrupt ({exc}): {fix}") from None
        if not isinstance(data, dict):
            raise ImageStoreError(f"image names file {path} is not a JSON object: {fix}")
        for name, image_id in data.items():
            try:
                check_name(name)
            except InvalidArgument:
                raise ImageStoreError(
                    f"image names file {path} holds the malformed name {name!r}: {fix}"
                ) from None
            if not isinstance(image_id, str) or not ID_RE.fullmatch(image_id):
                raise ImageStoreError(
                    f"image names file {path}: {name!r} maps to {image_id!r}, not an image id: "
                    f"{fix}"
                )
        return dict(data)

    def _write_names(self, names: dict[str, str]) -> None:
        self._ensure_root()
        _write_atomic(self._names_file, json.dumps(dict(sorted(names.items())), indent=2) + "\n")

    def _image_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if ID_RE.fullmatch(p.name) and p.is_dir()]

    def _load(self, image_id: str, names: dict[str, str]) -> StoredImage:
        """The image ``image_id``: NotFound when absent, ImageStoreError when broken."""
        path = self.root / image_id
        if not path.is_dir():
            raise NotFound(f"image {image_id} does not exist: `agent-vm image list` shows images")
        where = str(path / MANIFEST)
        fix = f"delete {path} (or re-import the image)"
        try:
            text = (path / MANIFEST).read_text()
        except OSError as exc:
            raise ImageStoreError(f"{where} is unreadable ({exc}): {fix}") from None
        try:
            manifest = ImageManifest.from_json(text, where)
        except ImageStoreError as exc:
            raise ImageStoreError(f"{exc.message}: {fix}") from None
        if not (path / DISK).is_file():
            raise ImageStoreError(f"image {image_id} has no {DISK} in {path}: {fix}")
        own = tuple(sorted(n for n, i in names.items() if i == image_id))
        return StoredImage(id=image_id, path=path, manifest=manifest, names=own)

    # -- lookup ------------------------------------------------------------------------
    def resolve(self, ref: str) -> StoredImage:
        """The image ``ref`` names: a name, "name:tag", an id, "sha256:<id>" or a
        unique id prefix of at least 8 hex digits. Names win over id prefixes."""
        if ref in ("", BUILTIN):
            raise InvalidArgument(
                f"{BUILTIN} is the built-in image, not a named image: callers take "
                f"{BUILTIN!r} and '' as the built-in image"
            )
        with self._lock:
            names = self._read_names()
            if ref in names:
                image_id = names[ref]
                if not (self.root / image_id).is_dir():
                    raise NotFound(
                        f"image {ref!r} points at {_short(image_id)}, which is missing: "
                        "`agent-vm image list` shows images"
                    )
                return self._load(image_id, names)
            prefix = ref.removeprefix("sha256:")
            if not HEX_RE.fullmatch(prefix):
                try:
                    check_name(ref)
                except InvalidArgument:
                    raise InvalidArgument(
                        f"image reference {ref!r} is malformed: {NAME_SYNTAX}"
                    ) from None
                raise NotFound(f"no image named {ref!r}: `agent-vm image list` shows images")
            if len(prefix) < MIN_PREFIX:
                if prefix != ref:
                    raise InvalidArgument(
                        f"image id prefix {ref!r} is too short: give at least {MIN_PREFIX} "
                        "hex digits"
                    )
                raise NotFound(
                    f"no image named {ref!r} (an id prefix needs at least {MIN_PREFIX} hex "
                    "digits): `agent-vm image list` shows images"
                )
            found = sorted(i for i in self._image_ids() if i.startswith(prefix))
            if not found:
                raise NotFound(
                    f"no image named {ref!r} or with an id starting so: `agent-vm image list` "
                    "shows images"
                )
            if len(found) > 1:
                shown = ", ".join(self._describe(i, names) for i in found)
                raise InvalidArgument(
                    f"image id prefix {ref!r} is ambiguous: it matches {shown}; give more digits"
                )
            return self._load(found[0], names)

    @staticmethod
    def _describe(image_id: str, names: dict[str, str]) -> str:
        own = sorted(n for n, i in names.items() if i == image_id)
        return f"{_short(image_id)} ({', '.join(own)})" if own else _short(image_id)

    def get(self, image_id: str) -> StoredImage:
        if not ID_RE.fullmatch(image_id):
            raise InvalidArgument(f"image id {image_id!r} is not 64 hex digits")
        with self._lock:
            return self._load(image_id, self._read_names())

    def list(self) -> list[StoredImage]:
        """Every readable image, newest first (unreadable ones are logged and left out)."""
        with self._lock:
            names = self._read_names()
            out = []
            for image_id in self._image_ids():
                try:
                    out.append(self._load(image_id, names))
                except (ImageStoreError, NotFound) as exc:
                    log.warning("skipping image %s: %s", image_id, exc)
        return sorted(out, key=lambda i: (-i.manifest.created, i.id))

    # -- adding --------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh private directory to assemble an image in; removed unless committed."""
        self._ensure_root()
        path = Path(tempfile.mkdtemp(dir=self._staging_dir, prefix="new-"))
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(
        self, staged: Path, image_id: str, manifest: ImageManifest, names: Sequence[str]
    ) -> StoredImage:
        """Publish ``staged`` (holding root.qcow2) as ``image_id`` and give it ``names``.
        The same content committed again keeps the existing files and only adds names."""
        if not ID_RE.fullmatch(image_id):
            raise InvalidArgument(f"image id {image_id!r} is not 64 hex digits")
        if manifest.kind not in KINDS:
            raise InvalidArgument(f"image kind {manifest.kind!r} is not one of {sorted(KINDS)}")
        for name in names:
            check_name(name)
        disk = staged / DISK
        if not disk.is_file():
            raise FailedPrecondition(f"cannot commit {staged}: it holds no {DISK}")
        with self._lock:
            current = self._read_names()
            final = self.root / image_id
            exists = False
            if final.is_dir():
                try:
                    self._load(image_id, current)
                    exists = True
                except ImageStoreError as exc:
                    log.warning("replacing broken image %s: %s", image_id, exc)
                    self._trash(final)
            if exists:
                shutil.rmtree(staged, ignore_errors=True)
            else:
                _write_atomic(staged / MANIFEST, manifest.to_json())
                with open(disk, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(disk, 0o644)
                os.chmod(staged, 0o755)
                os.rename(staged, final)
                _fsync_dir(self.root)
            if names:
                for name in names:
                    current[name] = image_id
                self._write_names(current)
            return self._load(image_id, current)

    def tag(self, ref: str, name: str) -> StoredImage:
        """Point ``name`` at the image ``ref`` names (moving it from another image)."""
        check_name(name)
        with self._lock:
            image = self.resolve(ref)
            names = self._read_names()
            names[name] = image.id
            self._write_names(names)
            return self._load(image.id, names)

    # -- removing ------------------------------------------------------------------------
    def _trash(self, path: Path) -> int:
        """Move an image directory out of the store, then remove it; its allocated bytes."""
        freed = allocated_bytes(path)
        self._ensure_root()
        trash = self._staging_dir / f"trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return freed

    def delete(self, ref: str, used_by: UsedBy) -> DeleteResult:
        """Remove the name ``ref`` (an id: every name); the files go with the last name.
        Refused, changing nothing, while ``used_by(id)`` names anyone."""
        with self._lock:
            names = self._read_names()
            if ref in names and not (self.root / names[ref]).is_dir():
                # A name left pointing at nothing: only the name goes.
                image_id = names.pop(ref)
                self._write_names(names)
                return DeleteResult(image_id, [ref], False, 0)
            image = self.resolve(ref)
            untag = [ref] if ref in names else list(image.names)
            users = used_by(image.id)
            if users:
                raise FailedPrecondition(
                    f"image {self._describe(image.id, names)} is used by {', '.join(users)}; "
                    "destroy them first"
                )
            left = {n: i for n, i in names.items() if n not in untag}
            if untag:
                self._write_names(left)
            deleted = image.id not in left.values()
            freed = self._trash(image.path) if deleted else 0
            if deleted:
                log.info("deleted image %s (%d bytes)", image.id, freed)
            return DeleteResult(image.id, untag, deleted, freed)

    def prune(self, used_by: UsedBy) -> PruneResult:
        """Remove images no name points at and nobody uses."""
        with self._lock:
            named = set(self._read_names().values())
            victims = [i for i in self.list() if i.id not in named and not used_by(i.id)]
            freed = sum(self._trash(i.path) for i in victims)
            if victims:
                log.info("pruned images %s (%d bytes)", ", ".join(i.id for i in victims), freed)
            return PruneResult([i.id for i in victims], freed)

    def recover(self) -> None:
        """At start (nothing stages): clear ``.staging``, drop names of missing images,
        log images whose files are unreadable."""
        with self._lock:
            if not self.root.is_dir():
                return
            if self._staging_dir.is_dir():
                for entry in self._staging_dir.iterdir():
                    log.info("removing %s, left by an interrupted import, build or delete", entry)
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
            for entry in self.root.iterdir():
                if entry.name.startswith(f".{NAMES}."):
                    with contextlib.suppress(OSError):
                        entry.unlink()
            try:
                names = self._read_names()
            except ImageStoreError as exc:
                log.error("%s", exc)  # noqa: TRY400 - the message says it all
                return
            for image_id in self._image_ids():
                try:
                    self._load(image_id, names)
                except (ImageStoreError, NotFound) as exc:
                    log.warning("image %s is unreadable and ignored: %s", image_id, exc)
            missing = {n for n, i in names.items() if not (self.root / i).is_dir()}
            for name in sorted(missing):
                log.warning("dropping image name %s: image %s is missing", name, names[name])
            if missing:
                self._write_names({n: i for n, i in names.items() if n not in missing})


def image_users(image_id: str, vms: Iterable[VM], templates: Iterable[TemplateInfo]) -> list[str]:
    """Who uses ``image_id``: "vm:NAME" (" (pool KEY)" for pool VMs), "template:KEY"."""
    users: list[str] = []
    for vm in vms:
        if vm.workload_image_id != image_id or vm.state is VMState.DESTROYED:
            continue
        pool = f" (pool {access.pool_key(vm)})" if access.is_pool_vm(vm.labels) else ""
        users.append(f"vm:{vm.name}{pool}")
    users.extend(f"template:{t.key}" for t in templates if t.workload_image_id == image_id)
    return users
