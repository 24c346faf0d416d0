"""Observation: resource figures of running VMs with their guests' own view
(ListVMStats), and evidence capture (CaptureEvidence); observe.py does the work.

A mixin of VMManager (manager.py), which provides what is declared at the top of
``Observation``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
from google.protobuf import json_format

from agentvm.common.config import Settings
from agentvm.common.events import EventSink
from agentvm.v1 import common_pb2, vm_manager_pb2
from agentvm.vm_manager import observe
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.network import NatNetwork
from agentvm.vm_manager.vm import VM, VMState


class Observation:
    """Report VMs' resource use; preserve a VM's state as evidence."""

    settings: Settings
    events: EventSink
    conn: LibvirtConnection
    net: NatNetwork
    _vms: dict[str, VM]
    # ListVMStats: each VM's CPU time at the previous call, and its guest's last answer.
    _cpu_seen: dict[str, tuple[float, float]]
    _guest_seen: dict[str, tuple[float, common_pb2.GuestInfo, int]]

    def _lock(self, name: str) -> asyncio.Lock:
        raise NotImplementedError

    def _get(self, name: str) -> VM:
        raise NotImplementedError

    async def agent_status(self, vm: VM, timeout: float) -> common_pb2.GuestInfo:
        raise NotImplementedError

    async def list_stats(
        self,
        selector: dict[str, str],
        guest_timeout: float,
        guest_min_cpu: float = 0.0,
        guest_max_age: float = 30.0,
    ) -> list[vm_manager_pb2.VMStats]:
        """Resource figures of running VMs (libvirt), with their guests' own view.

        A guest is asked only when its VM was busy since the previous call
        (``guest_min_cpu`` of its vCPUs) or its last answer is older than
        ``guest_max_age``; otherwise that last answer is returned.
        """
        vms = [
            vm
            for vm in self._vms.values()
            if vm.state.running and all(vm.labels.get(k) == v for k, v in selector.items())
        ]

        def collect() -> dict[str, dict[str, Any]]:
            doms = [d for d in (self.conn.find(vm.name) for vm in vms) if d is not None]
            return self.conn.call("reading VM stats", lambda c: observe.bulk_stats(c, doms))

        raw = await asyncio.to_thread(collect)
        now = time.monotonic()
        out: list[vm_manager_pb2.VMStats] = []
        busy: set[str] = set()
        for vm in vms:
            if vm.name not in raw:
                continue
            mem = vm.resources.memory_mib * 2**20
            msg = observe.stats_proto(vm.name, vm.labels, raw[vm.name], mem)
            cpu = msg.cpu_time.ToNanoseconds() / 1e9
            prev = self._cpu_seen.get(vm.name)
            self._cpu_seen[vm.name] = (now, cpu)
            if (
                prev is None
                or now <= prev[0]
                or not msg.vcpus
                or (cpu - prev[1]) / ((now - prev[0]) * msg.vcpus) >= guest_min_cpu
            ):
                busy.add(vm.name)
            out.append(msg)
        for name in set(self._cpu_seen) - set(self._vms):
            self._cpu_seen.pop(name, None)
            self._guest_seen.pop(name, None)
        if guest_timeout <= 0:
            return out

        async def ask(msg: vm_manager_pb2.VMStats) -> None:
            vm = self._vms.get(msg.name)
            if vm is None or vm.state is not VMState.READY:
                return
            seen = self._guest_seen.get(msg.name)
            if seen is not None and msg.name not in busy and now - seen[0] < guest_max_age:
                msg.guest.CopyFrom(seen[1])
                msg.guest_time.FromNanoseconds(seen[2])
                return
            try:
                info = await self.agent_status(vm, guest_timeout)
            except grpc.aio.AioRpcError:
                msg.guest_unresponsive = True
                return
            clean = observe.sanitize_guest(info, msg.memory_max_bytes)
            stamp = time.time_ns()
            self._guest_seen[msg.name] = (now, clean, stamp)
            msg.guest.CopyFrom(clean)
            msg.guest_time.FromNanoseconds(stamp)

        await asyncio.gather(*(ask(m) for m in out))
        return out

    async def capture_evidence(
        self, name: str, reason: str, include_memory: bool
    ) -> observe.Evidence:
        """Pause a VM and preserve memory, disk overlay, XML, metadata and egress log."""
        async with self._lock(name):
            vm = self._get(name)
            dom = await asyncio.to_thread(self.conn.lookup, name)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            directory = self.settings.state_dir / "evidence" / f"{name}-{stamp}"
            metadata = {
                "vm": json.loads(json_format.MessageToJson(vm.to_proto())),
                "reason": reason,
                "backing_image": vm.image_id,
                "template": vm.template_key,
            }
            evidence = await asyncio.to_thread(
                observe.capture,
                dom,
                directory=directory,
                overlay=vm.overlay,
                metadata=metadata,
                egress=self.net.egress.records(name),
                include_memory=include_memory,
            )
        self.events.emit(
            "vm.evidence_captured",
            vm=name,
            severity="warning",
            path=str(evidence.path),
            memory_bytes=evidence.memory_bytes,
            disk_bytes=evidence.disk_bytes,
            reason=reason,
        )
        return evidence
