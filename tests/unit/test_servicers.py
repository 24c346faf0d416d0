"""Servicers without VMs: the guest agent (grpcio-testing), vm-manager (libvirt test driver)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
import pytest

from agentvm.common.config import Settings
from agentvm.common.grpc_util import SERVER_OPTIONS, aio_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager.accel import Accel, AccelInfo
from agentvm.vm_manager.image import ImageStore, inputs_id
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.servicer import VMManagerServicer
from agentvm_guest import agent as agent_mod
from agentvm_guest import proctree

GUEST_SERVICE = guest_agent_pb2.DESCRIPTOR.services_by_name["GuestAgentService"]


@pytest.fixture
def guest_server(monkeypatch: pytest.MonkeyPatch) -> grpc_testing.Server:
    monkeypatch.setattr(proctree, "CGROUP_ROOT", "/proc/no-cgroups-here")
    return grpc_testing.server_from_dictionary(
        {GUEST_SERVICE: agent_mod.GuestAgent()}, grpc_testing.strict_real_time()
    )


def test_guest_get_status_under_grpc_testing(guest_server: grpc_testing.Server) -> None:
    rpc = guest_server.invoke_unary_unary(
        GUEST_SERVICE.methods_by_name["GetStatus"], (), guest_agent_pb2.GetStatusRequest(), None
    )
    response, _meta, code, _details = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert response.info.agent_version
    assert response.info.memory_total_bytes > 0


def test_guest_execute_streams_under_grpc_testing(guest_server: grpc_testing.Server) -> None:
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(
            code=common_pb2.Code(
                language=common_pb2.CODE_LANGUAGE_SHELL, source="echo hi; echo err >&2; exit 4"
            )
        )
    )
    rpc = guest_server.invoke_unary_stream(GUEST_SERVICE.methods_by_name["Execute"], (), req, None)
    events = []
    while True:
        try:
            events.append(rpc.take_response())
        except ValueError:
            break
        if events[-1].HasField("exited"):
            break
    _meta, code, _details = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert events[0].HasField("started")
    out = b"".join(e.output.data for e in events if e.HasField("output") and e.output.stream == 1)
    assert out == b"hi\n"
    assert events[-1].exited.exit_code == 4


def test_guest_execute_rejects_empty_program(guest_server: grpc_testing.Server) -> None:
    rpc = guest_server.invoke_unary_stream(
        GUEST_SERVICE.methods_by_name["Execute"], (), guest_agent_pb2.ExecuteRequest(), None
    )
    _meta, code, details = rpc.termination()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "program" in details


# -- vm-manager on libvirt's test driver ---------------------------------------------


@pytest.fixture
def fake_image(tmp_path: Path) -> Path:
    """An image directory for this version's inputs, with a tiny real qcow2 base."""
    cache = tmp_path / "cache"
    root = cache / "images" / inputs_id()
    root.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(root / "rootfs.qcow2"), "64M"], check=True
    )
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    manifest = {
        "id": inputs_id(),
        "distribution": "debian-bookworm",
        "kernel_release": "6.1.0-test",
        "built_at": 0.0,
        "packages": ["python3=3.11"],
        "wheels": [],
        "agent_version": "0.1.0",
        "files": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return cache


def unit_settings(tmp_path: Path, cache: Path) -> Settings:
    """A vm-manager on libvirt's test driver with the test's own directories."""
    return Settings(
        libvirt_uri="test:///default",
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=cache,
        vm_prefix="agent-vm-unit-",
    )


def unit_manager(settings: Settings, conn: LibvirtConnection, **kw: Any) -> VMManager:
    return VMManager(
        settings,
        conn,
        ImageStore(settings.cache_dir),
        AccelInfo(Accel.TCG, "test"),
        memory_limit=False,
        **kw,
    )


def run_servicer_test(
    tmp_path: Path, cache: Path, body: object, settings: Settings | None = None
) -> None:
    """Serve VMManagerService on the test driver in-process and run ``body(stub)``."""

    async def main() -> None:
        nonlocal settings
        settings = settings or unit_settings(tmp_path, cache)
        conn = LibvirtConnection(settings.libvirt_uri)
        images = ImageStore(cache)
        manager = unit_manager(settings, conn)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        vm_manager_pb2_grpc.add_VMManagerServiceServicer_to_server(
            VMManagerServicer(manager, images), server
        )
        address = f"unix:{tmp_path}/vmm.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with aio_channel(address, "vm-manager") as channel:
                stub = vm_manager_pb2_grpc.VMManagerServiceStub(channel)
                assert callable(body)
                await body(stub)
        finally:
            await server.stop(None)
            conn.close()

    asyncio.run(main())


def test_create_list_get_destroy_on_the_test_driver(tmp_path: Path, fake_image: Path) -> None:
    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        created = (
            await stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    profile=common_pb2.RESOURCE_PROFILE_INTENSIVE,
                    network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                    labels={"owner": "unit"},
                )
            )
        ).vm
        assert created.state == common_pb2.VM_STATE_DEFINED
        assert created.resources.vcpus == 2
        assert created.name.startswith("agent-vm-unit-")
        assert (tmp_path / "state" / "vms" / created.name / "overlay.qcow2").exists()
        listed = (
            await stub.ListVMs(vm_manager_pb2.ListVMsRequest(label_selector={"owner": "unit"}))
        ).vms
        assert [v.name for v in listed] == [created.name]
        got = (await stub.GetVM(vm_manager_pb2.GetVMRequest(name=created.name))).vm
        assert got.labels["owner"] == "unit"
        image = await stub.GetImage(vm_manager_pb2.GetImageRequest())
        assert image.present
        assert image.image.kernel_release == "6.1.0-test"
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=created.name))
        assert not (tmp_path / "state" / "vms" / created.name).exists()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVM(vm_manager_pb2.GetVMRequest(name=created.name))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Idempotent.
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=created.name))

    run_servicer_test(tmp_path, fake_image, body)


