"""What vm-manager tells the audit log about VMs that went down behind its back,
and about libvirt coming back (soak: every fault must be in the audit log)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VMState
from tests.unit.test_servicers import RecordingSink, fake_image, unit_manager, unit_settings

__all__ = ["fake_image"]  # the fixture, used by name

Body = Callable[[VMManager, LibvirtConnection, RecordingSink], Awaitable[None]]


def on_test_driver(tmp_path: Path, cache: Path, body: Body) -> None:
    """``body(manager, conn, sink)`` with a vm-manager on libvirt's test driver whose
    events ``sink`` records."""
    settings = unit_settings(tmp_path, cache)
    sink = RecordingSink()

    async def main() -> None:
        conn = LibvirtConnection(settings.libvirt_uri)
        try:
            await body(unit_manager(settings, conn, events=sink), conn, sink)
        finally:
            conn.close()

    asyncio.run(main())


def test_a_vm_that_stopped_behind_our_back_is_audited_once(
    tmp_path: Path, fake_image: Path
) -> None:
    async def body(manager: VMManager, conn: LibvirtConnection, sink: RecordingSink) -> None:
        vm = await manager.create(
            profile=ResourceProfile.STANDARD,
            network_mode=NetworkMode.ISOLATED,
            resources=Resources.for_profile(ResourceProfile.STANDARD),
            labels={},
            start=False,
        )
        # vm-manager believes it runs; its domain is not running (a QEMU that died).
        vm.state = VMState.READY
        await manager.get(vm.name)
        await manager.get(vm.name)
        assert vm.state is VMState.FAILED
        failed = [e for e in sink.events if e[0] == "vm.failed"]
        assert [
            (vm_name, "stopped unexpectedly" in str(a["error"])) for _, vm_name, a in failed
        ] == [(vm.name, True)]
        await manager.destroy(vm.name)

    on_test_driver(tmp_path, fake_image, body)


def test_a_reconnect_to_libvirt_is_audited(tmp_path: Path, fake_image: Path) -> None:
    async def body(manager: VMManager, conn: LibvirtConnection, sink: RecordingSink) -> None:
        manager.watch()
        first = conn.get()
        conn._drop(first)  # as a broken call does after a libvirtd restart
        await asyncio.to_thread(conn.get)
        await asyncio.sleep(0.05)  # the event is handed to the loop
        reconnected = [a for t, _, a in sink.events if t == "libvirt.reconnected"]
        assert len(reconnected) == 1
        assert reconnected[0]["uri"] == "test:///default"
        assert float(str(reconnected[0]["away_s"])) >= 0
        await manager.close()

    on_test_driver(tmp_path, fake_image, body)
