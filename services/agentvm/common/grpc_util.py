"""gRPC plumbing shared by every service: channel options, server bootstrap, error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from agentvm.common import auth, tls, wire
from agentvm.common.config import Settings
from agentvm.common.errors import REASON_KEY, AgentVMError, FailedPrecondition
from agentvm.common.reconnect import Reconnect

log = logging.getLogger("agentvm.grpc")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    # gRPC core also uses this as the connect timeout (time allowed for the
    # peer's HTTP/2 SETTINGS): keep it generous, a guest just restored from a
    # memory template under TCG takes a few hundred ms to answer first.
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


# Client interceptors every aio channel gets (tracing installs its own here).
CLIENT_INTERCEPTORS: list[Any] = []
# The bearer token this process sends to other services (never to guests).
_TOKEN: list[str] = []
# The TLS credentials this process presents to other services (empty: TLS off),
# and whether that was decided (setup_tls or use_plaintext): a channel made
# before is refused rather than silently plaintext.
_CREDENTIALS: list[grpc.ChannelCredentials] = []
_TLS_DECIDED: list[bool] = []
# Who this process is, in the user-agent of its calls ("agent-vm-executor").
_IDENTITY: list[str] = []


def set_identity(service: str) -> None:
    """Name this process in the user-agent of every call it makes."""
    _IDENTITY[:] = [f"agent-vm-{service}"]


def _options() -> list[tuple[str, Any]]:
    if not _IDENTITY:
        return CHANNEL_OPTIONS
    return [*CHANNEL_OPTIONS, ("grpc.primary_user_agent", _IDENTITY[0])]


if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A call's failure as grpc.aio reports one, for code that stands in for a stub."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=None
    )


def malformed_response(method: str | bytes) -> grpc.aio.AioRpcError:
    """The error for a response that is not a valid message of the method's type."""
    name = method.decode(errors="replace") if isinstance(method, bytes) else method
    return rpc_error(
        grpc.StatusCode.INTERNAL,
        f"the peer sent a malformed {name} response (not a valid protobuf message)",
    )


class RejectMalformedUnary(_UnaryUnaryInterceptor):
    """Turn a unary response grpc.aio could not parse into an INTERNAL error.

    grpc.aio logs a response its deserializer rejects and hands the caller
    ``None`` instead of failing the call, so a peer (a hostile guest agent)
    sending bytes that are not a valid message would surface as an
    AttributeError far from the call (and outside every ``except
    AioRpcError``). Stream-unary calls cannot be covered by an interceptor
    (it cannot wait for their response): check those at the call site.
    """

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        if await call is None:
            raise malformed_response(client_call_details.method)
        return call


class RejectMalformedStream(_UnaryStreamInterceptor):
    """:class:`RejectMalformedUnary` for server-streaming calls: the call is cancelled."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        call = await continuation(client_call_details, request)
        return self._checked(call, client_call_details.method)

    @staticmethod
    async def _checked(call: Any, method: str | bytes) -> AsyncIterator[Any]:
        async for response in call:
            if response is None:
                call.cancel()
                raise malformed_response(method)
            yield response


def setup_auth(settings: Settings) -> auth.TokenAuth | None:
    """A service process: the token its server requires and its channels send.

    Creates the token file when missing (services run as its owner).
    """
    if settings.auth == "none":
        _TOKEN.clear()
        return None
    try:
        token = auth.generate_token_file(settings.token_file)
    except auth.TokenError as exc:
        raise FailedPrecondition(str(exc)) from None
    _TOKEN[:] = [token]
    return auth.TokenAuth(token, settings.token_file)


def tls_files(settings: Settings, who: str) -> tls.TLSFiles | None:
    """The certificate ``who`` presents (made when missing); None when TLS is off."""
    try:
        return tls.for_identity(settings.tls, settings.tls_dir, who)
    except tls.TLSError as exc:
        raise FailedPrecondition(str(exc)) from None


def _credentials(files: tls.TLSFiles) -> tuple[grpc.ChannelCredentials, grpc.ServerCredentials]:
    try:
        return tls.channel_credentials(files), tls.server_credentials(files)
    except tls.TLSError as exc:
        raise FailedPrecondition(str(exc)) from None


def setup_tls(settings: Settings, service: str) -> grpc.ServerCredentials | None:
    """A service process: the TLS its server requires and its channels present (None: off)."""
    files = tls_files(settings, service)
    if files is None:
        use_plaintext()
        return None
    channel, server = _credentials(files)
    _CREDENTIALS[:] = [channel]
    _TLS_DECIDED[:] = [True]
    return server


def use_plaintext() -> None:
    """This process's service channels are plaintext (AGENTVM_TLS=off, in-process tests)."""
    _CREDENTIALS.clear()
    _TLS_DECIDED[:] = [True]


