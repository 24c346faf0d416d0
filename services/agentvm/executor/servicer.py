"""ExecutorService: the gRPC face of AgentExecutor."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentvm.common.errors import AgentVMError, FailedPrecondition, InvalidArgument
from agentvm.common.grpc_util import grpc_errors, grpc_stream_errors
from agentvm.executor.executor import AgentExecutor, SandboxState
from agentvm.executor.ports import first_request
from agentvm.executor.sandbox_env import SandboxEnv, check_metadata
from agentvm.v1 import executor_pb2, executor_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
# A guest call that ended so may have met a sandbox another replica closed or paused.
_GUEST_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """Maps RPCs to AgentExecutor."""

    def __init__(self, executor: AgentExecutor) -> None:
        self.executor = executor

    @contextlib.asynccontextmanager
    async def _guard(self, sandbox_id: str) -> AsyncIterator[None]:
        """Answer a call the closing of its sandbox cut short with why.

        Closing a sandbox (its caller, or the end of its lifetime) closes its
        agent channel, which cancels the guest calls in flight: their
        CancelledError would end the handler without a status, and the caller
        would wait for its own deadline. A guest that does not answer may be
        one another replica paused or closed: its record says which.
        """
        active = self.executor.sandbox_or_none(sandbox_id)
        if active is not None:
            active.busy += 1  # in use: no idle auto-pause meanwhile
        try:
            yield
        except AgentVMError as exc:
            if exc.code in _GUEST_GONE and active is not None and not active.closing:
                await self._changed_elsewhere(active, exc)
            # No secret of the sandbox leaves in a message (the guest's included).
            sb = self.executor.sandbox_or_none(sandbox_id)
            if sb is not None and sb.env.secret:
                exc.message = sb.env.redact(exc.message)
                exc.args = (exc.message,)
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # not this call's own cancel
                raise self.executor.gone_error(sandbox_id, cut_short=True) from exc
            raise
        finally:
            if active is not None:
                active.busy -= 1
                active.last_active = time.monotonic()
                self.executor.touch_soon(active)  # other replicas' idle clocks

    async def _changed_elsewhere(self, sb: SandboxState, exc: AgentVMError) -> None:
        """Raise why ``sb`` cannot answer when another replica closed or paused it.
        A sandbox whose VM is gone is forgotten: later calls are NOT_FOUND; this one
        keeps its own error when that says why (ABORTED: the VM is gone, and how)."""
        was_paused = sb.paused
        try:
            await self.executor.refresh(sb)
        except AgentVMError as gone:
            if gone.code == grpc.StatusCode.NOT_FOUND and exc.code != grpc.StatusCode.ABORTED:
                raise gone from None
            return  # the call's own error says it (or its node does not answer either)
        if sb.paused and not was_paused:
            raise FailedPrecondition(
                f"sandbox {sb.id} was paused (through another executor replica): resume it "
                "first (ResumeSandbox, agent-vm sandbox resume)"
            )

    @grpc_stream_errors
    async def Run(
        self, request: executor_pb2.RunRequest, context: Ctx
    ) -> AsyncIterator[executor_pb2.RunResponse]:
        async for ev in self.executor.run(request):
            yield ev

    @grpc_errors
    async def CreateSandbox(
        self, request: executor_pb2.CreateSandboxRequest, context: Ctx
    ) -> executor_pb2.CreateSandboxResponse:
        sb = await self.executor.create_sandbox(
            request.spec,
            metadata=request.metadata,
            env=SandboxEnv.from_proto(request.env),
            auto_pause=request.auto_pause.ToNanoseconds() / 1e9
            if request.HasField("auto_pause")
            else 0.0,
        )
        return executor_pb2.CreateSandboxResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def GetSandbox(
        self, request: executor_pb2.GetSandboxRequest, context: Ctx
    ) -> executor_pb2.GetSandboxResponse:
        sb = await self.executor.find(request.sandbox_id, paused_ok=True)
        if not sb.closing:
            await self.executor.refresh(sb)  # as its record says (other replicas' changes)
        return executor_pb2.GetSandboxResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def ListSandboxes(
        self, request: executor_pb2.ListSandboxesRequest, context: Ctx
    ) -> executor_pb2.ListSandboxesResponse:
        want = check_metadata(request.metadata, "metadata filter")
        await self.executor.sync()  # those other replicas made since
        return executor_pb2.ListSandboxesResponse(
            sandboxes=[s.to_proto() for s in self.executor.sandboxes(want)]
        )

    @grpc_errors
    async def SetSandboxTimeout(
        self, request: executor_pb2.SetSandboxTimeoutRequest, context: Ctx
    ) -> executor_pb2.SetSandboxTimeoutResponse:
        if not request.HasField("timeout"):
            raise InvalidArgument(
                "timeout is unset: give the sandbox's remaining life (1 s to 24 h)"
            )
        sb = await self.executor.find(request.sandbox_id)
        await self.executor.set_timeout(sb, request.timeout.ToNanoseconds() / 1e9)
        return executor_pb2.SetSandboxTimeoutResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def SetSandboxNetworkPolicy(
        self, request: executor_pb2.SetSandboxNetworkPolicyRequest, context: Ctx
    ) -> executor_pb2.SetSandboxNetworkPolicyResponse:
        sb = await self.executor.find(request.sandbox_id, paused_ok=True)
        async with self._guard(sb.id):
            await self.executor.set_network_policy(sb, request.policy)
        return executor_pb2.SetSandboxNetworkPolicyResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def PauseSandbox(
        self, request: executor_pb2.PauseSandboxRequest, context: Ctx
    ) -> executor_pb2.PauseSandboxResponse:
        sb = await self.executor.find(request.sandbox_id, paused_ok=True)
        async with self._guard(sb.id):
            await self.executor.pause_sandbox(sb)
        return executor_pb2.PauseSandboxResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def ResumeSandbox(
        self, request: executor_pb2.ResumeSandboxRequest, context: Ctx
    ) -> executor_pb2.ResumeSandboxResponse:
        sb = await self.executor.find(request.sandbox_id, paused_ok=True)
        async with self._guard(sb.id):
            await self.executor.resume_sandbox(sb)
        return executor_pb2.ResumeSandboxResponse(sandbox=sb.to_proto())

    @grpc_errors
    async def CloseSandbox(
        self, request: executor_pb2.CloseSandboxRequest, context: Ctx
    ) -> executor_pb2.CloseSandboxResponse:
        with contextlib.suppress(AgentVMError):  # closing what is gone is done
            await self.executor.find(request.sandbox_id, paused_ok=True)
        await self.executor.close_sandbox(request.sandbox_id, wait=request.wait)
        return executor_pb2.CloseSandboxResponse()

    @grpc_stream_errors
    async def Exec(
        self, request: executor_pb2.ExecRequest, context: Ctx
    ) -> AsyncIterator[executor_pb2.ExecResponse]:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            async for ev in self.executor.exec(sb, request):
                yield ev

    @grpc_errors
    async def SignalExec(
        self, request: executor_pb2.SignalExecRequest, context: Ctx
    ) -> executor_pb2.SignalExecResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            await self.executor.signal(sb, request.exec_id, request.signal)
        return executor_pb2.SignalExecResponse()

    @grpc_errors
    async def WriteStdin(
        self, request: executor_pb2.ExecutorServiceWriteStdinRequest, context: Ctx
    ) -> executor_pb2.ExecutorServiceWriteStdinResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            await self.executor.write_stdin(sb, request.exec_id, request.data, request.eof)
        return executor_pb2.ExecutorServiceWriteStdinResponse()

    @grpc_stream_errors
    async def StartProcess(
        self, request: executor_pb2.StartProcessRequest, context: Ctx
    ) -> AsyncIterator[executor_pb2.StartProcessResponse]:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            async for ev in self.executor.start_process(sb, request):
                yield ev

    @grpc_stream_errors
    async def ConnectProcess(
        self, request: executor_pb2.ConnectProcessRequest, context: Ctx
    ) -> AsyncIterator[executor_pb2.ConnectProcessResponse]:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            async for ev in self.executor.connect_process(sb, request.exec_id, request.offset):
                yield executor_pb2.ConnectProcessResponse(event=ev)

    @grpc_errors
    async def ListProcesses(
        self, request: executor_pb2.ListProcessesRequest, context: Ctx
    ) -> executor_pb2.ListProcessesResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            procs = await self.executor.list_processes(sb)
        return executor_pb2.ListProcessesResponse(processes=procs)

    @grpc_errors
    async def ResizePty(
        self, request: executor_pb2.ResizePtyRequest, context: Ctx
    ) -> executor_pb2.ResizePtyResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            await self.executor.resize_pty(sb, request.exec_id, request.size)
        return executor_pb2.ResizePtyResponse()

    @grpc_stream_errors
    async def ForwardPort(
        self, request_iterator: AsyncIterator[executor_pb2.ForwardPortRequest], context: Ctx
    ) -> AsyncIterator[executor_pb2.ForwardPortResponse]:
        requests = aiter(request_iterator)
        first = await first_request(requests)
        sb = await self.executor.find(first.sandbox_id)
        async with self._guard(sb.id):
            async for resp in self.executor.forward_port(sb, first, requests):
                yield resp

    @grpc_errors
    async def WriteFile(
        self, request_iterator: AsyncIterator[executor_pb2.WriteFileRequest], context: Ctx
    ) -> executor_pb2.WriteFileResponse:
        it = aiter(request_iterator)
        try:
            first = await anext(it)
        except StopAsyncIteration:
            raise InvalidArgument("WriteFile got no message") from None
        sb = await self.executor.find(first.sandbox_id)
        expected: list[str] = []

        async def chunks() -> AsyncIterator[bytes]:
            msg: executor_pb2.WriteFileRequest | None = first
            while msg is not None:
                if msg.sha256:
                    expected[:] = [msg.sha256]
                if msg.chunk:
                    yield msg.chunk
                msg = await anext(it, None)

        async with self._guard(sb.id):
            size, sha = await self.executor.write_file(
                sb, first.path, first.mode, chunks(), expected
            )
        return executor_pb2.WriteFileResponse(size_bytes=size, sha256=sha)

    @grpc_stream_errors
    async def ReadFile(
        self, request: executor_pb2.ReadFileRequest, context: Ctx
    ) -> AsyncIterator[executor_pb2.ReadFileResponse]:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            async for data, size, sha in self.executor.read_file(
                sb, request.path, request.max_bytes
            ):
                yield executor_pb2.ReadFileResponse(chunk=data, size_bytes=size, sha256=sha)

    @grpc_errors
    async def ListFiles(
        self, request: executor_pb2.ListFilesRequest, context: Ctx
    ) -> executor_pb2.ListFilesResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            files = await self.executor.list_files(sb, request.path, request.recursive)
        return executor_pb2.ListFilesResponse(files=files)

    @grpc_errors
    async def RemoveFile(
        self, request: executor_pb2.RemoveFileRequest, context: Ctx
    ) -> executor_pb2.RemoveFileResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            await self.executor.remove_file(sb, request.path, request.recursive)
        return executor_pb2.RemoveFileResponse()

    @grpc_errors
    async def StatFile(
        self, request: executor_pb2.StatFileRequest, context: Ctx
    ) -> executor_pb2.StatFileResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            info = await self.executor.files.stat_file(sb, request.path)
        if info is None:
            return executor_pb2.StatFileResponse(exists=False)
        return executor_pb2.StatFileResponse(exists=True, file=info)

    @grpc_errors
    async def MakeDirectory(
        self, request: executor_pb2.MakeDirectoryRequest, context: Ctx
    ) -> executor_pb2.MakeDirectoryResponse:
        sb = await self.executor.find(request.sandbox_id)
        async with self._guard(sb.id):
            await self.executor.files.make_dir(sb, request.path)
        return executor_pb2.MakeDirectoryResponse()

    @grpc_errors
    async def GetNetworkLog(
        self, request: executor_pb2.GetNetworkLogRequest, context: Ctx
    ) -> executor_pb2.GetNetworkLogResponse:
        sb = await self.executor.find(request.sandbox_id)
        return executor_pb2.GetNetworkLogResponse(records=await self.executor.network_log(sb))
