"""One error root for agent-vm, mapped to gRPC status codes at service boundaries.

Error tree::

    AgentVMError                      (INTERNAL)
     ├── InvalidArgument              (INVALID_ARGUMENT)  bad request: say what to change
     ├── NotFound                     (NOT_FOUND)
     ├── AlreadyExists                (ALREADY_EXISTS)
     ├── FailedPrecondition           (FAILED_PRECONDITION) missing image, wrong state ...
     │    └── StateError              a VM is not in a state that allows the call
     ├── Unavailable                  (UNAVAILABLE) libvirt down, service not up
     ├── DeadlineExceeded             (DEADLINE_EXCEEDED)
     ├── Unimplemented                (UNIMPLEMENTED) not available in this build/host
     ├── GuestError                   (UNAVAILABLE) the guest misbehaved or died
     ├── ResourceExhausted            (RESOURCE_EXHAUSTED) too many sandboxes
     ├── DataLoss                     (DATA_LOSS) checksum mismatch
     └── RemoteError                  (the code another service returned)

Every message says what was wrong and what to do about it. An error may
carry a ``reason`` (a stable word for clients: the status code alone does not
tell them apart), sent as the trailing metadata ``REASON_KEY``.
"""

from __future__ import annotations

import grpc

# Trailing metadata that carries AgentVMError.reason to clients.
REASON_KEY = "agentvm-reason"
# The sandbox reached the end of its lifetime (the executor destroyed it).
REASON_SANDBOX_EXPIRED = "sandbox-expired"
# The sandbox was closed (by its caller) while the call ran.
REASON_SANDBOX_CLOSED = "sandbox-closed"


class AgentVMError(Exception):
    """Root of every agent-vm error."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentVMError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AgentVMError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentVMError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AgentVMError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(AgentVMError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class StateError(FailedPrecondition):
    """A VM is in ``state`` but the operation needs one of ``required``."""

    def __init__(self, name: str, state: str, required: tuple[str, ...]) -> None:
        super().__init__(f"VM {name} is {state}; this needs it to be {' or '.join(required)}")
        self.state = state
        self.required = required


class Aborted(AgentVMError):
    """The operation was cut short by something else (e.g. its VM was destroyed)."""

    code = grpc.StatusCode.ABORTED


class Unavailable(AgentVMError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AgentVMError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(AgentVMError):
    code = grpc.StatusCode.UNIMPLEMENTED


class GuestError(AgentVMError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(AgentVMError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(AgentVMError):
    """Content did not arrive intact (checksum mismatch)."""

    code = grpc.StatusCode.DATA_LOSS


class RemoteError(AgentVMError):
    """An error another agent-vm service returned, passed on with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, what: str) -> RemoteError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        # gRPC's words for "nothing listens there", not a peer's own UNAVAILABLE
        # (e.g. vm-manager's "cannot connect to libvirt", which names its fix).
        if code == grpc.StatusCode.UNAVAILABLE and (details or "").startswith("failed to connect"):
            details = f"{details} (is the service up? `agent-vm up` starts it)"
        return cls(code, f"{what}: {details}")
