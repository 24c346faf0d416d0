"""Who is calling: the service or client name behind a gRPC call.

Under mutual TLS it is the verified certificate's name (``agent-vm-executor`` ->
``executor``). With TLS off (``AGENTVM_TLS=off``) nothing is verified: the name the
caller puts in its user-agent (``grpc_util.set_identity``) is taken instead, a claim
that keeps the ordinary tools (the CLI, the Python client) apart from the services
but stops nobody who holds the token and lies.
"""

from __future__ import annotations

from typing import Any

from agentvm.common import tls

PREFIX = "agent-vm-"
MAX_NAME = 64


def caller(context: Any) -> str:
    """The caller's name without the ``agent-vm-`` prefix ("" when it has none)."""
    name = tls.peer_identity(context)
    if not name and not tls.peer_uses_tls(context):
        name = _claimed(context)
    return name.removeprefix(PREFIX)[:MAX_NAME]


def _claimed(context: Any) -> str:
    try:
        metadata = context.invocation_metadata() or ()
    except Exception:  # noqa: BLE001 - a context without metadata claims nothing
        return ""
    for key, value in metadata:
        if key == "user-agent" and isinstance(value, str):
            first = value.split(" ", 1)[0]
            if first.startswith(PREFIX):
                return first
    return ""
