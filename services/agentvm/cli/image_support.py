"""What `agent-vm image` needs besides the RPCs: a spec and its files as one request,
import references made absolute, progress shown with rich, images described.

vm-manager never reads a caller's paths for a build (it runs as root): the CLI
parses the spec here (a bad one fails before any call, naming file and
field), reads the files its ``[[files]]`` entries name from the spec's
directory and sends them with it. Imports name an archive on vm-manager's
host, so a relative path is made absolute here, where the user's cwd is.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentvm.cli.base import human_bytes
from agentvm.cli.group import fail
from agentvm.common import image_spec
from agentvm.common.grpc_util import MAX_MESSAGE_BYTES
from agentvm.v1 import vm_manager_pb2

# The transports `image import` takes (skopeo's names), and what follows each.
TRANSPORTS = {
    "oci-archive": "PATH",
    "docker-archive": "PATH",
    "oci": "DIR[:TAG]",
}
KINDS: dict[int, str] = {
    vm_manager_pb2.IMAGE_KIND_BUILTIN: "builtin",
    vm_manager_pb2.IMAGE_KIND_SPEC: "spec",
    vm_manager_pb2.IMAGE_KIND_OCI: "oci",
}
# What a build request may carry besides the files (the TOML, names, framing).
REQUEST_MARGIN = 64 * 1024


def check_name(option: str, name: str) -> str:
    """An image name as vm-manager takes it (``coder``, ``coder:2``); exit 2 if not."""
    if not image_spec.IMAGE_NAME.fullmatch(name):
        fail(
            f"{option} {name!r}: an image name is lower-case letters, digits, '.', '_', '-' "
            "(at most 63, starting with a letter or digit), optionally ':TAG' (the same)"
        )
    return name


def absolute_ref(ref: str, cwd: Path | None = None) -> str:
    """``oci-archive:app.tar`` -> ``oci-archive:/home/me/app.tar``: vm-manager reads the
    archive in its own working directory, so a relative path means the caller's here.

    As vm-manager reads it: an archive's PATH is all that follows the transport;
    ``oci:DIR:TAG`` ends DIR at the last ':' (when what follows has no '/'),
    and the TAG is kept as written."""
    transport, sep, rest = ref.partition(":")
    if not sep or transport not in TRANSPORTS:
        fail(
            f"image import {ref!r}: write TRANSPORT:PATH, one of "
            + ", ".join(f"{t}:{what}" for t, what in TRANSPORTS.items())
            + " (e.g. docker-archive:app.tar from `docker save -o app.tar app`)"
        )
    path, colon, suffix = rest, "", ""
    if transport == "oci":
        head, sep, last = rest.rpartition(":")
        if sep and head and "/" not in last:
            path, colon, suffix = head, sep, last
    if not path:
        fail(f"image import {ref!r}: no path after {transport}:")
    full = os.path.normpath(os.path.join(cwd or Path.cwd(), os.path.expanduser(path)))
    return f"{transport}:{full}{colon}{suffix}"


# -- a spec and its files -------------------------------------------------------------
def spec_source(path: Path) -> vm_manager_pb2.ImageSpecSource:
    """The spec at ``path`` checked, with the files it copies in (read from its directory).

    ImageSpecError (exit 2 through handle_errors) for a bad spec; exit 2 naming
    the entry and the file for a symbolic link or a file that is not regular
    under a ``src``, or files too large for one request.
    """
    # Parsed first: each src exists and is inside the spec's directory.
    image_spec.parse_file(path)
    text = path.read_text(encoding="utf-8")
    raw = tomllib.loads(text).get("files", [])
    root = path.parent.resolve()
    found: list[tuple[str, Path, int]] = []
    total = len(text.encode())
    for i, entry in enumerate(raw):
        where = f"{path}: files[{i}].src = {entry['src']!r}"
        for key, local, size in _files_of(root, str(entry["src"]), where):
            total += size
            if total > MAX_MESSAGE_BYTES - REQUEST_MARGIN:
                fail(
                    f"{where}: the spec's files come to more than "
                    f"{human_bytes(MAX_MESSAGE_BYTES - REQUEST_MARGIN)} (at {local}), more "
                    "than one build request carries: fetch large files in run = [...] "
                    "steps, or install packages with apt, pip or npm"
                )
            found.append((key, local, size))
    files = []
    for key, local, _ in found:
        try:
            content = local.read_bytes()
            mode = local.stat().st_mode & 0o7777
        except OSError as exc:
            fail(f"{path}: cannot read {local}: {exc.strerror or exc}")
        files.append(vm_manager_pb2.SpecFile(path=key, content=content, mode=mode))
    return vm_manager_pb2.ImageSpecSource(toml=text, filename=str(path), files=files)


def _files_of(root: Path, src: str, where: str) -> Iterator[tuple[str, Path, int]]:
    """(key as sent, local path, size) of each regular file under ``src``; exit 2
    naming the first symbolic link or special file on the way."""
    parts = [p for p in src.split("/") if p not in ("", ".")]
    local = root
    for part in parts:
        local = local / part
        if local.is_symlink():
            fail(
                f"{where}: {local} is a symbolic link: copy the file it points to into "
                "the spec's directory (links are not followed)"
            )
    key = posixpath.normpath(src)
    info = _lstat(local, where)
    if stat.S_ISREG(info.st_mode):
        yield key, local, info.st_size
        return
    if not stat.S_ISDIR(info.st_mode):
        fail(f"{where}: {local} is {_kind(info.st_mode)}, not a regular file or a directory")
    for dirpath, dirnames, filenames in os.walk(local, onerror=_walk_error(where)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            entry = Path(dirpath) / name
            info = _lstat(entry, where)
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                fail(
                    f"{where}: {entry} is {_kind(info.st_mode)}: a directory copied in may "
                    "hold only regular files and directories"
                )
            rel = entry.relative_to(local).as_posix()
            yield (rel if key == "." else f"{key}/{rel}"), entry, info.st_size


def _lstat(path: Path, where: str) -> os.stat_result:
    try:
        return path.lstat()
    except OSError as exc:
        fail(f"{where}: cannot read {path}: {exc.strerror or exc}")


def _walk_error(where: str) -> Any:
    def raise_it(exc: OSError) -> None:
        fail(f"{where}: cannot read {exc.filename}: {exc.strerror or exc}")

    return raise_it


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "not a regular file"


# -- progress ---------------------------------------------------------------------------
class ProgressView:
    """ImageProgress events as rich progress bars (one per phase) on a terminal; a
    line per new phase otherwise. Log lines go to stdout, above the bars."""

    def __init__(self) -> None:
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        # The bars share stdout's terminal when there is one, so that log lines
        # printed through the same console land above them; stderr otherwise.
        out = sys.stdout if sys.stdout.isatty() else sys.stderr
        self.console = Console(file=out, highlight=False)
        self.live = self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[amount]}"),
            TimeElapsedColumn(),
            console=self.console,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.seen: set[str] = set()

    def __enter__(self) -> ProgressView:
        if self.live:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.progress.stop()

    def update(self, p: vm_manager_pb2.ImageProgress) -> None:
        phase = p.phase or "working"
        label = f"{phase} (cached)" if p.cached else phase
        amount = f"{p.done}/{p.total}" if p.total and p.total < 10_000 else ""
        if p.total >= 10_000:
            amount = f"{human_bytes(p.done)} of {human_bytes(p.total)}"
        if not self.live:
            if phase not in self.seen:
                self.seen.add(phase)
                self.console.print(f"agent-vm: {label}", markup=False)
            return
        task = self.tasks.get(phase)
        if task is None:
            self.finish()  # phases come one after another: a new one ends the others
            task = self.progress.add_task(label, total=p.total or None, amount=amount)
            self.tasks[phase] = task
        self.progress.update(
            task, description=label, completed=p.done, total=p.total or None, amount=amount
        )
        if p.total and p.done >= p.total:
            self.progress.update(task, completed=p.total)

    def finish(self) -> None:
        """Every bar so far at its end (its phase is over)."""
        for task in self.progress.tasks:
            total = task.total or 1
            self.progress.update(task.id, total=total, completed=total, amount="")

    def log(self, line: str) -> None:
        """A build step's output line, on stdout."""
        import click

        if self.live and self.console.file is not None and self.console.file.isatty():
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line)


