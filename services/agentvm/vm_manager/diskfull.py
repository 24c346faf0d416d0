"""The state directory's file system full (docs/RELIABILITY.md, "State disk full").

A VM's overlay is thin: it grows on the host as the guest writes. When the
file system under STATE_DIR is full, QEMU's default error policy for a
failed write (``werror=enospc``) pauses the VM rather than failing the
guest's I/O: nothing in the guest is lost. vm-manager then

- refuses new VMs while less than ``AGENTVM_MIN_FREE_DISK_MIB`` is free
  (RESOURCE_EXHAUSTED, naming the directory and what is free);
- marks every VM QEMU paused for an I/O error: GetVM's ``error`` says why,
  and the audit log gets ``vm.disk_full``;
- resumes them once that much is free again (``vm.disk_resumed``): the
  guest's write is retried and its program goes on as if it had been slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from agentvm.common.errors import AgentVMError, ResourceExhausted
from agentvm.common.events import EventSink
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.vm import VM

__all__ = ["HELD", "WATCH_S", "DiskWatch", "free_mib"]

log = logging.getLogger(__name__)

# How often the watch looks for VMs paused by a full disk (one libvirt call).
WATCH_S = 2.0
# How GetVM's error of a VM held for a full disk begins (the soak looks for it).
HELD = "QEMU paused the VM"


def free_mib(path: Path) -> int:
    """MiB free on the file system ``path`` is (or will be, made) on."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return int(shutil.disk_usage(path).free >> 20)


@dataclass
class DiskWatch:
    """Refuses VMs on a full state disk; notes and resumes the VMs it paused."""

    state_dir: Path
    min_free_mib: int
    conn: LibvirtConnection
    prefix: str
    events: EventSink
    # The VM vm-manager holds by that name (None: not one of ours).
    lookup: Callable[[str], VM | None]
    # VM name -> when its disk was first seen full.
    paused: dict[str, float] = field(default_factory=dict)

    def check_room(self) -> None:
        """RESOURCE_EXHAUSTED when a new VM would start on a disk that is (nearly) full."""
        free = free_mib(self.state_dir)
        if free < self.min_free_mib:
            raise ResourceExhausted(
                f"the file system of {self.state_dir} has {free} MiB free, less than the "
                f"{self.min_free_mib} MiB agent-vm keeps (AGENTVM_MIN_FREE_DISK_MIB): "
                "free space there (or close sandboxes), then try again"
            )

    def why(self, free: int) -> str:
        return (
            f"{HELD}: its disk could not grow, the file system of "
            f"{self.state_dir} is full ({free} MiB free); it resumes by itself once "
            f"{self.min_free_mib} MiB are free there"
        )

    def _io_paused(self) -> list[str]:
        """Names of our domains QEMU paused for an I/O error."""

        def paused(c: libvirt.virConnect) -> list[str]:
            found = []
            for dom in c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED):
                if not dom.name().startswith(self.prefix):
                    continue
                with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
                    state, reason = dom.state()
                    if (
                        state == libvirt.VIR_DOMAIN_PAUSED
                        and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
                    ):
                        found.append(dom.name())
            return found

        return self.conn.call("listing paused domains", paused)

    async def tick(self) -> None:
        """Note newly paused VMs; resume them all when there is room again."""
        names = await asyncio.to_thread(self._io_paused)
        free = await asyncio.to_thread(free_mib, self.state_dir)
        for name in list(self.paused):
            if name not in names:  # resumed or destroyed by someone else
                self.paused.pop(name)
                vm = self.lookup(name)
                if vm is not None and vm.error.startswith(HELD):
                    vm.error = ""
        for name in names:
            vm = self.lookup(name)
            if vm is None:
                continue
            if name not in self.paused:
                self.paused[name] = time.monotonic()
                vm.error = self.why(free)
                log.warning("VM %s paused: its disk is full (%d MiB free)", name, free)
                self.events.emit(
                    "vm.disk_full",
                    vm=name,
                    severity="warning",
                    state_dir=str(self.state_dir),
                    free_mib=free,
                )
            else:
                vm.error = self.why(free)
            if free >= self.min_free_mib:
                await self._resume(vm, free)

    async def _resume(self, vm: VM, free: int) -> None:
        try:
            dom = await asyncio.to_thread(self.conn.lookup, vm.name)
            await asyncio.to_thread(dom.resume)
        except (AgentVMError, libvirt.libvirtError) as exc:
            log.warning("cannot resume VM %s after its disk filled: %s", vm.name, exc)
            return
        since = self.paused.pop(vm.name, time.monotonic())
        vm.error = ""
        paused_s = round(time.monotonic() - since, 1)
        log.info("VM %s resumed: %d MiB free again after %.1f s", vm.name, free, paused_s)
        self.events.emit("vm.disk_resumed", vm=vm.name, free_mib=free, paused_s=paused_s)

    async def run(self) -> None:
        """Watch until cancelled; a libvirt that is away is looked at again later."""
        while True:
            try:
                await self.tick()
            except (AgentVMError, libvirt.libvirtError, OSError) as exc:
                log.debug("disk watch: %s", exc)
            await asyncio.sleep(WATCH_S)
