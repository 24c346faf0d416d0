"""VMs whose workload runs in a named image (docs/IMAGES.md).

Such a VM boots the system root as every VM does and gets the image's root
file system as a second virtio-blk disk (``vdb``, serial
:data:`IMAGE_DISK_SERIAL`): a per-VM qcow2 overlay on the image's read-only
``root.qcow2``, so the image itself is never written. Once the agent
answers, vm-manager sends it ``ConfigureRoot`` with the image's defaults and
from then on every Execute runs pivoted into that root. An import's build VM
gets a fresh raw ext4 disk instead of an overlay (:mod:`.importer`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agentvm.common.errors import FailedPrecondition
from agentvm.common.grpc_util import guest_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.vm import VM

IMAGE_DISK_SERIAL = "agentvm-image"


def disk_element(path: Path, *, raw: bool = False) -> dx.Disk:
    """The second disk's ``<disk>``: the image root as ``vdb``, found by its serial."""
    return dx.Disk(
        source=str(path),
        target="vdb",
        driver_type="raw" if raw else "qcow2",
        serial=IMAGE_DISK_SERIAL,
    )


def create_overlay(vm: VM, base: Path, size_bytes: int) -> None:
    """The VM's writable layer over the image's ``root.qcow2`` (a thin qcow2)."""
    proc = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(base),
            "-F",
            "qcow2",
            str(vm.image_disk),
            str(size_bytes),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise FailedPrecondition(
            f"cannot create the image overlay of {vm.name} on {base}: {proc.stderr.strip()}; "
            "check the image with `agent-vm image inspect` and the cache directory's free space"
        )


async def configure_root(
    endpoint: str, config: common_pb2.ImageConfig, timeout: float
) -> guest_agent_pb2.ConfigureRootResponse:
    """Tell the guest agent to mount the image's root and run every Execute in it."""
    async with guest_channel(endpoint) as channel:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(channel)
        return await stub.ConfigureRoot(
            guest_agent_pb2.ConfigureRootRequest(serial=IMAGE_DISK_SERIAL, config=config),
            timeout=min(timeout, 30.0),
        )
