"""The executor and named images (issue 15): SandboxSpec.image reaches vm-manager and
the pool key, a bad one is refused before any VM is asked for, NOT_FOUND from
vm-manager passes through, and a command without a cwd takes the image's workdir."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from agentvm.common.config import Settings
from agentvm.common.errors import AgentVMError, InvalidArgument
from agentvm.executor.executor import AgentExecutor
from agentvm.executor.sandbox import SandboxState, default_cwd, image_ref
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    guest_agent_pb2,
    pool_manager_pb2,
    vm_manager_pb2,
)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=None
    )


class FakeVMM:
    def __init__(self, missing: str = "") -> None:
        self.creates: list[vm_manager_pb2.CreateVMRequest] = []
        self.missing = missing

    async def CreateVM(
        self, req: vm_manager_pb2.CreateVMRequest, timeout: float
    ) -> vm_manager_pb2.CreateVMResponse:
        self.creates.append(req)
        if req.image and req.image == self.missing:
            raise rpc_error(
                grpc.StatusCode.NOT_FOUND, f"no image {req.image!r}: `agent-vm image list`"
            )
        vm = common_pb2.VM(name=f"agent-vm-{len(self.creates)}", agent_endpoint="unix:/none")
        return vm_manager_pb2.CreateVMResponse(vm=vm)

    async def WaitVM(
        self, req: vm_manager_pb2.WaitVMRequest, timeout: float
    ) -> vm_manager_pb2.WaitVMResponse:
        vm = common_pb2.VM(
            name=req.name,
            state=common_pb2.VM_STATE_READY,
            agent_endpoint="unix:/none",
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        )
        return vm_manager_pb2.WaitVMResponse(vm=vm)

    async def DestroyVM(self, req: Any, timeout: float) -> Any:
        return vm_manager_pb2.DestroyVMResponse()

    async def SetVMRecord(
        self, req: vm_manager_pb2.SetVMRecordRequest, timeout: float
    ) -> vm_manager_pb2.SetVMRecordResponse:
        vm = common_pb2.VM(name=req.name, record_generation=req.expected_generation + 1)
        return vm_manager_pb2.SetVMRecordResponse(vm=vm)


class FakePool:
    """A pool-manager with pools for the built-in image only (as by default)."""

    def __init__(self) -> None:
        self.keys: list[pool_manager_pb2.PoolKey] = []

    async def AcquireVM(
        self, req: pool_manager_pb2.AcquireVMRequest, timeout: float
    ) -> pool_manager_pb2.AcquireVMResponse:
        self.keys.append(req.key)
        if req.key.image:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, "no pool for coder/standard/isolated")
        vm = common_pb2.VM(
            name="agent-vm-pool",
            agent_endpoint="unix:/none",
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        )
        return pool_manager_pb2.AcquireVMResponse(lease_id="l1", vm=vm, from_pool=True)


class Events:
    def __init__(self) -> None:
        self.created: list[str] = []

    def emit(self, type_: str, **attrs: Any) -> None:
        if type_ == "sandbox.created":
            self.created.append(attrs["image"])


def spec(image: str) -> executor_pb2.SandboxSpec:
    return executor_pb2.SandboxSpec(
        image=image,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        workspace_mode=common_pb2.WORKSPACE_MODE_API,
    )


async def create(ex: AgentExecutor, image: str) -> SandboxState:
    sb = await ex.create_sandbox(spec(image))
    await sb.channel.close(grace=None)
    return sb


def test_the_image_reaches_vm_manager_and_the_pool_key() -> None:
    async def body() -> None:
        vmm, pool, events = FakeVMM(), FakePool(), Events()
        ex = AgentExecutor(Settings(), cast(Any, vmm), cast(Any, pool), events=cast(Any, events))
        # No pool holds the image: the executor makes the VM, with the image.
        sb = await create(ex, "coder:1")
        assert [k.image for k in pool.keys] == ["coder:1"]
        [req] = vmm.creates
        assert req.image == "coder:1"
        assert sb.vm.name == "agent-vm-1"
        assert events.created == ["coder:1"]  # the audit record names the image
        # The built-in image, by name or by default: the pool's VM, key without image.
        for name in ("default", ""):
            sb = await create(ex, name)
            assert sb.lease_id == "l1"
            assert pool.keys[-1].image == ""
        assert events.created[1:] == ["default", "default"]
        # Without a pool-manager, CreateVM carries it too ("default" sent as "").
        ex2 = AgentExecutor(Settings(), cast(Any, vmm))
        await create(ex2, "default")
        await create(ex2, "0123abcd")
        assert [r.image for r in vmm.creates[1:]] == ["", "0123abcd"]

    asyncio.run(body())


@pytest.mark.parametrize(
    "image", ["Coder", "co der", "../x", "a" * 201, "-x", "x\n", "name/other", ":tag"]
)
def test_an_image_that_cannot_be_one_is_refused_before_any_vm(image: str) -> None:
    async def body() -> None:
        vmm = FakeVMM()
        ex = AgentExecutor(Settings(), cast(Any, vmm))
        with pytest.raises(InvalidArgument) as info:
            await ex.create_sandbox(spec(image))
        assert info.value.message.startswith("image ")
        assert "agent-vm image list" in info.value.message
        assert not vmm.creates

    asyncio.run(body())


def test_an_unknown_image_is_vm_managers_not_found_with_its_message() -> None:
    async def body() -> None:
        ex = AgentExecutor(Settings(), cast(Any, FakeVMM(missing="nosuch")))
        with pytest.raises(AgentVMError) as info:
            await ex.create_sandbox(spec("nosuch"))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert "no image 'nosuch'" in info.value.message

    asyncio.run(body())


class FakeCall:
    def __init__(self) -> None:
        self.events = [
            guest_agent_pb2.ExecuteResponse(started=common_pb2.ProcessStarted(pid=7)),
            guest_agent_pb2.ExecuteResponse(exited=common_pb2.ExitStatus(exit_code=0)),
        ]

    def __aiter__(self) -> AsyncIterator[guest_agent_pb2.ExecuteResponse]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[guest_agent_pb2.ExecuteResponse]:
        for ev in self.events:
            yield ev

    def cancel(self) -> None:
        pass


class RecordingAgent:
    def __init__(self) -> None:
        self.requests: list[guest_agent_pb2.ExecuteRequest] = []

    def Execute(self, req: guest_agent_pb2.ExecuteRequest, timeout: float) -> FakeCall:
        self.requests.append(req)
        return FakeCall()


class AgentSandbox(SandboxState):
    stub: Any

    @property
    def agent(self) -> Any:
        return self.stub


def sandbox_of(image: str, agent: RecordingAgent) -> AgentSandbox:
    sb = AgentSandbox(
        id="sb-1",
        spec=spec(image),
        vm=common_pb2.VM(name="agent-vm-1", network_mode=common_pb2.NETWORK_MODE_ISOLATED),
        workspace_mode=common_pb2.WORKSPACE_MODE_API,
        created_at=time.time(),
        expires_at=time.time() + 600,
        boot_duration=0.0,
        channel=cast(Any, None),
    )
    sb.stub = agent
    return sb


@pytest.mark.parametrize(
    ("image", "cwd", "sent"),
    [
        ("", "", "/workspace/work"),
        ("default", "", "/workspace/work"),
        ("coder", "", ""),  # the guest takes the image's workdir, else "/"
        ("coder", "/src", "/src"),
        ("", "/tmp", "/tmp"),
    ],
)
def test_a_command_without_cwd_runs_in_the_images_workdir(image: str, cwd: str, sent: str) -> None:
    async def body() -> None:
        ex = AgentExecutor(Settings(), cast(Any, FakeVMM()))
        agent = RecordingAgent()
        req = executor_pb2.ExecRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=["pwd"])), cwd=cwd
        )
        events = [ev async for ev in ex.exec(sandbox_of(image, agent), req)]
        assert events[-1].exited.exit_code == 0
        [greq] = agent.requests
        assert greq.cwd == sent
        await ex.close()

    asyncio.run(body())


def test_image_ref_and_default_cwd() -> None:
    assert image_ref("") == image_ref("default") == ""
    assert image_ref("coder:2") == "coder:2"
    assert image_ref("a" * 200) == "a" * 200
    assert default_cwd(spec("coder")) == ""
    assert default_cwd(spec("default")) == "/workspace/work"
