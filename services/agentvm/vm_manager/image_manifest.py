"""What a named image is called and what it is (docs/IMAGES.md): the name syntax, and
``manifest.json`` (kind, origin, config, sizes).

Read strictly, as possibly corrupt: a missing field or one of the wrong type is an
:class:`ImageStoreError` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.v1 import common_pb2

MANIFEST = "manifest.json"
KINDS = ("oci", "spec")
BUILTIN = "default"
# Names that would read as something else: the built-in image, an id's prefix.
RESERVED = (BUILTIN, "sha256")

ID_RE = re.compile(r"[0-9a-f]{64}")
HEX_RE = re.compile(r"[0-9a-f]{1,64}")
MIN_PREFIX = 8
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
NAME_SYNTAX = (
    "a name is [a-z0-9][a-z0-9._-]{0,62} with an optional :TAG "
    "([A-Za-z0-9_][A-Za-z0-9._-]{0,127}); an id is 64 hex digits, sha256:<id> "
    f"or a unique prefix of at least {MIN_PREFIX}"
)


def check_name(name: str) -> str:
    """``name`` when it is a valid image name ("coder", "coder:1"), else InvalidArgument."""
    base, sep, tag = name.partition(":")
    if not NAME_RE.fullmatch(base) or (sep and not TAG_RE.fullmatch(tag)):
        raise InvalidArgument(f"image name {name!r} is malformed: {NAME_SYNTAX}")
    if base in RESERVED:
        raise InvalidArgument(
            f"image name {name!r} is reserved ({BUILTIN} is the built-in image, sha256: "
            "prefixes ids): choose another name"
        )
    if ID_RE.fullmatch(base):
        raise InvalidArgument(f"image name {name!r} would read as an image id: choose another")
    return name


class ImageStoreError(FailedPrecondition):
    """A file of the store is unreadable or malformed (the message names it)."""


# -- manifest ------------------------------------------------------------------------
def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ImageStoreError(f"{where}: field {key!r} is missing")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ImageStoreError(f"{where}: field {key!r} has the wrong type")
    return value


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageStoreError(f"{where}: field {key!r} must be a list of strings")
    return tuple(value)


def _string_map(value: Any, key: str, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ImageStoreError(f"{where}: field {key!r} must map strings to strings")
    return dict(value)


@dataclass(frozen=True)
class ImageConfigData:
    """The image's defaults for commands (OCI config or the spec)."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def to_proto(self) -> common_pb2.ImageConfig:
        return common_pb2.ImageConfig(
            env=self.env,
            workdir=self.workdir,
            user=self.user,
            entrypoint=list(self.entrypoint),
            cmd=list(self.cmd),
            labels=self.labels,
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.ImageConfig) -> ImageConfigData:
        return cls(
            env=dict(msg.env),
            workdir=msg.workdir,
            user=msg.user,
            entrypoint=tuple(msg.entrypoint),
            cmd=tuple(msg.cmd),
            labels=dict(msg.labels),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "labels": dict(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ImageConfigData:
        if not isinstance(data, dict):
            raise ImageStoreError(f"{where}: field 'config' must be an object")
        w = f"{where} (config)"
        return cls(
            env=_string_map(_get(data, "env", dict, w), "config.env", where),
            workdir=_get(data, "workdir", str, w),
            user=_get(data, "user", str, w),
            entrypoint=_strings(_get(data, "entrypoint", list, w), "config.entrypoint", where),
            cmd=_strings(_get(data, "cmd", list, w), "config.cmd", where),
            labels=_string_map(_get(data, "labels", dict, w), "config.labels", where),
        )


@dataclass(frozen=True)
class ImageManifest:
    """``manifest.json``: what an image is and where it came from."""

    kind: str
    base: str
    digest: str
    created: float
    config: ImageConfigData = field(default_factory=ImageConfigData)
    packages: tuple[str, ...] = ()
    content_bytes: int = 0
    disk_bytes: int = 0

    def to_json(self) -> str:
        data = {
            "kind": self.kind,
            "base": self.base,
            "digest": self.digest,
            "created": self.created,
            "config": self.config.to_dict(),
            "packages": list(self.packages),
            "content_bytes": self.content_bytes,
            "disk_bytes": self.disk_bytes,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> ImageManifest:
        """Parse strictly: a missing field or one of the wrong type is an
        ImageStoreError naming it (unknown fields are ignored: newer versions)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ImageStoreError(f"{where}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ImageStoreError(f"{where}: not a JSON object")
        kind = _get(data, "kind", str, where)
        if kind not in KINDS:
            raise ImageStoreError(f"{where}: field 'kind' is {kind!r}, not one of {sorted(KINDS)}")
        manifest = cls(
            kind=kind,
            base=_get(data, "base", str, where),
            digest=_get(data, "digest", str, where),
            created=float(_get(data, "created", (int, float), where)),
            config=ImageConfigData.from_dict(_get(data, "config", dict, where), where),
            packages=_strings(_get(data, "packages", list, where), "packages", where),
            content_bytes=_get(data, "content_bytes", int, where),
            disk_bytes=_get(data, "disk_bytes", int, where),
        )
        for key in ("content_bytes", "disk_bytes"):
            if getattr(manifest, key) < 0:
                raise ImageStoreError(f"{where}: field {key!r} is negative")
        return manifest
