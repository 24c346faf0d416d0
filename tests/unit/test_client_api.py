"""The Python client's public surface: sync mirrors async, errors map from status codes."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import grpc
import pytest

import agent_vm
from agent_vm import _async, _ports, _processes, _sync, errors
from agentvm.v1 import executor_pb2

PAIRS: list[tuple[Any, Any, list[str]]] = [
    (
        _async.AsyncSandbox,
        _sync.Sandbox,
        [
            "create",
            "connect",
            "disconnect",
            "pause",
            "resume",
            "run",
            "start",
            "close",
            "network_log",
            "list",
            "set_timeout",
            "info",
        ],
    ),
    (
        _async.AsyncFiles,
        _sync.Files,
        ["write", "upload", "read", "read_text", "download", "list", "exists", "mkdir", "remove"],
    ),
    (_async.AsyncCommandHandle, _sync.CommandHandle, ["wait", "kill", "send_stdin"]),
    (_processes.AsyncProcesses, _sync.Processes, ["start", "list", "connect"]),
    (_ports.AsyncPorts, _sync.Ports, ["forward", "close_all"]),
    (_ports.AsyncPortForward, _sync.PortForward, ["close"]),
    (
        _processes.AsyncProcess,
        _sync.Process,
        ["output", "wait", "send_input", "close_stdin", "signal", "kill", "resize"],
    ),
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


def test_every_public_method_has_a_docstring() -> None:
    """Sync and async alike: each public method, property and function says what it does."""
    missing = []
    for name in agent_vm.__all__:
        obj = getattr(agent_vm, name)
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if not inspect.isclass(obj) or issubclass(obj, Exception):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            func = member.fget if isinstance(member, property) else member
            if isinstance(func, classmethod):
                func = func.__func__
            if callable(func) and not (inspect.getdoc(func) or "").strip():
                missing.append(f"{name}.{attr}")
    assert not missing, missing


def test_every_exception_is_an_agentvmerror_and_documented() -> None:
    """The user guide's client section names every exception the client exports."""
    from pathlib import Path

    guide = (Path(__file__).parents[2] / "docs" / "USER_GUIDE.md").read_text()
    for name in agent_vm.__all__:
        obj = getattr(agent_vm, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, agent_vm.AgentVMError), name
            assert name in guide, f"{name} is not in docs/USER_GUIDE.md"


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


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: unix:/x: No such file",
        "Socket closed",
        "Stream removed",
        "Connection reset by peer",
    ],
)
def test_unreachable_service_says_which_and_how_to_start_it(details: str) -> None:
    err = errors.from_rpc(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "unix:/run/agent-vm/executor.sock"
    )
    assert type(err) is errors.UnavailableError
    assert "executor" in err.message
    assert "agent-vm status" in err.message
    assert "agent-vm up" in err.message
    assert "unix:/run/agent-vm/executor.sock" in err.message


def test_a_service_behind_the_executor_that_is_down_is_named() -> None:
    err = errors.from_rpc(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "vm-manager: failed to connect to all addresses"),
        "unix:/x.sock",
    )
    assert "agent-vm vm-manager service is down" in err.message
    assert "agent-vm status" in err.message
    # A service's own UNAVAILABLE (it names its fix) is passed on as it is.
    own = errors.from_rpc(
        FakeRpcError(grpc.StatusCode.UNAVAILABLE, "guest agent of vm-1: the VM is rebooting"),
        "unix:/x.sock",
    )
    assert own.message == "guest agent of vm-1: the VM is rebooting"


def test_the_end_of_a_lifetime_is_its_own_error() -> None:
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.ABORTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("agentvm-reason", "sandbox-expired")),
        "sandbox sb-1 reached the end of its lifetime (5 s)",
        None,
    )
    err = errors.from_rpc(exc, "x")
    assert type(err) is errors.SandboxExpiredError
    assert isinstance(err, errors.SandboxClosedError)
    assert "lifetime" in err.message
    closed = grpc.aio.AioRpcError(
        grpc.StatusCode.ABORTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("agentvm-reason", "sandbox-closed")),
        "sandbox sb-1 was closed while this call ran",
        None,
    )
    assert type(errors.from_rpc(closed, "x")) is errors.SandboxClosedError


