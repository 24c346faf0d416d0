"""Snapshots (snapshots.py: internal qcow2 snapshots, with memory or disk-only) and
suspend/resume (suspend.py: a READY VM's state saved to a file, its QEMU stopped).

A mixin of VMManager (manager.py), which provides what is declared at the top of
``Snapshots``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import libvirt

from agentvm.common.completion import to_completion
from agentvm.common.errors import AgentVMError, FailedPrecondition
from agentvm.vm_manager import suspend as suspend_vm
from agentvm.vm_manager.diskfull import DiskWatch
from agentvm.vm_manager.libvirt_conn import LibvirtConnection, libvirt_errors
from agentvm.vm_manager.manager_readiness import POLL_S
from agentvm.vm_manager.snapshots import SnapshotInfo, SnapshotManager
from agentvm.vm_manager.vm import VM, VMState

log = logging.getLogger("agentvm.vm_manager")


class Snapshots:
    """Snapshot, restore, suspend and resume VMs."""

    conn: LibvirtConnection
    snapshots: SnapshotManager
    disk: DiskWatch

    def _lock(self, name: str) -> asyncio.Lock:
        raise NotImplementedError

    def _get(self, name: str) -> VM:
        raise NotImplementedError

    async def _refresh(self, vm: VM, *, held: bool = False) -> None:
        raise NotImplementedError

    async def _start_relay(self, vm: VM, dom: libvirt.virDomain) -> None:
        raise NotImplementedError

    async def _probe_agent(self, vm: VM, deadline: float) -> None:
        raise NotImplementedError

    async def create_snapshot(
        self, vm_name: str, name: str, include_memory: bool, description: str
    ) -> SnapshotInfo:
        """Snapshot a VM: with memory when it runs, disk-only when it is stopped."""
        async with self._lock(vm_name):
            vm = self._get(vm_name)
            await self._refresh(vm, held=True)
            running = vm.state.running
            if running and not include_memory:
                raise FailedPrecondition(
                    f"VM {vm_name} is running: a snapshot of a running VM includes its memory "
                    "(set include_memory), or stop it first for a disk-only snapshot"
                )
            if not running and include_memory:
                raise FailedPrecondition(
                    f"VM {vm_name} is {vm.state.name}: there is no memory to save; start it, or "
                    "take a disk-only snapshot"
                )
            if include_memory and vm.shared_workspace:
                raise FailedPrecondition(
                    f"VM {vm_name} has a shared (virtiofs) workspace, whose device state QEMU "
                    "cannot save: use VMs without shared_workspace for memory snapshots"
                )
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            await asyncio.to_thread(
                self.snapshots.create,
                dom,
                name,
                include_memory=include_memory,
                description=description,
            )
            infos = await asyncio.to_thread(self.snapshots.list_snapshots, dom, vm.overlay)
        log.info("snapshot %s of %s created", name, vm_name, extra={"vm": vm_name})
        return next(i for i in infos if i.name == name)

    async def list_snapshots(self, vm_name: str) -> list[SnapshotInfo]:
        vm = self._get(vm_name)
        dom = await asyncio.to_thread(self.conn.lookup, vm_name)
        return await asyncio.to_thread(self.snapshots.list_snapshots, dom, vm.overlay)

    async def restore_snapshot(self, vm_name: str, name: str) -> VM:
        """Return the VM to the snapshot: running (memory) or stopped (disk-only)."""
        async with self._lock(vm_name):
            vm = self._get(vm_name)
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            if vm.relay is not None:
                # The guest's half of the session is rewound with its memory: the
                # next client starts a fresh session (SYNC handshake).
                await vm.relay.close()
                vm.relay = None
            started = time.monotonic()

            async def reverted() -> None:
                await asyncio.to_thread(self.snapshots.revert, dom, name)
                with libvirt_errors(f"looking at VM {name} after its revert"):
                    active = await asyncio.to_thread(dom.isActive)
                if active:
                    vm.state = VMState.BOOTING
                    # Timed from the restore request to the agent answering (WaitVM).
                    vm.boot_started = started
                    vm.boot_duration = None
                    vm.boot_kind = "snapshot"
                    await self._start_relay(vm, dom)
                else:
                    vm.state = VMState.STOPPED
                vm.error = ""

            # Once the revert begins, the VM's state and relay follow it, whoever
            # stops waiting (as suspend).
            await to_completion(reverted())
        log.info("VM %s restored to snapshot %s", vm_name, name, extra={"vm": vm_name})
        return vm

    async def suspend(self, name: str) -> VM:
        """Save a READY VM's state to a file and stop its QEMU (suspend.py). Once
        begun, it ends (and its state is recorded) even when its caller goes away:
        the save in its thread cannot be stopped."""
        return await self._saving(name, self._suspend)

    async def _saving(self, name: str, step: Callable[[str], Awaitable[VM]]) -> VM:
        """``step(name)`` (a suspend or resume) under the VM's lock, to completion, with
        ``vm.saving`` set meanwhile: GetVM then answers with its outcome."""
        async with self._lock(name):
            vm = self._get(name)
            vm.saving = True
            try:
                return await to_completion(step(name))
            finally:
                vm.saving = False

    async def _suspend(self, name: str) -> VM:
        vm = self._get(name)
        await self._refresh(vm, held=True)
        vm.require(VMState.READY)
        if vm.shared_workspace:
            raise FailedPrecondition(
                f"VM {name} has a shared (virtiofs) workspace, whose device state QEMU "
                "cannot save: only VMs without shared_workspace can be suspended"
            )
        # Its memory is written to the state disk: refused at once when that is full
        # (a save that fills it on the way fails RESOURCE_EXHAUSTED too, clones.py).
        await asyncio.to_thread(self.disk.check_room)
        dom = await asyncio.to_thread(self.conn.lookup, name)
        if vm.relay is not None:
            # The guest's half of the session is saved with its memory: the next
            # client after the resume starts a fresh session.
            await vm.relay.close()
            vm.relay = None
        try:
            with libvirt_errors(f"suspending VM {name}"):
                await asyncio.to_thread(suspend_vm.suspend, dom, vm.suspended_state)
        except BaseException:
            running = await asyncio.to_thread(self._running_again, name)
            if running is not None:
                await self._start_relay(vm, running)
            raise
        vm.transition(VMState.STOPPED)
        vm.guest = None
        log.info("VM %s suspended", name, extra={"vm": name})
        return vm

    def _running_again(self, name: str) -> libvirt.virDomain | None:
        """After a failed save: the domain running on as it was (resumed if the save
        left it paused), or None when it does not run or libvirt cannot say. Looked
        up afresh: the save may have failed because libvirtd restarted (the soak)."""
        try:
            dom = self.conn.lookup(name)
            if not dom.isActive():
                return None
            if dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            return dom
        except (AgentVMError, libvirt.libvirtError) as exc:
            log.warning("after the failed save of VM %s: %s", name, exc, extra={"vm": name})
            return None

    async def resume(self, name: str) -> VM:
        """Start a suspended VM from its saved state; BOOTING until its agent answers.
        Once begun, it ends even when its caller goes away (as suspend)."""
        return await self._saving(name, self._resume)

    async def _resume(self, name: str) -> VM:
        vm = self._get(name)
        if not vm.suspended:
            raise FailedPrecondition(
                f"VM {name} is {vm.state.name} and not suspended: nothing to resume "
                "(StartVM starts a stopped VM)"
            )
        vm.boot_started = time.monotonic()
        vm.boot_duration = None
        vm.boot_kind = "resume"
        vm.error = ""
        with libvirt_errors(f"resuming VM {name}"):
            dom = await asyncio.to_thread(suspend_vm.resume, self.conn, name, vm.suspended_state)
        vm.transition(VMState.BOOTING)
        await self._start_relay(vm, dom)
        # Its agent was running when it was saved: it answers at once, so the
        # caller gets a READY VM without a WaitVM round trip (as a template
        # restore does). A slow one is left BOOTING for WaitVM.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while vm.state is VMState.BOOTING and loop.time() < deadline:
            await self._probe_agent(vm, deadline)
            if vm.state is VMState.BOOTING:
                await asyncio.sleep(POLL_S)
        log.info("VM %s resumed (%s)", name, vm.state.name, extra={"vm": name})
        return vm

    async def delete_snapshot(self, vm_name: str, name: str) -> None:
        async with self._lock(vm_name):
            self._get(vm_name)
            dom = await asyncio.to_thread(self.conn.lookup, vm_name)
            await asyncio.to_thread(self.snapshots.delete, dom, name)
