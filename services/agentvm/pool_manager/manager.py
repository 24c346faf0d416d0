"""PoolManager: the pools of one pool-manager process, its lease journal and recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time

import grpc

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError, InvalidArgument, NotFound
from agentvm.common.events import EventSink, NullSink
from agentvm.common.fleet import NodeLink
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.pool_manager.backend import CREATE_TIMEOUT_S, VMManagerBackend
from agentvm.pool_manager.journal import LeaseJournal
from agentvm.pool_manager.pool import (
    Lease,
    PoolConfig,
    PoolKey,
    VMPool,
    check_config,
    check_image,
)
from agentvm.v1 import vm_manager_pb2

log = logging.getLogger("agentvm.pool_manager")

OWNER_LABEL = "agent-vm/owner"
POOL_LABEL = "agent-vm/pool-manager"


# AGENTVM_POOLS' network= values: the CLI's spelling of the modes a pool can hold
# (a bridged VM's network is the caller's; no template, so no pool).
NETWORKS = {"nat-filtered": NetworkMode.NAT_FILTERED, "isolated": NetworkMode.ISOLATED}
# Spellings of earlier releases, still accepted (with a warning in the log).
OLD_NETWORKS = {"nat": "nat-filtered"}
# A reconcile that kept a young VM runs again this long after (a create's timeout and more).
RECONCILE_AGAIN_S = CREATE_TIMEOUT_S + 5.0
# How often destroys that failed (vm-manager away) are tried again.
RETRY_DESTROY_S = 5.0


def parse_pools(spec: str) -> dict[PoolKey, PoolConfig]:
    """``"standard:min=2,max=10,ttl=900,network=nat-filtered;standard:min=1"`` -> configs.

    ``network`` is ``nat-filtered`` (the executor sets each sandbox's policy
    when it takes a VM) or ``isolated`` (the default); one profile may have a
    pool per network. The old ``nat`` is read as ``nat-filtered`` with a warning.
    An ``IMAGE/`` prefix (``coder/standard:min=1``, ``coder:2/light:...``) pools
    VMs of a named image (booted cold: no memory template); none, or
    ``default/``, the built-in image.
    """
    pools: dict[PoolKey, PoolConfig] = {}
    for entry in filter(None, (p.strip() for p in spec.split(";"))):
        image, part = "", entry
        if "/" in entry:
            # The image comes first and may hold a ":tag": split at the "/" before
            # looking for the ":" of the options.
            image, _, part = entry.partition("/")
            if not image.strip():
                raise InvalidArgument(
                    f"AGENTVM_POOLS: {entry!r} has no image before '/': write "
                    "IMAGE/PROFILE:... or leave the prefix out for the built-in image"
                )
            image = check_image(image, "AGENTVM_POOLS")
        name, _, opts = part.partition(":")
        try:
            profile = ResourceProfile[name.strip().upper()]
        except KeyError:
            raise InvalidArgument(
                f"AGENTVM_POOLS: unknown profile {name!r}; use light, standard or intensive"
            ) from None
        values = {"min": 1.0, "max": 4.0, "ttl": 900.0}
        network = NetworkMode.ISOLATED
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            k, _, v = opt.partition("=")
            if k == "network":
                if v in OLD_NETWORKS:
                    log.warning(
                        "AGENTVM_POOLS: network=%s is deprecated, write network=%s",
                        v,
                        OLD_NETWORKS[v],
                    )
                    v = OLD_NETWORKS[v]
                if v not in NETWORKS:
                    raise InvalidArgument(
                        f"AGENTVM_POOLS: network={v!r}; use nat-filtered or isolated (bridged "
                        "VMs are made per sandbox, never pooled)"
                    )
                network = NETWORKS[v]
                continue
            if k not in values:
                raise InvalidArgument(
                    f"AGENTVM_POOLS: unknown option {k!r} (use min, max, ttl, network)"
                )
            try:
                values[k] = float(v)
            except ValueError:
                raise InvalidArgument(f"AGENTVM_POOLS: {k}={v!r} is not a number") from None
        lo, hi = int(values["min"]), int(values["max"])
        key = PoolKey(profile, network, image)
        try:
            check_config(lo, hi, values["ttl"])
        except InvalidArgument as exc:
            raise InvalidArgument(f"AGENTVM_POOLS: {key}: {exc.message}") from None
        if key in pools:
            raise InvalidArgument(f"AGENTVM_POOLS: {key} is listed twice")
        pools[key] = PoolConfig(min_size=lo, max_size=hi, ttl_s=values["ttl"])
    return pools


class PoolManager:
    def __init__(
        self,
        settings: Settings,
        backend: VMManagerBackend,
        configs: dict[PoolKey, PoolConfig],
        *,
        events: EventSink | None = None,
    ) -> None:
        self.settings = settings
        self.events: EventSink = events or NullSink()
        self.backend = backend
        # One journal per pool-manager address: several may share a host.
        tag = hashlib.sha256(settings.pool_manager_addr.encode()).hexdigest()[:12]
        self.journal = LeaseJournal(settings.state_dir / "pool-manager" / f"leases-{tag}.jsonl")
        self.pools = {
            key: VMPool(key, cfg, backend, on_lease=self._leased, on_release=self._released)
            for key, cfg in configs.items()
        }
        # Reconciles to run again, by node address (see _reconcile_again).
        self._again: dict[str, asyncio.Task[None]] = {}
        self._retry_task: asyncio.Task[None] | None = None

    @staticmethod
    def labels(settings: Settings) -> dict[str, str]:
        return {OWNER_LABEL: "pool-manager", POOL_LABEL: settings.pool_manager_addr}

    def _leased(self, lease: Lease) -> None:
        # The VM's health channel stays open until release destroys the VM:
        # closing a gRPC channel here would cost the caller ~30 ms.
        self.journal.lease(
            lease.lease_id, lease.vm.name, str(lease.key), lease.labels, lease.acquired_at
        )

    def _released(self, lease: Lease) -> None:
        self.journal.release(lease.lease_id)

    async def start(self) -> None:
        """Recover from a previous run, then start warming."""
        open_leases = await asyncio.to_thread(self.journal.open)
        by_vm = {rec.get("vm"): rec for rec in open_leases.values()}
        # Journals of earlier releases spell NAT pools "standard/nat_filtered".
        keys = {str(k): k for k in self.pools}
        keys.update({str(k).replace("-", "_"): k for k in self.pools})
        vms = await self.backend.list_vms(self.labels(self.settings))
        alive = set()
        for vm in vms:
            rec = by_vm.get(vm.name)
            key = keys.get(str(rec.get("key"))) if rec else None
            if rec is None or key is None:
                log.info("destroying %s, left idle by a previous pool-manager", vm.name)
                try:
                    await self.backend.destroy(
                        vm.name, "pool-manager restart: left idle by a previous pool-manager"
                    )
                except AgentVMError as exc:
                    log.warning("cannot destroy %s: %s", vm.name, exc)
                if rec is not None:
                    self.journal.release(str(rec["lease_id"]))
                continue
            alive.add(vm.name)
            labels = rec.get("labels")
            self.pools[key].adopt_lease(
                Lease(
                    lease_id=str(rec["lease_id"]),
                    key=key,
                    vm=vm,
                    acquired_at=float(rec.get("at", time.time())),
                    labels=dict(labels) if isinstance(labels, dict) else {},
                )
            )
            log.info("kept lease %s of %s across the restart", rec["lease_id"], vm.name)
        for rec in open_leases.values():
            if rec.get("vm") not in alive and rec.get("vm") in by_vm:
                self.journal.release(str(rec["lease_id"]))
        for pool in self.pools.values():
            pool.start()
        self._retry_task = asyncio.ensure_future(self._retry_destroys())

    async def _retry_destroys(self) -> None:
        while True:
            await asyncio.sleep(RETRY_DESTROY_S)
            try:
                await self.backend.retry_destroys()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("retrying failed destroys")

    async def reconcile_node(self, link: NodeLink) -> None:
        """A node answers again (or for the first time since start): destroy this
        pool-manager's VMs there that no pool holds (idle VMs its pools gave up on
        while it was away, VMs of a previous run). Leased VMs stay their lessee's."""
        try:
            resp = await link.stub.ListVMs(
                vm_manager_pb2.ListVMsRequest(label_selector=self.labels(self.settings)),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot list the pool VMs of %s: %s", link.describe(), exc.details())
            return
        held = set(self.backend.made)
        for pool in self.pools.values():
            held.update(lease.vm.name for lease in pool.leases())
        kept_young = False
        for vm in resp.vms:
            if vm.name in held or vm.name in self.backend.made:
                continue
            if self.backend.creating and vm.created_at.seconds > time.time() - CREATE_TIMEOUT_S:
                kept_young = True  # perhaps a create whose answer is on its way
                continue
            log.info("destroying %s on %s: no pool holds it any more", vm.name, link.describe())
            try:
                await link.stub.DestroyVM(
                    vm_manager_pb2.DestroyVMRequest(
                        name=vm.name, reason=f"pool-manager: {link.describe()} is back"
                    ),
                    timeout=60,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("cannot destroy %s: %s", vm.name, exc.details())
        if kept_young:
            self._reconcile_again(link)

    def _reconcile_again(self, link: NodeLink) -> None:
        """Look at the node again once any create would have been answered.

        A VM kept as perhaps an unanswered create's may be a create's that failed
        with vm-manager away (its pool could not destroy it). Found by the soak: a
        SIGKILL of vm-manager during a pool boot left such a VM to nobody until
        the node next went away and came back.
        """
        if link.address in self._again:
            return

        async def again() -> None:
            try:
                await asyncio.sleep(RECONCILE_AGAIN_S)
            finally:
                self._again.pop(link.address, None)
            await self.reconcile_node(link)

        self._again[link.address] = asyncio.ensure_future(again())

    def pool(self, key: PoolKey) -> VMPool:
        pool = self.pools.get(key)
        if pool is None:
            have = ", ".join(str(k) for k in self.pools) or "none"
            raise NotFound(f"no pool for {key} (pools: {have}); configure one with AGENTVM_POOLS")
        return pool

    def set_config(
        self,
        key: PoolKey,
        min_size: int | None = None,
        max_size: int | None = None,
        ttl_s: float | None = None,
    ) -> VMPool:
        """Change a running pool's sizes and TTL (None keeps a value); lasts until restart."""
        pool = self.pool(key)
        cur = pool.config
        new = dataclasses.replace(
            cur,
            min_size=cur.min_size if min_size is None else min_size,
            max_size=cur.max_size if max_size is None else max_size,
            ttl_s=cur.ttl_s if ttl_s is None else ttl_s,
        )
        try:
            check_config(new.min_size, new.max_size, new.ttl_s)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"pool {key} (now min={cur.min_size}, max={cur.max_size}, ttl={cur.ttl_s:g}): "
                f"{exc.message}"
            ) from None
        pool.reconfigure(new)
        return pool

    def find_lease(self, lease_id: str) -> tuple[VMPool, Lease]:
        for pool in self.pools.values():
            lease = pool.lease(lease_id)
            if lease is not None:
                return pool, lease
        raise NotFound(f"no lease {lease_id!r}: it was released already, or never existed")

    def leases(self, selector: dict[str, str]) -> list[Lease]:
        out = []
        for pool in self.pools.values():
            for lease in pool.leases():
                if all(lease.labels.get(k) == v for k, v in selector.items()):
                    out.append(lease)
        return sorted(out, key=lambda lease: lease.acquired_at)

    async def close(self) -> None:
        for task in [*self._again.values(), self._retry_task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(p.close() for p in self.pools.values()))
        await self.backend.close()
        self.journal.close()
