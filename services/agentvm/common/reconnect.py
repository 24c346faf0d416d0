"""Calls made while the service they call restarts wait for it instead of failing.

agent-vm's services run under a supervisor that starts one again within
seconds of a crash or kill. A call made in that gap used to fail at once with
UNAVAILABLE ("failed to connect to all addresses"): the request never left
the caller. Before each call to an address this process has reached before
(on any channel: a program that makes many sandboxes makes a channel for
each), this interceptor waits for the channel to be connected again, for up to
:data:`RECONNECT_S` and never past the call's own deadline (what it waited is
taken off that deadline), then makes the call. Nothing is sent twice: a call
that was sent when the connection broke still fails as before (a create is
not idempotent). A process's first call to a service that is not running
still fails at once, with the message that says to start it.

Used by the Python client's channels to the executor and the E2B gateway's;
not by the channels to vm-managers, whose callers fail over to another node
instead of waiting (common/fleet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

__all__ = ["RECONNECT_OPTIONS", "RECONNECT_S", "Reconnect"]

# How long a call waits for its service to come back (its supervisor's restart
# takes a few seconds as a rule).
RECONNECT_S = 30.0
# A restarted service is found again within a fraction of a second (gRPC's
# default backoff grows from 1 s to 120 s).
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


if TYPE_CHECKING:
    _UU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UU, _US = grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
    _SU, _SS = grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor


class Reconnect(_UU, _US, _SU, _SS):
    """Give the channel with :meth:`bind` once it is made (interceptors come first)."""

    # The addresses a call of this process has reached.
    _reached: set[str] = set()  # noqa: RUF012 - shared by every instance on purpose

    def __init__(self, address: str) -> None:
        self._address = address
        self._channel: grpc.aio.Channel | None = None

    @property
    def reached(self) -> bool:
        """A call of this process has reached the service at this address."""
        return self._address in Reconnect._reached

    def bind(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def _ended(self, _call: object) -> None:
        # A call ended with the channel connected: the service was there.
        chan = self._channel
        if chan is not None and chan.get_state() == grpc.ChannelConnectivity.READY:
            Reconnect._reached.add(self._address)

    async def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """``details`` once the channel is connected again (or the wait is over),
        with the time waited taken off its timeout."""
        chan = self._channel
        if chan is None or not self.reached:
            return details
        if chan.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            return details
        budget = RECONNECT_S if details.timeout is None else min(RECONNECT_S, details.timeout)
        started = time.monotonic()
        # Past the wait the call fails as it would have, with the message that says why.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(chan.channel_ready(), budget)
        if details.timeout is None:
            return details
        left = max(details.timeout - (time.monotonic() - started), 0.001)
        return grpc.aio.ClientCallDetails(
            details.method, left, details.metadata, details.credentials, details.wait_for_ready
        )

    async def _call(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(await self._details(details), request)
        call.add_done_callback(self._ended)
        return call

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, details, request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await self._call(continuation, details, request_iterator)
