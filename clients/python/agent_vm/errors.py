"""One exception root for the client: every failure is an ``AgentVMError``.

gRPC status codes are translated here, at exactly one boundary, into
subclasses whose messages say what to do.
"""

from __future__ import annotations

import grpc


class AgentVMError(Exception):
    """Root of every agent_vm error. ``code`` is the gRPC status code name."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(AgentVMError):
    code = "INVALID_ARGUMENT"


class NotFoundError(AgentVMError):
    code = "NOT_FOUND"


class FailedPreconditionError(AgentVMError):
    code = "FAILED_PRECONDITION"


class UnavailableError(AgentVMError):
    """The service (or a VM's agent) cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceededError(AgentVMError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(AgentVMError):
    code = "RESOURCE_EXHAUSTED"


class DataLossError(AgentVMError):
    """Content did not arrive intact (checksum mismatch)."""

    code = "DATA_LOSS"


class UnimplementedError(AgentVMError):
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


def from_rpc(exc: grpc.aio.AioRpcError, address: str) -> AgentVMError:
    """The client exception for a failed call."""
    code = exc.code()
    details = exc.details() or code.name
    cls = _BY_CODE.get(code, AgentVMError)
    # gRPC's words for "nothing listens there"; a service's own UNAVAILABLE
    # (e.g. "cannot connect to libvirt") names its own fix.
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect"):
        details = (
            f"the agent-vm executor is not reachable at {address} ({details}): start the "
            "services with `agent-vm up`, or pass address= / set AGENTVM_EXECUTOR_ADDR"
        )
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        details += (
            " (a request or response is over the services' message limit: pass large "
            "inputs as files with Sandbox.files.upload, which streams them in chunks)"
        )
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details += " (raise `timeout` / `request_timeout` if the work needs longer)"
    return cls(details, code.name)
