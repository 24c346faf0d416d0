"""E2B paths: under /workspace for agent-vm's file calls, anything else for :mod:`.guest_fs`.

E2B resolves a relative path against the user's home; here it lands in
/workspace/work, the working directory commands start in, so a file written
as "a.txt" is the "a.txt" a command sees.
"""

from __future__ import annotations

import posixpath

from agentvm.e2b_gateway.errors import GatewayError

WORKSPACE = "/workspace"
HOME = "/workspace/work"


def absolute(path: str) -> str:
    """The guest's absolute, normalized path for an E2B path."""
    if not path:
        path = "."
    if "\0" in path:
        raise GatewayError(400, "path contains a NUL byte")
    if len(path) > 4096:
        raise GatewayError(400, "path is longer than 4096 bytes")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(HOME, path))
    return "/" + full.lstrip("/")  # normpath keeps a leading "//"


def in_workspace(full: str) -> str | None:
    """The executor's path (relative to /workspace) for an absolute path, or None."""
    if full == WORKSPACE:
        return "."
    if full.startswith(WORKSPACE + "/"):
        return full[len(WORKSPACE) + 1 :]
    return None


def to_workspace(path: str) -> str:
    """The executor's path for an E2B path under /workspace (400 for any other)."""
    rel = in_workspace(absolute(path))
    if rel is None:
        raise GatewayError(400, f"path {path!r} is not under {WORKSPACE}")
    return rel


def to_guest(rel: str) -> str:
    """The guest's absolute path for an executor path (relative to /workspace)."""
    return WORKSPACE if rel in ("", ".") else posixpath.join(WORKSPACE, rel)
