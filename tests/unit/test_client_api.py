"""The Python client's public surface: sync mirrors async, errors map from status codes."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import pytest

import agent_vm
from agent_vm import _async, _sync, errors

PAIRS: list[tuple[Any, Any, list[str]]] = [
    (_async.AsyncSandbox, _sync.Sandbox, ["create", "run", "start", "close"]),
    (
        _async.AsyncFiles,
        _sync.Files,
        ["write", "upload", "read", "read_text", "download", "list", "remove"],
    ),
    (_async.AsyncCommandHandle, _sync.CommandHandle, ["wait", "kill", "send_stdin"]),
]


def _params(func: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(inspect.unwrap(func))
    return [
        (p.name, p.kind, p.default)
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
    ]


@pytest.mark.parametrize(("async_cls", "sync_cls", "methods"), PAIRS)
def test_sync_api_mirrors_async(async_cls: Any, sync_cls: Any, methods: list[str]) -> None:
    for name in methods:
        assert _params(getattr(async_cls, name)) == _params(getattr(sync_cls, name)), name


def test_one_shot_run_mirrors_arun() -> None:
    assert _params(agent_vm.arun) == _params(agent_vm.run)


def test_public_names_are_exported() -> None:
    for name in agent_vm.__all__:
        assert hasattr(agent_vm, name), name


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.DATA_LOSS, errors.DataLossError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.UnimplementedError),
        (grpc.StatusCode.INTERNAL, errors.AgentVMError),
    ],
)
def test_status_codes_map_to_one_exception_tree(code: grpc.StatusCode, cls: type) -> None:
    err = errors.from_rpc(FakeRpcError(code, "boom"), "unix:/x.sock")
    assert type(err) is cls
    assert isinstance(err, errors.AgentVMError)
    assert err.code == code.name


def test_unreachable_service_says_how_to_start_it() -> None:
    err = errors.from_rpc(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        "unix:/run/agent-vm/executor.sock",
    )
    assert "agent-vm up" in err.message
    assert "unix:/run/agent-vm/executor.sock" in err.message
    slow = errors.from_rpc(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), "x")
    assert "timeout" in slow.message


def test_bad_options_fail_before_any_call() -> None:
    with pytest.raises(agent_vm.AgentVMError, match="profile"):
        _async._spec("huge", "isolated", 0, 0, None, "auto", None)  # type: ignore[arg-type]
    with pytest.raises(agent_vm.AgentVMError, match="either"):
        _async._program(None, None, "python", ())
    with pytest.raises(agent_vm.AgentVMError, match="language"):
        _async._program(None, "x", "cobol", ())
    prog = _async._program(["ls", "-l"], None, "python", ["/tmp"])
    assert list(prog.argv.args) == ["ls", "-l", "/tmp"]
    prog = _async._program("echo hi", None, "python", ())
    assert prog.code.source == "echo hi"


def test_command_result_check() -> None:
    ok = agent_vm.CommandResult(0, b"out", b"", False, 0.1)
    assert ok.check() is ok
    assert ok.ok
    assert ok.stdout == "out"
    with pytest.raises(agent_vm.CommandExitError) as info:
        agent_vm.CommandResult(3, b"", b"bad", False, 0.1).check()
    assert info.value.result.exit_code == 3  # type: ignore[attr-defined]
    with pytest.raises(agent_vm.CommandTimeoutError):
        agent_vm.CommandResult(124, b"", b"", True, 5.0).check()
