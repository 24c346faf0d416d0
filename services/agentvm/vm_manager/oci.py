"""OCI and Docker image archives: read them, verify every blob, refuse what could escape.

The first half of `agent-vm image import` (docs/IMAGES.md, "Importing an OCI
image"): the host reads the archive a user made with ``docker save``,
``podman save --format oci-archive`` or ``skopeo copy ... oci:DIR``, checks
every blob against its digest and size, and walks every layer's tar headers,
refusing what could write outside the image's root or create devices. It
extracts nothing to the host's file system: the layers are applied inside a
build VM.

References use skopeo's transport names::

    oci-archive:PATH          a tar of an OCI image layout
    docker-archive:PATH       what `docker save` / `podman save` write
    oci:DIR[:TAG]             an OCI image layout directory

Everything read from an archive is hostile: JSON documents are size-capped
and type-checked, digests are ``sha256:`` + 64 hex digits before they become
file names, and counts and sizes have caps. Walking and verifying the layers
is :mod:`.oci_scan`. Every error is an :class:`ImageArchiveError` whose
message names the archive, the blob or layer and the entry, and says what to
do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from agentvm.common.errors import InvalidArgument
from agentvm.common.image_spec import IMAGE_NAME

MAX_JSON_BYTES = 4 << 20
MAX_LAYERS = 128
MAX_ENTRIES = 1_000_000
MAX_PATH = 4096
MAX_IMAGE_BYTES = 64 << 30  # uncompressed, all layers together
MAX_CONFIG_ITEMS = 4096

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class ImageArchiveError(InvalidArgument):
    """An archive that cannot be imported; the message says where and why."""


@dataclass(frozen=True)
class Ref:
    transport: str  # "oci-archive" | "docker-archive" | "oci"
    path: Path
    tag: str = ""

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_ref(text: str) -> Ref:
    """``oci-archive:PATH`` / ``docker-archive:PATH`` / ``oci:DIR[:TAG]`` -> :class:`Ref`."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in ("oci-archive", "docker-archive", "oci") or not rest:
        raise ImageArchiveError(
            f"image reference {text!r}: use oci-archive:PATH (podman save --format "
            "oci-archive), docker-archive:PATH (docker save, podman save) or oci:DIR[:TAG] "
            "(skopeo copy ... oci:DIR)"
        )
    tag = ""
    if transport == "oci":
        head, colon, last = rest.rpartition(":")
        if colon and head and "/" not in last:
            rest, tag = head, last
    return Ref(transport, Path(rest), tag)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config agent-vm honours."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"


@dataclass(frozen=True)
class Layer:
    """One layer: where its blob is in the archive and what it must hash to."""

    path: str  # inside the archive / layout
    size: int  # -1: not declared (docker-archive)
    digest: str  # of the blob as stored; "" when not declared (docker-archive)
    diff_id: str  # of the uncompressed tar (the config's rootfs.diff_ids)


class _Store(Protocol):
    def open(self, name: str) -> IO[bytes]: ...

    def close(self) -> None: ...


class _DirStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, name: str) -> IO[bytes]:
        return (self.root / name).open("rb")

    def close(self) -> None:
        pass


class _TarStore:
    """Files of an (uncompressed) outer tar, by name, read in place."""

    def __init__(self, path: Path, ref: Ref) -> None:
        try:
            self.tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by close())
            self.members: dict[str, tarfile.TarInfo] = {}
            for m in self.tar.getmembers():
                name = _normal(m.name)
                if m.isfile() and name:
                    if name in self.members:
                        raise ImageArchiveError(f"{ref}: {name} is in the archive twice")
                    self.members[name] = m
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ImageArchiveError(
                f"{ref}: not a readable tar archive ({exc}): it is truncated or corrupt; "
                "save the image again (docker save / podman save) and retry"
            ) from exc

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(_normal(name))
        if member is None:
            raise FileNotFoundError(name)
        f = self.tar.extractfile(member)
        if f is None:
            raise FileNotFoundError(name)
        return f

    def close(self) -> None:
        self.tar.close()


