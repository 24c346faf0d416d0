"""VMPool: pre-warmed, health-checked VMs of one kind, handed out once each.

Invariants (each has a test):

* ``idle + warming + checking + leased <= max_size`` at every instant, also
  under concurrent acquires: a slot is reserved before any await.
* Only a VM whose agent answered within ``freshness_s`` is handed out; an
  older one is checked first, and one that fails is destroyed and replaced.
* A VM is handed out at most once; release destroys it.
* Idle VMs older than ``ttl_s`` are evicted; refill keeps ``min_size`` ready,
  from the memory template when one is ready, by cold boot otherwise.
* When nothing is idle and there is room, acquire creates a VM on demand;
  when the pool is full of leased VMs it waits until its deadline.

The pool does not talk gRPC itself: a ``Backend`` creates, checks and
destroys VMs (vm-manager and the guest agents in production, a fake in the
logic tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentvm.common.errors import (
    AgentVMError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2

log = logging.getLogger("agentvm.pool_manager.pool")

# VMs made at once: a restore or a boot keeps a host core busy (TCG: fully),
# so leave half the cores to the VMs in use and to the control plane.
MAX_PARALLEL_WARM = max(1, (os.cpu_count() or 2) // 2)
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
TEMPLATE_WAIT_S = 60.0
# Bounds of a pool's configuration (AGENTVM_POOLS and `agent-vm pool set` alike).
MAX_POOL_SIZE = 256
MIN_TTL_S = 1.0
MAX_TTL_S = 7 * 86400.0


def check_config(min_size: int, max_size: int, ttl_s: float) -> None:
    """InvalidArgument naming the field (as AGENTVM_POOLS and `pool set` spell it) when
    the sizes or the TTL cannot make a pool."""
    if not 1 <= max_size <= MAX_POOL_SIZE:
        raise InvalidArgument(f"max={max_size}: a pool's max must be 1 to {MAX_POOL_SIZE}")
    if not 0 <= min_size <= max_size:
        raise InvalidArgument(
            f"min={min_size} is above max={max_size}: min must be 0 to max (raise max too)"
        )
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise InvalidArgument(
            f"ttl={ttl_s:g}: a pool's ttl must be {MIN_TTL_S:g} to {MAX_TTL_S:g} seconds"
        )


def network_word(mode: NetworkMode) -> str:
    """A network mode as users write it everywhere (``nat-filtered``, ``isolated``)."""
    return mode.name.lower().replace("_", "-")


# The built-in image's name: a key without an image (or with this one) pools it.
BUILTIN_IMAGE = "default"
# An image as a pool key holds it (a name, "name:tag" or an id; vm-manager resolves it).
IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._:-]{0,199}")


def check_image(image: str, where: str) -> str:
    """``image`` as a key holds it ("" for the built-in image); InvalidArgument naming
    ``where`` when it cannot be an image name or id."""
    image = image.strip()
    if image in ("", BUILTIN_IMAGE):
        return ""
    if not IMAGE_REF.fullmatch(image):
        raise InvalidArgument(
            f"{where}: image {image[:60]!r} is not an image name, name:tag or id "
            "(lower-case letters, digits, '.', '_', '-', ':'; `agent-vm image list`)"
        )
    return image


@dataclass(frozen=True)
class PoolKey:
    """Which kind of VM a pool holds; shown (and parsed) as ``standard/nat-filtered``,
    or ``IMAGE/standard/nat-filtered`` for a named image's pool."""

    profile: ResourceProfile
    network_mode: NetworkMode = NetworkMode.ISOLATED
    # Named image of the pool's VMs; "" for the built-in image.
    image: str = ""

    def __str__(self) -> str:
        base = f"{self.profile.name.lower()}/{network_word(self.network_mode)}"
        return f"{self.image}/{base}" if self.image else base

    @classmethod
    def parse(cls, text: str) -> PoolKey:
        """``[IMAGE/]standard/isolated`` -> PoolKey (also the old ``standard/nat_filtered``)."""
        parts = text.strip().split("/")
        image = ""
        if len(parts) == 3:
            image = check_image(parts[0], f"pool key {text!r}")
            parts = parts[1:]
        try:
            if len(parts) != 2:
                raise KeyError(text)
            profile, network = (p.lower() for p in parts)
            return cls(
                ResourceProfile[profile.upper()],
                NetworkMode[network.replace("-", "_").upper()],
                image,
            )
        except KeyError:
            raise InvalidArgument(
                f"pool key {text!r}: write [IMAGE/]PROFILE/NETWORK as `agent-vm pool status` "
                "shows it, e.g. standard/nat-filtered, standard/isolated or coder/standard/isolated"
            ) from None


