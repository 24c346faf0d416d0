"""E2B paths onto agent-vm's file calls, which reach the sandbox's /workspace only.

E2B resolves a relative path against the user's home; here it lands in
/workspace/work, the working directory commands start in, so a file written
as "a.txt" is the "a.txt" a command sees. Absolute paths must lie under
/workspace. Anything else is refused with a message saying so.
"""

from __future__ import annotations

import posixpath

from agentvm.e2b_gateway.errors import GatewayError

WORKSPACE = "/workspace"
HOME = "/workspace/work"


def to_workspace(path: str) -> str:
    """The executor's path (relative to /workspace) for an E2B path."""
    if not path:
        path = "."
    if "\0" in path:
        raise GatewayError(400, "path contains a NUL byte")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(HOME, path))
    if full == WORKSPACE:
        return "."
    if not full.startswith(WORKSPACE + "/"):
        raise GatewayError(
            400,
            f"path {path!r}: agent-vm's file calls reach /workspace only; use a path under "
            f"/workspace, or a relative one (it lands in {HOME}, where commands start)",
        )
    return full[len(WORKSPACE) + 1 :]


def to_guest(rel: str) -> str:
    """The guest's absolute path for an executor path (relative to /workspace)."""
    return WORKSPACE if rel in ("", ".") else posixpath.join(WORKSPACE, rel)
