"""The VM an image import or a spec build step runs in: ISOLATED (no NIC), the
standard profile, the disk being built as its image disk and the agent pivoted
into it; destroyed on every path. Its files count only after a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agentvm.common.errors import FailedPrecondition
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2
from agentvm.vm_manager.image_vms import configure_root
from agentvm.vm_manager.templates import Resources
from agentvm.vm_manager.vm import VM, VMState

# Marks build VMs (vm list shows them; "import" or "spec").
BUILD_LABEL = "agent-vm/image-build"
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def build_vm(
    manager: Any, disk: Path, kind: str, config: common_pb2.ImageConfig
) -> AsyncIterator[VM]:
    """A ready build VM on ``disk`` (``manager`` is the VMManager), Execute pivoted
    into it with ``config``."""
    vm = await manager.create(
        profile=ResourceProfile.STANDARD,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources.for_profile(ResourceProfile.STANDARD),
        labels={BUILD_LABEL: kind},
        start=True,
        build_disk=disk,
    )
    try:
        await manager.wait(vm.name, VMState.READY, READY_TIMEOUT_S)
        await configure_root(vm.agent_endpoint, config, 60.0)
        yield vm
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(manager.destroy(vm.name, f"image {kind} finished"))


async def stop_cleanly(manager: Any, vm: VM, what: str) -> None:
    """Shut ``vm`` down; FAILED_PRECONDITION when it had to be forced (its disk may
    then miss writes)."""
    _vm, forced = await manager.stop(vm.name, STOP_TIMEOUT_S, False)
    if forced:
        raise FailedPrecondition(
            f"{what}: the build VM {vm.name} did not shut down within {STOP_TIMEOUT_S:.0f} s, "
            f"so its files may be incomplete; try again (its console log is {vm.console_log})"
        )
