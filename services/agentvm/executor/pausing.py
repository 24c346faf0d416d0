"""Pause and resume of sandboxes, and taking them up again after an executor restart
(docs/SANDBOXES.md, section 4). A mixin of AgentExecutor.

Pause = vm-manager's SuspendVM (the VM's memory and device state written
to a file next to its overlay, as a memory template is, then QEMU exits: no
RAM, no CPU). Resume = ResumeVM (QEMU starts from that file: processes and
files as they were at the pause) and WaitVM READY. A paused sandbox does not expire; the life it
had left is given back at resume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from agentvm.common.errors import FailedPrecondition, RemoteError
from agentvm.common.events import EventSink
from agentvm.executor.journal import Journal
from agentvm.executor.sandbox import SANDBOX_LABEL, SandboxState
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc

log = logging.getLogger("agentvm.executor")

SAVE_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 600.0


class Pausing:
    """Pause, resume, restore."""

    events: EventSink
    vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    journal: Journal
    _sandboxes: dict[str, SandboxState]
    _slots: asyncio.Semaphore
    agent_channel: Callable[[common_pb2.VM], grpc.aio.Channel]

    async def pause_sandbox(self, sb: SandboxState, *, idle: bool = False) -> None:
        """Save ``sb``'s memory and disk and stop its VM (``idle``: auto-pause)."""
        async with sb.lock:
            if idle and (sb.paused or sb.busy or sb.closing):
                return  # used again, paused or closed meanwhile
            if sb.paused:
                raise FailedPrecondition(
                    f"sandbox {sb.id} is already paused: resume it (ResumeSandbox) or close it"
                )
            if sb.workspace_mode == common_pb2.WORKSPACE_MODE_SHARED:
                raise FailedPrecondition(
                    f"sandbox {sb.id} has a shared (virtiofs) workspace, whose device state "
                    "QEMU cannot save: create sandboxes to pause with workspace mode API"
                )
            started = time.monotonic()
            name = sb.vm.name
            left = max(1.0, sb.expires_at - time.time())
            try:
                await self.vmm.SuspendVM(
                    vm_manager_pb2.SuspendVMRequest(name=name), timeout=SAVE_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                raise RemoteError.from_rpc(exc, "vm-manager") from exc
            sb.paused_left = left
            sb.paused = True
            if not sb.closing:  # a closed sandbox's record is gone for good
                self.journal.save(sb.record())
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
            if not sb.paused:
                raise FailedPrecondition(
                    f"sandbox {sb.id} is running, not paused: there is nothing to resume"
                )
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
            sb.expires_at = time.time() + sb.paused_left
            sb.last_active = time.monotonic()
            if not sb.closing:  # a closed sandbox's record is gone for good
                self.journal.save(sb.record())
            took = time.monotonic() - started
            self.events.emit("sandbox.resumed", vm=name, sandbox=sb.id, duration_s=round(took, 3))
            log.info("sandbox %s resumed in %.2f s", sb.id, took, extra={"sandbox": sb.id})

    async def take_up(self, vms: list[common_pb2.VM]) -> set[str]:
        """Take up the journal's sandboxes whose VM is still there; their VMs' names.

        ``vms`` are this executor's VMs as vm-manager lists them. A record
        without its VM (destroyed meanwhile) is dropped.
        """
        by_name = {vm.name: vm for vm in vms}
        kept: set[str] = set()
        for rec in self.journal.load():
            vm = by_name.get(rec.vm_name)
            if vm is None or vm.labels.get(SANDBOX_LABEL) != rec.id:
                log.info("sandbox %s is gone with its VM %s; forgetting it", rec.id, rec.vm_name)
                self.journal.remove(rec.id)
                continue
            left, expires = rec.paused_left, rec.expires_at
            if not rec.paused:
                left = max(1.0, rec.expires_at - time.time())
            elif not vm.suspended:
                expires = time.time() + rec.paused_left  # resumed, not yet recorded
            sb = SandboxState(
                id=rec.id,
                spec=rec.spec,
                vm=vm,
                workspace_mode=common_pb2.WorkspaceMode.ValueType(rec.workspace_mode),
                created_at=rec.created_at,
                expires_at=expires,
                boot_duration=rec.boot_duration,
                channel=self.agent_channel(vm),
                lease_id=rec.lease_id,
                metadata=rec.metadata,
                env=rec.env,
                # vm-manager knows best: a pause or resume cut short by a crash
                # may have happened without its journal record.
                paused=vm.suspended,
                paused_left=left,
                auto_pause=rec.auto_pause,
            )
            if self._slots.locked():
                sb.slot = False  # past AGENTVM_MAX_SANDBOXES now: kept all the same
            else:
                await self._slots.acquire()
            self._sandboxes[sb.id] = sb
            kept.add(vm.name)
            self.events.emit("sandbox.restored", vm=vm.name, sandbox=sb.id, paused=sb.paused)
            log.info(
                "took up sandbox %s (%s) on %s",
                sb.id,
                "paused" if sb.paused else "running",
                vm.name,
                extra={"sandbox": sb.id},
            )
        return kept
