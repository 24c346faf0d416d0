"""pool-manager over a fleet: a node that is back is reconciled (fake nodes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError
from agentvm.common.fleet import DOWN_AFTER, FleetStub
from agentvm.common.profiles import ResourceProfile
from agentvm.pool_manager.backend import VMManagerBackend
from agentvm.pool_manager.manager import PoolManager
from agentvm.pool_manager.pool import Lease, PoolConfig, PoolKey
from agentvm.v1 import common_pb2
from tests.unit.test_fleet import FakeNode, make_fleet, probe_all


def test_a_node_back_loses_the_pool_vms_no_pool_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agentvm.pool_manager.manager.RECONCILE_AGAIN_S", 0.2)

    async def main() -> None:
        a, b = FakeNode("a"), FakeNode("b")
        f, _ = make_fleet([a, b])
        await f.refresh()
        settings = Settings(state_dir=tmp_path, pool_manager_addr="unix:/tmp/pm.sock")
        backend = VMManagerBackend(cast(Any, FleetStub(f)), PoolManager.labels(settings), fleet=f)
        key = PoolKey(ResourceProfile.LIGHT)
        manager = PoolManager(settings, backend, {key: PoolConfig(0, 4, 900.0)})
        f.on_up.append(manager.reconcile_node)

        def vm(name: str) -> common_pb2.VM:
            made = common_pb2.VM(name=name, node_id="b")
            b.vms[name] = made
            return made

        # On b: a VM the pool still makes or holds idle, a leased one, and one
        # its pool gave up on while b was away (its destroy could not reach b).
        backend.made.add(vm("held").name)
        leased = vm("leased")
        manager.pools[key].adopt_lease(Lease("l1", key, leased, 0.0))
        vm("given-up")
        # A VM made just now while a create is unanswered may be that create's: kept.
        young = vm("young")
        young.created_at.GetCurrentTime()
        backend.creating = 1
        b.down = True
        for _ in range(DOWN_AFTER):
            await probe_all(f)
        b.down = False
        await probe_all(f)
        for _ in range(50):
            if "given-up" not in b.vms:
                break
            await asyncio.sleep(0.01)
        assert sorted(b.vms) == ["held", "leased", "young"]
        assert a.calls["DestroyVM"] == 0
        # The young VM was no create's after all (a create that failed while the
        # node was away, whose pool could not destroy it): the node is looked at
        # again once any create would have been answered, and it goes.
        backend.creating = 0
        for _ in range(100):
            if "young" not in b.vms:
                break
            await asyncio.sleep(0.02)
        assert sorted(b.vms) == ["held", "leased"]
        await manager.close()
        await f.close()

    asyncio.run(main())


def test_a_destroy_that_met_vm_manager_away_is_tried_again(tmp_path: Path) -> None:
    """A half-made pool VM whose clean-up failed (vm-manager restarting) is not left."""

    async def main() -> None:
        b = FakeNode("b")
        f, _ = make_fleet([b])
        await f.refresh()
        settings = Settings(state_dir=tmp_path, pool_manager_addr="unix:/tmp/pm.sock")
        backend = VMManagerBackend(cast(Any, FleetStub(f)), PoolManager.labels(settings), fleet=f)
        half = common_pb2.VM(name="half-made", node_id="b")
        b.vms[half.name] = half
        f.remember(half)
        b.down = True
        with pytest.raises(AgentVMError):
            await backend.destroy(half.name, "pool: its boot failed")
        assert backend.undestroyed == {"half-made": "pool: its boot failed"}
        await backend.retry_destroys()  # still away: kept for the next try
        assert "half-made" in b.vms
        assert backend.undestroyed == {"half-made": "pool: its boot failed"}
        b.down = False
        await backend.retry_destroys()
        assert "half-made" not in b.vms
        assert backend.undestroyed == {}
        await f.close()

    asyncio.run(main())