@dataclass(frozen=True)
class PoolConfig:
    min_size: int
    max_size: int
    ttl_s: float
    health_interval_s: float = 1.0
    freshness_s: float = 2.0
    health_timeout_s: float = 3.0


class Backend(Protocol):
    """What a pool needs from the rest of agent-vm."""

    async def create(self, key: PoolKey, from_template: bool) -> common_pb2.VM:
        """A READY VM (agent answered). FailedPrecondition when no template exists."""

    async def destroy(self, name: str, reason: str = "") -> None: ...

    async def healthy(self, vm: common_pb2.VM, timeout: float) -> bool:
        """True when the VM's agent answers now."""

    async def prepare_template(self, key: PoolKey) -> None:
        """Build the memory template for ``key`` (may take a boot's time)."""


@dataclass
class PoolVM:
    vm: common_pb2.VM
    created: float
    checked: float
    from_template: bool


@dataclass
class Lease:
    lease_id: str
    key: PoolKey
    vm: common_pb2.VM
    acquired_at: float
    labels: dict[str, str] = field(default_factory=dict)
    from_pool: bool = True


@dataclass
class Counters:
    acquired: int = 0
    created: int = 0
    replaced_unhealthy: int = 0
    evicted_ttl: int = 0
    on_demand: int = 0
    failed_creates: int = 0