def test_state_guards_and_validation_on_the_test_driver(tmp_path: Path, fake_image: Path) -> None:
    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        vm = (
            await stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(network_mode=common_pb2.NETWORK_MODE_ISOLATED)
            )
        ).vm
        # Stopping a VM that never ran is a no-op, not an error.
        stopped = await stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name))
        assert not stopped.forced
        bad = vm_manager_pb2.StopVMRequest(name=vm.name)
        bad.grace_period.FromSeconds(10_000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StopVM(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wait = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
        wait.timeout.FromSeconds(5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.WaitVM(wait)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "start it first" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(
                    network_mode=common_pb2.NETWORK_MODE_ISOLATED, bridge="br0"
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name="agent-vm-other-1234"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prefix" in (err.value.details() or "")
        host = await stub.GetHostInfo(vm_manager_pb2.GetHostInfoRequest())
        assert host.libvirt_uri == "test:///default"
        await stub.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name))

    run_servicer_test(tmp_path, fake_image, body)


def test_missing_image_is_failed_precondition(tmp_path: Path) -> None:
    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateVM(
                vm_manager_pb2.CreateVMRequest(network_mode=common_pb2.NETWORK_MODE_ISOLATED)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "agent-vm image build" in (err.value.details() or "")
        image = await stub.GetImage(vm_manager_pb2.GetImageRequest())
        assert not image.present
        assert not (tmp_path / "state" / "vms").exists() or not any(
            (tmp_path / "state" / "vms").iterdir()
        )

    run_servicer_test(tmp_path, tmp_path / "empty-cache", body)


def test_orphaned_vms_are_the_executors_own_without_an_open_sandbox() -> None:
    from agentvm.executor.executor import orphaned_vms

    def vm(name: str, created: int, **labels: str) -> common_pb2.VM:
        v = common_pb2.VM(name=name, labels=labels)
        v.created_at.FromSeconds(created)
        return v

    own = {"agent-vm/owner": "executor", "agent-vm/executor": "unix:/x"}
    vms = [
        vm("open", 0, **own, **{"agent-vm/sandbox": "sb-1"}),
        vm("orphan", 0, **own, **{"agent-vm/sandbox": "sb-2"}),
        vm("no-sandbox-label", 0, **own),
        vm("young", 990, **own, **{"agent-vm/sandbox": "sb-3"}),
        vm("users", 0, **{"agent-vm/sandbox": "sb-4"}),
        vm("pool", 0, **{"agent-vm/owner": "pool-manager"}),
    ]
    got = orphaned_vms(vms, {"sb-1"}, now=1000, min_age=60)
    assert [v.name for v in got] == ["orphan", "no-sandbox-label"]
    assert [v.name for v in orphaned_vms(vms, {"sb-1"})] == ["orphan", "no-sandbox-label", "young"]


def test_orphaned_leases_are_the_ones_no_sandbox_holds_unless_being_created() -> None:
    from agentvm.executor.executor import orphaned_leases
    from agentvm.v1 import pool_manager_pb2

    def lease(lease_id: str, sandbox: str) -> pool_manager_pb2.Lease:
        return pool_manager_pb2.Lease(
            lease_id=lease_id, vm_name=f"vm-{lease_id}", labels={"agent-vm/sandbox": sandbox}
        )

    leases = [
        lease("held", "sb-1"),
        # The sandbox fell back to a VM of its own: its lost lease is not held.
        lease("lost", "sb-1"),
        lease("creating", "sb-2"),
        lease("closed", "sb-3"),
    ]
    got = orphaned_leases(leases, held={"held"}, creating={"sb-2"})
    assert [x.lease_id for x in got] == ["lost", "closed"]


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, object]]] = []

    def emit(
        self,
        type_: str,
        *,
        vm: str = "",
        sandbox: str = "",
        severity: str = "info",
        **attrs: object,
    ) -> None:
        self.events.append((type_, vm, attrs))


