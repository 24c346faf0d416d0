"""e2b-gateway's logic: what the guest prints is checked, keys and tokens, paths, errors."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import grpc
import pytest
from connectrpc.code import Code
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import Request

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.e2b_gateway import __main__ as gateway_main
from agentvm.e2b_gateway import backend, guest_fs, interpreter, paths, sandboxes, tenants
from agentvm.e2b_gateway.envd.filesystem import filesystem_pb2 as fs_pb
from agentvm.e2b_gateway.envd.process import process_pb2 as pb
from agentvm.e2b_gateway.envd_process import convert, end_event
from agentvm.e2b_gateway.errors import GatewayError, from_rpc
from agentvm.v1 import common_pb2


# -- what the guest prints -------------------------------------------------------------
def test_a_find_record_becomes_an_entry() -> None:
    raw = b"f\t12\t644\t1700000000.25\troot\tstaff\t\t/etc/os-release"
    entry = guest_fs.parse_record(raw)
    assert entry is not None
    assert (entry.name, entry.path, entry.size, entry.mode) == (
        "os-release",
        "/etc/os-release",
        12,
        0o644,
    )
    assert entry.type == fs_pb.FILE_TYPE_FILE
    assert entry.permissions == "-rw-r--r--"
    assert entry.modified_time.seconds == 1700000000
    link = guest_fs.parse_record(b"l\t7\t777\t1\tu\tg\t/target\t/a/link")
    assert link is not None
    assert link.is_symlink
    assert link.symlink_target == "/target"
    directory = guest_fs.parse_record(b"d\t4096\t755\t1\tu\tg\t\t/d")
    assert directory is not None
    assert directory.permissions == stat.filemode(stat.S_IFDIR | 0o755)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"f\t1\t644\t1\tu\tg\t/relative",  # too few fields
        b"f\t1\t644\t1\tu\tg\t\trelative/path",
        b"f\t-1\t644\t1\tu\tg\t\t/p",
        b"f\tx\t644\t1\tu\tg\t\t/p",
        b"f\t1\t99999\t1\tu\tg\t\t/p",
        b"f\t1\t9\t1\tu\tg\t\t/p",  # not octal
        b"f\t1\t644\t1e99\tu\tg\t\t/p",
    ],
)
def test_a_record_that_is_not_finds_is_dropped(raw: bytes) -> None:
    assert guest_fs.parse_record(raw) is None


@given(st.binary(max_size=300))
def test_no_bytes_from_the_guest_break_the_record_parser(raw: bytes) -> None:
    entry = guest_fs.parse_record(raw)
    if entry is not None:
        assert entry.path.startswith("/")
        assert entry.size >= 0
        assert entry.mode <= 0o7777


def test_interpreter_lines_are_typed_and_shaped() -> None:
    ok = interpreter.checked(b'{"type": "stdout", "text": "hi\\n", "timestamp": 5}')
    assert ok == {"type": "stdout", "text": "hi\n", "timestamp": 5}
    result = interpreter.checked(b'{"type": "result", "text": "42", "extra": "dropped"}')
    assert result == {"type": "result", "text": "42", "is_main_result": True}
    err = interpreter.checked(b'{"type":"error","name":"E","value":"v","traceback":"t"}')
    assert err == {"type": "error", "name": "E", "value": "v", "traceback": "t"}
    count = interpreter.checked(b'{"type":"number_of_executions","execution_count":3}')
    assert count == {"type": "number_of_executions", "execution_count": 3}
    assert interpreter.checked(b'{"type":"end_of_execution","x":1}') == {"type": "end_of_execution"}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"type": "shell"}',
        b'{"type": "stdout", "text": 5, "timestamp": 1}',
        b'{"type": "stdout", "text": "x"}',
        b'{"type": "error", "name": "E", "value": "v"}',
        b'{"type": "number_of_executions", "execution_count": true}',
        b'{"type": "number_of_executions", "execution_count": -1}',
        b'{"type": "result", "text": null}',
    ],
)
def test_interpreter_lines_of_another_shape_are_not_passed_on(raw: bytes) -> None:
    assert interpreter.checked(raw) is None


@given(st.binary(max_size=200))
def test_no_bytes_from_the_guest_break_the_interpreter_parser(raw: bytes) -> None:
    item = interpreter.checked(raw)
    if item is not None:
        json.dumps(item)  # always something the caller's NDJSON can carry


def test_executor_process_events_become_envds() -> None:
    started = convert(common_pb2.ProcessEvent(started=common_pb2.ProcessStarted(pid=-5)))
    assert started is not None
    assert started.start.pid == 0
    out = convert(
        common_pb2.ProcessEvent(
            output=common_pb2.ProcessOutput(stream=common_pb2.OUTPUT_STREAM_STDERR, data=b"e")
        )
    )
    assert out is not None
    assert out.data.stderr == b"e"
    unknown = common_pb2.ProcessEvent(
        output=common_pb2.ProcessOutput(stream=common_pb2.OutputStream.ValueType(9), data=b"x")
    )
    assert convert(unknown) is None
    assert convert(common_pb2.ProcessEvent(dropped=common_pb2.OutputDropped())) is None


def test_an_exit_status_reads_as_gos() -> None:
    assert end_event(common_pb2.ExitStatus(exit_code=3)).end == pb.ProcessEvent.EndEvent(
        exit_code=3, exited=True, status="exit status 3"
    )
    killed = end_event(common_pb2.ExitStatus(signal=9)).end
    assert (killed.exit_code, killed.exited, killed.status) == (-1, False, "signal: killed")
    assert "out of time" in end_event(common_pb2.ExitStatus(signal=9, timed_out=True)).end.error


# -- paths --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given_path", "full", "rel"),
    [
        ("a.txt", "/workspace/work/a.txt", "work/a.txt"),
        ("", "/workspace/work", "work"),
        ("/workspace", "/workspace", "."),
        ("/workspace/x/../y", "/workspace/y", "y"),
        ("../../etc/passwd", "/etc/passwd", None),
        ("//tmp//x", "/tmp/x", None),
        ("/workspacefoo", "/workspacefoo", None),
    ],
)
def test_paths(given_path: str, full: str, rel: str | None) -> None:
    assert paths.absolute(given_path) == full
    assert paths.in_workspace(full) == rel


def test_a_nul_or_huge_path_is_refused() -> None:
    with pytest.raises(GatewayError, match="NUL"):
        paths.absolute("a\0b")
    with pytest.raises(GatewayError, match="4096"):
        paths.absolute("a" * 5000)


# -- keys and tokens ---------------------------------------------------------------------
def test_keys_are_stored_hashed_verified_and_revoked(tmp_path: Path) -> None:
    store = tenants.KeyStore(tmp_path / "e2b" / "keys.json")
    key = store.create("team-a", max_sandboxes=3)
    assert key.startswith("e2b_")
    assert len(key) == 44
    assert key not in (tmp_path / "e2b" / "keys.json").read_text()
    assert (tmp_path / "e2b" / "keys.json").stat().st_mode & 0o777 == 0o600
    found = store.verify(key)
    assert found is not None
    assert (found.tenant, found.max_sandboxes) == ("team-a", 3)
    assert store.verify("e2b_" + "0" * 40) is None
    assert store.verify("not a key") is None
    second = store.create("team-a", max_sandboxes=5)
    assert {k.max_sandboxes for k in store.all_keys()} == {5}  # one limit per tenant
    assert store.remove("team-a", key_id=key[4:12]) == 1
    assert store.verify(key) is None
    assert store.verify(second) is not None
    with pytest.raises(tenants.TenantError, match="no key of tenant 'nobody'"):
        store.remove("nobody")


@pytest.mark.parametrize("name", ["", "Upper", "-x", "a" * 64, "a b", "ä"])
def test_a_bad_tenant_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(tenants.TenantError, match="tenant name"):
        tenants.KeyStore(tmp_path / "k.json").create(name)


def test_a_damaged_key_file_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(tenants.TenantError, match="move it away"):
        tenants.KeyStore(path).all_keys()


def test_access_tokens_are_per_sandbox_and_survive_a_restart(tmp_path: Path) -> None:
    tokens = tenants.AccessTokens(tmp_path / "secret")
    token = tokens.token("sb-1")
    assert tokens.valid(token, "sb-1")
    assert not tokens.valid(token, "sb-2")
    assert tenants.AccessTokens(tmp_path / "secret").valid(token, "sb-1")
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


# -- requests and errors ----------------------------------------------------------------
def test_the_metadata_filter_and_bodies() -> None:
    assert sandboxes.metadata_filter("a=1&b=2") == {"a": "1", "b": "2"}
    with pytest.raises(GatewayError, match="agent-vm's"):
        sandboxes.metadata_filter("agentvm.e2b/tenant=x")
    assert backend.json_object(b"") == {}
    with pytest.raises(GatewayError, match="not JSON"):
        backend.json_object(b"{")
    with pytest.raises(GatewayError, match="JSON object"):
        backend.json_object(b"[1]")


class _Rpc(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def test_executor_errors_keep_their_meaning() -> None:
    nf = from_rpc(_Rpc(grpc.StatusCode.NOT_FOUND, "no such sandbox"), "get")
    assert (nf.status, nf.code, nf.message) == (404, Code.NOT_FOUND, "get: no such sandbox")
    gone = from_rpc(_Rpc(grpc.StatusCode.NOT_FOUND, "no sandbox 'sb-1': it was closed"))
    assert (gone.status, gone.code, gone.sandbox_gone) == (502, Code.UNAVAILABLE, True)
    assert "was not found" in gone.message  # the SDKs' SandboxNotRunningException
    full = from_rpc(_Rpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many"))
    assert (full.status, full.code) == (429, Code.RESOURCE_EXHAUSTED)
    down = from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert down.status == 503
    assert "agent-vm status" in down.message
    assert "executor is not reachable" in down.message
    # The executor answered for vm-manager (seen in the soak during its SIGKILL).
    behind = from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "vm-manager: Stream removed"))
    assert behind.status == 503
    assert behind.message.startswith("the agent-vm vm-manager service is not reachable")
    assert GatewayError(400, "bad").json() == {"code": 400, "message": "bad"}


def test_plain_http_off_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTVM_E2B_HTTP_ADDR", "0.0.0.0:8443")
    with pytest.raises(InvalidArgument, match="loopback only"):
        gateway_main.http_config(Settings())
    monkeypatch.setenv("AGENTVM_E2B_TLS_CERT", "/x.pem")
    with pytest.raises(InvalidArgument, match="go together"):
        gateway_main.http_config(Settings())
    monkeypatch.delenv("AGENTVM_E2B_TLS_CERT")
    monkeypatch.setenv("AGENTVM_E2B_HTTP_ADDR", "127.0.0.1:8443")
    assert not gateway_main.http_config(Settings()).ssl_enabled


def test_a_bad_tls_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTVM_E2B_TLS", "yes")
    with pytest.raises(InvalidArgument, match="use off or ca"):
        Settings()


def test_a_body_past_its_limit_is_refused_before_it_is_all_read() -> None:
    chunks = [b"x" * 600, b"y" * 600, b"never read"]
    read = []

    async def receive() -> dict[str, object]:
        piece = chunks.pop(0)
        read.append(piece)
        return {"type": "http.request", "body": piece, "more_body": bool(chunks)}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(GatewayError, match="larger than 1000 bytes") as caught:
        asyncio.run(backend.read_body(request, 1000))
    assert caught.value.status == 413
    assert len(read) == 2


def test_keyed_locks_serialise_per_key_and_are_forgotten_after() -> None:
    locks = backend.KeyedLocks()
    order: list[str] = []

    async def user(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    async def main() -> None:
        await asyncio.gather(user("a", "1"), user("a", "2"), user("b", "3"))

    asyncio.run(main())
    assert order.index("1-") < order.index("2+")  # same key: one at a time
    assert order.index("3+") < order.index("1-")  # another key: at once
    assert len(locks) == 0


def test_past_its_limit_of_requests_the_gateway_answers_busy(tmp_path: Path) -> None:
    from agentvm.e2b_gateway.app import MAX_INFLIGHT, Gateway

    gw = Gateway(
        backend.Backend(stub=None),  # type: ignore[arg-type]  # never reached
        tenants.KeyStore(tmp_path / "keys.json"),
        tenants.AccessTokens(tmp_path / "secret"),
    )
    gw.inflight = MAX_INFLIGHT
    before = _counted("refused", "503")
    sent = _asgi(gw, [], "/sandboxes")
    assert sent[0]["status"] == 503
    assert b"try again" in sent[1]["body"]  # type: ignore[operator]
    assert gw.inflight == MAX_INFLIGHT
    assert _counted("refused", "503") == before + 1


def _counted(api: str, code: str) -> float:
    """e2b-gateway's count of POST requests to ``api`` answered ``code`` (its /metrics)."""
    from prometheus_client import REGISTRY

    labels = {"api": api, "method": "POST", "code": code}
    return REGISTRY.get_sample_value("agentvm_e2b_http_requests_total", labels) or 0.0


