"""Running the package managers of a spec build, and reading their failures.

An unknown package or version is the spec's fault: :class:`PackageNotFound`
(INVALID_ARGUMENT) naming the packages as apt, pip or npm printed them, the
spec file and its field. Anything else a tool reports is FAILED_PRECONDITION
with the end of its output.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from urllib.parse import unquote

from agentvm.common.errors import FailedPrecondition, InvalidArgument
from agentvm.common.image_spec import ImageSpec

Log = Callable[[str], None]
# Tool output beyond this is not kept in an error message.
TAIL_LINES = 15

APT_MISSING = (
    re.compile(r"^E: Unable to locate package (\S+)", re.M),
    re.compile(r"^E: Package '?([^'\s]+)'? has no installation candidate", re.M),
)
APT_VERSION = re.compile(r"^E: Version '([^']+)' for '([^']+)' was not found", re.M)
PIP_MISSING = re.compile(r"No matching distribution found for (\S+)")
NPM_404 = re.compile(r"404 Not Found - GET \S*?/([^/\s]+)(?=\s|$)", re.M)
NPM_NO_VERSION = re.compile(r"No matching version found for (\S+?)\.?\s*$", re.M)


class PackageNotFound(InvalidArgument):
    """Packages or versions of the spec that their registry does not have."""

    def __init__(self, spec: ImageSpec, field: str, packages: tuple[str, ...], detail: str) -> None:
        super().__init__(
            f"{spec.path}: {field}: not found: {', '.join(packages)} ({detail}); "
            f"fix the name or version in {field}"
        )
        self.field = field
        self.packages = packages


class DiskCapExceeded(InvalidArgument):
    """The image's content does not fit in the spec's ``disk_gib``."""

    def __init__(self, spec: ImageSpec, cap_mib: int, needed_mib: int) -> None:
        super().__init__(
            f"{spec.path}: the image root does not fit in disk_gib = {spec.disk_gib} "
            f"({cap_mib} MiB): its files take {needed_mib} MiB, plus file-system overhead; "
            "raise disk_gib or drop packages"
        )
        self.cap_mib = cap_mib
        self.needed_mib = needed_mib


def run(
    cmd: list[str], log: Log, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its stdout and stderr together in ``.stdout``."""
    log("$ " + " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=env
    )


def failed(what: str, proc: subprocess.CompletedProcess[str]) -> FailedPrecondition:
    tail = " | ".join(proc.stdout.strip().splitlines()[-TAIL_LINES:])
    return FailedPrecondition(f"image build: {what} failed (exit {proc.returncode}): {tail}")


def apt_error(spec: ImageSpec, proc: subprocess.CompletedProcess[str]) -> Exception:
    """The error of a failed mmdebstrap."""
    found = [m.group(1) for rx in APT_MISSING for m in rx.finditer(proc.stdout)]
    found += [f"{m.group(2)}={m.group(1)}" for m in APT_VERSION.finditer(proc.stdout)]
    if not found:
        return failed("mmdebstrap", proc)
    return PackageNotFound(spec, "apt", _unique(found), f"not in Debian {_suite(spec)}")


def pip_error(
    spec: ImageSpec, proc: subprocess.CompletedProcess[str], python_version: str
) -> Exception:
    """The error of a failed ``pip download``."""
    found = _unique(PIP_MISSING.findall(proc.stdout))
    if not found:
        return failed("pip download", proc)
    return PackageNotFound(
        spec,
        "[pip] packages",
        found,
        f"PyPI has no such package or version as a wheel for CPython {python_version} on "
        "Linux x86_64; nothing is built from source on the host",
    )


def npm_error(spec: ImageSpec, proc: subprocess.CompletedProcess[str]) -> Exception:
    """The error of a failed ``npm install``."""
    found = [unquote(m) for m in NPM_404.findall(proc.stdout)]
    found += NPM_NO_VERSION.findall(proc.stdout)
    if not found:
        return failed("npm install", proc)
    return PackageNotFound(
        spec, "npm", _unique(found), "the npm registry has no such package or version"
    )


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _suite(spec: ImageSpec) -> str:
    return spec.base.partition(":")[2]