def aio_channel(target: str, service: str, *, wait_for_restart: bool = False) -> grpc.aio.Channel:
    """An asyncio channel to another agent-vm ``service``: limits, token, mutual TLS.

    ``wait_for_restart``: once it has reached the service, a call waits for a
    service that is restarting instead of failing (:mod:`agentvm.common.reconnect`).
    """
    if not wait_for_restart:
        return _service_channel(target, service, [])
    reconnect = Reconnect(target)
    chan = _service_channel(target, service, [], reconnect)
    reconnect.bind(chan)
    return chan


def _service_channel(
    target: str, service: str, extra: list[Any], reconnect: Reconnect | None = None
) -> grpc.aio.Channel:
    if not _TLS_DECIDED:
        raise RuntimeError(
            "grpc_util.setup_tls() (or use_plaintext()) must run before a service channel "
            "is made: it would otherwise be plaintext by accident"
        )
    # The reconnect wait is outermost: the time it waits comes off the deadline.
    outer = [] if reconnect is None else [reconnect]
    interceptors: list[Any] = [*outer, *CLIENT_INTERCEPTORS, *extra]
    if _TOKEN:
        interceptors += auth.aio_token_interceptors(_TOKEN[0])
    options = _options()  # its reconnect backoff is already short (CHANNEL_OPTIONS)
    if _CREDENTIALS:
        return grpc.aio.secure_channel(
            target,
            _CREDENTIALS[0],
            options=[*options, *tls.target_options(service)],
            interceptors=interceptors or None,
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)


def guest_channel(target: str) -> grpc.aio.Channel:
    """:func:`aio_channel` to a guest agent: the peer is hostile.

    Responses that are not valid messages fail the call (INTERNAL) instead of
    reaching the caller as ``None``.
    """
    interceptors: list[Any] = [
        *CLIENT_INTERCEPTORS,
        RejectMalformedUnary(),
        RejectMalformedStream(),
    ]
    return grpc.aio.insecure_channel(target, options=_options(), interceptors=interceptors)


# The metadata naming the VM of a GuestAgentService call made to vm-manager,
# which forwards it to that VM's agent (vm_manager/agent_proxy.py).
AGENT_VM_HEADER = "agentvm-vm"


def agent_channel(vm_manager_addr: str, vm_name: str, agent_endpoint: str) -> grpc.aio.Channel:
    """A channel to a VM's guest agent, for a service whose vm-manager is ``vm_manager_addr``.

    A vm-manager on a Unix socket is on this host: the VM's relay socket
    (``agent_endpoint``) is dialled directly. Otherwise the VM's agent is on
    that vm-manager's host and is reached through it (GuestAgentService on
    vm-manager, with the VM named in ``AGENT_VM_HEADER``): mutual TLS and the
    token to vm-manager, and the guest's answers still checked here as on
    :func:`guest_channel`.
    """
    if vm_manager_addr.startswith("unix:"):
        return guest_channel(agent_endpoint)
    checks = [RejectMalformedUnary(), RejectMalformedStream()]
    named = auth.aio_header_interceptors(AGENT_VM_HEADER, vm_name)
    return _service_channel(vm_manager_addr, "vm-manager", [*named, *checks])


def sync_channel(target: str) -> grpc.Channel:
    """An insecure blocking channel with agent-vm's limits (no token, no TLS: guests)."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


@dataclass(frozen=True)
class Caller:
    """How a process outside the services (CLI, benchmarks, tests) calls them.

    ``token``: the bearer token it sends (None: auth is off); ``credentials``:
    the TLS identity it presents (None: TLS is off); ``user_agent``: who it
    says it is (a test presenting a service's certificate says so too, as
    that service would: the audit log checks the claim against the certificate).
    """

    token: str | None
    credentials: grpc.ChannelCredentials | None
    user_agent: str | None = None

    @classmethod
    def of(cls, settings: Settings, who: str = tls.CLIENT) -> Caller:
        """The installation's caller: its token, and the certificate of ``who``."""
        files = tls_files(settings, who)
        return cls(auth.settings_token(settings), None if files is None else _credentials(files)[0])

    def bare(self, target: str, service: str) -> grpc.Channel:
        """A channel to ``service`` without the token (health checks)."""
        named = [("grpc.primary_user_agent", self.user_agent)] if self.user_agent else []
        if self.credentials is None:
            return grpc.insecure_channel(target, options=[*CHANNEL_OPTIONS, *named])
        return grpc.secure_channel(
            target,
            self.credentials,
            options=[*CHANNEL_OPTIONS, *named, *tls.target_options(service)],
        )

    def channel(self, target: str, service: str) -> grpc.Channel:
        """A blocking channel to ``service`` at ``target``, sending the token."""
        channel = self.bare(target, service)
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, auth.SyncTokenInterceptor(self.token))


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: AgentVMError) -> None:
    """Answer with ``exc``: its code, message and, when it has one, its reason
    (trailing metadata REASON_KEY)."""
    if exc.reason:
        await context.abort(exc.code, exc.message, ((REASON_KEY, exc.reason),))
    await context.abort(exc.code, exc.message)


