"""One exception root for the client: every failure is an ``AgentVMError``.

gRPC status codes are translated here, at exactly one boundary, into
subclasses whose messages say what to do. Arguments of the wrong type raise
``ArgumentTypeError`` (an ``InvalidArgumentError`` and a ``TypeError``), bad
values ``InvalidArgumentError`` (also a ``ValueError``), before anything is sent.

::

    AgentVMError
     ├── InvalidArgumentError (ValueError)    a bad argument: what to pass instead
     │    └── ArgumentTypeError (TypeError)   an argument of the wrong type
     ├── NotFoundError                        no such file, directory or sandbox
     ├── FailedPreconditionError              e.g. TLS files missing, a sparse file
     │    └── SandboxClosedError              the sandbox was closed
     │         └── SandboxExpiredError        ... by the end of its lifetime
     ├── UnavailableError                     a service (or a VM's agent) is unreachable
     ├── DeadlineExceededError                a call took longer than its deadline
     ├── ResourceExhaustedError               a limit: sizes, sandboxes, listings
     ├── DataLossError                        content did not arrive intact
     ├── UnimplementedError                   not offered by this installation
     ├── CommandTimeoutError                  result.check(): the command timed out
     └── CommandExitError                     result.check(): a non-zero exit
"""

from __future__ import annotations

import re
from typing import Any

import grpc

from agentvm.common.errors import REASON_KEY, REASON_SANDBOX_CLOSED, REASON_SANDBOX_EXPIRED


class AgentVMError(Exception):
    """Root of every agent_vm error. ``code`` is the gRPC status code name."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(AgentVMError, ValueError):
    """A bad argument (the message names it and what to pass instead)."""

    code = "INVALID_ARGUMENT"


class ArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type, found before anything was sent."""


class NotFoundError(AgentVMError):
    """No such file, directory or sandbox."""

    code = "NOT_FOUND"


class FailedPreconditionError(AgentVMError):
    """The request cannot be served in this state (e.g. TLS files missing, a sparse file)."""

    code = "FAILED_PRECONDITION"


class SandboxClosedError(FailedPreconditionError):
    """The sandbox was closed: create a new one."""


class SandboxExpiredError(SandboxClosedError):
    """The sandbox reached the end of its lifetime and was destroyed (also during a call).

    Extend a running sandbox's lifetime before it ends (``sb.set_timeout(SECONDS)``),
    or create it with a longer one (``Sandbox.create(lifetime=SECONDS)``).
    """


class UnavailableError(AgentVMError):
    """The service (or a VM's agent) cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceededError(AgentVMError):
    """A call took longer than its deadline."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(AgentVMError):
    """A limit was reached: a size, the number of sandboxes, a listing."""

    code = "RESOURCE_EXHAUSTED"


class DataLossError(AgentVMError):
    """Content did not arrive intact (checksum mismatch)."""

    code = "DATA_LOSS"


class UnimplementedError(AgentVMError):
    """Not offered by this installation."""

    code = "UNIMPLEMENTED"


class CommandTimeoutError(AgentVMError):
    """Raised by ``result.check()`` when the command hit its timeout."""

    code = "DEADLINE_EXCEEDED"


class CommandExitError(AgentVMError):
    """Raised by ``result.check()`` for a non-zero exit; carries the result."""

    code = "OK"

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


_BY_CODE: dict[grpc.StatusCode, type[AgentVMError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


# gRPC's own words for a connection that could not be made or broke: the
# service is down (or went down during the call), not a service's own answer.
_TRANSPORT = re.compile(
    r"failed to connect|socket closed|stream removed|connection reset|connection refused|"
    r"broken pipe|connection timed out|end of tcp stream|goaway|recvmsg",
    re.IGNORECASE,
)
# What the executor prefixes the errors of the services behind it with.
_SERVICES = ("vm-manager", "pool-manager", "monitor")


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """The service's reason for the error (trailing metadata), "" without one."""
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == REASON_KEY:
            return str(value)
    return ""


def from_rpc(exc: grpc.aio.AioRpcError, address: str) -> AgentVMError:
    """The client exception for a failed call."""
    code = exc.code()
    details = exc.details() or code.name
    cls = _BY_CODE.get(code, AgentVMError)
    reason = _reason(exc)
    if reason == REASON_SANDBOX_EXPIRED:
        return SandboxExpiredError(details, code.name)
    if reason == REASON_SANDBOX_CLOSED:
        return SandboxClosedError(details, code.name)
    if code == grpc.StatusCode.UNAVAILABLE:
        service = next((s for s in _SERVICES if details.startswith(s + ": ")), None)
        said = details[len(service) + 2 :] if service is not None else details
        if service is not None and _TRANSPORT.match(said):
            details = (
                f"{details}: the agent-vm {service} service is down; see `agent-vm status`, "
                "and start it with `agent-vm up`"
            )
        elif service is None and _TRANSPORT.match(details):
            details = (
                f"the agent-vm executor service is not reachable at {address} ({details}): "
                "see `agent-vm status`, start the services with `agent-vm up`, or pass "
                "address= / set AGENTVM_EXECUTOR_ADDR if it listens elsewhere"
            )
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        details += (
            " (a request or response is over the services' message limit: pass large "
            "inputs as files with Sandbox.files.upload, which streams them in chunks)"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details += " (raise `timeout` / `request_timeout` if the work needs longer)"
    return cls(details, code.name)
