"""The host's half of a spec build (docs/IMAGES.md): everything that needs the network.

Three steps, in this order, each fetched by the package manager's own client
on the host so that the build VM, which installs their results, needs no
network:

``root_step``
    ``mmdebstrap`` of the spec's ``apt`` list (plus what the later steps need
    in the image: see :func:`root_packages`) into a directory, turned into an
    ext4 file system of ``disk_gib`` without mounting anything
    (``mkfs.ext4 -d``), then into an uncompressed qcow2 the later steps put
    overlays on. :class:`RootResult`.
``pip_step``
    ``pip download`` of ``[pip] packages`` for bookworm's CPython 3.11 on
    x86_64 (wheels only: nothing is built on the host), plus a wheel of pip
    itself, so the build VM needs neither the network nor python3-pip.
    :class:`PipResult`.
``npm_step``
    ``npm install --install-strategy=shallow --ignore-scripts`` into a
    scratch prefix: the full dependency tree (``npm pack`` would fetch each
    package without its dependencies, and an offline ``npm install -g
    ./x.tgz`` then fails), laid out as ``npm install -g`` lays out
    ``/usr/local/lib/node_modules``, without running any package's scripts
    on the host. The tree is stored as one tar the build VM unpacks there;
    the bin links and the packages whose install scripts were skipped come
    with it. :class:`NpmResult`.

Caching (build_cache.py): a step's key is the sha256 of the previous step's
key and the step's own inputs (the keys are pure functions of the spec:
:func:`root_key`, :func:`pip_key`, :func:`npm_key`), and its result lives in
``CACHE/build/<key>/``, built in ``<key>.tmp-*`` and renamed into place with
its ``done`` marker written last. A step whose ``done`` exists is returned as
it is (``cached=True``) without running anything. An unknown package or
version is a :class:`PackageNotFound`, a root over ``disk_gib`` a
:class:`DiskCapExceeded` (both INVALID_ARGUMENT, fetch_errors.py); anything
else a tool reports is FAILED_PRECONDITION with the end of its output.

The chain is the build VM's: its layers stack in this order, so a changed
pip list also gives the npm step a new key (the npm fetch is repeated; it
takes seconds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.common.image_spec import ImageSpec
from agentvm.vm_manager import npm_tree
from agentvm.vm_manager.build_cache import Build, run_step, step_key
from agentvm.vm_manager.fetch_errors import (
    DiskCapExceeded,
    PackageNotFound,
    apt_error,
    failed,
    npm_error,
    pip_error,
    run,
)
from agentvm.vm_manager.image import (
    MMDEBSTRAP_OPTIONS,
    installed_packages,
    mmdebstrap_command,
)
from agentvm.vm_manager.workspace import remove_tree

__all__ = [
    "DiskCapExceeded",
    "NpmResult",
    "PackageNotFound",
    "PipResult",
    "RootResult",
    "StepResult",
    "npm_step",
    "pip_step",
    "root_step",
]

Log = Callable[[str], None]

# What every image root holds besides the spec's list: the CA bundle (TLS).
IMAGE_ROOT_PACKAGES = ("ca-certificates",)
LABEL = "agentvm-image"
BLOCK_SIZE = 4096
# bookworm's python3, for which the wheels are chosen whatever the host's is.
PYTHON_VERSION = "3.11"
PIP_TARGET = (
    "--python-version",
    PYTHON_VERSION,
    "--only-binary=:all:",
    *(
        f"--platform={p}"
        for p in (
            "manylinux2014_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux_2_28_x86_64",
            "linux_x86_64",
        )
    ),
    "--implementation=cp",
    *(f"--abi={a}" for a in ("cp311", "abi3", "none")),
)
NPM_OPTIONS = (
    "--install-strategy=shallow",
    "--ignore-scripts",
    "--no-audit",
    "--no-fund",
    "--no-save",
    "--no-update-notifier",
)


@dataclass(frozen=True)
class StepResult:
    """One finished step: ``path`` is ``CACHE/build/<key>/``."""

    key: str
    path: Path
    cached: bool
    packages: tuple[str, ...]  # what the step put in (for the image's manifest)


@dataclass(frozen=True)
class RootResult(StepResult):
    """``packages``: ``name=version`` of every Debian package in the image."""

    size_mib: int  # the ext4's size

    @property
    def disk(self) -> Path:
        """The ext4 root as an uncompressed qcow2 (base of the next layers)."""
        return self.path / "root.qcow2"


@dataclass(frozen=True)
class PipResult(StepResult):
    """``packages``: ``name==version`` of every wheel (dependencies included).

    In the build VM: ``PY <pip_wheel>/pip install --no-index --find-links
    <wheels> -r <requirements>`` where PY is ``<venv>/bin/python`` after
    ``python3 -m venv <venv>`` when ``venv`` is set, else ``python3`` with
    ``--break-system-packages``. Empty ``packages``: nothing to install.
    """

    python_version: str
    venv: str

    @property
    def wheels(self) -> Path:
        return self.path / "wheels"

    @property
    def requirements(self) -> Path:
        """The exact pins of every wheel in ``wheels``."""
        return self.path / "requirements.txt"

    @property
    def pip_wheel(self) -> Path | None:
        """pip's own wheel (runnable as ``python3 WHEEL/pip``), None when nothing is fetched."""
        found = sorted((self.path / "pip").glob("pip-*.whl"))
        return found[0] if found else None


