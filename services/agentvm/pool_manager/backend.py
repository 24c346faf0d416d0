"""The production Backend of VMPool: vm-manager for VMs, guest agents for health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import grpc

from agentvm.common.errors import AgentVMError, FailedPrecondition, NotFound, RemoteError
from agentvm.common.fleet import Fleet
from agentvm.common.grpc_util import agent_channel
from agentvm.pool_manager.pool import PoolKey
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)

CREATE_TIMEOUT_S = 60.0
LEASE_TIMEOUT_S = 30.0
POOL_KEY_LABEL = "agent-vm/pool"
BOOT_TIMEOUT_S = 180.0
log = logging.getLogger("agentvm.pool_manager")
TEMPLATE_TIMEOUT_S = 600.0
# Run once in every new pool VM before it is offered: the paths of a first
# command (the agent's Execute, a fork and exec, sh, python3) are then warm.
# Under TCG a VM restored from a template is a new QEMU process whose code
# translations start empty: a sandbox's first command took twice as long as
# its second (docs/BENCHMARKS.md, "What the user feels"). On KVM it costs a
# few milliseconds, off the request path either way. Best effort.
WARM_UP = ["/bin/sh", "-c", "command -v python3 >/dev/null 2>&1 && python3 -c pass; exit 0"]
WARM_UP_TIMEOUT_S = 60.0


def _remote(exc: grpc.RpcError, what: str) -> AgentVMError:
    err = RemoteError.from_rpc(exc, what)
    if err.code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(err.message)
    if err.code == grpc.StatusCode.NOT_FOUND:
        return NotFound(err.message)
    return err


class VMManagerBackend:
    """Creates pool VMs through vm-manager and checks them through their agents.

    One gRPC channel per idle VM is kept open, so a health check at acquire is
    a single round trip to the guest, not a connection setup.
    """

    def __init__(
        self,
        vmm: vm_manager_pb2_grpc.VMManagerServiceAsyncStub,
        labels: dict[str, str],
        vm_manager_addr: str = "unix:",
        fleet: Fleet | None = None,
    ) -> None:
        self.vmm = vmm
        self.labels = dict(labels)
        # Where vm-manager is: its VMs' agents are dialled directly on this host
        # (unix:), else through it (grpc_util.agent_channel). With a fleet (``vmm``
        # is a FleetStub over it), each VM's own node.
        self.vm_manager_addr = vm_manager_addr
        self.fleet = fleet
        self._agents: dict[str, grpc.aio.Channel] = {}
        # VMs this backend made and has not been asked to destroy (also while
        # they boot): a node's reconcile leaves them alone.
        self.made: set[str] = set()
        # CreateVM calls not answered yet: their VMs may exist on a node already.
        self.creating = 0
        # VMs whose destroy failed (vm-manager away): retry_destroys tries again.
        self.undestroyed: dict[str, str] = {}

    def _vm_manager_of(self, vm: common_pb2.VM) -> str:
        if self.fleet is None:
            return self.vm_manager_addr
        self.fleet.remember(vm)
        try:
            return self.fleet.address_of(vm)
        except AgentVMError:
            return self.vm_manager_addr  # its node is down: the health check fails

    async def create(self, key: PoolKey, from_template: bool) -> common_pb2.VM:
        req = vm_manager_pb2.CreateVMRequest(
            profile=key.profile.to_proto(),
            network_mode=key.network_mode.to_proto(),
            start=True,
            # vm-manager keeps a VM with these labels the pool's alone until it is leased.
            labels={**self.labels, POOL_KEY_LABEL: str(key)},
            # A named image's template is its own (vm-manager keys it by the image).
            from_template=from_template,
            image=key.image,
        )
        self.creating += 1
        try:
            vm = (await self.vmm.CreateVM(req, timeout=CREATE_TIMEOUT_S)).vm
        except grpc.RpcError as exc:
            raise _remote(exc, "creating a pool VM") from exc
        finally:
            self.creating -= 1
        self.made.add(vm.name)
        try:
            if vm.state != common_pb2.VM_STATE_READY:
                wait = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
                wait.timeout.FromSeconds(int(BOOT_TIMEOUT_S))
                vm = (await self.vmm.WaitVM(wait, timeout=BOOT_TIMEOUT_S + 10)).vm
        except BaseException as exc:
            # Never leave a half-made VM behind, also when cancelled.
            await asyncio.shield(self.destroy(vm.name))
            if isinstance(exc, grpc.RpcError):
                raise _remote(exc, f"waiting for pool VM {vm.name}") from exc
            raise
        # The VM's health channel lives exactly as long as the VM (destroy
        # closes it): a channel left to a dead VM would keep reconnecting.
        self._agents[vm.name] = agent_channel(self._vm_manager_of(vm), vm.name, vm.agent_endpoint)
        await self._warm_up(vm)
        return vm

    async def _warm_up(self, vm: common_pb2.VM) -> None:
        """Run WARM_UP in the new VM (its answer is read and dropped: best effort)."""
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(self._agents[vm.name])
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=WARM_UP)),
            max_output_bytes=4096,
        )
        req.timeout.FromSeconds(int(WARM_UP_TIMEOUT_S))
        try:
            async for _ in stub.Execute(req, timeout=WARM_UP_TIMEOUT_S + 10):
                pass
        except grpc.RpcError as exc:
            # An image without /bin/sh, a VM that died (the health check at
            # acquire replaces it): the VM is offered all the same.
            log.info("warm-up of pool VM %s failed: %s", vm.name, exc.details())

    async def mark_leased(
        self, name: str, lessee: str, lease_id: str, labels: Mapping[str, str] | None = None
    ) -> common_pb2.VM:
        """Tell vm-manager that ``name`` now belongs to ``lessee``: until then it refuses
        everyone but pool-manager. The VM carries the lessee's ``labels`` from then on,
        but for the keys that are the pool's (agent-vm/owner, agent-vm/pool...): its
        owner stays the pool. Returns the VM as the lessee will see it."""
        req = vm_manager_pb2.LeasePoolVMRequest(
            name=name,
            lessee=lessee,
            lease_id=lease_id,
            labels={
                k: v
                for k, v in (labels or {}).items()
                if k != "agent-vm/owner" and not k.startswith("agent-vm/pool")
            },
        )
        try:
            return (await self.vmm.LeasePoolVM(req, timeout=LEASE_TIMEOUT_S)).vm
        except grpc.RpcError as exc:
            raise _remote(exc, f"handing pool VM {name} to {lessee}") from exc

    async def destroy(self, name: str, reason: str = "") -> None:
        self.made.discard(name)
        channel = self._agents.pop(name, None)
        if channel is not None:
            await channel.close(grace=None)
        try:
            await self.vmm.DestroyVM(
                vm_manager_pb2.DestroyVMRequest(name=name, reason=reason), timeout=60
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                # vm-manager is away (restarting, or its node is): retry_destroys
                # tries again, and a node's reconcile once it is back.
                self.undestroyed[name] = reason
                raise _remote(exc, f"destroying {name}") from exc
        self.undestroyed.pop(name, None)

    async def retry_destroys(self) -> None:
        """Destroy again the VMs a failed destroy left (e.g. a half-made pool VM whose
        clean-up met a vm-manager restart: found by the soak)."""
        for name, reason in list(self.undestroyed.items()):
            try:
                await self.destroy(name, reason)
            except AgentVMError as exc:
                log.info("destroying %s again failed: %s", name, exc)
            else:
                log.info("destroyed %s, left by a destroy that failed before", name)

    async def healthy(self, vm: common_pb2.VM, timeout: float) -> bool:
        channel = self._agents.get(vm.name)
        if channel is None:
            return False  # destroyed meanwhile, or never made by this backend
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
        try:
            await stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        except asyncio.CancelledError:
            # Closing a channel (destroy) cancels its calls: that is a failed
            # check, unless this task itself is being cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False
        return True

    async def prepare_template(self, key: PoolKey) -> None:
        req = vm_manager_pb2.PrepareTemplateRequest(
            profile=key.profile.to_proto(),
            network_mode=key.network_mode.to_proto(),
            image=key.image,
        )
        try:
            await self.vmm.PrepareTemplate(req, timeout=TEMPLATE_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _remote(exc, f"preparing the template of {key}") from exc

    async def list_vms(self, labels: dict[str, str]) -> list[common_pb2.VM]:
        try:
            resp = await self.vmm.ListVMs(
                vm_manager_pb2.ListVMsRequest(label_selector=labels), timeout=30
            )
        except grpc.RpcError as exc:
            raise _remote(exc, "listing pool VMs") from exc
        return list(resp.vms)

    async def close(self) -> None:
        for channel in self._agents.values():
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        self._agents.clear()