def test_recovery_reclaims_directories_no_domain_owns_and_audits_it(tmp_path: Path) -> None:
    """A create cut short by a crash leaves a VM directory without a domain: the next
    vm-manager removes it at start and reports a vm.reclaimed event."""
    settings = unit_settings(tmp_path, tmp_path / "cache")
    name = "agent-vm-unit-cutshort"
    for base in (settings.vms_state_dir, settings.vms_run_dir):
        (base / name).mkdir(parents=True)
    (settings.vms_state_dir / name / "disk.qcow2").write_bytes(b"half")
    (settings.vms_state_dir / "not-ours").mkdir()
    sink = RecordingSink()

    async def main() -> None:
        conn = LibvirtConnection(settings.libvirt_uri)
        try:
            await unit_manager(settings, conn, events=sink).recover()
        finally:
            conn.close()

    asyncio.run(main())
    assert not (settings.vms_state_dir / name).exists()
    assert not (settings.vms_run_dir / name).exists()
    assert (settings.vms_state_dir / "not-ours").exists()
    reclaimed = [e for e in sink.events if e[0] == "vm.reclaimed"]
    assert [vm for _, vm, _ in reclaimed] == [name, name]
    assert all("no domain owns" in str(attrs["reason"]) for _, _, attrs in reclaimed)