@dataclass(frozen=True)
class NpmResult(StepResult):
    """``packages``: ``name@version`` of every package of the tree.

    In the build VM: unpack ``tarball`` into ``/usr/local/lib/node_modules``
    (its top-level entries are the packages, as ``npm install -g`` puts
    them), then for each ``(name, target)`` of ``bins``: ``chmod +x`` the
    target and link ``/usr/local/bin/NAME -> ../lib/node_modules/TARGET``.
    ``scripts`` are the tree paths of packages whose install scripts were
    not run (``npm rebuild`` in the VM, or a warning). Empty ``packages``:
    nothing to install.
    """

    top: tuple[str, ...]  # the top-level packages (what the spec asked for)
    bins: tuple[tuple[str, str], ...]
    scripts: tuple[str, ...]

    @property
    def tarball(self) -> Path:
        return self.path / "node_modules.tar"


def root_packages(spec: ImageSpec) -> tuple[str, ...]:
    """The apt list of the image root: the spec's, plus what the later steps need.

    ca-certificates always; python3 when ``[pip] packages`` is set (pip runs
    from its own wheel, no python3-pip needed), python3-venv with ``venv``,
    nodejs with ``npm``. A package the spec already names (any version) is
    not added again.
    """
    wanted = list(IMAGE_ROOT_PACKAGES)
    if spec.pip:
        wanted.append("python3")
    if spec.pip_venv:
        wanted.append("python3-venv")
    if spec.npm:
        wanted.append("nodejs")
    named = {p.partition("=")[0] for p in spec.apt}
    return tuple(sorted({*spec.apt, *(p for p in wanted if p not in named)}))


def root_key(spec: ImageSpec, size_mib: int | None = None) -> str:
    size = size_mib or spec.disk_gib * 1024
    return step_key(
        "root", spec.base, root_packages(spec), MMDEBSTRAP_OPTIONS, LABEL, BLOCK_SIZE, size
    )


def pip_key(spec: ImageSpec, size_mib: int | None = None) -> str:
    return step_key(
        root_key(spec, size_mib),
        "pip",
        sorted(spec.pip),
        spec.pip_venv,
        PIP_TARGET,
        _pip_version() if spec.pip else "",
    )


def npm_key(spec: ImageSpec, size_mib: int | None = None) -> str:
    return step_key(pip_key(spec, size_mib), "npm", sorted(spec.npm), NPM_OPTIONS)


def root_step(
    spec: ImageSpec, cache_dir: Path, log: Log, *, size_mib: int | None = None
) -> RootResult:
    """The Debian root of ``spec`` as ``root.qcow2``; ``size_mib`` overrides disk_gib (tests)."""
    size = size_mib or spec.disk_gib * 1024
    include = root_packages(spec)

    def build(out: Path) -> dict[str, Any]:
        for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img", "dpkg-query", "du"):
            if shutil.which(tool) is None:
                raise FailedPrecondition(f"{tool} is not installed on the host: run setup.sh")
        rootfs = out / "rootfs"
        raw = out / "root.raw"
        try:
            log(f"root: mmdebstrap {spec.base} with {len(include)} packages")
            proc = run(mmdebstrap_command(include, rootfs, "directory"), log)
            if proc.returncode != 0:
                raise apt_error(spec, proc)
            packages = installed_packages(rootfs)
            log(f"root: ext4 of {size} MiB")
            proc = run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-d",
                    str(rootfs),
                    "-E",
                    "root_owner=0:0",
                    "-L",
                    LABEL,
                    "-b",
                    str(BLOCK_SIZE),
                    str(raw),
                    f"{size}M",
                ],
                log,
            )
            if proc.returncode != 0:
                if re.search(r"Could not allocate|No space left", proc.stdout):
                    raise DiskCapExceeded(spec, size, _du_mib(rootfs))
                raise failed("mkfs.ext4", proc)
        finally:
            remove_tree(rootfs)
        proc = run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "root.qcow2")],
            log,
        )
        raw.unlink()
        if proc.returncode != 0:
            raise failed("qemu-img convert", proc)
        return {"packages": packages, "size_mib": size}

    return _result(RootResult, cache_dir, root_key(spec, size_mib), "root", log, build)


