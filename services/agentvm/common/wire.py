"""What every service does on the wire before and around its handlers.

* :class:`RejectMalformed`: a request that is not a valid message of the
  method's type is answered ``INVALID_ARGUMENT`` naming the method, the
  message type and the decoder's reason, and costs at most one log line
  without a traceback, rate-limited per caller identity (grpc.aio itself
  answers ``UNKNOWN`` and logs a full traceback per request: a caller with a
  certificate could fill the disk, and a client author learnt nothing).
* :class:`StreamCloser`: server streams are served through ``context.write``
  so that a cancel closes the handler chain in its own task.
* :class:`QuietLog`: the per-caller rate limit for log lines any caller can
  cause at will (malformed requests, unexpected handler errors).

Where the interceptors go: ``telemetry.server_interceptors`` puts StreamCloser
outermost and RejectMalformed innermost, so a malformed request is still
counted and audited by the CallObserver like any other failed call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from agentvm.common import tls
from agentvm_guest.wire import Malformed, message_name, same_kind, tolerant

log = logging.getLogger("agentvm.wire")

T = TypeVar("T")


@contextlib.asynccontextmanager
async def closing(items: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async iterator (a generator's ``aclose``) on every exit, in this task.

    A server stream's generator left to the garbage collector runs its
    ``finally`` blocks later, in another task, after the call is gone.
    """
    try:
        yield items
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


class QuietLog:
    """At most ``burst`` lines per ``window`` seconds per key; the rest are counted.

    The next line allowed for a key says how many were suppressed since the
    last one. Keys are bounded (least recently seen dropped first), so a
    caller inventing identities cannot grow this either.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        window: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        # key -> [window start, lines in this window, suppressed since the last line]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether a line for ``key`` may be written now, and how many were suppressed."""
        now = self._clock()
        state = self._keys.pop(key, None)
        if state is None or now - state[0] >= self._window:
            suppressed = int(state[2]) if state is not None else 0
            state = [now, 0.0, float(suppressed)]
        self._keys[key] = state
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)
        if state[1] >= self._burst:
            state[2] += 1
            return False, 0
        state[1] += 1
        suppressed, state[2] = int(state[2]), 0.0
        return True, suppressed

    def warning(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log ``message`` for ``key`` unless over its rate (then count it)."""
        ok, suppressed = self.allow(key)
        if not ok:
            return
        if suppressed:
            message += " (%d similar line(s) from this caller suppressed)"
            args = (*args, suppressed)
        self._log.warning(message, *args, exc_info=exc_info)


# One limiter per process for what callers provoke: keyed by verified identity.
CALLER_LOG = QuietLog(log)


def unexpected(context: grpc.aio.ServicerContext[Any, Any], where: str) -> None:
    """Log the exception being handled (a handler bug a caller may repeat at will).

    With its traceback, but rate-limited per caller like every line a caller
    can cause.
    """
    key = _caller_key(context)
    CALLER_LOG.warning(key, "unexpected error in %s (caller %s)", where, key, exc_info=True)


def _caller_key(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return tls.peer_identity(context) or "(no verified identity)"


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answer undecodable requests INVALID_ARGUMENT, before any handler sees them."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = (details.method or "").lstrip("/")
        kind = message_name(handler.request_deserializer)

        async def refuse(context: grpc.aio.ServicerContext[Any, Any], bad: Malformed) -> None:
            CALLER_LOG.warning(
                _caller_key(context),
                "refused a malformed %s request from %s (%s): not a valid %s: %s",
                method,
                _caller_key(context),
                context.peer(),
                kind,
                bad.reason,
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method}: the request is not a valid {kind} ({bad.reason}); "
                "encode it with the message type from protos/agentvm/v1",
            )

        async def checked(
            items: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for item in items:
                if isinstance(item, Malformed):
                    await refuse(context, item)
                yield item

        inner: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if handler.request_streaming and handler.response_streaming:

            async def behavior(items: Any, context: Any) -> Any:
                async with closing(forward(inner(checked(items, context), context))) as out:
                    async for item in out:
                        yield item

        elif handler.request_streaming:

            async def behavior(items: Any, context: Any) -> Any:  # type: ignore[misc]
                return await inner(checked(items, context), context)

        elif handler.response_streaming:

            async def behavior(request: Any, context: Any) -> Any:  # type: ignore[misc]
                if isinstance(request, Malformed):
                    await refuse(context, request)
                async with closing(forward(inner(request, context))) as out:
                    async for item in out:
                        yield item

        else:

            async def behavior(request: Any, context: Any) -> Any:  # type: ignore[misc]
                if isinstance(request, Malformed):
                    await refuse(context, request)
                return await inner(request, context)

        return same_kind(handler, behavior, tolerant(handler.request_deserializer))


async def forward(result: Any) -> AsyncIterator[Any]:
    """The items of a server-streaming handler's result, whichever API it uses.

    An async generator's items are passed on (and it is closed on every exit);
    a coroutine that writes through ``context.write`` itself (grpc's
    reader/writer API, e.g. the health service's Watch) is awaited.
    """
    if not hasattr(result, "__aiter__"):
        await result
        return
    async with closing(result) as items:
        async for item in items:
            yield item


class StreamCloser(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Serve server-streaming handlers through ``context.write``, closing them in their task.

    grpc.aio iterates an async-generator handler from its own loop and, when the
    caller cancels or its deadline passes, cancels that loop while the generator
    sits at a ``yield``: the generator (and every one it wraps: tracing,
    accounting, the servicer) is then closed later by the garbage collector, in
    another task and context, after gRPC has released the call. Their
    ``finally`` blocks run late and out of context (the tracing interceptor
    logs "Failed to detach context" for each such call, a log flood any caller
    can cause; reading the call's peer there is a SIGSEGV). Outermost, this
    interceptor turns the handler into a coroutine that writes each item: a
    cancel arrives as CancelledError at the write, in the handler's own task,
    and the chain is closed there at once.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(details)
        if handler is None or not handler.response_streaming:
            return handler
        inner: Any = handler.unary_stream or handler.stream_stream

        async def written(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with closing(forward(inner(request, context))) as items:
                async for item in items:
                    await context.write(item)

        return same_kind(handler, written, handler.request_deserializer)
