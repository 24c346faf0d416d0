"""Verify and walk the layers of an image archive (:mod:`.oci` reads the archive).

Each layer's blob is hashed as it streams (size and digest against the
manifest), its uncompressed tar too (against the config's diff_id), and every
entry is checked: no path out of the root, no device node, no hard link to
outside or to a file a whiteout removed; caps on the number of entries and
the uncompressed size. Nothing is extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

from agentvm.vm_manager.oci import (
    MAX_ENTRIES,
    MAX_IMAGE_BYTES,
    MAX_PATH,
    OPAQUE,
    WHITEOUT,
    Image,
    ImageArchiveError,
    Ref,
    _decompressed,
    _normal,
)


@dataclass(frozen=True)
class LayerScan:
    """What walking one layer found."""

    entries: int
    uncompressed_bytes: int
    whiteouts: int


class _Hashing(io.RawIOBase):
    """A reader that hashes and counts what passes through it."""

    def __init__(self, raw: IO[bytes] | io.RawIOBase) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


@dataclass
class Scanner:
    """Validates the layers of one image in order, tracking what exists for hard links."""

    ref: Ref
    max_entries: int = MAX_ENTRIES
    max_bytes: int = MAX_IMAGE_BYTES
    files: set[str] = field(default_factory=set)  # regular files present after each layer
    entries: int = 0
    total_bytes: int = 0

    def scan(self, image: Image, index: int) -> LayerScan:
        """Walk layer ``index``; check its digests, sizes and every entry."""
        layer = self.layers_label(image, index)
        declared = image.layers[index]
        before, whiteouts = self.entries, 0
        with image._open(declared.path, layer) as raw:
            blob = _Hashing(raw)
            try:
                plain = _Hashing(_decompressed(blob, self.ref, index))
                with tarfile.open(fileobj=plain, mode="r|") as tar:
                    added: set[str] = set()
                    for member in tar:
                        whiteouts += self._entry(member, layer, added)
                    self.files |= added
                plain.drain()
                blob.drain()
            except ImageArchiveError:
                raise
            except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
                raise ImageArchiveError(
                    f"{self.ref}: {layer} is not a readable tar stream ({exc}): the archive is "
                    "truncated or corrupt; save the image again"
                ) from exc
        if declared.size >= 0 and blob.count != declared.size:
            raise ImageArchiveError(
                f"{self.ref}: {layer} is {blob.count} bytes, its manifest says "
                f"{declared.size}: the archive is truncated or altered; save the image again"
            )
        if declared.digest and blob.digest != declared.digest:
            raise ImageArchiveError(
                f"{self.ref}: {layer} does not match its digest (got {blob.digest}): the "
                "archive is corrupt or was altered; save the image again"
            )
        if plain.digest != declared.diff_id:
            raise ImageArchiveError(
                f"{self.ref}: {layer}'s content does not match the config's diff_id "
                f"{declared.diff_id} (got {plain.digest}): the archive is corrupt or was "
                "altered; save the image again"
            )
        return LayerScan(self.entries - before, plain.count, whiteouts)

    @staticmethod
    def layers_label(image: Image, index: int) -> str:
        layer = image.layers[index]
        return f"layer {index + 1} of {len(image.layers)} ({layer.digest or layer.path})"

    def _entry(self, member: tarfile.TarInfo, layer: str, added: set[str]) -> int:
        """Check one entry; returns 1 for a whiteout."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise ImageArchiveError(
                f"{self.ref}: more than {self.max_entries} files in the image; agent-vm "
                "imports images up to that many"
            )
        where = f"{self.ref}: {layer}: entry {member.name[:200]!r}"
        if len(member.name) > MAX_PATH:
            raise ImageArchiveError(f"{where}: the path is over {MAX_PATH} bytes")
        name = _normal(member.name)
        if name.startswith("/"):
            raise ImageArchiveError(f"{where}: an absolute path; layers hold relative paths")
        if ".." in name.split("/"):
            raise ImageArchiveError(f"{where}: the path leaves the image's root ('..')")
        if member.ischr() or member.isblk():
            raise ImageArchiveError(
                f"{where}: a device node; agent-vm does not import devices (the guest's /dev "
                "is provided): remove it from the image"
            )
        if member.issym():
            if not member.linkname or len(member.linkname) > MAX_PATH:
                raise ImageArchiveError(f"{where}: a symlink without a valid target")
        elif member.islnk():
            target = _normal(member.linkname)
            if target.startswith("/") or ".." in target.split("/") or not target:
                raise ImageArchiveError(
                    f"{where}: a hard link to {member.linkname[:200]!r}, outside the image"
                )
            if target not in added and target not in self.files:
                raise ImageArchiveError(
                    f"{where}: a hard link to {target!r}, which is not a file of the image "
                    "at that point"
                )
        elif not (member.isfile() or member.isdir() or member.isfifo()):
            raise ImageArchiveError(f"{where}: an entry of unsupported type {member.type!r}")
        if member.size < 0:
            raise ImageArchiveError(f"{where}: a negative size")
        self.total_bytes += member.size
        if self.total_bytes > self.max_bytes:
            raise ImageArchiveError(
                f"{self.ref}: the image is over {self.max_bytes} bytes uncompressed; agent-vm "
                "imports images up to that size"
            )
        base = posixpath.basename(name)
        if base.startswith(WHITEOUT):
            parent = posixpath.dirname(name)
            if base == OPAQUE:
                prefix = f"{parent}/" if parent else ""
                self.files = {f for f in self.files if not f.startswith(prefix)}
            else:
                gone = base[len(WHITEOUT) :]
                if gone in ("", ".", "..") or gone.startswith(WHITEOUT):
                    raise ImageArchiveError(f"{where}: a whiteout of nothing")
                path = posixpath.join(parent, gone)
                self.files = {f for f in self.files if f != path and not f.startswith(path + "/")}
            return 1
        if member.isfile() or member.islnk():
            added.add(name)
        else:
            added.discard(name)
            self.files.discard(name)
        return 0


def scan_all(
    image: Image, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_IMAGE_BYTES
) -> list[LayerScan]:
    """Verify and walk every layer of ``image`` in order."""
    scanner = Scanner(image.ref, max_entries=max_entries, max_bytes=max_bytes)
    return [scanner.scan(image, i) for i in range(len(image.layers))]
