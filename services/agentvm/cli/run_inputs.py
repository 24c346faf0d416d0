"""What `agent-vm run` sends: input files, environment, stdin; nothing of it dropped unsaid.

Two inputs that would land at the same place under /workspace/input are an
error naming both (one of them would silently be lost); what an input
directory holds that is not a regular file (symlinks, FIFOs) is named on
stderr; stdin is sent when it is not a terminal, up to what a run carries.
"""

from __future__ import annotations

import os
import re
import select
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import click

from agentvm.cli.group import fail

# Inputs and stdin travel in the run's one request (16 MiB message cap).
MAX_INLINE_INPUT = 15 * 1024 * 1024
# How long stdin may stay silent before a line says the run is waiting for it.
STDIN_QUIET_S = 2.0
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _walk(root: Path) -> Iterable[tuple[str, Path]]:
    """(path relative to root, file) of the regular files under ``root``; the rest named."""

    def unreadable(exc: OSError) -> None:
        fail(f"--input {root}: cannot read {exc.filename}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):  # no symlinks
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames + [d for d in dirnames if (here / d).is_symlink()]):
            f = here / name
            mode = f.lstat().st_mode
            if stat.S_ISREG(mode):
                yield f.relative_to(root).as_posix(), f
            else:
                click.echo(
                    f"agent-vm: --input {root}: {f} is {_kind(mode)}, not sent "
                    "(inputs carry regular files only)",
                    err=True,
                )


class Inputs:
    """input/-relative name -> local file; refuses two files for one place."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        # Every directory the files above need: name -> a file under it (for the message).
        self.dirs: dict[str, str] = {}

    def add(self, name: str, local: Path) -> None:
        clash = None
        if name in self.files:
            if self.files[name].resolve() == local.resolve():
                return  # the same file named twice: nothing is lost
            clash = name
        elif name in self.dirs:
            clash = self.dirs[name]  # a file where another input needs a directory
        else:
            parts = name.split("/")
            clash = next(
                (
                    "/".join(parts[:i])
                    for i in range(1, len(parts))
                    if "/".join(parts[:i]) in self.files
                ),
                None,
            )
        if clash is not None:
            there = self.files[clash]
            where = min(clash, name, key=len)
            fail(
                f"--input {there} and {local} would both be /workspace/input/{where}: "
                "rename one, or give their directories as --input (a directory lands "
                "as input/DIRNAME/)"
            )
        self.files[name] = local
        parts = name.split("/")
        for i in range(1, len(parts)):
            self.dirs.setdefault("/".join(parts[:i]), name)

    def add_paths(self, paths: Iterable[str]) -> None:
        for raw in paths:
            p = Path(raw)
            if p.is_dir():
                for rel, f in _walk(p):
                    self.add(f"{p.name or p.resolve().name}/{rel}", f)
            elif p.is_file():
                self.add(p.name, p)
            else:
                fail(f"--input {raw}: no such file or directory")

    def total(self) -> int:
        return sum(f.stat().st_size for f in self.files.values())

    def check_size(self) -> int:
        """The bytes they total; exit 2 past what a run carries."""
        total = self.total()
        if total > MAX_INLINE_INPUT:
            fail(
                f"--input files total {total} bytes, more than a run carries "
                f"({MAX_INLINE_INPUT}): use the Python client (Sandbox.files.upload) for "
                "large inputs"
            )
        return total


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` pairs as a dict; exit 2 on a bad shape or a name given twice."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not ENV_NAME.match(name):
            fail(
                f"--env {pair!r}: use NAME=VALUE, NAME of letters, digits and _ not "
                "starting with a digit (e.g. --env DEBUG=1)"
            )
        if name in env:
            fail(f"--env {name} given twice ({name}={env[name]}, {pair}): give each name once")
        env[name] = value
    return env


def check_cwd(cwd: str | None) -> str:
    if cwd is None:
        return ""
    if not cwd.startswith("/"):
        fail(
            f"--cwd {cwd}: give an absolute directory in the VM (e.g. /workspace/input; "
            "the default is /workspace/work)"
        )
    return cwd


def read_stdin(stream: BinaryIO, budget: int) -> bytes:
    """This process's stdin, unless it is a terminal; exit 2 past ``budget`` bytes.

    A pipe that stays open without data (a parent that never closes it) is
    waited for, but not in silence: after STDIN_QUIET_S a line on stderr says
    what is awaited and how not to.
    """
    if stream.isatty():
        return b""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a real file (tests' in-memory stdin)
        return _within(stream.read(budget + 1), budget)
    data = bytearray()
    told = False
    while True:
        if not told and not select.select([fd], [], [], STDIN_QUIET_S)[0]:
            click.echo(
                "agent-vm: waiting for stdin to end (it is not a terminal, so it is passed "
                "to the program); give --no-stdin if the program does not read it",
                err=True,
            )
            told = True
            continue
        chunk = os.read(fd, min(1 << 20, budget + 1 - len(data)))
        if not chunk:
            return bytes(data)
        data += chunk
        _within(data, budget)


def _within(data: bytes | bytearray, budget: int) -> bytes:
    if len(data) > budget:
        fail(
            f"stdin carries more than {budget} bytes, more than a run has room for beside "
            f"its --input files ({MAX_INLINE_INPUT} bytes in all): write it to a file and "
            "pass it with --input, or give --no-stdin if the program does not read stdin"
        )
    return bytes(data)
