"""Malformed requests on the wire: INVALID_ARGUMENT, no handler runs, one quiet log line.

In process, with every service's real interceptor chain in front of the
executor's generated service registration (issue 21); the real services get
the same treatment in tests/integration/test_malformed.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvm.common import auth, telemetry, wire
from agentvm.common.errors import NotFound
from agentvm.common.grpc_util import aio_channel, grpc_errors
from agentvm.v1 import executor_pb2, executor_pb2_grpc
from tests.unit.helpers import run_async
from tests.unit.test_monitor_service import Recorder

TOKEN = "wire-test"


def test_quiet_log_allows_a_burst_per_key_then_counts_what_it_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    quiet = wire.QuietLog(logging.getLogger("t.quiet"), burst=2, window=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.quiet"):
        for _ in range(50):
            quiet.warning("alice", "bad request from %s", "alice")
        quiet.warning("bob", "bad request from %s", "bob")  # another caller is not silenced
        now[0] = 11.0
        quiet.warning("alice", "bad request from %s", "alice")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "bad request from alice",
        "bad request from alice",
        "bad request from bob",
        "bad request from alice (48 similar line(s) from this caller suppressed)",
    ]


def test_quiet_log_keeps_a_bounded_number_of_callers() -> None:
    quiet = wire.QuietLog(logging.getLogger("t.quiet"), burst=1, max_keys=8)
    for i in range(1000):
        assert quiet.allow(f"caller-{i}") == (True, 0)
    assert len(quiet._keys) == 8


class Recording(executor_pb2_grpc.ExecutorServiceServicer):
    """Every handler records that it ran (none may, for a malformed request)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def ListSandboxes(self, request: Any, context: Any) -> Any:
        self.ran.append("ListSandboxes")
        return executor_pb2.ListSandboxesResponse()

    async def ReadFile(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.ran.append("ReadFile")
        yield executor_pb2.ReadFileResponse(chunk=b"x")

    @grpc_errors
    async def WriteFile(self, requests: Any, context: Any) -> Any:
        try:
            async for _ in requests:
                self.ran.append("WriteFile message")
        except grpc.aio.AbortError:
            # What a handler that hands the request stream to other code (the
            # executor's API-mode upload to the guest) may see: the abort
            # swallowed, a failure of its own raised instead.
            raise NotFound("the upload failed") from None
        return executor_pb2.WriteFileResponse()


def _serve(tmp_path: Path, servicer: Recording, rec: Recorder) -> tuple[grpc.aio.Server, str]:
    token = auth.TokenAuth(TOKEN, tmp_path / "token")
    server = grpc.aio.server(interceptors=list(telemetry.server_interceptors(rec, None, token)))
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    sock = tmp_path / "x.sock"
    server.add_insecure_port(f"unix:{sock}")
    return server, f"unix:{sock}"


async def _call(ch: grpc.aio.Channel, path: str, streamed: bool, md: Any) -> None:
    """One call of ``path`` carrying b"\\xff": a tag whose varint never ends."""
    if streamed:
        async for _ in ch.unary_stream(path, None, None)(b"\xff", metadata=md):
            pass
    else:
        await ch.unary_unary(path, None, None)(b"\xff", metadata=md)


def test_malformed_requests_are_invalid_argument_and_never_reach_a_handler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servicer, rec = Recording(), Recorder()  # type: ignore[abstract]

    async def main() -> list[grpc.aio.AioRpcError]:
        server, target = _serve(tmp_path, servicer, rec)
        await server.start()
        errors: list[grpc.aio.AioRpcError] = []
        try:
            async with aio_channel(target, "executor") as ch:
                md = (("authorization", f"Bearer {TOKEN}"),)
                # b"\xff": a tag whose varint never ends.
                for method in ("ListSandboxes", "ReadFile", "CloseSandbox"):
                    path = f"/agentvm.v1.ExecutorService/{method}"
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await _call(ch, path, method == "ReadFile", md)
                    errors.append(info.value)
                # A client stream whose second message is bad: refused at that message.
                good = executor_pb2.WriteFileRequest(sandbox_id="s").SerializeToString()

                async def upload() -> AsyncIterator[bytes]:
                    yield good
                    yield b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.stream_unary("/agentvm.v1.ExecutorService/WriteFile", None, None)(
                        upload(), metadata=md
                    )
                errors.append(info.value)
                # Without the token: refused as unauthenticated, the bytes never decoded.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary("/agentvm.v1.ExecutorService/ListSandboxes", None, None)(
                        b"\xff"
                    )
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
                # Well-formed calls still work.
                got = await ch.unary_unary("/agentvm.v1.ExecutorService/ListSandboxes", None, None)(
                    b"", metadata=md
                )
                assert got == b""
        finally:
            await server.stop(None)
        return errors

    with caplog.at_level(logging.WARNING):
        errors = run_async(main())
    for err, kind in zip(
        errors,
        ["ListSandboxesRequest", "ReadFileRequest", "CloseSandboxRequest", "WriteFileRequest"],
        strict=True,
    ):
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = err.details() or ""
        assert f"not a valid agentvm.v1.{kind}" in details, details
        assert "ExecutorService/" in details
    assert servicer.ran == ["WriteFile message", "ListSandboxes"]
    # Counted and audited as INVALID_ARGUMENT like any failed call, logged without a traceback.
    codes = [attrs["code"] for kind, attrs in rec.events if kind == "api.call"]
    assert codes.count("INVALID_ARGUMENT") == 4
    refused = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(refused) <= 5
    assert not any(r.exc_info for r in refused)
    # Answered once: no second abort ("Abort already called!") logged by gRPC.
    assert not [r.getMessage() for r in caplog.records if r.exc_info], caplog.text[-2000:]


def test_health_watch_streams_through_the_whole_chain(tmp_path: Path) -> None:
    """A handler that writes through context.write (grpc's Health/Watch) still works."""

    async def main() -> list[int]:
        server, target = _serve(tmp_path, Recording(), Recorder())  # type: ignore[abstract]
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await server.start()
        try:
            async with aio_channel(target, "executor") as ch:
                call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                first = await call.read()
                await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                second = await call.read()
                call.cancel()
                return [first.status, second.status]
        finally:
            await server.stop(None)

    assert run_async(main()) == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
