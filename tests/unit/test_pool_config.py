"""Pools per network mode, one spelling of a mode, and pool sizes changed live."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from agentvm.cli.main import cli
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.monitor.metrics import StateCollector
from agentvm.pool_manager.journal import LeaseJournal
from agentvm.pool_manager.manager import PoolManager, parse_pools
from agentvm.pool_manager.pool import PoolConfig, PoolKey, VMPool
from agentvm.v1 import common_pb2, pool_manager_pb2
from tests.unit.test_pool import FakeBackend, aio, cfg, settle

NAT = PoolKey(ResourceProfile.STANDARD, NetworkMode.NAT_FILTERED)
ISO = PoolKey(ResourceProfile.STANDARD, NetworkMode.ISOLATED)


def test_the_default_configuration_pools_both_isolated_and_nat_filtered_sandboxes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AGENTVM_POOLS", raising=False)
    pools = parse_pools(Settings().pools)
    assert pools == {
        NAT: PoolConfig(min_size=2, max_size=10, ttl_s=900),
        ISO: PoolConfig(min_size=1, max_size=4, ttl_s=900),
    }


def test_pools_spell_network_modes_as_the_cli_does_and_old_nat_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert str(NAT) == "standard/nat-filtered"
    assert str(ISO) == "standard/isolated"
    assert PoolKey.parse("standard/nat-filtered") == NAT
    assert PoolKey.parse("Standard/isolated") == ISO
    assert PoolKey.parse("standard/nat_filtered") == NAT  # keys journaled by older releases
    with pytest.raises(InvalidArgument, match="standard/nat-filtered"):
        PoolKey.parse("standard")

    with caplog.at_level(logging.WARNING):
        assert list(parse_pools("standard:network=nat-filtered;light:network=isolated")) == [
            NAT,
            PoolKey(ResourceProfile.LIGHT, NetworkMode.ISOLATED),
        ]
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert list(parse_pools("standard:min=1,network=nat")) == [NAT]
    assert "network=nat is deprecated, write network=nat-filtered" in caplog.text
    with pytest.raises(InvalidArgument, match="never pooled"):
        parse_pools("standard:network=bridge")
    with pytest.raises(InvalidArgument, match="standard/isolated is listed twice"):
        parse_pools("standard:min=1;standard:max=2,network=isolated")
    for bad, word in [
        ("standard:max=0", "max=0"),
        ("standard:max=1000", "max=1000"),
        ("standard:min=5,max=4", "min=5 is above max=4"),
        ("standard:ttl=0", "ttl=0"),
    ]:
        with pytest.raises(InvalidArgument, match=word):
            parse_pools(bad)


def test_pool_metrics_spell_pools_and_states_as_pool_status_does() -> None:
    collector = StateCollector()
    key = pool_manager_pb2.PoolKey(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_NAT_FILTERED,
    )
    collector.update_pools([pool_manager_pb2.PoolStatus(key=key, ready=1, warming=2)])
    samples = {
        (s.labels["pool"], s.labels.get("state") or s.labels.get("bound")): s.value
        for family in collector.collect()
        for s in family.samples
    }
    assert samples[("standard/nat-filtered", "warming")] == 2
    assert samples[("standard/nat-filtered", "ready")] == 1
    assert not [k for k in samples if "nat_filtered" in k[0] or k[1] == "starting"]


@aio
async def test_new_sizes_take_effect_live_and_never_touch_leased_vms() -> None:
    be = FakeBackend()
    pool = VMPool(ISO, cfg(1, 4), be)
    pool.start()
    await settle(pool, 1)
    lease = await pool.acquire(5, {"who": "t"})
    await settle(pool, 1)
    # Up: the pool warms to the new min without a restart.
    pool.reconfigure(cfg(3, 4))
    await settle(pool, 3)
    assert (pool.idle, pool.leased) == (3, 1)
    # Down: idle VMs beyond the new max go, oldest first; the leased one stays.
    oldest = [p.vm.name for p in pool._idle][:2]
    evicted = pool.reconfigure(cfg(0, 2))
    assert evicted == oldest
    await asyncio.sleep(0.05)
    assert (pool.idle, pool.leased, pool.total) == (1, 1, 2)
    assert lease.vm.name in be.alive
    assert set(oldest) <= set(be.destroyed)
    # Below what is leased: no idle VM is left, the leased one is still not touched.
    pool.reconfigure(cfg(0, 1))
    await asyncio.sleep(0.05)
    assert (pool.idle, pool.leased) == (0, 1)
    assert lease.vm.name in be.alive
    with pytest.raises(ValueError, match="min"):
        pool.reconfigure(cfg(2, 1))
    await pool.release(lease.lease_id)
    await pool.close()


@aio
async def test_a_vm_being_made_when_max_goes_down_is_destroyed_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("agentvm.pool_manager.pool.MAX_PARALLEL_WARM", 2)
    be = FakeBackend(delay=0.2)
    pool = VMPool(ISO, cfg(2, 4), be)
    pool.start()
    for _ in range(200):
        if pool.warming == 2:
            break
        await asyncio.sleep(0.005)
    assert pool.warming == 2
    pool.reconfigure(cfg(0, 1))
    await settle(pool, 0)
    await asyncio.sleep(0.05)
    assert pool.total <= 1
    assert len(be.alive) == pool.idle <= 1
    await pool.close()


@aio
async def test_pool_says_when_its_template_is_being_built() -> None:
    gate = asyncio.Event()

    class SlowTemplate(FakeBackend):
        async def prepare_template(self, key: PoolKey) -> None:
            await gate.wait()

    pool = VMPool(ISO, cfg(0, 2), SlowTemplate())
    assert not pool.template_building
    pool.start()
    await asyncio.sleep(0.01)
    assert pool.template_building
    assert not pool.template_ready
    gate.set()
    await asyncio.sleep(0.01)
    assert pool.template_ready
    assert not pool.template_building
    await pool.close()


@aio
async def test_set_config_keeps_unset_values_and_names_the_bad_field(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        Settings(), state_dir=tmp_path, pool_manager_addr=f"unix:{tmp_path}/p.sock"
    )
    manager = PoolManager(settings, cast(Any, FakeBackend()), {ISO: cfg(0, 4, ttl=600)})
    pool = manager.set_config(ISO, max_size=2)
    assert (pool.config.min_size, pool.config.max_size, pool.config.ttl_s) == (0, 2, 600)
    pool = manager.set_config(ISO, ttl_s=30)
    assert (pool.config.max_size, pool.config.ttl_s) == (2, 30)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"min_size": 3}, "min=3 is above max=2"),
        ({"max_size": 0}, "max=0"),
        ({"max_size": 100_000}, "max=100000"),
        ({"ttl_s": 0.5}, "ttl=0.5"),
    ]
    for kw, word in bad:
        with pytest.raises(InvalidArgument, match=word):
            manager.set_config(ISO, **kw)
    assert pool.config.max_size == 2  # a refused change changes nothing
    with pytest.raises(Exception, match="no pool for standard/nat-filtered"):
        manager.set_config(NAT, min_size=1)
    manager.journal.close()


def test_pool_set_refuses_what_it_cannot_send_before_calling_anything() -> None:
    runner = CliRunner()
    for args, word in [
        (["standard", "min=1"], "PROFILE/NETWORK"),
        (["standard/bridge", "min=1"], "PROFILE/NETWORK"),
        (["standard/isolated", "size=1"], "write min=N, max=N or ttl=SECONDS"),
        (["standard/isolated", "min=x"], "min='x' is not a whole number"),
        (["standard/isolated", "min=1", "min=2"], "given twice"),
        (["standard/isolated", "ttl=nan"], "is not a number"),
        (["standard/isolated", "max=-1"], "out of range"),
    ]:
        result = runner.invoke(cli, ["pool", "set", *args])
        assert result.exit_code == 2, (args, result.output)
        assert word in result.output, (args, result.output)
    result = runner.invoke(cli, ["pool", "set", "--help"])
    assert "KEY is the pool as `agent-vm pool status` shows it" in result.output
    result = runner.invoke(cli, ["template", "prepare", "--help"])
    assert "--network [nat-filtered|isolated]" in result.output


@aio
async def test_a_lease_journaled_under_the_old_nat_spelling_survives_the_upgrade(
    tmp_path: Path,
) -> None:
    """A pool-manager of an earlier release journaled "standard/nat_filtered": the lease
    is kept (its holder can still release it), not taken for an idle VM and destroyed."""

    class Listing(FakeBackend):
        async def list_vms(self, labels: dict[str, str]) -> list[common_pb2.VM]:
            return [common_pb2.VM(name="agent-vm-old1"), common_pb2.VM(name="agent-vm-old2")]

    settings = dataclasses.replace(
        Settings(), state_dir=tmp_path, pool_manager_addr=f"unix:{tmp_path}/p.sock"
    )
    be = Listing()
    be.alive |= {"agent-vm-old1", "agent-vm-old2"}
    manager = PoolManager(settings, cast(Any, be), {NAT: cfg(0, 2)})
    old = LeaseJournal(manager.journal.path)
    old.open()
    old.lease("l1", "agent-vm-old1", "standard/nat_filtered", {"o": "x"}, 1.0)
    old.close()
    await manager.start()
    try:
        assert [lease.lease_id for lease in manager.leases({})] == ["l1"]
        assert manager.pools[NAT].leased == 1
        assert be.destroyed == ["agent-vm-old2"]  # idle, left by the previous pool-manager
        pool, lease = manager.find_lease("l1")
        await pool.release(lease.lease_id)
    finally:
        await asyncio.gather(*(p.close() for p in manager.pools.values()))
        manager.journal.close()


def test_up_on_running_services_with_other_pools_points_at_pool_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agentvm.cli.bringup_cmds import _pending_env_note

    monkeypatch.setenv("AGENTVM_POOLS", "standard:min=3")
    _pending_env_note({"env": {"AGENTVM_POOLS": "standard:min=1"}})
    err = capsys.readouterr().err
    assert "AGENTVM_POOLS" in err
    assert "`agent-vm pool set KEY min=N max=N ttl=SECONDS`" in err
    from agentvm.cli.supervisor import env_digests

    _pending_env_note({"env": env_digests(os.environ)})  # what the supervisor records
    assert capsys.readouterr().err == ""