# -- describing images ---------------------------------------------------------------
def short_id(image_id: str) -> str:
    """The 12 hex digits `image list` shows (a "sha256:" prefix dropped)."""
    return image_id.removeprefix("sha256:")[:12]


def kind_word(kind: int) -> str:
    return KINDS.get(kind, "-" if kind == vm_manager_pb2.IMAGE_KIND_UNSPECIFIED else str(kind))


def created(image: vm_manager_pb2.Image) -> str:
    if not image.HasField("built_at"):
        return "-"
    return image.built_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def describe(image: vm_manager_pb2.Image, stale: bool = False) -> list[str]:
    """`image inspect` without --json: every field that is set, config and users included."""
    rows: list[tuple[str, str]] = [
        ("id", image.id),
        ("names", ", ".join(image.names) or "(none: reachable by id)"),
        ("kind", kind_word(image.kind)),
    ]
    if image.base:
        rows.append(("base", image.base))
    if image.digest:
        rows.append(("digest", image.digest))
    rows.append(("created", created(image)))
    if image.distribution:
        rows.append(("distribution", image.distribution))
    if image.kernel_release:
        rows.append(("kernel", image.kernel_release))
    if image.agent_version:
        rows.append(("agent version", image.agent_version))
    sizes = [f"disk file {human_bytes(image.size_bytes)}"]
    if image.content_bytes:
        sizes.append(f"content {human_bytes(image.content_bytes)}")
    if image.disk_bytes:
        sizes.append(f"root file system cap {human_bytes(image.disk_bytes)}")
    rows.append(("size", ", ".join(sizes)))
    if image.path:
        rows.append(("path", image.path))
    if stale:
        rows.append(("stale", "yes: built from other inputs than this version's"))
    rows.append(("used by", ", ".join(image.used_by) or "(nothing)"))
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    c = image.config
    if image.HasField("config"):
        lines.append("config:")
        lines.append(f"  workdir:    {c.workdir or '(none: /)'}")
        lines.append(f"  user:       {c.user or '(none: root)'}")
        if c.entrypoint:
            lines.append(f"  entrypoint: {list(c.entrypoint)}")
        if c.cmd:
            lines.append(f"  cmd:        {list(c.cmd)}")
        for key in sorted(c.env):
            lines.append(f"  env:        {key}={c.env[key]}")
        for key in sorted(c.labels):
            lines.append(f"  label:      {key}={c.labels[key]}")
    if image.packages:
        lines.append(f"packages ({len(image.packages)}):")
        lines.extend(f"  {pkg}" for pkg in image.packages)
    return lines
