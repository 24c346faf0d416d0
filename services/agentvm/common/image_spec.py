"""Image specs: the TOML file `agent-vm image build FILE` reads (docs/IMAGES.md).

Parsed strictly, because a silently ignored line is a package the agent will
miss at run time: an unknown field, a value of the wrong type, a package
name that cannot be one, a file outside the spec's directory, or a
destination in a place the guest owns is an :class:`ImageSpecError` naming
the file, the field (``[pip].packages[2]``), what it holds and what is
allowed.

Both ends parse: the CLI, to read the files the spec names and send them
with it (vm-manager never reads a caller's paths: it runs as root), and
vm-manager again, because it never trusts a request.
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from agentvm.common.errors import InvalidArgument

BASES = ("debian:bookworm",)
# base = "image:REF": an image of the store (imported or built) as the root.
IMAGE_BASE = "image:"
IMAGE_ID = re.compile(r"[0-9a-f]{12,64}")
DEFAULT_DISK_GIB = 8
MAX_DISK_GIB = 256
MAX_ITEMS = 1000
MAX_STRING = 4096
# Where a file may not go: what the guest agent and the kernel provide.
RESERVED_DIRS = ("/proc", "/sys", "/dev", "/run/agentvm", "/workspace")
APT_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}(=[A-Za-z0-9.+:~-]{1,127})?")
NPM_NAME = re.compile(
    r"(@[a-z0-9][a-z0-9._-]{0,213}/)?[a-z0-9][a-z0-9._-]{0,213}(@[A-Za-z0-9.^~<>=*| +-]{1,128})?"
)
IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(:[a-z0-9][a-z0-9._-]{0,62})?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}|[0-9]{1,10}(:[0-9]{1,10})?")


class ImageSpecError(InvalidArgument):
    """A spec that cannot be built; the message names file, field and what is allowed."""


@dataclass(frozen=True)
class FileCopy:
    src: Path  # resolved, inside the spec's directory
    dest: str  # absolute, normalised
    mode: int | None = None


@dataclass(frozen=True)
class ImageSpec:
    path: Path
    name: str = ""
    base: str = BASES[0]
    disk_gib: int = DEFAULT_DISK_GIB
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    pip_venv: str = ""  # "" = the system interpreter
    npm: tuple[str, ...] = ()
    files: tuple[FileCopy, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    cmd: tuple[str, ...] = ()
    run: tuple[str, ...] = ()

    @property
    def base_image(self) -> str:
        """The named image this spec builds on (``base = "image:REF"``), or ""."""
        return self.base.removeprefix(IMAGE_BASE) if self.base.startswith(IMAGE_BASE) else ""


# The fields each table may hold.
TOP = (
    "name",
    "base",
    "disk_gib",
    "apt",
    "npm",
    "run",
    "workdir",
    "user",
    "cmd",
    "pip",
    "env",
    "files",
)
PIP = ("packages", "venv")
FILE = ("src", "dest", "mode")


def parse_file(path: Path) -> ImageSpec:
    """Read and check the spec at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ImageSpecError(f"{path}: no such spec file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageSpecError(f"{path}: cannot read the spec: {exc}") from exc
    return parse(text, path)


def parse(text: str, path: Path) -> ImageSpec:
    """Check spec ``text``; ``path`` is where it is (files are relative to its directory)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ImageSpecError(f"{path}: not valid TOML: {exc}") from exc
    p = _Parser(path)
    p.known(doc, TOP, "")
    pip = doc.get("pip", {})
    if not isinstance(pip, dict):
        raise p.wrong("[pip]", 'a table (packages = [...], venv = "/opt/venv")', pip)
    p.known(pip, PIP, "[pip].")
    name = p.string(doc, "name", "")
    if name and not IMAGE_NAME.fullmatch(name):
        raise p.bad("name", name, "lower-case letters, digits, '.', '_', '-', optional ':tag'")
    base = p.string(doc, "base", BASES[0])
    ref = base.removeprefix(IMAGE_BASE)
    if base not in BASES and not (
        base.startswith(IMAGE_BASE) and (IMAGE_NAME.fullmatch(ref) or IMAGE_ID.fullmatch(ref))
    ):
        allowed = f"{', '.join(BASES)}, or image:NAME[:TAG] / image:ID of `agent-vm image list`"
        raise p.bad("base", base, allowed)
    disk = doc.get("disk_gib", DEFAULT_DISK_GIB)
    if not isinstance(disk, int) or isinstance(disk, bool):
        raise p.wrong("disk_gib", "an integer (GiB)", disk)
    if not 1 <= disk <= MAX_DISK_GIB:
        raise p.bad("disk_gib", str(disk), f"1 to {MAX_DISK_GIB}")
    apt = p.strings(doc, "apt")
    if apt and base.startswith(IMAGE_BASE):
        raise ImageSpecError(
            f'{path}: apt needs base = "{BASES[0]}" (Debian packages are installed by '
            f'mmdebstrap into a fresh root); with base = "{base}" copy .deb files in with '
            "[[files]] and install them in run = [...] (dpkg -i), or build on Debian"
        )
    for i, pkg in enumerate(apt):
        if not APT_NAME.fullmatch(pkg):
            raise p.bad(f"apt[{i}]", pkg, "a Debian package name, optionally =VERSION")
    pip_pkgs = p.strings(pip, "packages", "[pip].")
    for i, req in enumerate(pip_pkgs):
        try:
            parsed = Requirement(req)
        except InvalidRequirement as exc:
            raise p.bad(f"[pip].packages[{i}]", req, f"a pip requirement ({exc})") from exc
        if parsed.url:
            raise p.bad(
                f"[pip].packages[{i}]",
                req,
                "a requirement from an index (copy a wheel with "
                "[[files]] and install it in run = [...] for a local one)",
            )
    venv = p.string(pip, "venv", "", "[pip].")
    if venv:
        venv = p.abspath("[pip].venv", venv)
    npm = p.strings(doc, "npm")
    for i, pkg in enumerate(npm):
        if not NPM_NAME.fullmatch(pkg):
            raise p.bad(f"npm[{i}]", pkg, "an npm package name, optionally @VERSION")
    env = doc.get("env", {})
    if not isinstance(env, dict):
        raise p.wrong("[env]", 'a table of NAME = "value"', env)
    for k, v in env.items():
        if not ENV_NAME.fullmatch(k):
            raise p.bad(f"[env].{k}", k, "a variable name (letters, digits, '_')")
        if not isinstance(v, str) or len(v) > MAX_STRING or "\0" in v:
            raise p.wrong(f"[env].{k}", "a string", v)
    workdir = p.string(doc, "workdir", "")
    if workdir:
        workdir = p.abspath("workdir", workdir)
    user = p.string(doc, "user", "")
    if user and not USER.fullmatch(user):
        raise p.bad("user", user, "a user name of the image, a uid, or uid:gid")
    return ImageSpec(
        path=path,
        name=name,
        base=base,
        disk_gib=disk,
        apt=apt,
        pip=pip_pkgs,
        pip_venv=venv,
        npm=npm,
        files=p.files(doc.get("files", [])),
        env=dict(env),
        workdir=workdir,
        user=user,
        cmd=p.strings(doc, "cmd"),
        run=p.strings(doc, "run"),
    )


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def known(self, table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise ImageSpecError(
                    f"{self.path}: unknown field {prefix}{key}; allowed: "
                    + ", ".join(prefix + a for a in allowed)
                )

    def wrong(self, where: str, expected: str, value: Any) -> ImageSpecError:
        return ImageSpecError(f"{self.path}: {where} must be {expected}, not {_type_name(value)}")

    def bad(self, where: str, value: str, allowed: str) -> ImageSpecError:
        return ImageSpecError(f"{self.path}: {where} = {value[:200]!r}: expected {allowed}")

    def string(self, table: dict[str, Any], key: str, default: str, prefix: str = "") -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.wrong(prefix + key, "a string", value)
        if len(value) > MAX_STRING or "\0" in value:
            raise self.bad(prefix + key, value, f"a string of at most {MAX_STRING} characters")
        return value

    def strings(self, table: dict[str, Any], key: str, prefix: str = "") -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list):
            raise self.wrong(prefix + key, "a list of strings", value)
        if len(value) > MAX_ITEMS:
            raise self.bad(prefix + key, f"{len(value)} items", f"at most {MAX_ITEMS}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.wrong(f"{prefix}{key}[{i}]", "a string", item)
            if len(item) > MAX_STRING or "\0" in item:
                raise self.bad(f"{prefix}{key}[{i}]", item, f"at most {MAX_STRING} characters")
        return tuple(value)

    def abspath(self, where: str, value: str) -> str:
        if not value.startswith("/"):
            raise self.bad(where, value, "an absolute path in the image")
        norm = posixpath.normpath(value)
        if ".." in value.split("/"):
            raise self.bad(where, value, "a path without '..'")
        return "/" + norm.lstrip("/")

    def files(self, raw: Any) -> tuple[FileCopy, ...]:
        if not isinstance(raw, list):
            raise self.wrong("[[files]]", "an array of tables (src, dest, mode)", raw)
        if len(raw) > MAX_ITEMS:
            raise self.bad("[[files]]", f"{len(raw)} entries", f"at most {MAX_ITEMS}")
        root = self.path.parent.resolve()
        out = []
        for i, entry in enumerate(raw):
            where = f"files[{i}]"
            if not isinstance(entry, dict):
                raise self.wrong(where, "a table (src, dest, mode)", entry)
            self.known(entry, FILE, f"{where}.")
            if "src" not in entry or "dest" not in entry:
                raise ImageSpecError(f"{self.path}: {where} needs both src and dest")
            src_text = self.string(entry, "src", "", f"{where}.")
            src = (root / src_text).resolve()
            if src_text.startswith("/") or not src.is_relative_to(root):
                raise self.bad(
                    f"{where}.src", src_text, f"a path inside the spec's directory {root}"
                )
            if not src.exists():
                raise self.bad(f"{where}.src", src_text, f"an existing file or directory in {root}")
            dest = self.abspath(f"{where}.dest", self.string(entry, "dest", "", f"{where}."))
            if dest == "/" or any(dest == d or dest.startswith(d + "/") for d in RESERVED_DIRS):
                raise self.bad(
                    f"{where}.dest", dest, "a path outside " + ", ".join(RESERVED_DIRS) + " and /"
                )
            mode = entry.get("mode")
            if mode is not None:
                if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
                    raise self.wrong(f"{where}.mode", 'an octal string such as "0644"', mode)
                mode = int(mode, 8)
            out.append(FileCopy(src, dest, mode))
        return tuple(out)


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for t, n in names.items():
        if type(value) is t:
            return f"{n} ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
