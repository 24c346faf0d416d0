"""Token authentication: the server interceptor, the client interceptors, the token file."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvm.common import auth
from agentvm.common.grpc_util import Caller, sync_channel

TOKEN = "a" * 64
SERVICE = "test.Echo"


def _identity(b: bytes) -> bytes:
    return b


class Echo:
    """One method of each kind; counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def uu(self, req: bytes, ctx: Any) -> bytes:
        self.calls += 1
        return req

    async def us(self, req: bytes, ctx: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        yield req
        yield req

    async def su(self, reqs: AsyncIterator[bytes], ctx: Any) -> bytes:
        self.calls += 1
        return b"".join([r async for r in reqs])

    async def ss(self, reqs: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        async for r in reqs:
            yield r

    def handler(self) -> Any:
        kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "UU": grpc.unary_unary_rpc_method_handler(self.uu, **kw),
                "US": grpc.unary_stream_rpc_method_handler(self.us, **kw),
                "SU": grpc.stream_unary_rpc_method_handler(self.su, **kw),
                "SS": grpc.stream_stream_rpc_method_handler(self.ss, **kw),
            },
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Echo]]:
    """An aio server with TokenAuth on a background loop."""
    echo = Echo()
    address = f"unix:{tmp_path}/s.sock"
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        srv = grpc.aio.server(interceptors=[auth.TokenAuth(TOKEN, tmp_path / "token")])
        srv.add_generic_rpc_handlers((echo.handler(),))
        hs = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(hs, srv)
        srv.add_insecure_port(address)
        await srv.start()
        stop.append(asyncio.Event())
        started.set()
        await stop[0].wait()
        await srv.stop(None)

    t = threading.Thread(target=loop.run_until_complete, args=(main(),))
    t.start()
    assert started.wait(10)
    try:
        yield address, echo
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        t.join(10)
        loop.close()


def call_all(ch: grpc.Channel) -> list[bytes]:
    kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    out = [ch.unary_unary(f"/{SERVICE}/UU", **kw)(b"x", timeout=5)]
    out += list(ch.unary_stream(f"/{SERVICE}/US", **kw)(b"y", timeout=5))
    out.append(ch.stream_unary(f"/{SERVICE}/SU", **kw)(iter([b"a", b"b"]), timeout=5))
    out += list(ch.stream_stream(f"/{SERVICE}/SS", **kw)(iter([b"c"]), timeout=5))
    return out


@pytest.mark.parametrize("token", [None, "b" * 64, TOKEN[:-1], ""])
def test_calls_without_the_right_token_are_unauthenticated_and_run_nothing(
    server: tuple[str, Echo], token: str | None
) -> None:
    address, echo = server
    kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    with Caller(token, None).channel(address, "vm-manager") as ch:
        calls: list[Callable[[], object]] = [
            lambda: ch.unary_unary(f"/{SERVICE}/UU", **kw)(b"x", timeout=5),
            lambda: list(ch.unary_stream(f"/{SERVICE}/US", **kw)(b"y", timeout=5)),
            lambda: ch.stream_unary(f"/{SERVICE}/SU", **kw)(iter([b"a"]), timeout=5),
            lambda: list(ch.stream_stream(f"/{SERVICE}/SS", **kw)(iter([b"c"]), timeout=5)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            details = err.value.details() or ""
            assert "AGENTVM_TOKEN" in details
            assert ("no token was sent" if token is None else "the token is wrong") in details
            assert TOKEN not in details
    assert echo.calls == 0


def test_the_right_token_passes_every_kind_of_call(server: tuple[str, Echo]) -> None:
    address, echo = server
    with Caller(TOKEN, None).channel(address, "vm-manager") as ch:
        assert call_all(ch) == [b"x", b"y", b"y", b"ab", b"c"]
    assert echo.calls == 4


def test_reflection_method_names_are_exempt_and_nothing_else() -> None:
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".startswith(
        auth.EXEMPT_PREFIXES
    )
    assert not "/agentvm.v1.ExecutorService/Run".startswith(auth.EXEMPT_PREFIXES)
    assert not "/grpc.health.v1.HealthX/Check".startswith(auth.EXEMPT_PREFIXES)


def test_health_needs_no_token(server: tuple[str, Echo]) -> None:
    address, _ = server
    with sync_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_aio_channels_send_the_token(server: tuple[str, Echo]) -> None:
    address, echo = server

    async def main() -> list[bytes]:
        kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
        interceptors = auth.aio_token_interceptors(TOKEN)
        async with grpc.aio.insecure_channel(address, interceptors=interceptors) as ch:
            out = [await ch.unary_unary(f"/{SERVICE}/UU", **kw)(b"x", timeout=5)]
            out += [r async for r in ch.unary_stream(f"/{SERVICE}/US", **kw)(b"y", timeout=5)]
            out.append(await ch.stream_unary(f"/{SERVICE}/SU", **kw)(iter([b"a"]), timeout=5))
            out += [r async for r in ch.stream_stream(f"/{SERVICE}/SS", **kw)(iter([b"c"]))]
            return out

    assert asyncio.run(main()) == [b"x", b"y", b"y", b"a", b"c"]
    assert echo.calls == 4


def test_token_file_is_created_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    first = auth.generate_token_file(path)
    assert len(first) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.generate_token_file(path) == first
    assert auth.read_token_file(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["token"]


def test_concurrent_creators_agree_on_one_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            results.append(auth.generate_token_file(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 8
    assert len(set(results)) == 1
    assert results[0] == path.read_text().strip()
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def test_bad_token_files_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(auth.TokenError, match="delete it and run `agent-vm up`"):
        auth.read_token_file(path)
    with pytest.raises(auth.TokenError, match="AGENTVM_TOKEN_FILE to a writable path"):
        auth.generate_token_file(Path("/proc/agent-vm/token"))


def test_client_token_prefers_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    monkeypatch.delenv("AGENTVM_TOKEN", raising=False)
    assert auth.client_token(path) is None  # no file: send nothing, the server says why
    auth.generate_token_file(path)
    assert auth.client_token(path) == path.read_text().strip()
    monkeypatch.setenv("AGENTVM_TOKEN", TOKEN)
    assert auth.client_token(path) == TOKEN
    monkeypatch.delenv("AGENTVM_TOKEN")
    monkeypatch.setenv("AGENTVM_TOKEN_FILE", str(path))
    assert auth.client_token() == path.read_text().strip()
    if os.geteuid() == 0:
        return  # root reads any file: the unreadable case needs another user
    path.chmod(0)
    assert auth.client_token(path) is None
