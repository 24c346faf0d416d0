"""Executions in a sandbox: Exec's stream, signals, stdin, and what is reported.

A mixin of AgentExecutor (which provides what is declared at the top of
``Executions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc

from agentvm.common.errors import (
    Aborted,
    AgentVMError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    RemoteError,
    ResourceExhausted,
)
from agentvm.common.events import EventSink
from agentvm.common.fleet import Fleet
from agentvm.common.guest_figures import Bounds, clamp_exit_status
from agentvm.executor.sandbox import (
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    SandboxState,
    default_cwd,
    describe_program,
    outcome_of,
    output_cap,
    seconds_of,
)
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    guest_agent_pb2,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

log = logging.getLogger("agentvm.executor")


class Executions:
    """Programs running in sandboxes."""

    events: EventSink
    vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    fleet: Fleet | None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        raise NotImplementedError

    def gone_error(self, sandbox_id: str, *, cut_short: bool) -> AgentVMError:
        raise NotImplementedError

    async def network_log(self, sb: SandboxState) -> list[common_pb2.EgressRecord]:
        raise NotImplementedError

    async def exec(
        self, sb: SandboxState, req: executor_pb2.ExecRequest
    ) -> AsyncIterator[executor_pb2.ExecResponse]:
        """Run a program in ``sb``; streams ExecStarted, output chunks, exit status."""
        if not req.program.WhichOneof("kind"):
            raise InvalidArgument("program is empty: set program.argv or program.code")
        timeout = seconds_of(req, "timeout", DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S)
        cap = output_cap(req.max_output_bytes)
        exec_id = req.exec_id or "ex-" + secrets.token_hex(6)
        if exec_id in sb.execs:
            raise InvalidArgument(f"exec_id {exec_id!r} is already running in this sandbox")
        greq = guest_agent_pb2.ExecuteRequest(
            program=req.program,
            cwd=req.cwd or default_cwd(sb.spec),
            env=sb.env.for_exec(req.env),
            stdin=req.stdin,
            exec_id=exec_id,
            max_output_bytes=cap,
            keep_stdin_open=req.keep_stdin_open,
        )
        greq.timeout.FromNanoseconds(int(timeout * 1e9))
        sent = {common_pb2.OUTPUT_STREAM_STDOUT: 0, common_pb2.OUTPUT_STREAM_STDERR: 0}
        truncated = dict.fromkeys(sent, False)
        sb.execs.add(exec_id)
        command, command_sha = describe_program(req.program)
        command = sb.env.redact(command)
        self.events.emit(
            "execution.started",
            vm=sb.vm.name,
            sandbox=sb.id,
            exec_id=exec_id,
            command=command,
            command_sha256=command_sha,
        )
        started_wall, started = time.time(), time.monotonic()
        final: common_pb2.ExitStatus | None = None
        failure = ""
        call = sb.agent.Execute(greq, timeout=timeout + 30)
        try:
            async for ev in call:
                if final is not None:
                    # Nothing may follow the exit status: a guest that goes on is cut off.
                    break
                kind = ev.WhichOneof("event")
                if kind == "started":
                    yield executor_pb2.ExecResponse(
                        started=executor_pb2.ExecStarted(exec_id=exec_id, pid=ev.started.pid)
                    )
                elif kind == "output":
                    stream = ev.output.stream
                    if stream not in sent:
                        raise DataLoss(f"the guest sent output on an unknown stream {stream}")
                    room = cap - sent[stream]
                    data = ev.output.data
                    if len(data) > room:
                        data = data[: max(room, 0)]
                        truncated[stream] = True
                    if data:
                        sent[stream] += len(data)
                        yield executor_pb2.ExecResponse(
                            output=common_pb2.OutputChunk(stream=stream, data=data)
                        )
                elif kind == "exited":
                    status = ev.exited
                    # The guest's figures, bounded by what the host measured (noted if not).
                    elapsed = time.monotonic() - started
                    if clamped := clamp_exit_status(status, Bounds.of_vm(sb.vm, elapsed)):
                        log.warning(
                            "guest of %s reported impossible figures: %s", sb.vm.name, clamped
                        )
                        self.events.emit(
                            "guest.figures_clamped",
                            vm=sb.vm.name,
                            sandbox=sb.id,
                            severity="warning",
                            exec_id=exec_id,
                            clamped=clamped,
                        )
                    status.stdout_truncated |= truncated[common_pb2.OUTPUT_STREAM_STDOUT]
                    status.stderr_truncated |= truncated[common_pb2.OUTPUT_STREAM_STDERR]
                    final = status
                    yield executor_pb2.ExecResponse(exited=status)
            # (The stream is read to its end: the call and its span end cleanly.)
            if final is not None:
                return
            failure = "no exit status"
            raise FailedPrecondition(
                f"the guest agent of {sb.vm.name} ended the execution without an exit status"
            )
        except grpc.aio.AioRpcError as exc:
            if final is not None:
                return
            failure = f"{exc.code().name}: {exc.details()}"
            # A broken connection (UNAVAILABLE) may be the VM dying: libvirt
            # can take a moment to see QEMU go, so look again for a while.
            gone = await self._vm_gone(sb, patient=exc.code() is grpc.StatusCode.UNAVAILABLE)
            if gone:
                failure = gone
                raise Aborted(
                    f"exec {exec_id} ended because the VM of sandbox {sb.id} is gone: {gone}"
                ) from exc
            deadline = exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            if deadline and (held := await self._vm_held(sb)):
                # Its guest did not answer in time because the host held it (a full disk).
                failure = held
                raise ResourceExhausted(
                    f"exec {exec_id} in sandbox {sb.id} did not end in time: {held}"
                ) from exc
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
        except asyncio.CancelledError as exc:
            failure = failure or "cancelled"
            task = asyncio.current_task()
            if sb.closing and task is not None and not task.cancelling():
                # Closing the sandbox closed its agent channel, which cancels the
                # guest call: answer with why, or the caller waits for its deadline.
                failure = "sandbox closed"
                raise self.gone_error(sb.id, cut_short=True) from exc
            raise
        except BaseException as exc:
            failure = failure or type(exc).__name__
            raise
        finally:
            call.cancel()
            sb.execs.discard(exec_id)
            self._spawn(
                self._report_finished(sb, exec_id, final, failure, started_wall, sum(sent.values()))
            )

    async def _vm_held(self, sb: SandboxState) -> str:
        """Why the host holds the sandbox's running VM (vm-manager's word: QEMU paused
        it for a full disk), or ""."""
        try:
            resp = await self.vmm.GetVM(vm_manager_pb2.GetVMRequest(name=sb.vm.name), timeout=5)
        except grpc.aio.AioRpcError:
            return ""
        return resp.vm.error if resp.vm.state == common_pb2.VM_STATE_READY else ""

    async def _vm_gone(self, sb: SandboxState, *, patient: bool = False) -> str:
        """Why the sandbox's VM no longer exists ("" while it does).

        A VM being destroyed is waited for (briefly): its reason is known once it is gone.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            try:
                resp = await self.vmm.GetVM(vm_manager_pb2.GetVMRequest(name=sb.vm.name), timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    return exc.details() or "destroyed"
                many = self.fleet is not None and self.fleet.only() is None
                if exc.code() is grpc.StatusCode.UNAVAILABLE and many:
                    # Its node does not answer: the fleet's words name it and since when.
                    details = exc.details() or "its node does not answer"
                    raise RemoteError(exc.code(), details) from exc
                return ""
            state = resp.vm.state
            if state in (common_pb2.VM_STATE_FAILED, common_pb2.VM_STATE_STOPPED):
                # A guest kernel panic, a poweroff, a QEMU that died.
                return f"VM {sb.vm.name} stopped: {resp.vm.error or 'the guest powered off'}"
            going = state in (common_pb2.VM_STATE_DESTROYING, common_pb2.VM_STATE_DESTROYED)
            waited = loop.time() - start
            if waited > (15.0 if going else 3.0 if patient else 0.0):
                return "destroyed" if going else ""
            await asyncio.sleep(0.2)

    async def _report_finished(
        self,
        sb: SandboxState,
        exec_id: str,
        status: common_pb2.ExitStatus | None,
        failure: str,
        started_wall: float,
        output_bytes: int,
    ) -> None:
        """The execution.finished event, with what the monitor scores executions by."""
        denied = 0
        if sb.vm.network_mode == common_pb2.NETWORK_MODE_NAT_FILTERED:
            with contextlib.suppress(AgentVMError):
                denied = sum(
                    1
                    for r in await self.network_log(sb)
                    if r.verdict == common_pb2.EGRESS_VERDICT_DENIED
                    and r.time.ToNanoseconds() / 1e9 >= started_wall
                )
        attrs: dict[str, Any] = {
            "exec_id": exec_id,
            "outcome": outcome_of(status, failure),
            "output_bytes": output_bytes,
            "denied_egress": denied,
            "duration_s": round(time.time() - started_wall, 6),
        }
        if status is not None:
            usage = status.usage
            attrs.update(
                exit_code=status.exit_code,
                signal=status.signal,
                timed_out=status.timed_out,
                duration_s=round(status.duration.ToNanoseconds() / 1e9, 6),
                cpu_s=round(usage.cpu_time.ToNanoseconds() / 1e9, 6),
                memory_peak_bytes=usage.memory_peak_bytes,
                pids_peak=usage.pids_peak,
            )
        else:
            attrs["error"] = sb.env.redact(failure)[:500]
        self.events.emit(
            "execution.finished",
            vm=sb.vm.name,
            sandbox=sb.id,
            severity="info" if status is not None else "warning",
            **attrs,
        )

    async def signal(self, sb: SandboxState, exec_id: str, signum: int) -> None:
        try:
            await sb.agent.SignalProcess(
                guest_agent_pb2.SignalProcessRequest(exec_id=exec_id, signal=signum), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc

    async def write_stdin(self, sb: SandboxState, exec_id: str, data: bytes, eof: bool) -> None:
        try:
            await sb.agent.WriteStdin(
                guest_agent_pb2.WriteStdinRequest(exec_id=exec_id, data=data, eof=eof), timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
