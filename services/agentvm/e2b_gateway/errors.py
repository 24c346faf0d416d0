"""One error type for every protocol the gateway speaks, from the executor's status codes.

REST answers ``{"code": HTTP_STATUS, "message": ...}`` with that HTTP status (what the
E2B SDKs parse); envd calls answer the Connect error of the same meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from starlette.responses import JSONResponse, Response

log = logging.getLogger("agentvm.e2b_gateway")

# gRPC status -> (HTTP status, Connect code).
_MAP: dict[grpc.StatusCode, tuple[int, Code]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, Code.INVALID_ARGUMENT),
    grpc.StatusCode.OUT_OF_RANGE: (400, Code.OUT_OF_RANGE),
    grpc.StatusCode.UNAUTHENTICATED: (401, Code.UNAUTHENTICATED),
    grpc.StatusCode.PERMISSION_DENIED: (403, Code.PERMISSION_DENIED),
    grpc.StatusCode.NOT_FOUND: (404, Code.NOT_FOUND),
    grpc.StatusCode.ALREADY_EXISTS: (409, Code.ALREADY_EXISTS),
    grpc.StatusCode.FAILED_PRECONDITION: (409, Code.FAILED_PRECONDITION),
    grpc.StatusCode.ABORTED: (409, Code.ABORTED),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, Code.RESOURCE_EXHAUSTED),
    grpc.StatusCode.CANCELLED: (499, Code.CANCELED),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, Code.DEADLINE_EXCEEDED),
    grpc.StatusCode.UNIMPLEMENTED: (501, Code.UNIMPLEMENTED),
    grpc.StatusCode.UNAVAILABLE: (503, Code.UNAVAILABLE),
    grpc.StatusCode.DATA_LOSS: (500, Code.DATA_LOSS),
    grpc.StatusCode.INTERNAL: (500, Code.INTERNAL),
    grpc.StatusCode.UNKNOWN: (500, Code.UNKNOWN),
}
_BY_HTTP = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.FAILED_PRECONDITION,
    429: Code.RESOURCE_EXHAUSTED,
    500: Code.INTERNAL,
    501: Code.UNIMPLEMENTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}


class GatewayError(ConnectError):
    """An answer that is not a success: its HTTP status and what the caller should do.

    A Connect error too, so an envd handler raises it as it is.
    """

    def __init__(
        self, status: int, message: str, code: Code | None = None, *, sandbox_gone: bool = False
    ) -> None:
        super().__init__(code or _BY_HTTP.get(status, Code.UNKNOWN), message)
        self.status = status
        # The executor has no such sandbox (closed, expired): REST answers 404 for it.
        self.sandbox_gone = sandbox_gone

    def json(self) -> dict[str, object]:
        return {"code": self.status, "message": self.message}


# How the executor's message names a service behind it that did not answer.
BEHIND_EXECUTOR = ("vm-manager", "pool-manager")


def from_rpc(exc: grpc.aio.AioRpcError, what: str = "") -> GatewayError:
    """The executor's answer as the gateway's: same meaning, its message kept."""
    status, code = _MAP.get(exc.code(), (500, Code.INTERNAL))
    detail = exc.details() or exc.code().name
    if exc.code() == grpc.StatusCode.NOT_FOUND and detail.startswith("no sandbox "):
        # The sandbox itself is gone: the SDKs read 502 "... was not found" as
        # "the sandbox is not running" (SandboxNotRunningException).
        return GatewayError(
            502, f"The sandbox was not found ({detail})", Code.UNAVAILABLE, sandbox_gone=True
        )
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        # A message naming a service behind the executor: the executor answered for it.
        behind = next((s for s in BEHIND_EXECUTOR if detail.startswith(s + ": ")), None)
        who = f"{behind} service" if behind else "executor"
        detail = f"the agent-vm {who} is not reachable ({detail}): `agent-vm status` on the host"
    return GatewayError(status, f"{what}: {detail}" if what else detail, code)


def not_found(sandbox_id: str) -> GatewayError:
    return GatewayError(
        404, f"sandbox {sandbox_id!r} not found (closed, expired, or not this API key's)"
    )


def error_response(exc: GatewayError) -> JSONResponse:
    """``exc`` as the SDKs read an error: its status and ``{"code", "message"}``."""
    # The SDK retries 429/5xx unless told not to: a full quota stays full.
    headers = {"Should-Retry": "false"} if exc.status in (429, 502, 503, 504) else None
    return JSONResponse(exc.json(), status_code=exc.status, headers=headers)


async def guard(handler: Callable[[], Awaitable[Response]]) -> Response:
    """``handler``'s response, or its failure as a JSON error (never a bare 500 page)."""
    try:
        return await handler()
    except GatewayError as exc:
        return error_response(exc)
    except Exception:
        log.exception("unexpected error")
        return error_response(
            GatewayError(500, "internal error in agent-vm's e2b-gateway: see its log")
        )
