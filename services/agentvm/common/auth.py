"""Caller authentication: a shared bearer token on every call between and into services.

Design (docs/SECURITY.md, "Authentication"):

- One installation has one token: 32 random bytes, hex, in ``AGENTVM_TOKEN_FILE``
  (default ``/etc/agent-vm/token``, mode 0600, created by ``agent-vm up``).
- Every server requires ``authorization: Bearer <token>`` on every call except
  the standard health checks (probes and ``agent-vm status`` need no secret)
  and server reflection (it describes the public schema only).
  A missing or wrong token is UNAUTHENTICATED before any handler runs.
- Services, the CLI and the Python client attach it from ``AGENTVM_TOKEN``
  or, failing that, the token file. Channels to guest agents never carry it:
  the guest is hostile.
- ``AGENTVM_AUTH=none`` turns the check off (a single-user host that relies on
  the sockets' modes alone); ``agent-vm doctor`` reports it.
"""

from __future__ import annotations

import collections
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from agentvm.common.config import DEFAULT_TOKEN_FILE, Settings

HEADER = "authorization"
# Health checks (probes, `agent-vm status`) and reflection (the schema, which
# the .proto files publish anyway) need no token.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
TOKEN_BYTES = 32


class TokenError(Exception):
    """The token cannot be read or created; the message says what to do."""


def generate_token_file(path: Path) -> str:
    """Create ``path`` with a new token (mode 0600) unless it exists; the token."""
    try:
        return read_token_file(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_hex(TOKEN_BYTES)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        try:
            os.link(tmp, path)  # never replace a token another process just made
        except FileExistsError:
            return read_token_file(path)
        finally:
            tmp.unlink()
    except OSError as exc:
        raise TokenError(
            f"cannot create the token file {path}: {exc.strerror}; "
            "set AGENTVM_TOKEN_FILE to a writable path"
        ) from None
    return token


def read_token_file(path: Path) -> str:
    """The token in ``path`` (FileNotFoundError when missing; TokenError when unusable)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(
            f"cannot read the token file {path} ({exc}): run as its owner, or set "
            "AGENTVM_TOKEN to the token"
        ) from None
    if len(text) < 32 or not text.isascii() or not text.isalnum():
        raise TokenError(
            f"the token file {path} does not hold a token (32+ letters or digits): "
            "delete it and run `agent-vm up` to make a new one"
        )
    return text


def settings_token(settings: Settings) -> str | None:
    """What a caller configured by ``settings`` sends (nothing when auth is off)."""
    return None if settings.auth == "none" else client_token(settings.token_file)


def client_token(token_file: Path | None = None) -> str | None:
    """What a caller sends: AGENTVM_TOKEN, else the token file if readable, else None.

    Sending nothing is not an error here: a server that needs the token says
    UNAUTHENTICATED and how to get it.
    """
    env = os.environ.get("AGENTVM_TOKEN", "").strip()
    if env:
        return env
    if token_file is None:
        token_file = Path(os.environ.get("AGENTVM_TOKEN_FILE", DEFAULT_TOKEN_FILE))
    try:
        return read_token_file(token_file)
    except (FileNotFoundError, TokenError):
        return None


def _denied(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as ``handler`` that only aborts with ``code``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover (abort raises)

    if handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse every call without the installation's bearer token (UNAUTHENTICATED)."""

    def __init__(self, token: str, token_file: Path) -> None:
        self._expected = f"Bearer {token}".encode()
        self._hint = (
            f"set AGENTVM_TOKEN to the token in {token_file} (or run as a user who can "
            "read that file)"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        sent = [v for k, v in handler_call_details.invocation_metadata or () if k == HEADER]
        if len(sent) == 1 and hmac.compare_digest(_as_bytes(sent[0]), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        why = "no token was sent" if not sent else "the token is wrong"
        return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, f"{method}: {why}: {self._hint}")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode(errors="replace") if isinstance(value, str) else value


# -- clients -------------------------------------------------------------------------------
if TYPE_CHECKING:
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUS = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _AioSU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _AioSS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
    _UU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.StreamStreamClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor
    _AioUS = grpc.aio.UnaryStreamClientInterceptor
    _AioSU = grpc.aio.StreamUnaryClientInterceptor
    _AioSS = grpc.aio.StreamStreamClientInterceptor
    _UU = grpc.UnaryUnaryClientInterceptor
    _US = grpc.UnaryStreamClientInterceptor
    _SU = grpc.StreamUnaryClientInterceptor
    _SS = grpc.StreamStreamClientInterceptor


def _with_header(metadata: Any, key: str, value: str) -> list[tuple[str, str | bytes]]:
    out = [(k, v) for k, v in (metadata or ()) if k != key]
    out.append((key, value))
    return out


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    return _with_header(metadata, HEADER, f"Bearer {token}")


class _AioHeader:
    def __init__(self, key: str, value: str) -> None:
        self._key = key
        self._value = value

    def _details(self, d: Any) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            d.method,
            d.timeout,
            grpc.aio.Metadata(*_with_header(d.metadata, self._key, self._value)),
            d.credentials,
            d.wait_for_ready,
        )


class _AioHeaderUU(_AioHeader, _AioUU):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioHeaderUS(_AioHeader, _AioUS):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioHeaderSU(_AioHeader, _AioSU):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioHeaderSS(_AioHeader, _AioSS):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def aio_header_interceptors(key: str, value: str) -> list[Any]:
    """Interceptors that set the metadata ``key`` to ``value`` on every call of an aio channel.

    One per kind of call: grpc.aio files an interceptor under the first kind
    it implements only.
    """
    return [cls(key, value) for cls in (_AioHeaderUU, _AioHeaderUS, _AioHeaderSU, _AioHeaderSS)]


def aio_token_interceptors(token: str) -> list[Any]:
    """Interceptors that add the bearer token to every call of an aio channel."""
    return aio_header_interceptors(HEADER, f"Bearer {token}")


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class SyncTokenInterceptor(_UU, _US, _SU, _SS):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: Any) -> _SyncDetails:
        return _SyncDetails(
            d.method,
            d.timeout,
            _with_token(d.metadata, self._token),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
