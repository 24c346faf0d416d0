"""After a failed save (SuspendVM), the VM runs on as it was, and no raw libvirt
error escapes as INTERNAL (vm_manager/manager_snapshots.py).

Found by the soak: a libvirtd restart during a SuspendVM broke the save, and
the look at the domain afterwards raised "client socket is closed" past the
error translation: the caller got INTERNAL.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from tests.unit.test_servicers import fake_image, unit_manager, unit_settings

__all__ = ["fake_image"]  # the fixture, used by name


def test_a_domain_the_failed_save_left_paused_runs_again(tmp_path: Path, fake_image: Path) -> None:
    settings = unit_settings(tmp_path, fake_image)
    conn = LibvirtConnection(settings.libvirt_uri)
    try:
        manager = unit_manager(settings, conn)
        dom = conn.lookup("test")  # the test driver's running domain
        dom.suspend()
        assert dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED
        again = manager._running_again("test")
        assert again is not None
        assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert manager._running_again("no-such-domain") is None
        dom.destroy()
        assert manager._running_again("test") is None  # not running: no relay
    finally:
        conn.close()


def test_libvirt_gone_after_a_failed_save_is_no_internal_error(
    tmp_path: Path, fake_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = unit_settings(tmp_path, fake_image)
    conn = LibvirtConnection(settings.libvirt_uri)
    try:
        manager = unit_manager(settings, conn)

        def broken(name: str) -> libvirt.virDomain:
            raise libvirt.libvirtError("internal error: client socket is closed")

        monkeypatch.setattr(conn, "lookup", broken)
        assert manager._running_again("test") is None
    finally:
        conn.close()
