"""Ports of a sandbox: TCP connections to guest services over the agent channel
(docs/SANDBOXES.md, section 5). A mixin of AgentExecutor.

One ForwardPort call is one connection: the executor bounds how many a
sandbox has open, passes the caller's bytes to the guest agent's OpenPort,
and checks what comes back (connected first, bounded chunks, nothing after
the guest's eof).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from agentvm.common.errors import DataLoss, InvalidArgument, RemoteError, ResourceExhausted
from agentvm.executor.sandbox import SandboxState
from agentvm.v1 import executor_pb2, guest_agent_pb2

MAX_PER_SANDBOX = 32
MAX_CHUNK = 64 * 1024


class Ports:
    """Forwarded connections of sandboxes."""

    async def forward_port(
        self,
        sb: SandboxState,
        first: executor_pb2.ForwardPortRequest,
        rest: AsyncIterator[executor_pb2.ForwardPortRequest],
    ) -> AsyncIterator[executor_pb2.ForwardPortResponse]:
        """Carry one connection to ``first.port`` in ``sb``'s guest."""
        port = first.port
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port must be 1-65535, got {port}")
        if len(first.data) > MAX_CHUNK:
            raise InvalidArgument(f"data is over {MAX_CHUNK} bytes a message")
        if sb.open_ports >= MAX_PER_SANDBOX:
            raise ResourceExhausted(
                f"sandbox {sb.id} has {MAX_PER_SANDBOX} forwarded connections open; close one first"
            )
        sb.open_ports += 1
        try:

            async def to_guest() -> AsyncIterator[guest_agent_pb2.GuestAgentServiceOpenPortRequest]:
                yield guest_agent_pb2.GuestAgentServiceOpenPortRequest(
                    port=port, data=first.data, eof=first.eof
                )
                if first.eof:
                    return
                async for req in rest:
                    if len(req.data) > MAX_CHUNK:
                        raise InvalidArgument(f"data is over {MAX_CHUNK} bytes a message")
                    yield guest_agent_pb2.GuestAgentServiceOpenPortRequest(
                        data=req.data, eof=req.eof
                    )
                    if req.eof:
                        return

            call = sb.agent.OpenPort(to_guest())
            where = f"the guest of {sb.vm.name}, port {port}"
            connected = eof = False
            try:
                async for resp in call:
                    if eof:
                        raise DataLoss(f"{where} sent bytes after its end")
                    if not connected:
                        if not resp.connected:
                            raise DataLoss(f"{where} did not say it connected")
                        connected = True
                        yield executor_pb2.ForwardPortResponse(connected=True)
                        continue
                    if len(resp.data) > MAX_CHUNK:
                        raise DataLoss(f"{where} sent a chunk of {len(resp.data)} bytes")
                    eof = resp.eof
                    yield executor_pb2.ForwardPortResponse(data=resp.data, eof=resp.eof)
            except grpc.aio.AioRpcError as exc:
                raise RemoteError.from_rpc(exc, f"guest agent of {sb.vm.name}") from exc
            finally:
                call.cancel()
        finally:
            sb.open_ports -= 1


async def first_request(
    requests: AsyncIterator[executor_pb2.ForwardPortRequest],
) -> executor_pb2.ForwardPortRequest:
    """The first message of a ForwardPort call (INVALID_ARGUMENT when there is none)."""
    try:
        return await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgument(
            "ForwardPort needs a first message naming sandbox_id and port"
        ) from None
