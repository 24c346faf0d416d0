"""Settings, errors and JSON logging (agentvm.common)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentvm.common import errors
from agentvm.common import logging as jsonlog
from agentvm.common.config import Settings

ENV_VARS = [
    "AGENTVM_LIBVIRT_URI",
    "AGENTVM_STATE_DIR",
    "AGENTVM_RUN_DIR",
    "AGENTVM_CACHE_DIR",
    "AGENTVM_LOG_DIR",
    "AGENTVM_ACCEL",
    "AGENTVM_VM_PREFIX",
    "AGENTVM_VM_MANAGER_ADDR",
    "AGENTVM_LOG_LEVEL",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# -- config ---------------------------------------------------------------------------------
def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.libvirt_uri == "qemu:///system"
    assert s.accel == "auto"
    assert s.vm_prefix == "agent-vm-"
    assert s.vms_state_dir == Path("/var/lib/agent-vm/vms")
    assert s.vms_run_dir == Path("/run/agent-vm/vms")


def test_settings_from_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("AGENTVM_ACCEL", "tcg")
    clean_env.setenv("AGENTVM_VM_PREFIX", "agent-vm-ci-")
    clean_env.setenv("AGENTVM_STATE_DIR", str(tmp_path / "state"))
    clean_env.setenv("AGENTVM_LIBVIRT_URI", "test:///default")
    s = Settings()
    assert (s.accel, s.vm_prefix, s.libvirt_uri) == ("tcg", "agent-vm-ci-", "test:///default")
    assert s.vms_state_dir == tmp_path / "state" / "vms"


@pytest.mark.parametrize("value", ["KVM", "hvf", "", "auto "])
def test_settings_rejects_bad_accel(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("AGENTVM_ACCEL", value)
    with pytest.raises(errors.InvalidArgument, match="AGENTVM_ACCEL"):
        Settings()
    with pytest.raises(errors.InvalidArgument, match="auto, kvm or tcg"):
        Settings(accel=value)


@pytest.mark.parametrize("value", ["vm-", "agent-vm", "Agent-vm-x", "", "x-agent-vm-"])
def test_settings_rejects_bad_prefix(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("AGENTVM_VM_PREFIX", value)
    with pytest.raises(
        errors.InvalidArgument, match=r"AGENTVM_VM_PREFIX.*must start with 'agent-vm-'"
    ):
        Settings()


@pytest.mark.parametrize("value", ["auto", "kvm", "tcg"])
def test_settings_accepts_every_accel(clean_env: pytest.MonkeyPatch, value: str) -> None:
    assert Settings(accel=value).accel == value


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.AgentVMError, grpc.StatusCode.INTERNAL),
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.GuestError, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_error_codes(cls: type[errors.AgentVMError], code: grpc.StatusCode) -> None:
    err = cls("what went wrong")
    assert err.code == code
    assert err.message == "what went wrong"
    assert str(err) == "what went wrong"
    assert isinstance(err, errors.AgentVMError)


def test_state_error() -> None:
    err = errors.StateError("agent-vm-1", "STOPPED", ("READY",))
    assert isinstance(err, errors.FailedPrecondition)
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.message == "VM agent-vm-1 is STOPPED; this needs it to be READY"
    assert (err.state, err.required) == ("STOPPED", ("READY",))


# -- logging ----------------------------------------------------------------------------------
@pytest.fixture
def log_stream() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(jsonlog.JSONFormatter("vm-manager"))
    logger = logging.getLogger("agentvm.test.jsonlog")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, stream
    finally:
        logger.handlers.clear()
        logger.propagate = True


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_formatter_fields(log_stream: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_stream

    class Odd:
        def __str__(self) -> str:
            return "odd-object"

    logger.info(
        "started VM %s", "agent-vm-1", extra={"vm": "agent-vm-1", "n": 3, "ok": True, "obj": Odd()}
    )
    logger.warning('quote " and newline\n inside')
    first, second = records(stream)
    assert first["message"] == "started VM agent-vm-1"
    assert first["level"] == "info"
    assert first["service"] == "vm-manager"
    assert first["logger"] == "agentvm.test.jsonlog"
    assert (first["vm"], first["n"], first["ok"], first["obj"]) == (
        "agent-vm-1",
        3,
        True,
        "odd-object",
    )
    assert not {"args", "msg", "exc_info", "levelno"} & set(first)  # LogRecord internals
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["time"]))
    assert second["message"] == 'quote " and newline\n inside'
    assert second["level"] == "warning"


def test_json_formatter_exception(log_stream: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_stream
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logger.exception("failed")
    (rec,) = records(stream)
    assert rec["level"] == "error"
    assert "RuntimeError: kaput" in str(rec["exception"])
    assert len(stream.getvalue().splitlines()) == 1  # one line per record


def test_setup_routes_root_logging_to_stderr_as_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    jsonlog.setup("pool-manager", "debug")
    assert root.level == logging.DEBUG
    logging.getLogger("agentvm.x").debug("hello", extra={"k": "v"})
    lines = capsys.readouterr().err.splitlines()
    rec = json.loads(lines[-1])
    assert (rec["service"], rec["message"], rec["k"]) == ("pool-manager", "hello", "v")


def test_services_raise_their_open_file_limit_to_the_hard_limit() -> None:
    """A 1024 soft limit would let callers and guests exhaust a service's descriptors."""
    import resource
    import subprocess
    import sys

    code = (
        "import resource; from agentvm.common.grpc_util import raise_descriptor_limit;"
        "print(raise_descriptor_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)

    def limit_low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=limit_low,
    ).stdout.split()
    assert [int(x) for x in out] == [hard, hard, hard]
