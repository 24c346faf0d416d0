"""A full state disk: new VMs refused, paused VMs noted and resumed (vm_manager/diskfull.py).

The real effect (QEMU pausing a VM whose overlay cannot grow, the guest's
write finishing after the resume) is in tests/integration/test_state_disk_full.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager import diskfull
from agentvm.vm_manager.diskfull import DiskWatch
from tests.unit.test_servicers import RecordingSink, fake_image, run_servicer_test, unit_settings

__all__ = ["fake_image"]  # the fixture, used by name


class Domain:
    def __init__(self) -> None:
        self.resumed = 0

    def resume(self) -> int:
        self.resumed += 1
        return 0


class Conn:
    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}

    def lookup(self, name: str) -> Domain:
        return self.domains[name]


@dataclasses.dataclass
class FakeVM:
    name: str
    error: str = ""


def watch(tmp_path: Path, vms: dict[str, Any], conn: Conn, sink: RecordingSink) -> DiskWatch:
    return DiskWatch(tmp_path, 100, conn, "agent-vm-t-", sink, vms.get)  # type: ignore[arg-type]


def test_a_paused_vm_is_noted_once_and_resumed_when_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, sink = Conn(), RecordingSink()
    conn.domains["agent-vm-t-1"] = Domain()
    vms: dict[str, Any] = {"agent-vm-t-1": FakeVM("agent-vm-t-1")}
    w = watch(tmp_path, vms, conn, sink)
    paused = ["agent-vm-t-1", "agent-vm-t-unknown"]  # one vm-manager does not hold
    free = [5]
    monkeypatch.setattr(w, "_io_paused", lambda: list(paused))
    monkeypatch.setattr(diskfull, "free_mib", lambda path: free[0])

    async def main() -> None:
        await w.tick()
        await w.tick()  # still full: noted once, not resumed
        assert [e[0] for e in sink.events] == ["vm.disk_full"]
        assert sink.events[0][2]["free_mib"] == 5
        assert "is full (5 MiB free)" in vms["agent-vm-t-1"].error
        assert "resumes by itself once 100 MiB are free" in vms["agent-vm-t-1"].error
        assert conn.domains["agent-vm-t-1"].resumed == 0
        free[0] = 150
        await w.tick()
        assert conn.domains["agent-vm-t-1"].resumed == 1
        assert [e[0] for e in sink.events] == ["vm.disk_full", "vm.disk_resumed"]
        assert vms["agent-vm-t-1"].error == ""
        paused.clear()
        await w.tick()
        assert w.paused == {}

    asyncio.run(main())


def test_a_vm_resumed_by_someone_else_loses_its_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, sink = Conn(), RecordingSink()
    vms: dict[str, Any] = {"agent-vm-t-1": FakeVM("agent-vm-t-1")}
    w = watch(tmp_path, vms, conn, sink)
    paused = ["agent-vm-t-1"]
    monkeypatch.setattr(w, "_io_paused", lambda: list(paused))
    monkeypatch.setattr(diskfull, "free_mib", lambda path: 0)

    async def main() -> None:
        await w.tick()
        assert vms["agent-vm-t-1"].error
        paused.clear()
        await w.tick()
        assert vms["agent-vm-t-1"].error == ""
        assert w.paused == {}

    asyncio.run(main())


def test_create_on_a_full_state_disk_is_resource_exhausted_naming_it(
    tmp_path: Path, fake_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dataclasses.replace(unit_settings(tmp_path, fake_image), min_free_disk_mib=10**9)

    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(network_mode=common_pb2.NETWORK_MODE_ISOLATED)
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = err.value.details() or ""
        assert str(tmp_path / "state") in details
        assert "AGENTVM_MIN_FREE_DISK_MIB" in details
        assert "free space there" in details
        listed = await stub.ListVMs(vm_manager_pb2.ListVMsRequest())
        assert list(listed.vms) == []  # nothing half-made

    run_servicer_test(tmp_path, fake_image, body, settings)
