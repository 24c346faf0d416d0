"""What every handler of the gateway shares: the executor stub and the call context.

A request for a sandbox (an envd or code-interpreter call) has been
authenticated by :mod:`.app` before it reaches a handler: its sandbox id is
one whose access token the caller presented.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from starlette.requests import Request

from agentvm.e2b_gateway.errors import GatewayError, from_rpc
from agentvm.v1 import executor_pb2, executor_pb2_grpc

T = TypeVar("T")

# Header names (lower case, as ASGI and connectrpc give them).
SANDBOX_ID_HEADER = "e2b-sandbox-id"
SANDBOX_PORT_HEADER = "e2b-sandbox-port"
ACCESS_TOKEN_HEADER = "x-access-token"  # noqa: S105 - a header name
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"  # noqa: S105 - a header name
API_KEY_HEADER = "x-api-key"
# Default deadline of one executor call the gateway makes (seconds).
CALL_TIMEOUT = 60.0


@dataclass
class Backend:
    """The executor, as the gateway calls it."""

    stub: executor_pb2_grpc.ExecutorServiceAsyncStub


async def write_stdin(
    stub: executor_pb2_grpc.ExecutorServiceAsyncStub,
    sandbox_id: str,
    exec_id: str,
    data: bytes,
    eof: bool = False,
    timeout: float = CALL_TIMEOUT,
) -> None:
    """Input for a process (``eof``: then end its input)."""
    await call(
        "write input",
        stub.WriteStdin(
            executor_pb2.ExecutorServiceWriteStdinRequest(
                sandbox_id=sandbox_id, exec_id=exec_id, data=data, eof=eof
            ),
            timeout=timeout,
        ),
    )


async def signal_process(
    stub: executor_pb2_grpc.ExecutorServiceAsyncStub,
    sandbox_id: str,
    exec_id: str,
    signal: int,
    timeout: float = CALL_TIMEOUT,
) -> None:
    """A signal for a process (its tree, or its terminal's foreground group)."""
    await call(
        "signal",
        stub.SignalExec(
            executor_pb2.SignalExecRequest(sandbox_id=sandbox_id, exec_id=exec_id, signal=signal),
            timeout=timeout,
        ),
    )


async def call(what: str, awaitable: Awaitable[T]) -> T:
    """Await one executor call; its failure becomes the gateway's error of the same meaning."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise from_rpc(exc, what) from exc


async def with_keepalive(
    source: AsyncIterator[T], interval: float, keepalive: T
) -> AsyncIterator[T]:
    """``source``'s items, and ``keepalive`` whenever it has been quiet for ``interval`` s.

    A reader task moves items into a queue so that a quiet period never cancels
    the source's own read (a gRPC stream does not survive that).
    """
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put(("item", item))
            await queue.put(("end", None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put(("error", exc))

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield keepalive
                continue
            if kind == "end":
                return
            if isinstance(value, BaseException):
                raise value
            yield value  # type: ignore[misc]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def read_body(request: Request, limit: int) -> bytes:
    """A request's body, at most ``limit`` bytes (413 past that, before reading more)."""
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise GatewayError(413, f"the request body is larger than {limit} bytes")
    return body


def json_object(raw: bytes) -> dict[str, object]:
    """A JSON object from a request body (empty: {}); 400 naming what is wrong."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise GatewayError(400, f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


class KeyedLocks:
    """One lock per key, kept only while someone holds or waits for it (no growth)."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
