"""Callers that cancel streams or let deadlines pass cannot crash a service (issue 22, item 1).

The server is a child process (tests/cancelserver.py) with every service's
real interceptor chain; before the fix, the CallObserver read the call's
peer, auth context and metadata after a cancel had freed the call, and the
process died of SIGSEGV within the first few hundred cancels.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvm.common.auth import aio_token_interceptors
from tests.cancelserver import SERVICE, TOKEN

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 150


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    sock = tmp_path / "flood.sock"
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cancelserver", str(sock)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc, f"unix:{sock}", log
    finally:
        proc.kill()
        proc.communicate()


async def _abuse(target: str) -> int:
    """Cancels and deadlines of every kind; returns how many calls ended as the caller chose."""
    req = health_pb2.HealthCheckRequest()
    ser, de = req.SerializeToString, health_pb2.HealthCheckResponse.FromString
    ended = 0
    async with grpc.aio.insecure_channel(target, interceptors=aio_token_interceptors(TOKEN)) as ch:
        stream = ch.unary_stream(
            f"/{SERVICE}/Stream", request_serializer=ser, response_deserializer=de
        )
        slow = ch.unary_stream(f"/{SERVICE}/Slow", request_serializer=ser, response_deserializer=de)
        unary = ch.unary_unary(
            f"/{SERVICE}/Unary", request_serializer=ser, response_deserializer=de
        )
        for i in range(ROUNDS):
            # A deadline that passes mid-stream, with a slow reader.
            call = stream(req, timeout=0.02 + (i % 5) * 0.01)
            try:
                async for _ in call:
                    if i % 3 == 0:
                        await asyncio.sleep(0.001)
            except grpc.aio.AioRpcError as exc:
                ended += exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # A cancel after some messages.
            call = stream(req)
            got = 0
            async for _ in call:
                got += 1
                if got > i % 40:
                    call.cancel()
                    break
            ended += 1
            # A cancel while the handler awaits, and a deadline that passes there.
            call = slow(req)
            async for _ in call:
                call.cancel()
                break
            try:
                async for _ in slow(req, timeout=0.01):
                    pass
            except grpc.aio.AioRpcError as exc:
                ended += exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # A unary call cut by its deadline.
            try:
                await unary(req, timeout=0.001 * (i % 4))
            except grpc.aio.AioRpcError as exc:
                ended += exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                ended += 1
    return ended


def test_cancels_and_deadlines_on_streams_leave_the_service_alive_and_serving(
    server: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, target, log = server
    ended = asyncio.run(_abuse(target))
    assert proc.poll() is None, (
        f"the server died ({proc.returncode}): {proc.communicate()[1][-3000:]}"
    )
    assert ended >= ROUNDS * 3  # the calls really were cut short, not answered in full
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # Every stream was closed in its own task: nothing was left for the garbage
    # collector to finish out of context (each such call logged a traceback).
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
