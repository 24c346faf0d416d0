"""Pause and resume of sandboxes (docs/SANDBOXES.md, section 4). A mixin of
AgentExecutor; taking sandboxes up after a restart is replicas.py's.

Pause = vm-manager's SuspendVM (the VM's memory and device state written
to a file next to its overlay, as a memory template is, then QEMU exits: no
RAM, no CPU). Resume = ResumeVM (QEMU starts from that file: processes and
files as they were at the pause) and WaitVM READY. A paused sandbox does not expire; the life it
had left is given back at resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from agentvm.common.completion import to_completion
from agentvm.common.errors import AgentVMError, FailedPrecondition, RemoteError
from agentvm.common.events import EventSink
from agentvm.executor.sandbox import SandboxState
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc

log = logging.getLogger("agentvm.executor")

SAVE_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 600.0


class Pausing:
    """Pause, resume, restore."""

    events: EventSink
    vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    _sandboxes: dict[str, SandboxState]
    agent_channel: Callable[[common_pb2.VM], grpc.aio.Channel]

    if TYPE_CHECKING:  # replicas.py's (a stub here would shadow it in the MRO)

        async def refresh(self, sb: SandboxState, *, holding_lock: bool = False) -> None: ...

        async def update(
            self,
            sb: SandboxState,
            change: Callable[[SandboxState], None],
            *,
            holding_lock: bool = False,
        ) -> None: ...

        def remote_idle(self, sb: SandboxState) -> bool: ...

    async def pause_sandbox(self, sb: SandboxState, *, idle: bool = False) -> None:
        """Save ``sb``'s memory and disk and stop its VM (``idle``: auto-pause)."""
        async with sb.lock:
            # Another replica may have paused, resumed or used it.
            await self.refresh(sb, holding_lock=True)
            if idle and (sb.paused or sb.busy or sb.closing or not self.remote_idle(sb)):
                return  # used again (here or elsewhere), paused or closed meanwhile
            if sb.paused:
                raise FailedPrecondition(
                    f"sandbox {sb.id} is already paused: resume it (ResumeSandbox) or close it"
                )
            if sb.workspace_mode == common_pb2.WORKSPACE_MODE_SHARED:
                raise FailedPrecondition(
                    f"sandbox {sb.id} has a shared (virtiofs) workspace, whose device state "
                    "QEMU cannot save: create sandboxes to pause with workspace mode API"
                )
            # Begun, a pause ends and is recorded even when its caller goes away.
            await to_completion(self._pause_now(sb, idle))

    async def _pause_now(self, sb: SandboxState, idle: bool) -> None:
        started = time.monotonic()
        name = sb.vm.name
        left = max(1.0, sb.expires_at - time.time())
        try:
            await self.vmm.SuspendVM(
                vm_manager_pb2.SuspendVMRequest(name=name), timeout=SAVE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        sb.paused = True
        await self._record(sb, paused_left=left)
        await sb.channel.close(grace=None)
        took = time.monotonic() - started
        self.events.emit(
            "sandbox.paused",
            vm=name,
            sandbox=sb.id,
            duration_s=round(took, 3),
            reason="idle" if idle else "requested",
        )
        log.info("sandbox %s paused in %.2f s", sb.id, took, extra={"sandbox": sb.id})

    def idle_sandboxes(self) -> list[SandboxState]:
        """Running sandboxes with auto-pause whose last call ended long enough ago."""
        now = time.monotonic()
        return [
            sb
            for sb in self._sandboxes.values()
            if sb.auto_pause
            and not (sb.paused or sb.closing or sb.busy or sb.lock.locked())
            and now - sb.last_active >= sb.auto_pause
        ]

    async def auto_pause(self, sb: SandboxState) -> None:
        try:
            await self.pause_sandbox(sb, idle=True)
        except Exception as exc:  # noqa: BLE001 (logged; tried again after the next idle spell)
            sb.last_active = time.monotonic()
            log.warning("auto-pause of sandbox %s failed: %s", sb.id, exc)

    async def resume_sandbox(self, sb: SandboxState) -> None:
        """Bring a paused ``sb`` back as it was at the pause."""
        async with sb.lock:
            await self.refresh(sb, holding_lock=True)
            if not sb.paused:
                raise FailedPrecondition(
                    f"sandbox {sb.id} is running, not paused: there is nothing to resume"
                )
            await to_completion(self._resume_now(sb))  # as a pause

    async def _resume_now(self, sb: SandboxState) -> None:
        started = time.monotonic()
        name = sb.vm.name
        try:
            await self.vmm.ResumeVM(
                vm_manager_pb2.ResumeVMRequest(name=name), timeout=SAVE_TIMEOUT_S
            )
            wait = vm_manager_pb2.WaitVMRequest(name=name, state=common_pb2.VM_STATE_READY)
            wait.timeout.FromNanoseconds(int(READY_TIMEOUT_S * 1e9))
            ready = await self.vmm.WaitVM(wait, timeout=READY_TIMEOUT_S + 30)
        except grpc.aio.AioRpcError as exc:
            raise RemoteError.from_rpc(exc, "vm-manager") from exc
        sb.vm = ready.vm
        sb.channel = self.agent_channel(ready.vm)
        sb.paused = False
        sb.last_active = time.monotonic()
        await self._record(sb, expires_at=time.time() + sb.paused_left)
        took = time.monotonic() - started
        self.events.emit("sandbox.resumed", vm=name, sandbox=sb.id, duration_s=round(took, 3))
        log.info("sandbox %s resumed in %.2f s", sb.id, took, extra={"sandbox": sb.id})

    async def _record(
        self, sb: SandboxState, *, paused_left: float = 0.0, expires_at: float = 0.0
    ) -> None:
        """Write what a pause or resume did into ``sb``'s record. The VM's state is
        done and vm-manager says it: a record that cannot be written is logged."""
        if sb.closing:
            return  # a closed sandbox's record says closing, for good

        def change(s: SandboxState) -> None:
            s.paused = not expires_at
            if paused_left:
                s.paused_left = paused_left
            if expires_at:
                s.expires_at = expires_at

        change(sb)
        try:
            await self.update(sb, change, holding_lock=True)
        except AgentVMError as exc:
            log.warning(
                "cannot record the %s of sandbox %s: %s",
                "pause" if sb.paused else "resume",
                sb.id,
                exc,
            )
