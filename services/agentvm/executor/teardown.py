"""Closing sandboxes: the sandbox is closed at once, its VM destroyed by a task of its
own right after (docs/ARCHITECTURE.md, "Teardown").

A mixin of AgentExecutor (which provides what is declared at the top of ``Teardown``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from agentvm.common.errors import AgentVMError
from agentvm.common.events import EventSink
from agentvm.executor.sandbox import REMEMBER_EXPIRED, SandboxState
from agentvm.v1 import pool_manager_pb2, pool_manager_pb2_grpc, vm_manager_pb2, vm_manager_pb2_grpc

log = logging.getLogger("agentvm.executor")
# A teardown waits this long for a vm-manager that restarts.
DESTROY_RETRY_S = 60.0


class Teardown:
    """Close sandboxes; release leases and destroy VMs, certainly."""

    events: EventSink
    vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    pool: pool_manager_pb2_grpc.PoolManagerServiceAsyncStub | None
    _sandboxes: dict[str, SandboxState]
    _slots: asyncio.Semaphore
    _expired: dict[str, float]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        raise NotImplementedError

    if TYPE_CHECKING:  # replicas.py's (a stub here would shadow it in the MRO)

        async def update(
            self,
            sb: SandboxState,
            change: Callable[[SandboxState], None],
            *,
            holding_lock: bool = False,
        ) -> None: ...

        def drop(self, sb: SandboxState) -> None: ...

    async def close_sandbox(self, sandbox_id: str, *, wait: bool = True) -> None:
        """Close the sandbox: from now on it serves no call, and its VM and workspace
        are destroyed by a task of their own; with ``wait``, return once they are.
        Idempotent.

        The record says "closing" first: an executor killed mid-teardown (or any
        replica's sweep) finds it so and finishes the teardown (replicas.py); a
        one-shot Run's sandbox, which nobody can reconnect to, is finished by
        its replica's next start without it. A vm-manager killed mid-teardown
        is waited for (``_destroy_vm``), else the periodic sweep takes the VM.
        """
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        if not sb.closing:
            sb.closing = True
            if not sb.oneshot:
                await self._record_closing(sb)
            sb.teardown = self._spawn(self._teardown(sb))
        if wait and sb.teardown is not None:
            await asyncio.shield(sb.teardown)

    async def _record_closing(self, sb: SandboxState) -> None:
        try:
            await self.update(sb, lambda s: None)  # record() carries closing
        except AgentVMError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return  # its VM is gone (closed elsewhere): the teardown is a formality
            log.warning(
                "cannot record that sandbox %s is closing (%s): tearing it down all the same",
                sb.id,
                exc,
            )

    async def _teardown(self, sb: SandboxState) -> None:
        started = time.monotonic()
        try:
            await sb.channel.close(grace=None)
            why = f"sandbox {sb.id} {'expired' if sb.expired else 'closed'}"
            if sb.lease_id:
                await self._release(sb.lease_id, sb.vm.name, why)
            else:
                await self._destroy_vm(sb.vm.name, why)
        finally:
            if sb.expired:
                self._expired[sb.id] = sb.expires_at - sb.created_at
                while len(self._expired) > REMEMBER_EXPIRED:
                    del self._expired[next(iter(self._expired))]
            self.drop(sb)
            took = round(time.monotonic() - started, 3)
            self.events.emit("sandbox.closed", vm=sb.vm.name, sandbox=sb.id, teardown_s=took)
            log.info("sandbox %s closed", sb.id, extra={"sandbox": sb.id, "teardown_s": took})

    async def _release(self, lease_id: str, vm_name: str, reason: str = "") -> None:
        """Give a pool VM back (the pool destroys it); destroy it here if the pool is
        gone (``reason`` for the audit log)."""
        if self.pool is None:
            await self._destroy_vm(vm_name, reason)
            return
        try:
            await self.pool.ReleaseVM(
                pool_manager_pb2.ReleaseVMRequest(lease_id=lease_id), timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning(
                    "cannot release %s to the pool (%s); destroying it", vm_name, exc.details()
                )
            # NOT_FOUND: released already (a sweep and a close crossed), or a pool-manager
            # still starting has not adopted the lease yet; destroying is safe either way.
            await self._destroy_vm(vm_name, reason)

    async def _destroy_vm(self, name: str, reason: str = "") -> None:
        """Destroy ``name``, waiting out a vm-manager that restarts (UNAVAILABLE) for
        up to DESTROY_RETRY_S; after that the periodic sweep takes the VM."""
        deadline = time.monotonic() + DESTROY_RETRY_S
        while True:
            try:
                await self.vmm.DestroyVM(
                    vm_manager_pb2.DestroyVMRequest(name=name, reason=reason), timeout=60
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    continue
                log.warning("cannot destroy VM %s: %s", name, exc.details())
                return
