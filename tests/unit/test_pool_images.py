"""Pools of named images (issue 15): the image is part of the pool key, AGENTVM_POOLS
takes an ``IMAGE/`` prefix, and an image's VMs boot cold (no memory template yet)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from click.testing import CliRunner

from agentvm.cli import pool_cmds
from agentvm.cli.main import cli
from agentvm.common.errors import InvalidArgument, NotFound
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.monitor.metrics import pool_name
from agentvm.pool_manager.backend import POOL_KEY_LABEL, VMManagerBackend
from agentvm.pool_manager.manager import parse_pools
from agentvm.pool_manager.pool import PoolConfig, PoolKey, VMPool
from agentvm.pool_manager.servicer import key_from_proto, key_to_proto
from agentvm.v1 import common_pb2, pool_manager_pb2, vm_manager_pb2
from tests.unit.test_pool import FakeBackend, aio, cfg, settle

STD = ResourceProfile.STANDARD
ISO = NetworkMode.ISOLATED
NAT = NetworkMode.NAT_FILTERED


def test_every_earlier_spelling_still_means_the_built_in_image() -> None:
    pools = parse_pools("standard:min=2,max=10,network=nat-filtered;light:min=1")
    assert list(pools) == [PoolKey(STD, NAT), PoolKey(ResourceProfile.LIGHT, ISO)]
    assert all(key.image == "" for key in pools)
    # "default/" is the built-in image by name: the same key as no prefix.
    assert list(parse_pools("default/standard:min=1")) == [PoolKey(STD, ISO)]
    with pytest.raises(InvalidArgument, match="standard/isolated is listed twice"):
        parse_pools("standard:min=1;default/standard:max=2")


def test_an_image_prefix_makes_a_pool_of_that_image() -> None:
    pools = parse_pools(
        "coder/standard:min=1,max=4,network=isolated;coder:2/light:min=0,max=2,network=nat-filtered"
        ";standard:min=1"
    )
    assert pools == {
        PoolKey(STD, ISO, "coder"): PoolConfig(min_size=1, max_size=4, ttl_s=900),
        PoolKey(ResourceProfile.LIGHT, NAT, "coder:2"): PoolConfig(
            min_size=0, max_size=2, ttl_s=900
        ),
        PoolKey(STD, ISO): PoolConfig(min_size=1, max_size=4, ttl_s=900),
    }
    assert str(PoolKey(STD, ISO, "coder")) == "coder/standard/isolated"
    assert str(PoolKey(STD, NAT)) == "standard/nat-filtered"
    # One profile and network may have a pool per image.
    assert len(parse_pools("standard:min=1;coder/standard:min=1")) == 2


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("Coder/standard:min=1", ("AGENTVM_POOLS", "image 'Coder'")),
        ("/standard:min=1", ("no image before '/'",)),
        ("co der/standard:min=1", ("image 'co der'",)),
        ("coder/huge:min=1", ("unknown profile 'huge'",)),
        ("coder/standard:network=bridge", ("never pooled",)),
    ],
)
def test_a_bad_image_prefix_is_named(spec: str, words: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_pools(spec)
    for word in words:
        assert word in info.value.message, info.value.message


def test_keys_parse_and_travel_with_their_image() -> None:
    key = PoolKey(STD, NAT, "coder:1")
    assert PoolKey.parse(str(key)) == key
    assert PoolKey.parse("standard/isolated") == PoolKey(STD, ISO)
    assert PoolKey.parse("default/standard/isolated") == PoolKey(STD, ISO)
    with pytest.raises(InvalidArgument, match=r"\[IMAGE/\]PROFILE/NETWORK"):
        PoolKey.parse("a/b/standard/isolated")
    msg = key_to_proto(key)
    assert msg.image == "coder:1"
    assert key_from_proto(msg) == key
    default = pool_manager_pb2.PoolKey(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        image="default",
    )
    assert key_from_proto(default) == PoolKey(STD, ISO)
    with pytest.raises(InvalidArgument, match=r"key\.image"):
        key_from_proto(pool_manager_pb2.PoolKey(image="bad name"))
    assert pool_name(msg) == "coder:1/standard/nat-filtered"


@aio
async def test_a_named_images_pool_builds_its_template_and_restores_from_it() -> None:
    be = FakeBackend()
    pool = VMPool(PoolKey(STD, ISO, "coder"), cfg(2, 4), be)
    pool.start()
    await settle(pool, 2)
    assert be.prepares == 1
    assert pool.template_ready
    lease = await pool.acquire(1.0, {})
    await settle(pool, 2)
    assert be.created
    assert [t for _, t in be.created] == [True] * len(be.created)
    await pool.release(lease.lease_id)
    await pool.close()


class RecordingVMM:
    def __init__(self) -> None:
        self.creates: list[vm_manager_pb2.CreateVMRequest] = []
        self.prepares: list[vm_manager_pb2.PrepareTemplateRequest] = []

    async def CreateVM(
        self, req: vm_manager_pb2.CreateVMRequest, timeout: float
    ) -> vm_manager_pb2.CreateVMResponse:
        self.creates.append(req)
        vm = common_pb2.VM(name="agent-vm-x", state=common_pb2.VM_STATE_READY)
        return vm_manager_pb2.CreateVMResponse(vm=vm)

    async def PrepareTemplate(
        self, req: vm_manager_pb2.PrepareTemplateRequest, timeout: float
    ) -> vm_manager_pb2.PrepareTemplateResponse:
        self.prepares.append(req)
        return vm_manager_pb2.PrepareTemplateResponse()


@aio
async def test_the_backend_asks_vm_manager_for_the_image_and_its_template() -> None:
    vmm = RecordingVMM()
    be = VMManagerBackend(cast(Any, vmm), {"agent-vm/owner": "pool-manager"})
    await be.create(PoolKey(STD, ISO, "coder"), from_template=True)
    await be.create(PoolKey(STD, ISO), from_template=True)
    await be.prepare_template(PoolKey(STD, ISO, "coder"))
    await be.prepare_template(PoolKey(STD, ISO))
    named, builtin = vmm.creates
    assert named.image == "coder"
    assert named.from_template
    assert named.labels[POOL_KEY_LABEL] == "coder/standard/isolated"
    assert builtin.image == ""
    assert builtin.from_template
    assert [p.image for p in vmm.prepares] == ["coder", ""]
    await be.close()


def test_pool_set_and_status_show_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pool_cmds.parse_key("coder:1/standard/isolated").image == "coder:1"
    assert pool_cmds.parse_key("standard/isolated").image == ""
    assert pool_cmds.parse_key("default/standard/isolated").image == ""
    key = pool_manager_pb2.PoolKey(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        image="coder",
    )

    class Stub:
        def GetPoolStatus(self, *_: object, **__: object) -> object:
            return pool_manager_pb2.GetPoolStatusResponse(
                pools=[pool_manager_pb2.PoolStatus(key=key, min_size=1, max_size=2)]
            )

    monkeypatch.setattr(pool_cmds, "pool_stub", Stub)
    result = CliRunner().invoke(cli, ["pool", "status"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("coder/standard/isolated: ready 0")
    for bad in ("/standard/isolated", "a/b/standard/isolated", "coder/standard"):
        result = CliRunner().invoke(cli, ["pool", "set", bad, "min=1"])
        assert result.exit_code == 2, (bad, result.output)
        assert "[IMAGE/]PROFILE/NETWORK" in result.output


@aio
async def test_an_image_vm_manager_does_not_know_is_not_found_at_acquire_not_a_timeout() -> None:
    class NoSuchImage(FakeBackend):
        missing = True

        async def create(self, key: PoolKey, from_template: bool) -> common_pb2.VM:
            if self.missing:
                raise NotFound("no image 'coder' (agent-vm image list)")
            return await super().create(key, from_template)

    be = NoSuchImage()
    pool = VMPool(PoolKey(STD, ISO, "coder"), cfg(0, 2), be)
    pool.start()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NotFound, match="pool coder/standard/isolated: no image 'coder'"):
        await pool.acquire(30.0, {})
    assert loop.time() - start < 5
    # Once the image exists, the next acquire gets a VM.
    be.missing = False
    lease = await pool.acquire(30.0, {})
    assert lease.vm.name
    await pool.release(lease.lease_id)
    await pool.close()


def test_template_prepare_takes_an_image_and_list_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[vm_manager_pb2.PrepareTemplateRequest] = []
    image_id = "ab" * 32

    class Stub:
        def PrepareTemplate(
            self, req: vm_manager_pb2.PrepareTemplateRequest, **_: object
        ) -> vm_manager_pb2.PrepareTemplateResponse:
            seen.append(req)
            return vm_manager_pb2.PrepareTemplateResponse(built=True)

        def ListTemplates(self, *_: object, **__: object) -> vm_manager_pb2.ListTemplatesResponse:
            return vm_manager_pb2.ListTemplatesResponse(
                templates=[vm_manager_pb2.Template(key="k-image", workload_image_id=image_id)]
            )

    monkeypatch.setattr(pool_cmds, "vm_stub", Stub)
    args = ["template", "prepare", "--image", "coder", "--network", "isolated"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen[-1].image == "coder"
    assert seen[-1].network_mode == common_pb2.NETWORK_MODE_ISOLATED
    assert CliRunner().invoke(cli, ["template", "prepare"]).exit_code == 0
    assert seen[-1].image == ""
    listed = CliRunner().invoke(cli, ["template", "list"])
    assert listed.exit_code == 0, listed.output
    assert image_id[:12] in listed.output
