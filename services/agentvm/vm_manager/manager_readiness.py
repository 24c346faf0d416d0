"""Readiness: waiting for a VM's agent to answer (WaitVM), configuring the guest's
network and root on the way, and the vm.ready event.

A mixin of VMManager (manager.py), which provides what is declared at the top of
``Readiness``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

import grpc
import libvirt

from agentvm.common.errors import DeadlineExceeded, FailedPrecondition
from agentvm.common.events import EventSink
from agentvm.common.grpc_util import guest_channel
from agentvm.common.profiles import NetworkMode
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager import image_vms, observe
from agentvm.vm_manager.image_store import ImageStore as NamedImageStore
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.network import NatNetwork
from agentvm.vm_manager.vm import VM, VMState
from agentvm_guest.mux import PORT_NAME

log = logging.getLogger("agentvm.vm_manager")

DEFAULT_WAIT_S = 120.0
POLL_S = 0.05


class Readiness:
    """Tell when a VM is READY: its agent answers, its guest is configured."""

    events: EventSink
    conn: LibvirtConnection
    net: NatNetwork
    image_store: NamedImageStore

    def _get(self, name: str) -> VM:
        raise NotImplementedError

    async def _refresh(self, vm: VM) -> None:
        raise NotImplementedError

    async def wait(self, name: str, state: VMState, timeout: float) -> VM:
        """Wait until ``name`` is in ``state``; READY means the agent answered."""
        vm = self._get(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self._refresh(vm)
            if state is VMState.READY and vm.state is VMState.BOOTING:
                await self._probe_agent(vm, deadline)
            if vm.state is state:
                return vm
            if state is VMState.READY and vm.state is not VMState.BOOTING:
                raise FailedPrecondition(
                    f"VM {name} is {vm.state.name} and will not become READY"
                    + (f": {vm.error}" if vm.error else "; start it first")
                )
            if vm.state is VMState.DESTROYED:
                raise FailedPrecondition(f"VM {name} was destroyed")
            if loop.time() >= deadline:
                raise DeadlineExceeded(
                    f"VM {name} did not become {state.name} within {timeout:.0f} s "
                    f"(it is {vm.state.name}; console log: {vm.console_log})"
                )
            await asyncio.sleep(POLL_S)

    async def _probe_agent(self, vm: VM, deadline: float) -> None:
        """One readiness attempt: the guest opened its port and the agent answers."""
        loop = asyncio.get_running_loop()
        dom = await asyncio.to_thread(self.conn.find, vm.name)
        if dom is None:
            return
        try:
            xml = await asyncio.to_thread(dom.XMLDesc, 0)
        except libvirt.libvirtError as exc:
            # libvirtd restarting (the soak's libvirtd-restart fault): not an answer
            # about the VM; the next attempt looks again on a new connection.
            log.info("cannot read the XML of VM %s: %s", vm.name, exc.get_error_message())
            return
        _path, cstate = dx.channel_state(xml, PORT_NAME)
        if cstate != "connected":
            return
        budget = max(0.1, min(5.0, deadline - loop.time()))
        try:
            info = await self.agent_status(vm, budget)
        except grpc.aio.AioRpcError as exc:
            log.debug("agent of %s not ready: %s", vm.name, exc.details())
            return
        if vm.state is VMState.BOOTING and vm.network is not None:
            try:
                await self._configure_network(vm, budget)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
                vm.transition(VMState.FAILED)
                vm.error = f"the guest could not configure its network: {exc.details()}"
                return
        if vm.state is VMState.BOOTING and vm.workload_image_id:
            try:
                await self._configure_root(vm, budget)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return
                vm.transition(VMState.FAILED)
                vm.error = f"the guest could not mount image {vm.workload_image_id[:12]}: " + (
                    exc.details() or exc.code().name
                )
                return
        if vm.state is VMState.BOOTING:
            vm.guest = observe.sanitize_guest(info, vm.resources.memory_mib * 2**20)
            if vm.boot_started is not None and vm.boot_duration is None:
                vm.boot_duration = time.monotonic() - vm.boot_started
            vm.transition(VMState.READY)
            self._emit_ready(vm)
            log.info(
                "VM %s ready",
                vm.name,
                extra={"vm": vm.name, "boot_s": round(vm.boot_duration or 0.0, 3)},
            )

    async def _configure_root(self, vm: VM, timeout: float) -> None:
        stored = await asyncio.to_thread(self.image_store.get, vm.workload_image_id)
        await image_vms.configure_root(
            vm.agent_endpoint, stored.manifest.config.to_proto(), timeout
        )

    def _emit_ready(self, vm: VM) -> None:
        """vm.ready: the monitor observes boot_s in agentvm_vm_boot_duration_seconds
        by kind; an adopted VM's boot was not timed, so it carries none."""
        timed: dict[str, Any] = {}
        if vm.boot_duration is not None:
            timed["boot_s"] = round(vm.boot_duration, 6)
        self.events.emit(
            "vm.ready",
            vm=vm.name,
            kind=vm.boot_kind,
            restored=vm.boot_kind == "restore",
            labels=dict(vm.labels),
            **timed,
        )

    async def _configure_network(self, vm: VM, timeout: float) -> None:
        """Tell the guest its MAC, and its address, gateway and resolver (NAT: no DHCP
        there) or to take them by DHCP (BRIDGE: the user's network)."""
        bridged = vm.network_mode is NetworkMode.BRIDGE and vm.network is not None
        att = self.net.attachment(vm.name)
        if bridged and vm.network is not None:
            request = guest_agent_pb2.ConfigureNetworkRequest(mac=vm.network.mac, dhcp=True)
        elif att is not None:
            request = guest_agent_pb2.ConfigureNetworkRequest(
                mac=att.mac,
                address=f"{att.ip}/{att.prefixlen}",
                gateway=att.gateway,
                nameservers=[att.gateway],
            )
        else:
            return
        async with guest_channel(vm.agent_endpoint) as channel:
            stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
            resp = await stub.ConfigureNetwork(request, timeout=min(timeout, 30.0))
        if bridged and vm.network is not None:
            # What the guest says it got: shown, never trusted for anything.
            try:
                vm.network.address = str(ipaddress.IPv4Interface(resp.address))
            except ValueError:
                vm.network.address = ""

    async def agent_status(self, vm: VM, timeout: float) -> common_pb2.GuestInfo:
        async with guest_channel(vm.agent_endpoint) as channel:
            stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
            resp = await stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=timeout)
            return resp.info
