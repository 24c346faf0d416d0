"""The one-shot Run: a fresh sandbox, inputs in, the program, outputs out, and the
sandbox destroyed on every path.

A mixin of AgentExecutor (which provides what is declared at the top of
``OneShot``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from agentvm.common.errors import FailedPrecondition, InvalidArgument, RemoteError
from agentvm.executor.execs import Executions
from agentvm.executor.files import CHUNK, WorkspaceFiles, check_path
from agentvm.executor.outputs import collect_outputs, run_caps
from agentvm.executor.sandbox import (
    BOOT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    SandboxState,
    output_cap,
    seconds_of,
)
from agentvm.v1 import common_pb2, executor_pb2, vm_manager_pb2


class OneShot(Executions):
    """Run (and the default command of a named image)."""

    files: WorkspaceFiles

    async def create_sandbox(
        self,
        spec: executor_pb2.SandboxSpec,
        *,
        default_lifetime: float | None = None,
        oneshot: bool = False,
    ) -> SandboxState:
        raise NotImplementedError

    async def close_sandbox(self, sandbox_id: str, *, wait: bool = True) -> None:
        raise NotImplementedError

    async def write_file(
        self,
        sb: SandboxState,
        path: str,
        mode: int,
        chunks: AsyncIterator[bytes],
        expected: list[str],
    ) -> tuple[int, str]:
        raise NotImplementedError

    async def _default_command(self, image: str) -> common_pb2.Program:
        """A named image's default command (OCI Entrypoint + Cmd, a spec's cmd)."""
        if image in ("", "default"):
            raise InvalidArgument("program is empty: set program.argv or program.code")
        try:
            resp = await self.vmm.GetImage(vm_manager_pb2.GetImageRequest(name=image), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        argv = [*resp.image.config.entrypoint, *resp.image.config.cmd]
        if not argv:
            raise InvalidArgument(
                f"program is empty and image {image!r} has no default command (OCI "
                "Entrypoint/Cmd, or cmd in its spec): give the program to run"
            )
        return common_pb2.Program(argv=common_pb2.Argv(args=argv[:4096]))

    # -- one shot ------------------------------------------------------------------
    async def run(self, req: executor_pb2.RunRequest) -> AsyncIterator[executor_pb2.RunResponse]:
        """Fresh sandbox, inputs, program, outputs; the sandbox is always destroyed (after
        the result is sent)."""
        timeout = seconds_of(req, "timeout", DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S)
        output_cap(req.max_output_bytes)
        caps = run_caps(self.files, req)
        program = req.program
        if not program.WhichOneof("kind"):
            program = await self._default_command(req.spec.image)
        for f in req.inputs:
            check_path(f.path)
        if req.cwd and not req.cwd.startswith("/"):
            raise InvalidArgument(
                f"cwd {req.cwd!r} is relative: give an absolute directory in the guest "
                "(e.g. /workspace/input)"
            )
        started = time.monotonic()
        sb = await self.create_sandbox(
            req.spec, default_lifetime=timeout + BOOT_TIMEOUT_S + 60, oneshot=True
        )
        try:
            for f in req.inputs:
                await self.write_file(
                    sb, "input/" + check_path(f.path), f.mode, _one(f.content), []
                )
            ereq = executor_pb2.ExecRequest(
                program=program,
                cwd=req.cwd,
                env=req.env,
                stdin=req.stdin,
                timeout=req.timeout,
                max_output_bytes=req.max_output_bytes,
            )
            status: common_pb2.ExitStatus | None = None
            async for ev in self.exec(sb, ereq):
                if ev.HasField("output"):
                    yield executor_pb2.RunResponse(output=ev.output)
                elif ev.HasField("exited"):
                    status = ev.exited
            if status is None:
                raise FailedPrecondition("the execution ended without an exit status")
            result = executor_pb2.RunResult(status=status, vm_name=sb.vm.name)
            async for item in collect_outputs(
                self.files, sb, req.return_output_files, caps, result
            ):
                yield item
            result.network_log.extend(await self.network_log(sb))
            result.boot_duration.FromNanoseconds(int(sb.boot_duration * 1e9))
            result.total_duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
            # The result goes out at once; the VM is destroyed by a task of its own
            # (close_sandbox: certain across a crash of either service).
            await self.close_sandbox(sb.id, wait=False)
            yield executor_pb2.RunResponse(result=result)
        finally:
            # Also on an error or a caller gone: its own task, nobody can stop it.
            await self.close_sandbox(sb.id, wait=False)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]
