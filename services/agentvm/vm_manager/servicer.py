"""VMManagerService: the gRPC face of VMManager and ImageStore."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from agentvm.common import fields, identity
from agentvm.common.errors import InvalidArgument
from agentvm.common.grpc_util import grpc_errors, grpc_stream_errors, remaining_time
from agentvm.common.placement import Amount
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2, vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager import access, build_cache
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.clones import TemplateInfo
from agentvm.vm_manager.dnsproxy import EgressRecord
from agentvm.vm_manager.image import ImageStore, Manifest
from agentvm.vm_manager.manager import DEFAULT_GRACE_S, DEFAULT_WAIT_S, VMManager
from agentvm.vm_manager.network import Policy
from agentvm.vm_manager.servicer_images import ImageRPCs, image_to_proto
from agentvm.vm_manager.snapshots import SnapshotInfo
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VMState

Ctx = grpc.aio.ServicerContext[Any, Any]


def snapshot_to_proto(info: SnapshotInfo) -> vm_manager_pb2.Snapshot:
    msg = vm_manager_pb2.Snapshot(
        name=info.name,
        vm_name=info.vm_name,
        parent=info.parent,
        includes_memory=info.includes_memory,
        size_bytes=info.size_bytes,
        description=info.description,
    )
    msg.created_at.FromSeconds(int(info.created_at))
    return msg


def template_to_proto(info: TemplateInfo) -> vm_manager_pb2.Template:
    msg = vm_manager_pb2.Template(
        key=info.key,
        profile=ResourceProfile[info.profile].to_proto(),
        resources=common_pb2.Resources(
            vcpus=info.vcpus, memory_mib=info.memory_mib, disk_mib=info.disk_mib
        ),
        image_id=info.image_id,
        memory_state_bytes=info.memory_state_bytes,
        disk_bytes=info.disk_bytes,
        qemu_version=info.qemu_version,
        network_mode=NetworkMode[info.network_mode].to_proto(),
        workload_image_id=info.workload_image_id,
    )
    msg.created_at.FromNanoseconds(int(info.created_at * 1e9))
    msg.build_duration.FromNanoseconds(int(info.build_s * 1e9))
    return msg


_KINDS = {"dns": common_pb2.EGRESS_KIND_DNS, "connect": common_pb2.EGRESS_KIND_CONNECT}
_VERDICTS = {
    "allowed": common_pb2.EGRESS_VERDICT_ALLOWED,
    "denied": common_pb2.EGRESS_VERDICT_DENIED,
}


def egress_to_proto(rec: EgressRecord) -> common_pb2.EgressRecord:
    msg = common_pb2.EgressRecord(
        vm_name=rec.vm,
        kind=_KINDS.get(rec.kind, common_pb2.EGRESS_KIND_UNSPECIFIED),
        name=rec.name,
        address=rec.address,
        port=rec.port,
        protocol=rec.protocol,
        verdict=_VERDICTS.get(rec.verdict, common_pb2.EGRESS_VERDICT_UNSPECIFIED),
        reason=rec.detail,
    )
    msg.time.FromNanoseconds(int(rec.time * 1e9))
    return msg


def qemu_version() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return ""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else ""


def seconds(request: Message, field: str, default: float, low: float, high: float) -> float:
    """A Duration field in seconds: ``default`` when unset, INVALID_ARGUMENT outside [low, high]."""
    if not request.HasField(field):
        return default
    value: float = getattr(request, field).ToNanoseconds() / 1e9
    if not low <= value <= high:
        raise InvalidArgument(
            f"{field} must be between {low:g} and {high:g} seconds, got {value:g}"
        )
    return value


class VMManagerServicer(ImageRPCs, vm_manager_pb2_grpc.VMManagerServiceServicer):
    """Maps RPCs to VMManager; every error becomes a status code with advice.
    The image RPCs are in servicer_images.py."""

    def __init__(self, manager: VMManager, images: ImageStore) -> None:
        self.manager = manager
        self.images = images
        self.build_cache_use = build_cache.CacheUse()

    async def _require_usable(self, name: str, context: Ctx, what: str) -> str:
        """The caller's name; FAILED_PRECONDITION when the VM is a warm pool VM it
        may not ``what`` (access.py)."""
        who = identity.caller(context)
        access.require_usable(await self.manager.get(name), who, what)
        return who

    @grpc_errors
    async def LeasePoolVM(
        self, request: vm_manager_pb2.LeasePoolVMRequest, context: Ctx
    ) -> vm_manager_pb2.LeasePoolVMResponse:
        who = identity.caller(context)
        lessee = request.lessee[: identity.MAX_NAME] or "unnamed"
        labels = dict(request.labels)
        access.check_lease(await self.manager.get(request.name), who, lessee, labels)
        vm = await self.manager.lease_pool_vm(request.name, lessee, request.lease_id[:64], labels)
        return vm_manager_pb2.LeasePoolVMResponse(vm=access.view(vm, who))

    @grpc_errors
    async def SetVMRecord(
        self, request: vm_manager_pb2.SetVMRecordRequest, context: Ctx
    ) -> vm_manager_pb2.SetVMRecordResponse:
        who = identity.caller(context)
        access.require_usable(await self.manager.get(request.name), who, "set its record")
        vm = await self.manager.set_record(
            request.name, request.record, request.expected_generation
        )
        msg = access.view(vm, who)
        msg.record = vm.record
        return vm_manager_pb2.SetVMRecordResponse(vm=msg)

    @grpc_errors
    async def CreateVM(
        self, request: vm_manager_pb2.CreateVMRequest, context: Ctx
    ) -> vm_manager_pb2.CreateVMResponse:
        profile = ResourceProfile.from_proto(request.profile)
        mode = NetworkMode.from_proto(request.network_mode)
        if mode is not NetworkMode.BRIDGE and request.bridge:
            raise InvalidArgument("bridge is only valid with NETWORK_MODE_BRIDGE")
        policy = None
        if mode is NetworkMode.NAT_FILTERED:
            policy = Policy.from_proto(request.network_policy, self.manager.settings)
        elif any(
            (
                request.network_policy.allow_domains,
                request.network_policy.allow_cidrs,
                request.network_policy.ports,
            )
        ):
            raise InvalidArgument(
                f"network_policy is only valid with NETWORK_MODE_NAT_FILTERED, not {mode.name}"
            )
        who = identity.caller(context)
        access.check_create(request.labels, who)
        res = request.resources
        resources = Resources.for_profile(profile, res.vcpus, res.memory_mib, res.disk_mib)
        vm = await self.manager.create(
            policy=policy,
            bridge=request.bridge,
            profile=profile,
            network_mode=mode,
            resources=resources,
            labels=dict(request.labels),
            start=request.start,
            shared_workspace=request.shared_workspace,
            from_template=request.from_template,
            workload_image=request.image,
        )
        return vm_manager_pb2.CreateVMResponse(vm=access.view(vm, who))

    @grpc_errors
    async def PrepareTemplate(
        self, request: vm_manager_pb2.PrepareTemplateRequest, context: Ctx
    ) -> vm_manager_pb2.PrepareTemplateResponse:
        profile = ResourceProfile.from_proto(request.profile)
        res = request.resources
        resources = Resources.for_profile(profile, res.vcpus, res.memory_mib, res.disk_mib)
        network = (
            NetworkMode.ISOLATED
            if request.network_mode == common_pb2.NETWORK_MODE_UNSPECIFIED
            else NetworkMode.from_proto(request.network_mode)
        )
        info, built = await self.manager.prepare_template(
            profile, resources, request.force, network, request.image
        )
        return vm_manager_pb2.PrepareTemplateResponse(template=template_to_proto(info), built=built)

    @grpc_errors
    async def UpdateNetworkPolicy(
        self, request: vm_manager_pb2.UpdateNetworkPolicyRequest, context: Ctx
    ) -> vm_manager_pb2.UpdateNetworkPolicyResponse:
        who = await self._require_usable(request.name, context, "change its network policy")
        policy = Policy.from_proto(request.policy, self.manager.settings)
        vm = await self.manager.update_network_policy(request.name, policy)
        return vm_manager_pb2.UpdateNetworkPolicyResponse(vm=access.view(vm, who))

    @grpc_stream_errors
    async def WatchEgress(
        self, request: vm_manager_pb2.WatchEgressRequest, context: Ctx
    ) -> AsyncIterator[vm_manager_pb2.WatchEgressResponse]:
        if request.name:
            await self.manager.get(request.name)
        since = fields.timestamp_seconds(request, "since") or 0.0
        async for rec in self.manager.net.watch(request.name, request.follow, since):
            yield vm_manager_pb2.WatchEgressResponse(record=egress_to_proto(rec))

    @grpc_errors
    async def ListTemplates(
        self, request: vm_manager_pb2.ListTemplatesRequest, context: Ctx
    ) -> vm_manager_pb2.ListTemplatesResponse:
        infos = await asyncio.to_thread(self.manager.list_templates)
        return vm_manager_pb2.ListTemplatesResponse(templates=[template_to_proto(i) for i in infos])

    @grpc_errors
    async def DeleteTemplate(
        self, request: vm_manager_pb2.DeleteTemplateRequest, context: Ctx
    ) -> vm_manager_pb2.DeleteTemplateResponse:
        await self.manager.delete_template(request.key)
        return vm_manager_pb2.DeleteTemplateResponse()

    @grpc_errors
    async def StartVM(
        self, request: vm_manager_pb2.StartVMRequest, context: Ctx
    ) -> vm_manager_pb2.StartVMResponse:
        who = await self._require_usable(request.name, context, "start it")
        vm = await self.manager.start(request.name)
        return vm_manager_pb2.StartVMResponse(vm=access.view(vm, who))

    @grpc_errors
    async def StopVM(
        self, request: vm_manager_pb2.StopVMRequest, context: Ctx
    ) -> vm_manager_pb2.StopVMResponse:
        grace = seconds(request, "grace_period", DEFAULT_GRACE_S, 0, 600)
        who = await self._require_usable(request.name, context, "stop it")
        vm, forced = await self.manager.stop(request.name, grace, request.force)
        return vm_manager_pb2.StopVMResponse(vm=access.view(vm, who), forced=forced)

    @grpc_errors
    async def SuspendVM(
        self, request: vm_manager_pb2.SuspendVMRequest, context: Ctx
    ) -> vm_manager_pb2.SuspendVMResponse:
        who = await self._require_usable(request.name, context, "suspend it")
        vm = await self.manager.suspend(request.name)
        return vm_manager_pb2.SuspendVMResponse(vm=access.view(vm, who))

    @grpc_errors
    async def ResumeVM(
        self, request: vm_manager_pb2.ResumeVMRequest, context: Ctx
    ) -> vm_manager_pb2.ResumeVMResponse:
        who = await self._require_usable(request.name, context, "resume it")
        vm = await self.manager.resume(request.name)
        return vm_manager_pb2.ResumeVMResponse(vm=access.view(vm, who))

    @grpc_errors
    async def DestroyVM(
        self, request: vm_manager_pb2.DestroyVMRequest, context: Ctx
    ) -> vm_manager_pb2.DestroyVMResponse:
        await self.manager.destroy(request.name, reason=request.reason[:500])
        return vm_manager_pb2.DestroyVMResponse()

    @grpc_errors
    async def ListVMStats(
        self, request: vm_manager_pb2.ListVMStatsRequest, context: Ctx
    ) -> vm_manager_pb2.ListVMStatsResponse:
        guest = request.guest_timeout.ToNanoseconds() / 1e9
        if guest < 0 or guest > 30:
            raise InvalidArgument(f"guest_timeout must be between 0 and 30 s, got {guest:g} s")
        # Leave room for the reply inside the caller's deadline.
        guest = min(guest, max(0.0, remaining_time(context, guest + 1) - 0.5)) if guest else 0.0
        if not 0.0 <= request.guest_min_cpu <= 1.0:
            raise InvalidArgument(
                f"guest_min_cpu must be a fraction between 0 and 1, got {request.guest_min_cpu:g}"
            )
        max_age = request.guest_max_age.ToNanoseconds() / 1e9 or 30.0
        if max_age < 0:
            raise InvalidArgument(f"guest_max_age must not be negative, got {max_age:g} s")
        stats = await self.manager.list_stats(
            dict(request.label_selector), guest, request.guest_min_cpu, max_age
        )
        return vm_manager_pb2.ListVMStatsResponse(stats=stats)

    @grpc_errors
    async def CaptureEvidence(
        self, request: vm_manager_pb2.CaptureEvidenceRequest, context: Ctx
    ) -> vm_manager_pb2.CaptureEvidenceResponse:
        evidence = await self.manager.capture_evidence(
            request.name, request.reason[:500], request.include_memory
        )
        return vm_manager_pb2.CaptureEvidenceResponse(
            path=str(evidence.path),
            memory_bytes=evidence.memory_bytes,
            disk_bytes=evidence.disk_bytes,
        )

    @grpc_errors
    async def GetVM(
        self, request: vm_manager_pb2.GetVMRequest, context: Ctx
    ) -> vm_manager_pb2.GetVMResponse:
        vm = await self.manager.get(request.name)
        msg = access.view(vm, identity.caller(context))
        msg.record = vm.record
        return vm_manager_pb2.GetVMResponse(vm=msg)

    @grpc_errors
    async def ListVMs(
        self, request: vm_manager_pb2.ListVMsRequest, context: Ctx
    ) -> vm_manager_pb2.ListVMsResponse:
        vms = await self.manager.list_vms(dict(request.label_selector))
        who = identity.caller(context)
        return vm_manager_pb2.ListVMsResponse(vms=[access.view(v, who) for v in vms])

    @grpc_errors
    async def WaitVM(
        self, request: vm_manager_pb2.WaitVMRequest, context: Ctx
    ) -> vm_manager_pb2.WaitVMResponse:
        if request.state == common_pb2.VM_STATE_UNSPECIFIED:
            raise InvalidArgument("state is required (e.g. VM_STATE_READY)")
        try:
            state = VMState.from_proto(request.state)
        except ValueError:
            raise InvalidArgument(f"unknown VM state {request.state}") from None
        timeout = seconds(request, "timeout", DEFAULT_WAIT_S, 0.001, 3600)
        timeout = remaining_time(context, timeout)
        vm = await self.manager.wait(request.name, state, timeout)
        return vm_manager_pb2.WaitVMResponse(vm=access.view(vm, identity.caller(context)))

    @grpc_errors
    async def CreateSnapshot(
        self, request: vm_manager_pb2.CreateSnapshotRequest, context: Ctx
    ) -> vm_manager_pb2.CreateSnapshotResponse:
        await self._require_usable(request.vm_name, context, "snapshot it")
        info = await self.manager.create_snapshot(
            request.vm_name, request.snapshot_name, request.include_memory, request.description
        )
        return vm_manager_pb2.CreateSnapshotResponse(snapshot=snapshot_to_proto(info))

    @grpc_errors
    async def ListSnapshots(
        self, request: vm_manager_pb2.ListSnapshotsRequest, context: Ctx
    ) -> vm_manager_pb2.ListSnapshotsResponse:
        infos = await self.manager.list_snapshots(request.vm_name)
        return vm_manager_pb2.ListSnapshotsResponse(snapshots=[snapshot_to_proto(i) for i in infos])

    @grpc_errors
    async def RestoreSnapshot(
        self, request: vm_manager_pb2.RestoreSnapshotRequest, context: Ctx
    ) -> vm_manager_pb2.RestoreSnapshotResponse:
        who = await self._require_usable(request.vm_name, context, "restore a snapshot into it")
        vm = await self.manager.restore_snapshot(request.vm_name, request.snapshot_name)
        return vm_manager_pb2.RestoreSnapshotResponse(vm=access.view(vm, who))

    @grpc_errors
    async def DeleteSnapshot(
        self, request: vm_manager_pb2.DeleteSnapshotRequest, context: Ctx
    ) -> vm_manager_pb2.DeleteSnapshotResponse:
        await self._require_usable(request.vm_name, context, "delete its snapshots")
        await self.manager.delete_snapshot(request.vm_name, request.snapshot_name)
        return vm_manager_pb2.DeleteSnapshotResponse()

    @grpc_stream_errors
    async def BuildImage(
        self, request: vm_manager_pb2.BuildImageRequest, context: Ctx
    ) -> AsyncIterator[vm_manager_pb2.BuildImageResponse]:
        if request.HasField("spec"):
            async for event in self.build_named(request):
                yield event
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def log(line: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, line)

        def build() -> Manifest:
            try:
                return self.images.build(force=request.force, log=log)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        task = asyncio.ensure_future(asyncio.to_thread(build))
        while (line := await queue.get()) is not None:
            yield vm_manager_pb2.BuildImageResponse(log_line=line)
        manifest = await task
        path = str(self.images.paths(manifest.id).root)
        yield vm_manager_pb2.BuildImageResponse(image=image_to_proto(manifest, path))

    @grpc_errors
    async def GetNode(
        self, request: vm_manager_pb2.GetNodeRequest, context: Ctx
    ) -> vm_manager_pb2.GetNodeResponse:
        m = self.manager
        (used, count), cfg = m.committed(), m.node.config

        def res(a: Amount) -> common_pb2.Resources:
            return common_pb2.Resources(
                vcpus=int(a.vcpus), memory_mib=int(a.memory_mib), disk_mib=int(a.disk_mib)
            )

        return vm_manager_pb2.GetNodeResponse(
            node=vm_manager_pb2.Node(
                id=cfg.id,
                labels=cfg.labels,
                accelerator=common_pb2.ACCELERATOR_KVM
                if m.accel.accel is Accel.KVM
                else common_pb2.ACCELERATOR_TCG,
                allocatable=res(m.node.allocatable),
                committed=res(used),
                cpu_overcommit=cfg.cpu_overcommit,
                memory_overcommit=cfg.memory_overcommit,
                disk_overcommit=cfg.disk_overcommit,
                vm_count=count,
                template_keys=[t.key for t in m.list_templates()],
                recovering=not m.recovered,
            )
        )

    @grpc_errors
    async def GetHostInfo(
        self, request: vm_manager_pb2.GetHostInfoRequest, context: Ctx
    ) -> vm_manager_pb2.GetHostInfoResponse:
        libvirt_version, _hv = await asyncio.to_thread(self.manager.conn.versions)
        accel = self.manager.accel
        return vm_manager_pb2.GetHostInfoResponse(
            libvirt_uri=self.manager.conn.uri,
            libvirt_version=libvirt_version,
            qemu_version=await asyncio.to_thread(qemu_version),
            accelerator=common_pb2.ACCELERATOR_KVM
            if accel.accel is Accel.KVM
            else common_pb2.ACCELERATOR_TCG,
            accelerator_reason=accel.reason,
            agent_transport=common_pb2.AGENT_TRANSPORT_VIRTIO_SERIAL,
            shared_workspace_supported=self.manager.virtiofsd is not None,
        )