def test_unreachable_service_says_how_to_start_it() -> None:
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


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda sb: sb.run("env", env={"A": 1}), ["env['A']", "int", "str"]),
        (lambda sb: sb.run("env", env={1: "a"}), ["key of env", "str"]),
        (lambda sb: sb.run("env", env=["A=1"]), ["env must be a mapping", "list"]),
        (lambda sb: sb.run(["ls", 3]), ["cmd[1]", "str", "int"]),
        (lambda sb: sb.run("ls", args="-l"), ["args must be a list of str", "['-l']"]),
        (lambda sb: sb.run("ls", stdin=5), ["stdin", "bytes or str"]),
        (lambda sb: sb.run("ls", timeout="10"), ["timeout", "number"]),
        (lambda sb: sb.run("ls", cwd=Path("/tmp")), ["cwd", "str"]),
        (lambda sb: sb.run("ls", on_stdout="print"), ["on_stdout", "callable"]),
        (lambda sb: sb.files.write("a", 42), ["data", "bytes or str"]),
        (lambda sb: sb.files.write(Path("a"), b""), ["path", "str"]),
        (lambda sb: sb.files.write("a", b"", mode="644"), ["mode", "0o644"]),
        (lambda sb: sb.files.exists(None), ["path", "str"]),
        (lambda sb: sb.files.read("a", max_bytes=-1), ["max_bytes", "0 or more"]),
    ],
)
def test_bad_arguments_name_the_argument_before_any_call(call: Any, words: list[str]) -> None:
    """Arguments are checked before anything is sent (the address serves nothing)."""

    async def main() -> None:
        async with _async._channel("unix:/nonexistent/agent-vm.sock") as channel:
            sb = _async.AsyncSandbox(
                "unix:/nonexistent/agent-vm.sock", channel, executor_pb2.Sandbox(id="sb-1")
            )
            with pytest.raises(TypeError if "0 or more" not in words else ValueError) as info:
                await call(sb)
            assert isinstance(info.value, agent_vm.InvalidArgumentError)
            for word in words:
                assert word in str(info.value), (word, str(info.value))

    asyncio.run(main())


def test_bad_create_arguments_fail_before_any_call() -> None:
    for kwargs, words in (
        ({"labels": {"a": 1}}, ["labels['a']"]),
        ({"lifetime": 0}, ["lifetime", "more than 0"]),
        ({"cpus": "2"}, ["cpus", "int"]),
        ({"bridge": "br0"}, ["bridge='br0' needs network='bridge'"]),
        ({"network": "bridge"}, ["network='bridge' needs bridge="]),
        ({"policy": {"allow_domains": ["x"]}}, ["policy", "NetworkPolicy"]),
    ):
        with pytest.raises(agent_vm.InvalidArgumentError) as info:
            agent_vm.Sandbox.create(address="unix:/nonexistent/agent-vm.sock", **kwargs)
        for word in words:
            assert word in info.value.message, (kwargs, info.value.message)
    with pytest.raises(agent_vm.InvalidArgumentError, match="needs network='bridge'"):
        agent_vm.run("true", bridge="br0", address="unix:/nonexistent/agent-vm.sock")
    # A secret's value is never in an error, even a type error about it.
    bad_secrets: list[tuple[object, str]] = [
        ({"T": b"hunter2"}, "secret_envs['T'] must be a str, got bytes"),
        ([("T", "hunter2")], "secret_envs must be a mapping of str to str, got list"),
    ]
    for given, says in bad_secrets:
        with pytest.raises(agent_vm.ArgumentTypeError) as type_err:
            agent_vm.Sandbox.create(secret_envs=given, address="unix:/nonexistent/x.sock")  # type: ignore[arg-type]
        assert says in type_err.value.message
        assert "hunter2" not in type_err.value.message
    with pytest.raises(agent_vm.InvalidArgumentError, match="'T' is in both envs and secret_envs"):
        agent_vm.Sandbox.create(
            envs={"T": "1"}, secret_envs={"T": "2"}, address="unix:/nonexistent/x.sock"
        )
    with pytest.raises(agent_vm.ArgumentTypeError, match=r"inputs\['a.txt'\] must be bytes"):
        agent_vm.run("true", inputs={"a.txt": 5}, address="unix:/nonexistent/agent-vm.sock")  # type: ignore[dict-item]
    with pytest.raises(agent_vm.ArgumentTypeError, match=r"env\['A'\]"):
        agent_vm.run("true", env={"A": 1}, address="unix:/nonexistent/agent-vm.sock")  # type: ignore[dict-item]


def test_a_closed_sandbox_says_so() -> None:
    """No grpc UsageError: every call after close() raises SandboxClosedError at once."""

    async def main() -> None:
        channel = _async._channel("unix:/nonexistent/agent-vm.sock")
        sb = _async.AsyncSandbox(
            "unix:/nonexistent/agent-vm.sock", channel, executor_pb2.Sandbox(id="sb-1")
        )
        sb._closed = True  # as close() leaves it (close() itself needs a server)
        await channel.close(grace=None)
        assert sb.closed
        for call in (
            sb.run("true"),
            sb.start("true"),
            sb.network_log(),
            sb.files.write("a", b"x"),
            sb.files.read("a"),
            sb.files.list(),
            sb.files.exists("a"),
            sb.files.mkdir("d"),
            sb.files.remove("a"),
        ):
            with pytest.raises(agent_vm.SandboxClosedError, match="sb-1 is closed"):
                await call
        await sb.close()  # idempotent

    asyncio.run(main())


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


def test_a_network_policy_built_from_lists_equals_the_servers_answer() -> None:
    mine = agent_vm.NetworkPolicy(allow_domains=["pypi.org"], allow_cidrs=[], ports=[22, 80])
    from_server = agent_vm.NetworkPolicy.from_proto(mine.to_proto())
    assert mine == from_server
    assert mine.ports == (22, 80)
    assert hash(mine) == hash(from_server)
