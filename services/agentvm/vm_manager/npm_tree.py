"""A ``node_modules`` tree that ``npm install --install-strategy=shallow`` made on the host.

The layout is the one ``npm install -g`` gives ``/usr/local/lib/node_modules``:
each requested package at the top, its dependencies nested under it. This
module says what the tree holds (from npm's hidden lockfile and the top-level
packages' ``package.json``) and writes it as one tar owned by root, for the
build VM to unpack (spec_fetch.npm_step). Package metadata comes from the
registry, so it is checked: a bin name is one path component and its target
stays inside its package.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCKFILE = ".package-lock.json"
BIN_NAME = re.compile(r"[A-Za-z0-9@_+][A-Za-z0-9@._+-]{0,213}")


class TreeError(Exception):
    """The tree is not what npm should have made."""


@dataclass(frozen=True)
class Tree:
    packages: list[str]  # name@version of every package, sorted
    top: list[str]  # the top-level package names
    bins: list[list[str]]  # [bin name, target relative to node_modules]
    scripts: list[str]  # tree paths of packages with install scripts (not run)


def read(node_modules: Path) -> Tree:
    """Describe the tree at ``node_modules``."""
    try:
        lock = json.loads((node_modules / LOCKFILE).read_text())
    except (OSError, ValueError) as exc:
        raise TreeError(f"npm left no readable {LOCKFILE}: {exc}") from exc
    entries: dict[str, Any] = lock.get("packages", {})
    packages, scripts = set(), []
    for key, entry in sorted(entries.items()):
        rel = key.removeprefix("node_modules/")
        if not key.startswith("node_modules/") or not (node_modules / rel).is_dir():
            continue
        name = key.rsplit("node_modules/", 1)[1]
        packages.add(f"{name}@{entry.get('version', '')}")
        if entry.get("hasInstallScript"):
            scripts.append(rel)
    top = _top(node_modules)
    bins: dict[str, str] = {}
    for pkg in top:
        for name, target in _bins(node_modules, pkg).items():
            if name in bins:
                raise TreeError(
                    f"packages {bins[name].split('/')[0]} and {pkg} both provide {name}"
                )
            bins[name] = target
    return Tree(sorted(packages), top, [[n, t] for n, t in sorted(bins.items())], scripts)


def write_tar(node_modules: Path | None, out: Path) -> None:
    """Write the tree's top-level packages (no ``.bin``, no lockfile) to ``out``; None: empty."""

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        if node_modules is None:
            return
        for entry in sorted(node_modules.iterdir()):
            if not entry.name.startswith("."):
                tar.add(entry, arcname=entry.name, filter=as_root)


def _top(node_modules: Path) -> list[str]:
    top = []
    for entry in sorted(node_modules.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name.startswith("@"):
            top += [f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir())]
        else:
            top.append(entry.name)
    return top


def _bins(node_modules: Path, pkg: str) -> dict[str, str]:
    try:
        manifest = json.loads((node_modules / pkg / "package.json").read_text())
    except (OSError, ValueError) as exc:
        raise TreeError(f"{pkg}: no readable package.json: {exc}") from exc
    raw = manifest.get("bin") if isinstance(manifest, dict) else None
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = {pkg.rsplit("/", 1)[-1]: raw}
    if not isinstance(raw, dict):
        raise TreeError(f"{pkg}: package.json bin is neither a path nor a table")
    bins = {}
    for name, target in raw.items():
        if not isinstance(target, str) or not BIN_NAME.fullmatch(name):
            raise TreeError(f"{pkg}: bin {name!r} is not a command name with a path")
        rel = posixpath.normpath(posixpath.join(pkg, target))
        if not rel.startswith(pkg + "/") or target.startswith("/"):
            raise TreeError(f"{pkg}: bin {name} points outside the package ({target!r})")
        bins[name] = rel
    return bins