def test_a_create_cancelled_twice_cleans_up_only_after_its_define_thread(
    tmp_path: Path, fake_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The define thread (overlay, workspace mount, domain) cannot be cancelled: a
    create cancelled by its client and then by the server's stop must wait for it,
    or the cleanup would run first and the thread mount or define afterwards."""
    import threading
    import time as time_mod

    from agentvm.common.profiles import NetworkMode, ResourceProfile
    from agentvm.vm_manager.templates import Resources

    settings = unit_settings(tmp_path, fake_image)
    order: list[str] = []
    in_define = threading.Event()

    def slow_define(vm: Any, *args: Any) -> None:
        in_define.set()
        time_mod.sleep(0.5)
        order.append("define finished")

    def remove_everything(vm: Any) -> None:
        order.append("cleanup")

    async def main() -> None:
        conn = LibvirtConnection(settings.libvirt_uri)
        try:
            manager = unit_manager(settings, conn)
            monkeypatch.setattr(manager, "_define", slow_define)
            monkeypatch.setattr(manager, "_remove_everything", remove_everything)
            task = asyncio.ensure_future(
                manager.create(
                    profile=ResourceProfile.STANDARD,
                    network_mode=NetworkMode.ISOLATED,
                    resources=Resources.for_profile(ResourceProfile.STANDARD),
                    labels={},
                    start=False,
                )
            )
            await asyncio.to_thread(in_define.wait, 10)
            task.cancel()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            conn.close()

    asyncio.run(main())
    assert order == ["define finished", "cleanup"]


def test_prune_images_empties_the_build_cache_only_when_asked(
    tmp_path: Path, fake_image: Path
) -> None:
    build = fake_image / "build"
    (build / ("a" * 64)).mkdir(parents=True)
    (build / ("a" * 64) / "done").write_text("")
    (build / ("a" * 64) / "layer.qcow2").write_bytes(b"x" * 8192)
    (build / f"{'b' * 64}.tmp-1").mkdir()

    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        first = await stub.PruneImages(vm_manager_pb2.PruneImagesRequest())
        assert (list(first.removed_ids), first.build_entries_removed) == ([], 1)
        assert [p.name for p in build.iterdir()] == ["a" * 64]
        second = await stub.PruneImages(vm_manager_pb2.PruneImagesRequest(build_cache=True))
        assert second.build_entries_removed == 1
        assert second.build_cache_freed_bytes >= 8192
        assert list(build.iterdir()) == []

    run_servicer_test(tmp_path, fake_image, body)


def test_a_vm_record_is_compare_and_set_and_outlives_the_vm_manager(
    tmp_path: Path, fake_image: Path
) -> None:
    """SetVMRecord (docs/SCALE_OUT.md): writes race on a generation; the record lives in
    the domain's metadata, so a new vm-manager's recovery reads it back."""
    settings = unit_settings(tmp_path, fake_image)
    record = bytes(range(256)) * 8
    name = ""

    async def body(stub: vm_manager_pb2_grpc.VMManagerServiceAsyncStub) -> None:
        nonlocal name
        req = vm_manager_pb2.CreateVMRequest(
            network_mode=common_pb2.NETWORK_MODE_ISOLATED, labels={"owner": "unit"}
        )
        vm = (await stub.CreateVM(req)).vm
        name = vm.name
        assert (vm.record, vm.record_generation) == (b"", 0)

        async def put(data: bytes, expected: int) -> common_pb2.VM:
            req = vm_manager_pb2.SetVMRecordRequest(
                name=name, record=data, expected_generation=expected
            )
            return (await stub.SetVMRecord(req)).vm

        first = await put(b"first", 0)
        assert (first.record, first.record_generation) == (b"first", 1)
        # A writer that read generation 0 lost the race: told so, nothing changed.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(b"stale", 0)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "generation 1, not 0" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await put(b"x" * (64 * 1024 + 1), 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 65536 bytes" in (err.value.details() or "")
        second = await put(record, 1)
        assert second.record_generation == 2
        got = (await stub.GetVM(vm_manager_pb2.GetVMRequest(name=name))).vm
        assert (got.record, got.record_generation) == (record, 2)
        # ListVMs: the generation, never the records themselves.
        listed = (
            await stub.ListVMs(vm_manager_pb2.ListVMsRequest(label_selector={"owner": "unit"}))
        ).vms
        assert [(v.record, v.record_generation) for v in listed] == [(b"", 2)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetVMRecord(vm_manager_pb2.SetVMRecordRequest(name="agent-vm-unit-none"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    async def restarted() -> None:
        conn = LibvirtConnection(settings.libvirt_uri)
        try:
            manager = unit_manager(settings, conn)
            await manager.recover()
            vm = await manager.get(name)
            assert (vm.record, vm.record_generation) == (record, 2)
            # Cleared by an empty record: the generation still counts.
            cleared = await manager.set_record(name, b"", 2)
            assert (cleared.record, cleared.record_generation) == (b"", 3)
            await manager.destroy(name)
        finally:
            conn.close()

    # The test driver forgets its domains when its last connection closes.
    keep = LibvirtConnection(settings.libvirt_uri)
    try:
        keep.call("holding the test driver open", lambda c: c.getInfo())
        run_servicer_test(tmp_path, fake_image, body, settings)
        asyncio.run(restarted())
    finally:
        keep.close()