def _asgi(gw: object, headers: list[tuple[bytes, bytes]], path: str) -> list[dict[str, object]]:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(gw(scope, receive, send))  # type: ignore[operator]
    return sent


def test_a_sandbox_is_named_by_headers_or_by_the_host(tmp_path: Path) -> None:
    from agentvm.e2b_gateway.app import Gateway

    gw = Gateway(
        backend.Backend(stub=None),  # type: ignore[arg-type]  # never reached
        tenants.KeyStore(tmp_path / "keys.json"),
        tenants.AccessTokens(tmp_path / "secret"),
    )
    path = "/process.Process/List"
    # Headers (E2B_SANDBOX_URL) or the host (E2B_DOMAIN): a sandbox call, and
    # without its access token a 404 naming the sandbox.
    before = _counted("envd-process", "404"), _counted("rest", "401")
    for headers in (
        [(b"e2b-sandbox-id", b"sb-0123"), (b"e2b-sandbox-port", b"49983")],
        [(b"host", b"49983-sb-0123.e2b.example.org")],
    ):
        sent = _asgi(gw, headers, path)
        assert sent[0]["status"] == 404
        assert b"sb-0123" in sent[1]["body"]  # type: ignore[operator]
    # Any other host is the REST API, which wants an API key.
    sent = _asgi(gw, [(b"host", b"api.e2b.example.org")], "/sandboxes")
    assert sent[0]["status"] == 401
    # Counted by what they were for (never by path or sandbox id).
    assert (_counted("envd-process", "404"), _counted("rest", "401")) == (
        before[0] + 2,
        before[1] + 1,
    )
