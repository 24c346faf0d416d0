"""What vm-manager tells the audit log about VMs that went down behind its back,
and about libvirt coming back (soak: every fault must be in the audit log)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import libvirt
import pytest

from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager import console
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState
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


async def defined_vm(manager: VMManager) -> VM:
    """A standard ISOLATED VM, defined, not started."""
    return await manager.create(
        profile=ResourceProfile.STANDARD,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources.for_profile(ResourceProfile.STANDARD),
        labels={},
        start=False,
    )


def test_a_vm_that_stopped_behind_our_back_is_audited_once(
    tmp_path: Path, fake_image: Path
) -> None:
    async def body(manager: VMManager, conn: LibvirtConnection, sink: RecordingSink) -> None:
        vm = await defined_vm(manager)
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


@pytest.mark.parametrize(
    ("console_text", "state", "event", "says"),
    [
        # What the guest printed in the soak's guest-panic fault (sysrq c).
        (
            "[   14.2] sysrq: Trigger a crash\n"
            "[   14.3] Kernel panic - not syncing: sysrq triggered crash\n"
            "[   14.3] CPU: 0 PID: 212 Comm: sh\x1b[0m\n",
            VMState.FAILED,
            "vm.failed",
            "the guest kernel panicked (Kernel panic - not syncing: sysrq triggered crash)",
        ),
        ("[    2.0] reboot: Power down\n", VMState.STOPPED, "vm.stopped", ""),
    ],
)
def test_a_guest_that_panicked_is_failed_and_one_that_powered_off_stopped(
    tmp_path: Path,
    fake_image: Path,
    console_text: str,
    state: VMState,
    event: str,
    says: str,
) -> None:
    async def body(manager: VMManager, conn: LibvirtConnection, sink: RecordingSink) -> None:
        vm = await defined_vm(manager)
        # Its guest ran, wrote its console, and went down by itself (libvirt: a
        # shutdown, whatever the cause: on_reboot=destroy).
        dom = conn.lookup(vm.name)
        dom.create()
        dom.shutdown()
        assert dom.state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
        vm.console_log.parent.mkdir(parents=True, exist_ok=True)
        vm.console_log.write_text("x" * (console.TAIL_BYTES * 2) + console_text)
        vm.state = VMState.READY
        await manager.get(vm.name)
        assert vm.state is state
        assert says in vm.error
        assert [e[0] for e in sink.events if e[0] in ("vm.failed", "vm.stopped")] == [event]
        await manager.destroy(vm.name)

    on_test_driver(tmp_path, fake_image, body)


def test_a_console_log_is_read_as_untrusted(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console.panic_line(log) == ""  # none yet
    log.write_bytes(b"Kernel panic - not syncing: \xff\x00\x1b[2J" + b"A" * 1000 + b"\n")
    line = console.panic_line(log)
    assert line.startswith("Kernel panic - not syncing: ")
    assert len(line) <= console.QUOTE_CHARS
    assert line.isprintable()
    assert line.isascii()
    # A panic further back than the tail read is not seen.
    log.write_bytes(b"Kernel panic - not syncing: old\n" + b"\n" * console.TAIL_BYTES)
    assert console.panic_line(log) == ""
