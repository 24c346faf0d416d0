"""VMPool logic against a fake backend: capacity, health, TTL, leases, shutdown."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agentvm.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from agentvm.common.profiles import ResourceProfile
from agentvm.pool_manager.journal import LeaseJournal
from agentvm.pool_manager.manager import parse_pools
from agentvm.pool_manager.pool import PoolConfig, PoolKey, VMPool
from agentvm.v1 import common_pb2

KEY = PoolKey(ResourceProfile.STANDARD)


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (fixtures pass through)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


class FakeBackend:
    def __init__(self, delay: float = 0.01, template_ok: bool = True) -> None:
        self.delay = delay
        self.template_ok = template_ok
        self.alive: set[str] = set()
        self.sick: set[str] = set()
        self.destroyed: list[str] = []
        self.created: list[tuple[str, bool]] = []
        self.health_calls = 0
        self.prepares = 0
        self.peak = 0
        self.fail_creates = 0
        self._n = 0

    async def create(self, key: PoolKey, from_template: bool) -> common_pb2.VM:
        if self.fail_creates:
            self.fail_creates -= 1
            raise Unavailable("vm-manager is restarting")
        if from_template and not self.template_ok:
            raise FailedPrecondition("template gone")
        self._n += 1
        name = f"agent-vm-fake{self._n:04d}"
        self.alive.add(name)
        self.peak = max(self.peak, len(self.alive))
        await asyncio.sleep(self.delay)
        self.created.append((name, from_template))
        return common_pb2.VM(name=name, state=common_pb2.VM_STATE_READY)

    async def destroy(self, name: str, reason: str = "") -> None:
        self.alive.discard(name)
        self.destroyed.append(name)

    async def healthy(self, vm: common_pb2.VM, timeout: float) -> bool:
        self.health_calls += 1
        return vm.name in self.alive and vm.name not in self.sick

    async def prepare_template(self, key: PoolKey) -> None:
        self.prepares += 1
        if not self.template_ok:
            self.template_ok = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle(pool: VMPool, idle: int, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pool.idle < idle or pool.warming:
        assert loop.time() < deadline, f"pool stuck at idle={pool.idle} warming={pool.warming}"
        await asyncio.sleep(0.005)


def cfg(lo: int, hi: int, ttl: float = 600.0, **kw: float) -> PoolConfig:
    return PoolConfig(min_size=lo, max_size=hi, ttl_s=ttl, health_interval_s=3600, **kw)


@aio
async def test_warms_to_min_and_refills_after_acquire() -> None:
    be = FakeBackend()
    pool = VMPool(KEY, cfg(2, 5), be)
    pool.start()
    await settle(pool, 2)
    calls = be.health_calls
    lease = await pool.acquire(1.0, {"who": "t"})
    assert lease.from_pool
    assert lease.labels == {"who": "t"}
    assert be.health_calls == calls  # checked within the freshness window: no extra check
    await settle(pool, 2)
    assert pool.leased == 1
    assert pool.idle == 2
    assert pool.template_ready
    assert be.prepares == 1
    await pool.close()


@aio
async def test_concurrent_acquires_never_exceed_max_nor_share_a_vm() -> None:
    be = FakeBackend(delay=0.02)
    pool = VMPool(KEY, cfg(1, 5), be)
    pool.start()
    results = await asyncio.gather(
        *(pool.acquire(0.5, {}) for _ in range(12)), return_exceptions=True
    )
    leases = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(leases) == 5
    assert all(isinstance(e, DeadlineExceeded) for e in errors)
    assert "leased" in str(errors[0])
    assert len({lease.vm.name for lease in leases}) == 5
    assert be.peak <= 5
    assert pool.total <= 5
    # A release frees a slot for a waiting acquirer, with a fresh VM.
    waiter = asyncio.ensure_future(pool.acquire(5.0, {}))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await pool.release(leases[0].lease_id)
    got = await waiter
    assert got.vm.name not in {lease.vm.name for lease in leases}
    assert leases[0].vm.name in be.destroyed
    assert be.peak <= 5
    await pool.close()


@aio
async def test_a_released_vm_is_never_handed_out_again() -> None:
    be = FakeBackend()
    pool = VMPool(KEY, cfg(1, 2), be)
    pool.start()
    seen: set[str] = set()
    for _ in range(6):
        lease = await pool.acquire(2.0, {})
        assert lease.vm.name not in seen
        seen.add(lease.vm.name)
        await pool.release(lease.lease_id)
        assert lease.vm.name not in be.alive
    with pytest.raises(NotFound):
        await pool.release(lease.lease_id)
    await pool.close()


@aio
async def test_stale_vms_are_checked_and_sick_ones_replaced_at_acquire() -> None:
    be = FakeBackend()
    clock = Clock()
    pool = VMPool(KEY, cfg(2, 4, freshness_s=1.0), be, clock=clock)
    pool.start()
    await settle(pool, 2)
    clock.now += 10  # both idle VMs are now stale
    first = be.created[0][0]  # the front of the idle queue
    be.sick.add(first)
    lease = await pool.acquire(2.0, {})
    assert lease.vm.name != first
    assert pool.counters.replaced_unhealthy == 1
    await asyncio.sleep(0.05)
    assert first in be.destroyed
    await settle(pool, 2)
    await pool.close()


@aio
async def test_health_pass_replaces_a_vm_killed_behind_the_pools_back() -> None:
    be = FakeBackend()
    pool = VMPool(KEY, cfg(2, 4), be)
    pool.start()
    await settle(pool, 2)
    victim = sorted(be.alive)[0]
    be.alive.discard(victim)  # "virsh destroy" behind the pool's back
    await pool.health_pass()
    assert pool.counters.replaced_unhealthy == 1
    await settle(pool, 2)
    lease_names = {(await pool.acquire(1.0, {})).vm.name for _ in range(2)}
    assert victim not in lease_names
    await pool.close()


@aio
async def test_idle_vms_past_their_ttl_are_evicted_and_replaced() -> None:
    be = FakeBackend()
    clock = Clock()
    pool = VMPool(KEY, cfg(2, 4, ttl=60), be, clock=clock)
    pool.start()
    await settle(pool, 2)
    old = set(be.alive)
    clock.now += 61
    await pool.health_pass()
    assert pool.counters.evicted_ttl == 2
    await settle(pool, 2)
    await asyncio.sleep(0.02)
    assert old.isdisjoint(be.alive)
    assert old <= set(be.destroyed)
    await pool.close()


@aio
async def test_an_unusable_template_falls_back_to_cold_boot_and_is_rebuilt() -> None:
    be = FakeBackend()
    pool = VMPool(KEY, cfg(0, 2), be)
    pool.start()
    while not pool.template_ready:
        await asyncio.sleep(0.005)
    be.template_ok = False
    lease = await pool.acquire(2.0, {})
    assert not lease.from_pool  # made on demand: the pool was empty (min 0)
    assert be.created[-1] == (lease.vm.name, False)
    await asyncio.sleep(0.05)
    assert be.prepares == 2
    assert pool.template_ready
    await pool.close()


@aio
async def test_failed_creates_back_off_and_recover() -> None:
    be = FakeBackend()
    be.fail_creates = 1
    pool = VMPool(KEY, cfg(1, 2), be)
    pool.start()
    await settle(pool, 1, timeout=5)
    assert pool.counters.failed_creates == 1
    await pool.close()


@aio
async def test_close_destroys_idle_vms_and_vms_being_made() -> None:
    be = FakeBackend(delay=0.2)
    pool = VMPool(KEY, cfg(3, 3), be)
    pool.start()
    await asyncio.sleep(0.05)
    lease_task = asyncio.ensure_future(pool.acquire(0.01, {}))
    await asyncio.gather(lease_task, return_exceptions=True)
    await pool.close()
    assert be.alive == set()
    with pytest.raises(Exception, match="shutting down"):
        await pool.acquire(1.0, {})


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="min"):
        VMPool(KEY, cfg(3, 2), FakeBackend())


def test_parse_pools() -> None:
    pools = parse_pools("standard:min=2,max=10,ttl=900; light:max=3")
    assert pools[KEY] == PoolConfig(min_size=2, max_size=10, ttl_s=900)
    assert pools[PoolKey(ResourceProfile.LIGHT)].max_size == 3
    assert parse_pools("") == {}
    for bad, word in [
        ("huge:min=1", "unknown profile"),
        ("standard:min=3,max=2", "min=3 is above max=2"),
        ("standard:size=3", "unknown option"),
        ("standard:min=x", "not a number"),
        ("standard;standard", "twice"),
    ]:
        with pytest.raises(InvalidArgument, match=word):
            parse_pools(bad)


def test_journal_replays_compacts_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "pool" / "leases.jsonl"
    j = LeaseJournal(path)
    assert j.open() == {}
    j.lease("a", "agent-vm-1", "standard/isolated", {"x": "1"}, 1.0)
    j.lease("b", "agent-vm-2", "standard/isolated", {}, 2.0)
    j.release("a")
    j.close()
    with open(path, "a") as fh:
        fh.write('{"op": "lea')  # killed mid-write
    j2 = LeaseJournal(path)
    leases = j2.open()
    assert list(leases) == ["b"]
    assert leases["b"]["vm"] == "agent-vm-2"
    j2.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x)["lease_id"] for x in lines] == ["b"]


@aio
async def test_one_vm_at_a_time_still_fills_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a small host the pool makes one VM at a time, and each finished one starts the next."""
    monkeypatch.setattr("agentvm.pool_manager.pool.MAX_PARALLEL_WARM", 1)
    be = FakeBackend()
    pool = VMPool(KEY, cfg(3, 5), be)
    pool.start()
    await settle(pool, 3)
    assert be.peak == 3
    await pool.close()


@aio
async def test_health_loop_survives_checks_cancelled_by_a_closing_channel() -> None:
    """destroy() closes a VM's channel, which cancels a check in flight: not a reason to die."""

    class Cancelling(FakeBackend):
        async def healthy(self, vm: common_pb2.VM, timeout: float) -> bool:
            if vm.name in self.sick:
                raise asyncio.CancelledError
            return await super().healthy(vm, timeout)

    be = Cancelling()
    pool = VMPool(KEY, PoolConfig(min_size=2, max_size=4, ttl_s=600, health_interval_s=0.01), be)
    pool.start()
    await settle(pool, 2)
    victim = be.created[0][0]
    be.sick.add(victim)
    for _ in range(200):
        if pool.counters.replaced_unhealthy:
            break
        await asyncio.sleep(0.01)
    assert pool.counters.replaced_unhealthy == 1
    await asyncio.sleep(0.05)
    loops = [t for t in pool._tasks if "_health_loop" in repr(t)]
    assert loops
    assert not loops[0].done()
    await pool.close()
