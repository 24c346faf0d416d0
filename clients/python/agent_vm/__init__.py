"""agent_vm: run untrusted agent code in throw-away VMs.

    from agent_vm import Sandbox

    with Sandbox.create() as sb:
        sb.files.write("input/task.py", "print(6 * 7)")
        result = sb.run(["python3", "/workspace/input/task.py"], on_stdout=print)
        print(result.exit_code)

``AsyncSandbox`` is the same API for asyncio (``await AsyncSandbox.create()``);
``run()`` / ``arun()`` are one-shot runs in a fresh VM. Every error is an
``AgentVMError`` (the tree is in ``agent_vm.errors``).
"""

from agent_vm._async import (
    AsyncCommandHandle,
    AsyncFiles,
    AsyncSandbox,
    CommandResult,
    EgressRecord,
    FileInfo,
    NetworkPolicy,
)
from agent_vm._oneshot import OutputFile, RunResult, SkippedOutputFile, arun
from agent_vm._ports import AsyncPortForward, AsyncPorts
from agent_vm._processes import AsyncProcess, AsyncProcesses
from agent_vm._sync import (
    CommandHandle,
    Files,
    PortForward,
    Ports,
    Process,
    Processes,
    Sandbox,
    run,
)
from agent_vm._types import ProcessExit, ProcessInfo, ProcessOutput, SandboxInfo
from agent_vm.errors import (
    AgentVMError,
    ArgumentTypeError,
    CommandExitError,
    CommandTimeoutError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SandboxClosedError,
    SandboxExpiredError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "AgentVMError",
    "ArgumentTypeError",
    "AsyncCommandHandle",
    "AsyncFiles",
    "AsyncPortForward",
    "AsyncPorts",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncSandbox",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "CommandTimeoutError",
    "DataLossError",
    "DeadlineExceededError",
    "EgressRecord",
    "FailedPreconditionError",
    "FileInfo",
    "Files",
    "InvalidArgumentError",
    "NetworkPolicy",
    "NotFoundError",
    "OutputFile",
    "PortForward",
    "Ports",
    "Process",
    "ProcessExit",
    "ProcessInfo",
    "ProcessOutput",
    "Processes",
    "ResourceExhaustedError",
    "RunResult",
    "Sandbox",
    "SandboxClosedError",
    "SandboxExpiredError",
    "SandboxInfo",
    "SkippedOutputFile",
    "UnavailableError",
    "UnimplementedError",
    "arun",
    "run",
]
