"""PoolManagerService: the gRPC face of PoolManager."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
from google.protobuf import duration_pb2

from agentvm.common import identity
from agentvm.common.errors import AgentVMError, InvalidArgument
from agentvm.common.grpc_util import grpc_errors, remaining_time
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.pool_manager.manager import PoolManager
from agentvm.pool_manager.pool import Lease, PoolKey, VMPool, check_image
from agentvm.v1 import pool_manager_pb2, pool_manager_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]
DEFAULT_ACQUIRE_S = 30.0
MAX_ACQUIRE_S = 600.0


def key_from_proto(msg: pool_manager_pb2.PoolKey) -> PoolKey:
    return PoolKey(
        ResourceProfile.from_proto(msg.profile),
        NetworkMode.from_proto(msg.network_mode),
        check_image(msg.image, "key.image"),
    )


def key_to_proto(key: PoolKey) -> pool_manager_pb2.PoolKey:
    return pool_manager_pb2.PoolKey(
        profile=key.profile.to_proto(), network_mode=key.network_mode.to_proto(), image=key.image
    )


def ttl_seconds(ttl: duration_pb2.Duration) -> float:
    """A TTL Duration in seconds; InvalidArgument naming ``ttl`` when it is malformed."""
    if ttl.seconds < 0 or ttl.nanos < 0 or ttl.nanos >= 10**9:
        raise InvalidArgument(f"ttl={ttl.seconds}s{ttl.nanos}ns is not a valid duration")
    return float(ttl.seconds) + ttl.nanos / 1e9


def lease_to_proto(lease: Lease) -> pool_manager_pb2.Lease:
    msg = pool_manager_pb2.Lease(
        lease_id=lease.lease_id,
        key=key_to_proto(lease.key),
        vm_name=lease.vm.name,
        labels=lease.labels,
    )
    msg.acquired_at.FromNanoseconds(int(lease.acquired_at * 1e9))
    return msg


def status_to_proto(pool: VMPool) -> pool_manager_pb2.PoolStatus:
    c = pool.counters
    msg = pool_manager_pb2.PoolStatus(
        key=key_to_proto(pool.key),
        min_size=pool.config.min_size,
        max_size=pool.config.max_size,
        ready=pool.idle,
        in_use=pool.leased,
        warming=pool.warming,
        template_ready=pool.template_ready,
        template_building=pool.template_building,
        acquired_total=c.acquired,
        created_total=c.created,
        replaced_unhealthy=c.replaced_unhealthy,
        evicted_ttl=c.evicted_ttl,
        on_demand_total=c.on_demand,
    )
    msg.ttl.FromNanoseconds(int(pool.config.ttl_s * 1e9))
    return msg


class PoolManagerServicer(pool_manager_pb2_grpc.PoolManagerServiceServicer):
    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager

    @grpc_errors
    async def AcquireVM(
        self, request: pool_manager_pb2.AcquireVMRequest, context: Ctx
    ) -> pool_manager_pb2.AcquireVMResponse:
        pool = self.manager.pool(key_from_proto(request.key))
        timeout = DEFAULT_ACQUIRE_S
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if not 0 < timeout <= MAX_ACQUIRE_S:
                raise InvalidArgument(
                    f"timeout must be between 0 and {MAX_ACQUIRE_S:g} seconds, got {timeout:g}"
                )
        timeout = remaining_time(context, timeout)
        start = time.monotonic()
        lessee = identity.caller(context) or "unnamed"
        lease = await pool.acquire(timeout, dict(request.labels))
        try:
            # vm-manager keeps a warm pool VM from everyone but pool-manager until now.
            lease.vm = await self.manager.backend.mark_leased(
                lease.vm.name, lessee, lease.lease_id, request.labels
            )
        except BaseException:
            # Never hand out a VM its lessee could not use; the release destroys it.
            with contextlib.suppress(AgentVMError):
                await asyncio.shield(pool.release(lease.lease_id))
            raise
        self.manager.events.emit(
            "pool.acquired",
            vm=lease.vm.name,
            pool=str(pool.key),
            lease_id=lease.lease_id,
            wait_s=round(time.monotonic() - start, 6),
            warm=lease.from_pool,
            labels=dict(request.labels),
        )
        return pool_manager_pb2.AcquireVMResponse(
            lease_id=lease.lease_id, vm=lease.vm, from_pool=lease.from_pool
        )

    @grpc_errors
    async def ReleaseVM(
        self, request: pool_manager_pb2.ReleaseVMRequest, context: Ctx
    ) -> pool_manager_pb2.ReleaseVMResponse:
        if not request.lease_id:
            raise InvalidArgument("lease_id is empty: pass the lease_id AcquireVM returned")
        pool, lease = self.manager.find_lease(request.lease_id)
        await pool.release(lease.lease_id)
        self.manager.events.emit(
            "pool.released", vm=lease.vm.name, pool=str(pool.key), lease_id=lease.lease_id
        )
        return pool_manager_pb2.ReleaseVMResponse()

    @grpc_errors
    async def GetPoolStatus(
        self, request: pool_manager_pb2.GetPoolStatusRequest, context: Ctx
    ) -> pool_manager_pb2.GetPoolStatusResponse:
        return pool_manager_pb2.GetPoolStatusResponse(
            pools=[status_to_proto(p) for p in self.manager.pools.values()]
        )

    @grpc_errors
    async def ListLeases(
        self, request: pool_manager_pb2.ListLeasesRequest, context: Ctx
    ) -> pool_manager_pb2.ListLeasesResponse:
        leases = self.manager.leases(dict(request.label_selector))
        return pool_manager_pb2.ListLeasesResponse(leases=[lease_to_proto(x) for x in leases])

    @grpc_errors
    async def SetPoolConfig(
        self, request: pool_manager_pb2.SetPoolConfigRequest, context: Ctx
    ) -> pool_manager_pb2.SetPoolConfigResponse:
        if not request.HasField("key"):
            raise InvalidArgument("key is missing: name the pool, e.g. standard/isolated")
        ttl_s = None
        if request.HasField("ttl"):
            ttl_s = ttl_seconds(request.ttl)
        pool = self.manager.set_config(
            key_from_proto(request.key),
            min_size=request.min_size if request.HasField("min_size") else None,
            max_size=request.max_size if request.HasField("max_size") else None,
            ttl_s=ttl_s,
        )
        c = pool.config
        self.manager.events.emit(
            "pool.configured",
            pool=str(pool.key),
            min_size=c.min_size,
            max_size=c.max_size,
            ttl_s=c.ttl_s,
            by=identity.caller(context) or "unnamed",
        )
        return pool_manager_pb2.SetPoolConfigResponse(pool=status_to_proto(pool))