class VMPool:
    """One pool; all methods run on one asyncio loop."""

    def __init__(
        self,
        key: PoolKey,
        config: PoolConfig,
        backend: Backend,
        *,
        on_lease: Callable[[Lease], None] | None = None,
        on_release: Callable[[Lease], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= config.min_size <= config.max_size or config.max_size < 1:
            raise ValueError(
                f"pool {key}: need 0 <= min ({config.min_size}) <= max ({config.max_size}) "
                "and max >= 1"
            )
        self.key = key
        self.config = config
        self.backend = backend
        self.counters = Counters()
        self.template_ready = False
        self._on_lease = on_lease
        self._on_release = on_release
        self._clock = clock
        self._idle: deque[PoolVM] = deque()
        self._warming = 0
        self._checking = 0
        self._leases: dict[str, Lease] = {}
        self._changed = asyncio.Condition()
        self._refill_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warm_tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._retry_s = RETRY_MIN_S
        self._backoff_until = 0.0
        # vm-manager's NOT_FOUND of a create (a named image that does not exist),
        # counted: an acquire waiting when one comes says so at once rather than
        # waiting for its deadline (the next acquire tries again).
        self._missing: NotFound | None = None
        self._missing_count = 0
        self._waiters = 0
        self._template_task: asyncio.Task[None] | None = None

    # -- counts ----------------------------------------------------------
    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def warming(self) -> int:
        return self._warming

    @property
    def leased(self) -> int:
        return len(self._leases)

    @property
    def total(self) -> int:
        return len(self._idle) + self._warming + self._checking + len(self._leases)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    @property
    def template_building(self) -> bool:
        """True while the memory template is being built (new VMs boot cold meanwhile)."""
        task = self._template_task
        return not self.template_ready and task is not None and not task.done()

    def reconfigure(self, config: PoolConfig) -> list[str]:
        """New sizes and TTL, live: refill warms up to the new min, idle VMs beyond the
        new max are destroyed (oldest first; VMs being made are destroyed when done),
        leased VMs are never touched. Returns the names of the VMs destroyed now."""
        if not 0 <= config.min_size <= config.max_size or config.max_size < 1:
            raise ValueError(f"pool {self.key}: need 0 <= min <= max and max >= 1")
        old, self.config = self.config, config
        evicted = []
        while self._idle and self.total > config.max_size:
            pvm = self._idle.popleft()
            evicted.append(pvm.vm.name)
            self._discard(pvm.vm.name, f"the pool's max went down to {config.max_size}")
        log.info(
            "pool %s: min %d -> %d, max %d -> %d, ttl %g -> %g s",
            self.key,
            old.min_size,
            config.min_size,
            old.max_size,
            config.max_size,
            old.ttl_s,
            config.ttl_s,
        )
        self._refill_wake.set()
        return evicted

    # -- lifecycle -------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_warm(self) -> None:
        """Make one VM in the background (the slot is reserved here)."""
        self._warming += 1
        task = asyncio.ensure_future(self._warm_one())
        self._warm_tasks.add(task)
        task.add_done_callback(self._warm_tasks.discard)

    def start(self) -> None:
        # A named image's pool has its own template (PrepareTemplateRequest.image).
        self._prepare_template()
        self._spawn(self._refill_loop())
        self._spawn(self._health_loop())

    def adopt_lease(self, lease: Lease) -> None:
        """A lease recorded before a restart: its VM counts against max until released."""
        self._leases[lease.lease_id] = lease

    async def close(self) -> None:
        """Stop refilling, destroy idle VMs and VMs being made; leases stay with holders.

        VMs being made are waited for rather than cancelled (a cancelled create
        could leave a VM nobody knows about); they destroy themselves.
        """
        self._closing = True
        self._refill_wake.set()
        for task in list(self._tasks):
            task.cancel()
        for task in [*self._tasks, *self._warm_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        idle, self._idle = list(self._idle), deque()
        why = f"pool {self.key}: pool-manager shutting down"
        await asyncio.gather(*(self._destroy(p.vm.name, why) for p in idle))
        async with self._changed:
            self._changed.notify_all()

    # -- acquire / release ---------------------------------------------------
    async def acquire(self, timeout: float, labels: dict[str, str]) -> Lease:
        """A healthy VM within ``timeout`` seconds, idle if possible, made on demand if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waited = False
        missing_seen = self._missing_count
        self._waiters += 1
        try:
            while True:
                if self._closing:
                    raise Unavailable(
                        "the pool is shutting down: retry against a running pool-manager"
                    )
                while self._idle:
                    pvm = self._idle.popleft()
                    self._checking += 1
                    try:
                        ok = self._fresh(pvm) or await self._check(pvm)
                    finally:
                        self._checking -= 1
                    if ok:
                        return self._lease(pvm.vm, labels, from_pool=not waited)
                    self.counters.replaced_unhealthy += 1
                    self._discard(pvm.vm.name, "its agent did not answer at acquire")
                if self._missing is not None and self._missing_count != missing_seen:
                    raise NotFound(f"pool {self.key}: {self._missing.message}")
                # Nothing idle: start one VM per waiting caller, room permitting.
                if self._warming < self._waiters and self.total < self.config.max_size:
                    self._start_warm()
                    self.counters.on_demand += 1
                waited = True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if self.leased >= self.config.max_size:
                        why = f"all {self.config.max_size} VMs of the pool are leased"
                    else:
                        why = "VMs are still being made (a cold boot takes seconds)"
                    raise DeadlineExceeded(
                        f"no {self.key} VM within {timeout:g} s: {why}; release VMs, raise the "
                        "pool's max or min, or wait longer"
                    )
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self._waiters -= 1

    def _fresh(self, pvm: PoolVM) -> bool:
        return self._clock() - pvm.checked <= self.config.freshness_s

    async def _check(self, pvm: PoolVM) -> bool:
        try:
            ok = await self.backend.healthy(pvm.vm, self.config.health_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a check that cannot be made has failed
            log.info("pool %s: health check of %s failed: %r", self.key, pvm.vm.name, exc)
            ok = False
        if ok:
            pvm.checked = self._clock()
        return ok

    def _lease(self, vm: common_pb2.VM, labels: dict[str, str], *, from_pool: bool) -> Lease:
        lease = Lease(
            lease_id=secrets.token_hex(12),
            key=self.key,
            vm=vm,
            acquired_at=time.time(),
            labels=dict(labels),
            from_pool=from_pool,
        )
        self._leases[lease.lease_id] = lease
        self.counters.acquired += 1
        if self._on_lease is not None:
            self._on_lease(lease)
        self._refill_wake.set()
        return lease

    def lease(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    async def release(self, lease_id: str) -> None:
        """Destroy the leased VM (never handed out again) and free its slot."""
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r} in pool {self.key}: it was released already")
        try:
            await self.backend.destroy(lease.vm.name, f"pool lease {lease_id} released")
        finally:
            self._leases.pop(lease_id, None)
            if self._on_release is not None:
                self._on_release(lease)
            self._refill_wake.set()
            async with self._changed:
                self._changed.notify_all()

    # -- making and removing VMs ---------------------------------------------
    async def _make(self) -> PoolVM:
        """Create one READY VM (template restore when possible). Caller holds a slot."""
        use_template = self.template_ready
        try:
            vm = await self.backend.create(self.key, use_template)
        except FailedPrecondition:
            if not use_template:
                raise
            # The template went away (image rebuilt, QEMU upgraded): boot cold
            # now and have the template rebuilt in the background.
            log.info("pool %s: template unusable, booting cold and rebuilding it", self.key)
            self.template_ready = False
            self._prepare_template()
            use_template = False
            vm = await self.backend.create(self.key, False)
        now = self._clock()
        self.counters.created += 1
        return PoolVM(vm=vm, created=now, checked=now, from_template=use_template)

    def _prepare_template(self) -> None:
        if self._template_task is not None and not self._template_task.done():
            return

        async def prepare() -> None:
            delay = RETRY_MIN_S
            while not self._closing:
                try:
                    await self.backend.prepare_template(self.key)
                except AgentVMError as exc:
                    log.warning("pool %s: template not built (%s); retrying", self.key, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self.template_ready = True
                log.info("pool %s: memory template ready", self.key)
                return

        self._template_task = self._spawn(prepare())

    def _discard(self, name: str, why: str) -> None:
        log.info("pool %s: destroying %s: %s", self.key, name, why)
        self._spawn(self._destroy(name, f"pool {self.key}: {why}"))
        self._refill_wake.set()

    async def _destroy(self, name: str, reason: str = "") -> None:
        try:
            await self.backend.destroy(name, reason)
        except AgentVMError as exc:
            log.warning("pool %s: destroying %s failed: %s", self.key, name, exc)

    async def _warm_one(self) -> None:
        """Make one VM into the idle queue. Caller reserved the slot (warming += 1)."""
        try:
            pvm = await self._make()
        except BaseException as exc:
            self._warming -= 1
            self._refill_wake.set()
            if not isinstance(exc, AgentVMError):
                raise
            self.counters.failed_creates += 1
            if isinstance(exc, NotFound):
                self._missing = exc
                self._missing_count += 1
            self._backoff_until = self._clock() + self._retry_s
            log.warning(
                "pool %s: creating a VM failed (next try in %.0f s): %s",
                self.key,
                self._retry_s,
                exc,
            )
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            if isinstance(exc, NotFound):
                async with self._changed:
                    self._changed.notify_all()  # waiting acquires answer NOT_FOUND now
            return
        self._warming -= 1
        self._retry_s = RETRY_MIN_S
        self._refill_wake.set()
        if self._closing:
            await self._destroy(pvm.vm.name, f"pool {self.key}: pool-manager shutting down")
            return
        if self.total >= self.config.max_size:
            # The max went down while this VM was being made.
            await self._destroy(
                pvm.vm.name, f"pool {self.key}: the pool's max went down to {self.config.max_size}"
            )
            async with self._changed:
                self._changed.notify_all()
            return
        self._idle.append(pvm)
        async with self._changed:
            self._changed.notify_all()

    async def _refill_loop(self) -> None:
        # A template restore is several times faster than a boot, and building
        # a missing template costs about one boot: wait for it before the first
        # fill (bounded; a failing template build leaves the pool booting cold).
        if self._template_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._template_task), TEMPLATE_WAIT_S)
        while not self._closing:
            self._refill_wake.clear()
            pause = self._backoff_until - self._clock()
            if pause > 0:
                await asyncio.sleep(pause)
            while (
                not self._closing
                and len(self._idle) + self._warming < self.config.min_size
                and self.total < self.config.max_size
                and self._warming < MAX_PARALLEL_WARM
            ):
                self._start_warm()
            await self._refill_wake.wait()

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.health_pass()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("pool %s: health pass failed", self.key)

    async def health_pass(self) -> None:
        """Evict idle VMs past their TTL; check the rest, replace those that fail."""
        now = self._clock()
        for pvm in list(self._idle):
            if now - pvm.created > self.config.ttl_s and pvm in self._idle:
                self._idle.remove(pvm)
                self.counters.evicted_ttl += 1
                self._discard(pvm.vm.name, f"idle longer than its TTL ({self.config.ttl_s:g} s)")
        idle = list(self._idle)
        results = await asyncio.gather(*(self._check(p) for p in idle), return_exceptions=True)
        for pvm, ok in zip(idle, results, strict=True):
            if ok is not True and pvm in self._idle:
                self._idle.remove(pvm)
                self.counters.replaced_unhealthy += 1
                self._discard(pvm.vm.name, "its agent stopped answering")
