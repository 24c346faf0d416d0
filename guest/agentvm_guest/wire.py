"""Requests the agent cannot decode: INVALID_ARGUMENT and one quiet log line.

Malformed, tolerant, message_name and same_kind are the part both ends
share: the host services' ``agentvm.common.wire`` builds on them.

The guest's counterpart of the host services' ``agentvm.common.wire`` for
its synchronous gRPC server (the guest image carries only this package):
grpcio's sync server answers an undecodable request ``INTERNAL`` "Exception
deserializing request!" and logs a traceback each time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("agentvm.guest.wire")

# At most this many lines per window; the rest are counted and reported with the next one.
BURST = 5
WINDOW_S = 60.0


@dataclass(frozen=True)
class Malformed:
    reason: str


class _Quiet:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = 0.0
        self._lines = 0
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= WINDOW_S:
                self._start, self._lines = now, 0
            if self._lines >= BURST:
                self._suppressed += 1
                return
            self._lines += 1
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (%d similar line(s) suppressed)"
            args = (*args, suppressed)
        log.warning(message, *args)


_QUIET = _Quiet()


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns Malformed(reason) instead of raising."""

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the caller's bad bytes
            return Malformed(str(exc) or type(exc).__name__)

    return parse


def message_name(deserializer: Any) -> str:
    """``agentvm.v1.RunRequest`` for ``RunRequest.FromString``, else a generic name."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


def same_kind(handler: Any, behavior: Any, deserializer: Any) -> Any:
    """A method handler of ``handler``'s kind serving ``behavior`` (sync or aio alike)."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        behavior,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class RejectMalformed(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Answer undecodable requests INVALID_ARGUMENT before any handler runs."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = (details.method or "").lstrip("/")
        kind = message_name(handler.request_deserializer)

        def refuse(context: grpc.ServicerContext, bad: Malformed) -> None:
            _QUIET.warning("refused a malformed %s request: %s", method, bad.reason)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{method}: the request is not a valid {kind} ({bad.reason})",
            )

        def checked(items: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for item in items:
                if isinstance(item, Malformed):
                    refuse(context, item)
                yield item

        inner: Any = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if handler.request_streaming:

            def behavior(items: Any, context: grpc.ServicerContext) -> Any:
                return inner(checked(items, context), context)

        else:

            def behavior(request: Any, context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                if isinstance(request, Malformed):
                    refuse(context, request)
                return inner(request, context)

        return same_kind(handler, behavior, tolerant(handler.request_deserializer))
