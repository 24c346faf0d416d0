"""Sandboxes shared by executor replicas: records kept with the VMs, taking sandboxes
up, the reaper and the sweeps (docs/SCALE_OUT.md, "Executor replicas").

Every replica of a group (AGENTVM_EXECUTOR_GROUP; one executor alone is a
group of one) serves every sandbox of the group. A sandbox's record lives
with its VM (records.py), so nothing of it is the replica's own:

* a call for a sandbox this replica has not seen looks it up by label on the
  nodes and takes it up (``find``), as a restarted replica takes up all of
  them (``start``);
* a lifecycle change (timeout, pause, resume, close) reads the record, applies
  itself and writes it back compare-and-set (``update``), again on a race:
  the last writer's change wins whole, never half of two;
* the timers run on every replica: an end of life is checked against the
  record before the sandbox is closed, and an idle auto-pause counts the use
  other replicas record (``touch``, at most every quarter of the idle time);
* the sweep reclaims what no record holds: a VM or lease at once when this
  replica's previous self made it, another replica's after CREATE_GRACE_S.

A mixin of AgentExecutor (which provides what is declared at the top of ``Replicas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from agentvm.common.config import Settings
from agentvm.common.errors import Aborted, AgentVMError, NotFound
from agentvm.common.events import EventSink
from agentvm.executor.journal import SANDBOX_ID, Journal, Record
from agentvm.executor.record_seal import RecordUnreadable
from agentvm.executor.records import VMRecords
from agentvm.executor.sandbox import (
    CREATE_GRACE_S,
    CREATOR_LABEL,
    EXECUTOR_LABEL,
    OWNER_LABEL,
    REMEMBER_EXPIRED,
    SANDBOX_LABEL,
    SandboxState,
    orphaned_leases,
)
from agentvm.v1 import (
    common_pb2,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

log = logging.getLogger("agentvm.executor")

UPDATE_ATTEMPTS = 5


class Replicas:
    """Records with the VMs; take-up, reaper and sweeps."""

    settings: Settings
    events: EventSink
    vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub
    pool: pool_manager_pb2_grpc.PoolManagerServiceAsyncStub | None
    records: VMRecords
    journal: Journal
    _sandboxes: dict[str, SandboxState]
    _creating: set[str]
    _slots: asyncio.Semaphore
    _expired: dict[str, float]
    _closed: OrderedDict[str, None]
    _reaper: asyncio.Task[None] | None

    if TYPE_CHECKING:  # AgentExecutor's and its other mixins' (not shadowed in the MRO)

        def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

        def agent_channel(self, vm: common_pb2.VM) -> grpc.aio.Channel: ...

        def get(self, sandbox_id: str, *, paused_ok: bool = False) -> SandboxState: ...

        def gone_error(self, sandbox_id: str, *, cut_short: bool) -> AgentVMError: ...

        async def close_sandbox(self, sandbox_id: str, *, wait: bool = True) -> None: ...

        async def _release(self, lease_id: str, vm_name: str, reason: str = "") -> None: ...

        async def _destroy_vm(self, name: str, reason: str = "") -> None: ...

        def idle_sandboxes(self) -> list[SandboxState]: ...

        async def auto_pause(self, sb: SandboxState) -> None: ...

    # -- identity ------------------------------------------------------------
    def _owner_labels(self) -> dict[str, str]:
        """What a VM this group made carries (and its pool leases)."""
        return dict([OWNER_LABEL, (EXECUTOR_LABEL, self.settings.executor_identity)])

    def _vm_selector(self) -> dict[str, str]:
        """This group's sandboxes' VMs: those it made, and pool VMs leased to it
        (they keep the pool's owner label and carry the group's from the lease)."""
        return {EXECUTOR_LABEL: self.settings.executor_identity}

    def _made_here(self, labels: Any) -> bool:
        """Made by this replica (this process or its previous self, by address)."""
        return bool(labels.get(CREATOR_LABEL, "") == self.settings.executor_addr)

    # -- records -------------------------------------------------------------
    async def refresh(self, sb: SandboxState, *, holding_lock: bool = False) -> None:
        """Bring ``sb`` up to its record; the gone error when it was closed elsewhere.

        Only a newer record is applied (an answer that left vm-manager before this
        replica's own last write is older), and whether the sandbox is paused is
        left alone while a pause or resume here holds its lock (``holding_lock``:
        the caller is that pause or resume).
        """
        try:
            vm, rec = await self.records.read(sb.vm.name)
        except NotFound:
            vm, rec = None, None
        if vm is None or rec is None or rec.id != sb.id:
            self.forget(sb)
            raise self.gone_error(sb.id, cut_short=False)
        if rec.closing and not sb.closing:
            self.forget(sb)
            raise self.gone_error(sb.id, cut_short=False)
        # Its network policy may have been changed through another replica.
        sb.vm.network.CopyFrom(vm.network)
        if vm.record_generation > sb.record_generation:
            self._apply(sb, rec, vm, pause_state=holding_lock or not sb.lock.locked())

    def _apply(
        self, sb: SandboxState, rec: Record, vm: common_pb2.VM, *, pause_state: bool
    ) -> None:
        sb.record_generation = vm.record_generation
        sb.expires_at = rec.expires_at
        sb.paused_left = rec.paused_left
        sb.auto_pause = rec.auto_pause
        sb.remote_active = max(sb.remote_active, rec.active_at)
        # vm-manager knows whether it is paused: another replica may have paused
        # or resumed it (a resumed VM has a new agent connection to make).
        if not pause_state:
            return
        if vm.suspended and not sb.paused:
            sb.paused = True
        elif sb.paused and not vm.suspended and vm.state == common_pb2.VM_STATE_READY:
            sb.paused = False
            old, sb.vm, sb.channel = sb.channel, vm, self.agent_channel(vm)
            self._spawn(old.close(grace=None))

    async def update(
        self,
        sb: SandboxState,
        change: Callable[[SandboxState], None],
        *,
        holding_lock: bool = False,
    ) -> None:
        """Read ``sb``'s record, apply ``change`` and write it back, compare-and-set."""
        for _ in range(UPDATE_ATTEMPTS):
            await self.refresh(sb, holding_lock=holding_lock)
            change(sb)
            local = sb.local_active_at()
            try:
                sb.record_generation = await self.records.write(sb.record(), sb.record_generation)
                sb.own_active = max(sb.own_active, local)
                return
            except Aborted:
                continue  # another replica wrote it meanwhile: read it again
        raise Aborted(
            f"sandbox {sb.id}'s record kept changing under this call (other executor "
            "replicas): try again"
        )

    async def touch(self, sb: SandboxState) -> None:
        """Record that a call used ``sb`` here (other replicas' idle clocks)."""
        sb.touched = time.monotonic()
        if sb.lock.locked():
            return  # a pause or resume under way writes the record itself
        try:
            await self.update(sb, lambda _: None)  # record() carries active_at
        except AgentVMError as exc:
            log.info("cannot record the use of sandbox %s: %s", sb.id, exc)

    def touch_soon(self, sb: SandboxState) -> None:
        """``touch`` when an idle auto-pause could otherwise miss this replica's use."""
        if sb.auto_pause and not sb.closing and time.monotonic() - sb.touched >= sb.auto_pause / 4:
            sb.touched = time.monotonic()
            self._spawn(self.touch(sb))

    def remote_idle(self, sb: SandboxState) -> bool:
        """No other replica recorded a use within the idle time (allowing for the
        quarter by which its record may lag)."""
        if sb.remote_active <= sb.own_active:
            return True  # the last use recorded is this replica's own: its clock decides
        ended = sb.remote_active + sb.auto_pause / 4
        if time.time() - ended >= sb.auto_pause:
            return True
        # Seen from here, the sandbox was used then: the idle clock starts over.
        sb.last_active = max(sb.last_active, time.monotonic() - (time.time() - ended))
        return False

    def forget(self, sb: SandboxState) -> None:
        """Drop a sandbox another replica closed (its teardown is that replica's)."""
        if self._sandboxes.get(sb.id) is not sb or sb.closing:
            return
        self.drop(sb)
        self._spawn(sb.channel.close(grace=None))
        log.info("sandbox %s was closed by another replica", sb.id, extra={"sandbox": sb.id})

    def drop(self, sb: SandboxState) -> None:
        """Remove ``sb`` from this replica and give its slot back, once."""
        if self._sandboxes.get(sb.id) is sb:
            del self._sandboxes[sb.id]
        self._remember_closed(sb.id)
        if sb.slot:
            sb.slot = False
            self._slots.release()

    def _remember_closed(self, sandbox_id: str) -> None:
        self._closed[sandbox_id] = None
        while len(self._closed) > REMEMBER_EXPIRED:
            self._closed.popitem(last=False)

    # -- taking sandboxes up ---------------------------------------------------
    async def find(self, sandbox_id: str, *, paused_ok: bool = False) -> SandboxState:
        """``get``, looking on the nodes for a sandbox of the group this replica has
        not seen (made by another replica since, or before this one started)."""
        if (
            sandbox_id not in self._sandboxes
            and SANDBOX_ID.fullmatch(sandbox_id)
            and sandbox_id not in self._closed
            and sandbox_id not in self._expired
        ):
            selector = {**self._vm_selector(), SANDBOX_LABEL: sandbox_id}
            try:
                resp = await self.vmm.ListVMs(
                    vm_manager_pb2.ListVMsRequest(label_selector=selector), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot look for sandbox %s: %s", sandbox_id, exc.details())
            else:
                await self.take_up(list(resp.vms), restart=False)
        return self.get(sandbox_id, paused_ok=paused_ok)

    async def sync(self) -> None:
        """Take up the group's sandboxes this replica has not seen; bring the others up
        to their records; forget those whose VM is gone (ListSandboxes)."""
        try:
            vms = await self._list_vms()
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list the group's VMs: %s", exc.details())
            return
        await self.take_up(vms, restart=False)
        names = {vm.name: vm for vm in vms}
        stale = [
            sb
            for sb in self._sandboxes.values()
            if not sb.closing
            and (
                sb.vm.name not in names
                or names[sb.vm.name].record_generation > sb.record_generation
            )
        ]

        async def quietly(sb: SandboxState) -> None:
            with contextlib.suppress(AgentVMError):  # forgotten, or its node is away
                await self.refresh(sb)

        await asyncio.gather(*(quietly(sb) for sb in stale))

    async def _list_vms(self) -> list[common_pb2.VM]:
        resp = await self.vmm.ListVMs(
            vm_manager_pb2.ListVMsRequest(label_selector=self._vm_selector()), timeout=30
        )
        return list(resp.vms)

    async def take_up(self, vms: list[common_pb2.VM], *, restart: bool) -> list[str]:
        """Take up the sandboxes of ``vms`` (the group's) that this replica does not
        hold, from their records; at a restart, also those its journal had (before
        records moved to the VMs). Finishes the teardown of closed ones. The names of
        the VMs no record holds (for the sweep)."""
        journal = {r.vm_name: r for r in self.journal.load()} if restart else {}
        unrecorded: list[str] = []
        for listed in vms:
            sandbox_id = listed.labels.get(SANDBOX_LABEL, "")
            if sandbox_id in self._sandboxes or sandbox_id in self._creating:
                continue
            try:
                vm, rec = await self._record_of(listed, journal.pop(listed.name, None))
            except NotFound:
                continue  # destroyed meanwhile
            except RecordUnreadable as exc:
                log.warning("%s; leaving VM %s alone", exc, listed.name)
                continue
            except AgentVMError as exc:
                log.warning("cannot read the record of VM %s: %s", listed.name, exc)
                continue
            if rec is None or rec.id != sandbox_id:
                unrecorded.append(vm.name)
                continue
            if sandbox_id in self._sandboxes:
                continue  # taken up meanwhile (another call looking for it)
            if rec.closing or (rec.oneshot and restart and self._made_here(vm.labels)):
                # Closed (or a one-shot Run the previous executor ran) and not torn down.
                log.info("finishing the teardown of sandbox %s (%s)", rec.id, vm.name)
                self._remember_closed(rec.id)
                why = "executor restart" if restart else "executor sweep"
                finish = self._finish(rec, f"{why}: its sandbox was closed, its teardown cut short")
                if restart:
                    await finish
                else:
                    self._spawn(finish)  # not on a caller's time
                continue
            await self._take(vm, rec, restart=restart)
        for rec in journal.values():
            log.info("sandbox %s is gone with its VM %s; forgetting it", rec.id, rec.vm_name)
        if restart:
            for rec in self.journal.load():
                self.journal.remove(rec.id)  # on the VMs now, or gone
        return unrecorded

    async def _record_of(
        self, vm: common_pb2.VM, journaled: Record | None
    ) -> tuple[common_pb2.VM, Record | None]:
        """``vm`` as it is now and its record (ListVMs leaves records out); a record
        the journal had (before records moved to the VMs) is moved onto it first."""
        if not vm.record_generation:
            if journaled is None or journaled.id != vm.labels.get(SANDBOX_LABEL, ""):
                return vm, None
            with contextlib.suppress(Aborted):  # written meanwhile: read below
                await self.records.write(journaled, 0)
                log.info("moved sandbox %s's record from the journal to %s", journaled.id, vm.name)
        return await self.records.read(vm.name)

    async def _take(self, vm: common_pb2.VM, rec: Record, *, restart: bool) -> SandboxState:
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
            # may have happened without its record.
            paused=vm.suspended,
            paused_left=left,
            auto_pause=rec.auto_pause,
            record_generation=vm.record_generation,
            remote_active=rec.active_at,
            oneshot=rec.oneshot,
        )
        if rec.active_at:
            sb.last_active = time.monotonic() - max(0.0, time.time() - rec.active_at)
        # A restarted replica takes its own sandboxes' slots back while there are
        # any; another replica's sandboxes hold none here.
        if restart and self._made_here(vm.labels) and not self._slots.locked():
            await self._slots.acquire()  # free: does not wait
        else:
            sb.slot = False
        self._sandboxes[sb.id] = sb
        self.events.emit("sandbox.restored", vm=vm.name, sandbox=sb.id, paused=sb.paused)
        log.info(
            "took up sandbox %s (%s) on %s",
            sb.id,
            "paused" if sb.paused else "running",
            vm.name,
            extra={"sandbox": sb.id},
        )
        return sb

    async def _finish(self, rec: Record, reason: str) -> None:
        if rec.lease_id:
            await self._release(rec.lease_id, rec.vm_name)
        else:
            await self._destroy_vm(rec.vm_name, reason)

    # -- start, reaper, sweeps -----------------------------------------------
    async def start(self) -> None:
        """Take up the group's sandboxes, reclaim what no record holds, start the reaper."""
        # An unusable record key stops the start here, naming the file and the fix.
        _ = self.records.key
        try:
            vms = await self._list_vms()
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list leftover VMs: %s", exc.details())
        else:
            unrecorded = set(await self.take_up(vms, restart=True))
            for vm in vms:
                if vm.name in unrecorded and self._orphaned(vm):
                    log.info("destroying VM %s left by a previous executor", vm.name)
                    await self._destroy_vm(
                        vm.name,
                        "executor restart: its sandbox did not survive the previous executor",
                    )
        # Every lease of the group that no sandbox holds and that no create can
        # still be answering for was left behind.
        await self._reconcile_leases()
        self._reaper = asyncio.ensure_future(self._reap())

    def _orphaned(self, vm: common_pb2.VM) -> bool:
        """A VM this group made whose create never recorded it: this replica's own
        (at once) or another's after CREATE_GRACE_S. Pool VMs go with their lease."""
        if vm.labels.get(OWNER_LABEL[0]) != OWNER_LABEL[1]:
            return False
        if vm.labels.get(SANDBOX_LABEL, "") in self._creating:
            return False
        return self._made_here(vm.labels) or time.time() - vm.created_at.ToSeconds() > (
            CREATE_GRACE_S
        )

    async def _reap(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for sb in list(self._sandboxes.values()):
                if sb.busy:
                    self.touch_soon(sb)
                if sb.expires_at <= now and not (sb.closing or sb.paused or sb.checking):
                    sb.checking = True
                    self._spawn(self._expire(sb))
            for sb in self.idle_sandboxes():
                log.info("sandbox %s idle for %g s: pausing it", sb.id, sb.auto_pause)
                self._spawn(self.auto_pause(sb))
            interval = self.settings.reconcile_interval_s
            if interval > 0 and time.monotonic() - last_sweep >= interval:
                last_sweep = time.monotonic()
                try:
                    await self.reconcile()
                except grpc.aio.AioRpcError as exc:
                    log.warning("cannot sweep for orphaned VMs: %s", exc.details())
                except Exception:  # the reaper never dies: lifetimes depend on it
                    log.exception("the sweep for orphaned VMs failed; trying again next time")

    async def _expire(self, sb: SandboxState) -> None:
        """Close ``sb`` at the end of its lifetime, unless its record says otherwise
        (another replica extended or paused it)."""
        try:
            await self.refresh(sb)
        except NotFound:
            return  # closed elsewhere: forgotten
        except AgentVMError as exc:
            log.info("cannot check sandbox %s's record (%s); closing it", sb.id, exc)
        finally:
            sb.checking = False
        if sb.expires_at > time.time() or sb.closing or sb.paused:
            return
        log.info("sandbox %s reached the end of its lifetime", sb.id)
        sb.expired = True
        await self.close_sandbox(sb.id)

    async def reconcile(self) -> list[str]:
        """Take up the group's sandboxes not seen yet; destroy the VMs and release the
        pool leases of the group that no record holds; the VMs' names.

        Such a VM is left when its CreateVM answer never arrived (vm-manager
        killed mid-create, a deadline) or the replica died before its record
        was written; the same goes for a lease whose AcquireVM answer never
        arrived (pool-manager killed mid-acquire).
        """
        vms = await self._list_vms()
        unrecorded = set(await self.take_up(vms, restart=False))
        gone = [vm for vm in vms if vm.name in unrecorded and self._orphaned(vm)]
        for vm in gone:
            sandbox = vm.labels.get(SANDBOX_LABEL, "?")
            log.info("destroying VM %s: sandbox %s is not open", vm.name, sandbox)
            await self._destroy_vm(
                vm.name,
                f"executor reconcile: sandbox {sandbox} is not open (its creation was cut short)",
            )
        return [vm.name for vm in gone] + await self._reconcile_leases()

    async def _reconcile_leases(self) -> list[str]:
        if self.pool is None:
            return []
        try:
            resp = await self.pool.ListLeases(
                pool_manager_pb2.ListLeasesRequest(label_selector=self._owner_labels()),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list pool leases to sweep: %s", exc.details())
            return []
        held = {sb.lease_id for sb in self._sandboxes.values() if sb.lease_id}
        gone = []
        for lease in orphaned_leases(resp.leases, held, self._creating):
            age = time.time() - lease.acquired_at.ToSeconds()
            if not self._made_here(lease.labels) and age <= CREATE_GRACE_S:
                continue  # another replica may still be creating its sandbox
            if await self._has_open_record(lease.vm_name):
                continue  # a sandbox this replica has not taken up yet
            gone.append(lease)
        for lease in gone:
            log.info(
                "releasing lease %s of %s: no sandbox holds it (a previous executor's, or "
                "its AcquireVM answer was lost)",
                lease.lease_id,
                lease.vm_name,
            )
            await self._release(lease.lease_id, lease.vm_name)
        return [lease.vm_name for lease in gone]

    async def _has_open_record(self, vm_name: str) -> bool:
        try:
            _vm, rec = await self.records.read(vm_name)
        except NotFound:
            return False
        except AgentVMError:
            return True  # unknown: keep it for the next sweep
        return rec is not None and not rec.closing
