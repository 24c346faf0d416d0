"""The soak's client-side faults judge the system, not their own races (issue 20).

The first minutes of a 60-minute run reported a slow-reader fault as failed:
the command it read slowly (50 MB of ``yes``) had ended by itself, because the
guest keeps a process's output in a bounded ring and a slow reader never holds
the writer back, and killing an ended process is refused (FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import agent_vm
from agentvm.cli import soak_ops
from agentvm.cli.soak_faults import _Injector
from agentvm.common.config import Settings


class _Process:
    def __init__(self, ended: bool) -> None:
        self.ended = ended
        self.killed = False

    async def output(self) -> AsyncIterator[Any]:
        yield b"agent-vm-soak\n"

    async def kill(self) -> None:
        if self.ended:
            raise agent_vm.FailedPreconditionError("process 'pr-1' has ended (exit code 0)")
        self.killed = True


class _Processes:
    def __init__(self, proc: _Process) -> None:
        self.proc = proc

    async def start(self, cmd: list[str]) -> _Process:
        return self.proc


class _Sandbox:
    id = "sb-double"

    def __init__(self, proc: _Process, answers: bool = True) -> None:
        self.processes = _Processes(proc)
        self.answers = answers
        self.closed = False

    async def run(self, cmd: str, timeout: float) -> Any:
        if not self.answers:
            raise agent_vm.UnavailableError("the sandbox does not answer")
        return agent_vm.CommandResult(0, b"still\n", b"", False, 0.1)

    async def close(self) -> None:
        self.closed = True


class _Context(soak_ops.Context):
    def __init__(self, sb: _Sandbox) -> None:
        super().__init__("run")
        self.sb = sb

    async def sandbox(self, *args: Any, **kw: Any) -> Any:
        return self.sb


def _slow_reader(sb: _Sandbox) -> str:
    injector = _Injector(Settings(), _Context(sb), lambda: 0.0)
    return asyncio.run(injector.abuse_stream("slow-reader")).failed


def test_a_slow_readers_command_that_ended_by_itself_is_not_a_failed_fault() -> None:
    ended = _Process(ended=True)
    sb = _Sandbox(ended)
    assert _slow_reader(sb) == ""
    assert sb.closed


def test_a_slow_reader_kills_a_running_command_and_fails_when_the_sandbox_stops_answering() -> None:
    running = _Process(ended=False)
    assert _slow_reader(_Sandbox(running)) == ""
    assert running.killed
    assert _slow_reader(_Sandbox(_Process(ended=False), answers=False)).startswith(
        "UnavailableError"
    )
