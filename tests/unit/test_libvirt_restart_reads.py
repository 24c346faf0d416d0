"""Reads of a domain during a libvirtd restart are no INTERNAL error
(vm_manager/manager.py ``_refresh``, manager_readiness.py ``_probe_agent``).

Found by the 60-minute soak of 2026-12-07: a libvirtd restart while the
executor waited for a new VM (WaitVM) made the readiness probe's
``dom.XMLDesc`` raise "End of file while reading data" past the error
translation, and the sandbox's creation failed with INTERNAL. A look at a
domain that cannot be read now leaves the VM as last known and the next poll
looks again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from agentvm.common.errors import AgentVMError, DeadlineExceeded
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.vm import VMState
from tests.unit.test_servicers import RecordingSink, fake_image
from tests.unit.test_vm_audit import defined_vm, on_test_driver

__all__ = ["fake_image"]  # the fixture, used by name


class _Gone:
    """A domain handle whose connection died under it (libvirtd restarting)."""

    def __getattr__(self, name: str) -> Any:
        def broken(*args: object) -> None:
            raise libvirt.libvirtError("End of file while reading data: Input/output error")

        return broken


def test_a_vm_read_while_libvirtd_restarts_is_as_last_known(
    tmp_path: Path, fake_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(manager: VMManager, conn: LibvirtConnection, sink: RecordingSink) -> None:
        vm = await defined_vm(manager)
        monkeypatch.setattr(conn, "find", lambda name: _Gone())
        vm.state = VMState.READY
        assert (await manager.get(vm.name)).state is VMState.READY
        assert not [e for e in sink.events if e[0] in ("vm.failed", "vm.stopped")]
        # Booting: WaitVM's probe cannot read the domain either, and polls on
        # until its own deadline instead of failing with a raw libvirt error.
        vm.state = VMState.BOOTING
        with pytest.raises(DeadlineExceeded, match="did not become READY"):
            await manager.wait(vm.name, VMState.READY, 0.5)
        # Recording its metadata (a record write, a policy) on the dead connection is
        # a translated error, not a raw one (the servicer gives it a status).
        with pytest.raises(AgentVMError, match="recording the record"):
            manager._store_metadata(vm, _Gone(), "the record")
        monkeypatch.undo()
        await manager.destroy(vm.name)

    on_test_driver(tmp_path, fake_image, body)