@dataclass
class Image:
    """An image in an archive: its config and layers, not yet scanned."""

    ref: Ref
    config: ImageConfig
    layers: list[Layer]
    _store: _Store
    # The archive's own name for the image ("busybox:1.36"), "" if it has none
    # (see :func:`short_name`): the name an import gets without --name.
    name: str = ""

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def open_layer(self, index: int) -> Iterator[IO[bytes]]:
        """The layer's uncompressed tar stream (not verified: use :func:`scan`)."""
        layer = self.layers[index]
        with self._open(layer.path, f"layer {index + 1} ({layer.digest or layer.path})") as raw:
            yield _decompressed(raw, self.ref, index)

    @contextlib.contextmanager
    def _open(self, name: str, what: str) -> Iterator[IO[bytes]]:
        try:
            f = self._store.open(name)
        except (FileNotFoundError, KeyError) as exc:
            raise ImageArchiveError(
                f"{self.ref}: {what} is missing from the archive ({name}); the archive is "
                "incomplete: save the image again"
            ) from exc
        with f:
            yield f


def open_image(text: str) -> Image:
    """Read the image ``text`` names (see :func:`parse_ref`): manifest and config."""
    ref = parse_ref(text)
    if ref.transport == "oci":
        if not (ref.path / "index.json").is_file():
            raise ImageArchiveError(
                f"{ref}: {ref.path} has no index.json: not an OCI image layout directory "
                "(make one with `skopeo copy docker-archive:X oci:DIR`)"
            )
        store: _Store = _DirStore(ref.path)
    else:
        if not ref.path.is_file():
            raise ImageArchiveError(f"{ref}: no such file {ref.path}")
        store = _TarStore(ref.path, ref)
    try:
        if ref.transport == "docker-archive":
            config, layers, name = _read_docker(store, ref)
        else:
            config, layers, name = _read_oci(store, ref)
    except BaseException:
        store.close()
        raise
    return Image(ref, config, layers, store, short_name(name))


def short_name(reference: object) -> str:
    """An image reference as a store name: ``docker.io/library/busybox:1.36`` ->
    ``busybox:1.36`` (registry and namespace dropped, a digest too); "" when it is
    not a string or not a valid name then (the import is then unnamed)."""
    if not isinstance(reference, str) or len(reference) > 512:
        return ""
    ref = reference.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last if IMAGE_NAME.fullmatch(last) else ""


# -- manifests ------------------------------------------------------------------
def _json(store: _Store, name: str, ref: Ref, what: str, digest: str = "") -> Any:
    try:
        with store.open(name) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except (FileNotFoundError, KeyError) as exc:
        raise ImageArchiveError(
            f"{ref}: {what} ({name}) is missing: the archive is incomplete; save the image again"
        ) from exc
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ImageArchiveError(f"{ref}: cannot read {what} ({name}): {exc}") from exc
    if len(data) > MAX_JSON_BYTES:
        raise ImageArchiveError(f"{ref}: {what} ({name}) is over {MAX_JSON_BYTES} bytes")
    if digest and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageArchiveError(
            f"{ref}: {what} does not match its digest {digest}: the archive is corrupt or "
            "was altered; save the image again"
        )
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageArchiveError(f"{ref}: {what} ({name}) is not valid JSON: {exc}") from exc


