"""vm-manager's proxy to the guest agents of its node (docs/SCALE_OUT.md, "Reaching a VM").

A service that is not on a VM's host (the executor, pool-manager) calls
``agentvm.v1.GuestAgentService`` on the VM's node, its vm-manager, and names
the VM in the call's metadata ``agentvm-vm``. vm-manager forwards the call to
the VM's agent relay: bytes in, bytes out, streams in both directions. It
parses nothing the guest sends (the caller validates every message, as it does
over the local socket) and adds nothing to what the caller sent.

Checked before anything is forwarded: the caller's identity (the executor's or
pool-manager's certificate under mutual TLS: the agent is root in the VM), the
VM (a name of this node's VMs; a warm pool VM for pool-manager only, as
access.py has it; running). The incoming call's deadline bounds the forwarded
one and cancelling the incoming call cancels it. The agent's status codes pass
through, its messages cut to ``MAX_DETAILS`` characters. One channel per VM's
relay socket is kept for the next call and closed once the VM is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from agentvm.common import identity
from agentvm.common.errors import AgentVMError, FailedPrecondition, InvalidArgument
from agentvm.common.grpc_util import AGENT_VM_HEADER as HEADER
from agentvm.common.grpc_util import CHANNEL_OPTIONS
from agentvm.v1 import guest_agent_pb2
from agentvm.vm_manager import access
from agentvm.vm_manager.vm import VM

log = logging.getLogger("agentvm.vm_manager.agent_proxy")

SERVICE = guest_agent_pb2.DESCRIPTOR.services_by_name["GuestAgentService"]
CALLERS = ("executor", access.POOL_MANAGER)
MAX_DETAILS = 1000
SWEEP_S = 30.0

# (client streams, server streams) -> the handler to serve it, the channel method to forward it.
KINDS: dict[tuple[bool, bool], tuple[Callable[..., grpc.RpcMethodHandler[Any, Any]], str]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}

if TYPE_CHECKING:
    _Handler = grpc.GenericRpcHandler[Any, Any]
else:  # not subscriptable at run time
    _Handler = grpc.GenericRpcHandler


class VMs(Protocol):
    """What the proxy needs of the manager: a VM by name, and the names that exist."""

    def lookup(self, name: str) -> VM: ...

    def names(self) -> set[str]: ...


def _methods() -> dict[str, tuple[bool, bool]]:
    """``/agentvm.v1.GuestAgentService/Method`` -> (client streams, server streams)."""
    return {
        f"/{SERVICE.full_name}/{m.name}": (m.client_streaming, m.server_streaming)
        for m in SERVICE.methods
    }


class AgentProxy(_Handler):
    """GuestAgentService on vm-manager, forwarded to the named VM's agent."""

    def __init__(self, vms: VMs) -> None:
        self._vms = vms
        self._methods = _methods()
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}  # name -> (endpoint, ch)
        self._swept = time.monotonic()

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        kind = self._methods.get(method)
        if kind is None:
            return None
        make, opener = KINDS[kind]
        streams_out = kind[1]
        forward = self._streaming if streams_out else self._single
        return make(forward(method, opener))

    async def close(self) -> None:
        for _endpoint, channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    # -- routing -----------------------------------------------------------------------

    async def _route(self, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.aio.Channel:
        """The channel to the VM this call names, once the call may reach it."""
        who = identity.caller(context)
        names = [v for k, v in context.invocation_metadata() or () if k == HEADER]
        try:
            if who not in CALLERS:
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"only {' and '.join(CALLERS)} reach guest agents through vm-manager "
                    f"(caller: {who or 'unnamed'}); use the executor's API",
                )
            if len(names) != 1 or not isinstance(names[0], str):
                raise InvalidArgument(
                    f"name the VM in the metadata {HEADER!r}, once: GuestAgentService on "
                    "vm-manager forwards each call to that VM's agent"
                )
            vm = self._vms.lookup(names[0])
            access.require_usable(vm, who, "reach its guest agent")
            if not vm.state.running:
                raise FailedPrecondition(
                    f"VM {vm.name} is {vm.state.name}: its agent answers only while it runs "
                    "(StartVM starts it)"
                )
        except AgentVMError as exc:
            await _abort(context, exc.code, str(exc))
        self._sweep()
        held = self._channels.get(vm.name)
        if held is not None and held[0] == vm.agent_endpoint:
            return held[1]
        if held is not None:
            await held[1].close(None)
        channel = grpc.aio.insecure_channel(vm.agent_endpoint, options=CHANNEL_OPTIONS)
        self._channels[vm.name] = (vm.agent_endpoint, channel)
        return channel

    def _sweep(self) -> None:
        """Close the channels of VMs that are gone (at most every SWEEP_S)."""
        now = time.monotonic()
        if now - self._swept < SWEEP_S:
            return
        self._swept = now
        alive = self._vms.names()
        for name in [n for n in self._channels if n not in alive]:
            _endpoint, channel = self._channels.pop(name)
            # Not awaited here: close() waits for calls in flight, of which there are none.
            task = channel.close(None)
            _keep(task)

    # -- the four kinds of call ----------------------------------------------------------

    def _single(self, method: str, opener: str) -> Callable[..., Any]:
        """A call with one answer (its request a message, or a stream of them)."""

        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            channel = await self._route(context)
            forward = getattr(channel, opener)(method, None, None)
            call = forward(request, timeout=context.time_remaining())
            try:
                return bytes(await call)
            except grpc.aio.AioRpcError as exc:
                await _pass_on(context, exc)
                raise
            finally:
                call.cancel()

        return behaviour

    def _streaming(self, method: str, opener: str) -> Callable[..., Any]:
        """A call that answers with a stream (its request a message, or a stream of them)."""

        async def behaviour(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            channel = await self._route(context)
            forward = getattr(channel, opener)(method, None, None)
            call = forward(request, timeout=context.time_remaining())
            try:
                async for message in call:
                    yield bytes(message)
            except grpc.aio.AioRpcError as exc:
                await _pass_on(context, exc)
            finally:
                call.cancel()

        return behaviour


_KEPT: set[Any] = set()


def _keep(task: Any) -> None:
    fut = asyncio.ensure_future(task)
    _KEPT.add(fut)
    fut.add_done_callback(_KEPT.discard)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    await context.abort(code, message)


async def _pass_on(context: grpc.aio.ServicerContext[Any, Any], exc: grpc.aio.AioRpcError) -> None:
    """End the incoming call as the agent ended the forwarded one."""
    details = str(exc.details() or "")[:MAX_DETAILS]
    await context.abort(exc.code(), details)