# Translations a service registers for errors its code should have translated
# but did not (vm-manager: a libvirt connection lost mid-call is UNAVAILABLE,
# wherever it was raised). Each returns None for errors it does not know.
_FALLBACKS: list[Callable[[Exception], AgentVMError | None]] = []


def translate_unexpected(fallback: Callable[[Exception], AgentVMError | None]) -> None:
    """Have every servicer of this process answer an error that escaped its handler
    as ``fallback`` maps it (still logged with its traceback, as the bug it is)."""
    if fallback not in _FALLBACKS:
        _FALLBACKS.append(fallback)


async def _unexpected(
    context: grpc.aio.ServicerContext[Any, Any], where: str, exc: Exception, message: str
) -> None:
    wire.unexpected(context, where)
    for fallback in _FALLBACKS:
        mapped = fallback(exc)
        if mapped is not None:
            await _abort(context, mapped)
    await context.abort(grpc.StatusCode.INTERNAL, message)


def grpc_errors(func: F) -> F:
    """Servicer decorator: AgentVMError -> its status code, anything else -> INTERNAL.

    BaseExceptions (cancellation, KeyboardInterrupt) pass through untouched.
    A call that was answered already (a malformed message in the middle of a
    client stream is refused by wire.RejectMalformed from inside the request
    iterator, which the handler may hand to code that swallows the abort) is
    not answered twice: the handler returns, and gRPC raises the first abort
    again, quietly (a second abort raised UsageError, logged with a traceback).
    """

    @functools.wraps(func)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await func(self, request, context)
        except AgentVMError as exc:
            if context.done():
                return None  # already answered (see above)
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged with its traceback by wire.unexpected
            if context.done():
                return None
            await _unexpected(
                context,
                func.__name__,
                exc,
                f"internal error in {func.__name__}: {exc!r}; see the service log",
            )

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(
    func: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """Like :func:`grpc_errors` for server-streaming methods."""

    @functools.wraps(func)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async with wire.closing(func(self, request, context)) as items:
                async for item in items:
                    yield item
        except AgentVMError as exc:
            if context.done():
                return
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged with its traceback by wire.unexpected
            if context.done():
                return
            await _unexpected(context, func.__name__, exc, f"internal error: {exc!r}")

    return wrapper


def remaining_time(context: grpc.aio.ServicerContext[Any, Any], default: float) -> float:
    """Seconds left before the caller's deadline, or ``default`` when it set none."""
    left = context.time_remaining()
    return default if left is None else max(0.0, min(default, left))


def unix_path(address: str) -> Path | None:
    """The socket path of a unix: address, None for other addresses."""
    if not address.startswith("unix:"):
        return None
    return Path(address.removeprefix("unix:").removeprefix("//"))


def prepare_unix_address(address: str) -> None:
    """Create the directory of a unix: address and remove a stale socket file."""
    path = unix_path(address)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def raise_descriptor_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the new soft one.

    A service holds descriptors for every VM, client and walk of a guest's
    tree: the common default soft limit of 1024 is reached long before the
    hard limit the host allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft
        return hard
    return soft


async def serve(
    *,
    service_name: str,
    address: str,
    register: Callable[[grpc.aio.Server], None],
    full_service_names: Sequence[str],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    interceptors: Sequence[Any] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT: health + reflection, restrictive socket mode.

    ``credentials``: serve mutual TLS only (None: plaintext).
    """
    # Servers only: a client (the CLI) starts ~15 ms sooner without them.
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    raise_descriptor_limit()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors) or None)
    register(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    # grpc's HealthServicer starts with "" SERVING: say NOT_SERVING until
    # ``ready`` (recovery, reclaiming leftovers) has finished.
    for name in [*full_service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*full_service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    prepare_unix_address(address)
    old = os.umask(0o117)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
        await server.start()
    finally:
        os.umask(old)
    if ready is not None:
        await ready()
    for name in [*full_service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving on %s", service_name, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s stopping", service_name)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    path = unix_path(address)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if on_stop is not None:
        await on_stop()