def _descriptor(obj: Any, ref: Ref, what: str) -> tuple[str, int, str]:
    """(digest, size, media type) of a descriptor, type-checked."""
    if not isinstance(obj, dict):
        raise ImageArchiveError(f"{ref}: {what} is not a descriptor object")
    digest, size, media = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ImageArchiveError(
            f"{ref}: {what} has digest {str(digest)[:80]!r}: only sha256 digests are supported"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageArchiveError(f"{ref}: {what} has no valid size")
    if not isinstance(media, str):
        raise ImageArchiveError(f"{ref}: {what} has a mediaType that is not a string")
    return digest, size, media


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _read_oci(store: _Store, ref: Ref) -> tuple[ImageConfig, list[Layer], str]:
    index = _json(store, "index.json", ref, "index.json")
    chosen = _choose_manifest(index, ref, "index.json")
    notes = chosen.get("annotations") if isinstance(chosen, dict) else None
    notes = notes if isinstance(notes, dict) else {}
    # docker save (containerd) names the image; a ref.name is often a bare tag
    # ("latest"), a name only when it is a whole reference.
    name = notes.get(CONTAINERD_NAME) or ""
    ref_name = notes.get(REF_NAME)
    if not name and isinstance(ref_name, str) and ("/" in ref_name or ":" in ref_name):
        name = ref_name
    digest, _, media = _descriptor(chosen, ref, "the manifest")
    manifest = _json(store, _blob(digest), ref, f"manifest {digest}", digest)
    if media in INDEX_TYPES or (isinstance(manifest, dict) and "manifests" in manifest):
        # A multi-platform image: take the linux/amd64 manifest.
        nested = _choose_manifest(manifest, Ref(ref.transport, ref.path), f"index {digest}")
        digest, _, _ = _descriptor(nested, ref, "the linux/amd64 manifest")
        manifest = _json(store, _blob(digest), ref, f"manifest {digest}", digest)
    if not isinstance(manifest, dict):
        raise ImageArchiveError(f"{ref}: manifest {digest} is not a JSON object")
    cfg_digest, _, _ = _descriptor(manifest.get("config"), ref, "the manifest's config")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageArchiveError(f"{ref}: manifest {digest} has no layers list")
    config, diff_ids = _config_of(
        store, ref, _blob(cfg_digest), f"config {cfg_digest}", cfg_digest,
        len(raw_layers), "the manifest",
    )  # fmt: skip
    layers = []
    for i, (raw, diff_id) in enumerate(zip(raw_layers, diff_ids, strict=True)):
        d, size, media = _descriptor(raw, ref, f"layer {i + 1}")
        if "zstd" in media:
            raise ImageArchiveError(
                f"{ref}: layer {i + 1} is zstd-compressed ({media}), which this version cannot "
                "read: save the image with gzip layers (podman save --format oci-archive "
                "without --compression-format zstd)"
            )
        layers.append(Layer(_blob(d), size, d, diff_id))
    return config, layers, name


def _choose_manifest(index: Any, ref: Ref, what: str) -> Any:
    """The manifest ``ref.tag`` names, or the linux/amd64 one, or the only one."""
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise ImageArchiveError(f"{ref}: {what} has no manifests list")
    manifests = [m for m in index["manifests"] if isinstance(m, dict)]
    if ref.tag:
        named = [
            m
            for m in manifests
            if isinstance(m.get("annotations"), dict) and m["annotations"].get(REF_NAME) == ref.tag
        ]
        if not named:
            raise ImageArchiveError(f"{ref}: no image tagged {ref.tag!r} in {what}")
        manifests = named
    amd64 = [
        m
        for m in manifests
        if isinstance(m.get("platform"), dict)
        and m["platform"].get("architecture") == "amd64"
        and m["platform"].get("os") == "linux"
    ]
    if len(manifests) > 1 and len(amd64) == 1:
        return amd64[0]
    if len(manifests) != 1:
        raise ImageArchiveError(
            f"{ref}: {what} holds {len(manifests)} images: name one with oci:DIR:TAG"
            if manifests
            else f"{ref}: {what} holds no image"
        )
    return manifests[0]


def _read_docker(store: _Store, ref: Ref) -> tuple[ImageConfig, list[Layer], str]:
    entries = _json(store, "manifest.json", ref, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageArchiveError(f"{ref}: manifest.json lists no image")
    if len(entries) != 1:
        raise ImageArchiveError(
            f"{ref}: the archive holds {len(entries)} images; save one image per archive"
        )
    entry = entries[0]
    if not isinstance(entry, dict):
        raise ImageArchiveError(f"{ref}: manifest.json's entry is not an object")
    cfg_path, layer_paths = entry.get("Config"), entry.get("Layers")
    if not isinstance(cfg_path, str) or not isinstance(layer_paths, list):
        raise ImageArchiveError(f"{ref}: manifest.json's entry has no Config or Layers")
    config, diff_ids = _config_of(
        store, ref, _inside(cfg_path, ref), "the image config", _digest_in_name(cfg_path),
        len(layer_paths), "manifest.json",
    )  # fmt: skip
    layers = []
    for path, diff_id in zip(layer_paths, diff_ids, strict=True):
        if not isinstance(path, str):
            raise ImageArchiveError(f"{ref}: manifest.json has a layer path that is not a string")
        layers.append(Layer(_inside(path, ref), -1, _digest_in_name(path), diff_id))
    tags = entry.get("RepoTags")
    return config, layers, tags[0] if isinstance(tags, list) and tags else ""


def _config_of(
    store: _Store, ref: Ref, name: str, what: str, digest: str, listed: int, lister: str
) -> tuple[ImageConfig, list[str]]:
    """The config (and its diff_ids), which must name as many layers as ``lister`` does."""
    _check_count(listed, ref)
    config, diff_ids = _config(_json(store, name, ref, what, digest), ref)
    if len(diff_ids) != listed:
        raise ImageArchiveError(
            f"{ref}: {lister} lists {listed} layers but the config {len(diff_ids)}: the "
            "archive is inconsistent; save the image again"
        )
    return config, diff_ids


def _digest_in_name(path: str) -> str:
    """``blobs/sha256/HEX`` or ``HEX.json`` names its own digest; others do not."""
    m = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?", path)
    return f"sha256:{m.group(1)}" if m else ""


def _inside(path: str, ref: Ref) -> str:
    name = _normal(path)
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ImageArchiveError(f"{ref}: manifest.json names {path!r}, outside the archive")
    return name


def _check_count(n: int, ref: Ref) -> None:
    if n > MAX_LAYERS:
        raise ImageArchiveError(
            f"{ref}: {n} layers, more than the {MAX_LAYERS} this version imports: squash the "
            "image (e.g. podman build --squash) and save it again"
        )


def _strings(value: Any, ref: Ref, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_CONFIG_ITEMS
        or not all(isinstance(v, str) and len(v) <= 65536 and "\0" not in v for v in value)
    ):
        raise ImageArchiveError(f"{ref}: the image config's {what} is not a list of strings")
    return tuple(value)


def _string(value: Any, ref: Ref, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_PATH or "\0" in value:
        raise ImageArchiveError(f"{ref}: the image config's {what} is not a valid string")
    return value


def _config(doc: Any, ref: Ref) -> tuple[ImageConfig, list[str]]:
    if not isinstance(doc, dict):
        raise ImageArchiveError(f"{ref}: the image config is not a JSON object")
    arch, osname = doc.get("architecture", "amd64"), doc.get("os", "linux")
    if arch != "amd64" or osname != "linux":
        raise ImageArchiveError(
            f"{ref}: the image is for {osname}/{arch}; agent-vm's guests are linux/amd64: "
            "save the linux/amd64 variant (e.g. podman pull --platform linux/amd64)"
        )
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids
    ):
        raise ImageArchiveError(f"{ref}: the image config has no valid rootfs.diff_ids")
    c = doc.get("config") or {}
    if not isinstance(c, dict):
        raise ImageArchiveError(f"{ref}: the image config's config is not an object")
    env = _strings(c.get("Env"), ref, "Env")
    for item in env:
        if not re.fullmatch(r"[^=]+=.*", item, re.DOTALL):
            raise ImageArchiveError(f"{ref}: the image config's Env has {item[:80]!r}, not K=V")
    labels = c.get("Labels") or {}
    if (
        not isinstance(labels, dict)
        or len(labels) > MAX_CONFIG_ITEMS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise ImageArchiveError(f"{ref}: the image config's Labels are not strings")
    config = ImageConfig(
        env=env,
        workdir=_string(c.get("WorkingDir"), ref, "WorkingDir"),
        user=_string(c.get("User"), ref, "User"),
        entrypoint=_strings(c.get("Entrypoint"), ref, "Entrypoint"),
        cmd=_strings(c.get("Cmd"), ref, "Cmd"),
        labels=dict(labels),
        architecture=arch,
        os=osname,
    )
    return config, list(diff_ids)


# -- layers -----------------------------------------------------------------------
def _decompressed(raw: IO[bytes] | io.RawIOBase, ref: Ref, index: int) -> IO[bytes]:
    head = io.BufferedReader(raw if isinstance(raw, io.RawIOBase) else _Passthrough(raw))
    magic = head.peek(4)[:4]
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=head, mode="rb")  # type: ignore[return-value]
    if magic == ZSTD_MAGIC:
        raise ImageArchiveError(
            f"{ref}: layer {index + 1} is zstd-compressed, which this version cannot read: "
            "save the image with gzip layers"
        )
    return head


class _Passthrough(io.RawIOBase):
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _normal(name: str) -> str:
    """A tar entry name without ``./`` and trailing ``/`` ("" for the root itself)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    prefix = "/" if name.startswith("/") else ""
    return prefix + "/".join(parts)
