"""Cached build steps: ``CACHE/build/<key>/``, complete or absent.

A step's key is the sha256 of the previous step's key and the step's own
inputs (:func:`step_key`). :func:`run_step` builds into ``<key>.tmp-*`` next
to it, writes the step's ``result.json`` and then the ``done`` marker, and
renames the directory into place: a directory named by a key with ``done``
in it is a finished step, whatever was interrupted before. A failed build
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentvm.common.errors import FailedPrecondition, Unavailable
from agentvm.vm_manager.image_store import allocated_bytes
from agentvm.vm_manager.workspace import remove_tree

# Bumped when a step's result changes for the same inputs.
CACHE_VERSION = "1"
DONE = "done"
RESULT = "result.json"

Log = Callable[[str], None]
Build = Callable[[Path], dict[str, Any]]


def step_key(*parts: object) -> str:
    """The key of a step: ``parts`` are the previous key and the inputs (JSON-able)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()


def step_dir(cache_dir: Path, key: str) -> Path:
    return cache_dir / "build" / key


def run_step(
    cache_dir: Path, key: str, name: str, log: Log, build: Build
) -> tuple[Path, dict[str, Any], bool]:
    """``(directory, result, cached)`` of step ``key``: reused when done, else ``build`` runs.

    ``build(dir)`` fills the scratch directory ``dir`` and returns the step's
    result (JSON-able), which a later cache hit returns as it was.
    """
    final = step_dir(cache_dir, key)
    if (final / DONE).exists():
        log(f"{name}: cached ({key[:12]})")
        return final, json.loads((final / RESULT).read_text()), True
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{key}.tmp-"))
    try:
        result = build(tmp)
        (tmp / RESULT).write_text(json.dumps(result, indent=1) + "\n")
        (tmp / DONE).write_text("")
        os.chmod(tmp, 0o755)
        if final.exists() and not (final / DONE).exists():
            remove_tree(final)  # not one of ours: they are renamed into place finished
        try:
            tmp.rename(final)
        except OSError:
            if not (final / DONE).exists():
                raise
            log(f"{name}: another build finished the same step first; using it")
            return final, json.loads((final / RESULT).read_text()), True
    finally:
        if tmp.exists():
            remove_tree(tmp)
    log(f"{name}: done ({key[:12]})")
    return final, result, False


class CacheUse:
    """Builds share the build cache; pruning it needs it to itself.

    One per vm-manager, used from its event loop only: the checks and the
    counters change between awaits, so no lock is needed.
    """

    def __init__(self) -> None:
        self.builds = 0
        self.pruning = False

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        if self.pruning:
            raise Unavailable("the build cache is being pruned: build again in a moment")
        self.builds += 1
        try:
            yield
        finally:
            self.builds -= 1

    @contextlib.contextmanager
    def exclusive(self, everything: bool) -> Iterator[bool]:
        """Held while pruning; yields whether pruning may go ahead. With builds
        running, emptying the cache is refused and scratch cleanup is skipped
        (their scratch is not stale)."""
        if self.builds:
            if everything:
                raise FailedPrecondition(
                    f"{self.builds} image build(s) running: prune the build cache when "
                    "they have ended"
                )
            yield False
            return
        self.pruning = True
        try:
            yield True
        finally:
            self.pruning = False


@dataclass(frozen=True)
class Pruned:
    entries: int = 0
    freed_bytes: int = 0


def prune(build_dir: Path, everything: bool) -> Pruned:
    """Remove what interrupted builds left in ``build_dir`` (``*.tmp-*`` and
    ``spec-*`` scratch, unfinished key directories) and, with ``everything``,
    every finished step too. Call only with no build running
    (:meth:`CacheUse.exclusive`)."""
    if not build_dir.is_dir():
        return Pruned()
    entries = freed = 0
    for path in sorted(build_dir.iterdir()):
        finished = (
            path.is_dir()
            and not path.is_symlink()
            and ".tmp-" not in path.name
            and not path.name.startswith("spec-")
            and (path / DONE).exists()
        )
        if finished and not everything:
            continue
        freed += allocated_bytes(path)
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
        entries += 1
    return Pruned(entries, freed)