def pip_step(
    spec: ImageSpec, cache_dir: Path, log: Log, *, size_mib: int | None = None
) -> PipResult:
    """Wheels of ``[pip] packages`` (and their dependencies) for the image's python3.

    ``size_mib``: the one given to root_step (the keys chain root -> pip -> npm).
    """

    def build(out: Path) -> dict[str, Any]:
        (out / "wheels").mkdir()
        (out / "pip").mkdir()
        pins: list[str] = []
        if spec.pip:
            version = _pip_version()
            log(f"pip: downloading {len(spec.pip)} requirement(s) for CPython {PYTHON_VERSION}")
            proc = run(_pip_download(out / "wheels", list(spec.pip)), log)
            if proc.returncode != 0:
                raise pip_error(spec, proc, PYTHON_VERSION)
            proc = run(_pip_download(out / "pip", [f"pip=={version}", "--no-deps"]), log)
            if proc.returncode != 0:
                raise failed("pip download pip", proc)
            pins = sorted(_wheel_pin(w) for w in (out / "wheels").iterdir())
        (out / "requirements.txt").write_text("".join(p + "\n" for p in pins))
        return {"packages": pins, "python_version": PYTHON_VERSION, "venv": spec.pip_venv}

    return _result(PipResult, cache_dir, pip_key(spec, size_mib), "pip", log, build)


def npm_step(
    spec: ImageSpec, cache_dir: Path, log: Log, *, size_mib: int | None = None
) -> NpmResult:
    """The npm packages of ``spec`` and their dependency tree (``size_mib``: see pip_step)."""

    def build(out: Path) -> dict[str, Any]:
        if not spec.npm:
            npm_tree.write_tar(None, out / "node_modules.tar")
            return {"packages": [], "top": [], "bins": [], "scripts": []}
        npm = shutil.which("npm")
        if npm is None:
            raise FailedPrecondition("npm is not installed on the host: run setup.sh")
        prefix = out / "tree"
        prefix.mkdir()
        log(f"npm: fetching {len(spec.npm)} package(s) and their dependencies (no scripts run)")
        env = {**os.environ, "NO_UPDATE_NOTIFIER": "1"}
        proc = run([npm, "install", *NPM_OPTIONS, "--prefix", str(prefix), *spec.npm], log, env=env)
        if proc.returncode != 0:
            raise npm_error(spec, proc)
        try:
            tree = npm_tree.read(prefix / "node_modules")
            npm_tree.write_tar(prefix / "node_modules", out / "node_modules.tar")
        except npm_tree.TreeError as exc:
            raise InvalidArgument(f"{spec.path}: npm: {exc}") from exc
        finally:
            shutil.rmtree(prefix)
        return {
            "packages": tree.packages,
            "top": tree.top,
            "bins": tree.bins,
            "scripts": tree.scripts,
        }

    return _result(NpmResult, cache_dir, npm_key(spec, size_mib), "npm", log, build)


R = TypeVar("R", bound=StepResult)


def _result(cls: type[R], cache_dir: Path, key: str, name: str, log: Log, build: Build) -> R:
    """Step ``key`` (cached or built) as a ``cls``: its result.json holds the other fields."""
    path, meta, cached = run_step(cache_dir, key, name, log, build)
    return cls(key=key, path=path, cached=cached, **{k: _frozen(v) for k, v in meta.items()})


def _frozen(value: Any) -> Any:
    """JSON lists as the tuples of the frozen results."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _pip_version() -> str:
    try:
        return metadata.version("pip")
    except metadata.PackageNotFoundError as exc:
        raise FailedPrecondition(
            f"pip is not installed in {sys.prefix}: run setup.sh (it makes the venv)"
        ) from exc


def _pip_download(dest: Path, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar=off",
        "--dest",
        str(dest),
        *PIP_TARGET,
        *args,
    ]


def _wheel_pin(wheel: Path) -> str:
    try:
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
    except InvalidWheelFilename as exc:
        raise FailedPrecondition(f"pip download left {wheel.name}, not a wheel") from exc
    return f"{name}=={version}"


def _du_mib(path: Path) -> int:
    proc = subprocess.run(["du", "-sxm", str(path)], capture_output=True, text=True, check=False)
    try:
        return int(proc.stdout.split()[0])
    except (IndexError, ValueError):
        return 0
