"""VM templates: resource profiles and network modes turned into domain XML."""

from __future__ import annotations

import random
from dataclasses import dataclass

from agentvm.common.errors import InvalidArgument
from agentvm.common.limits import MAX_DISK_MIB, MAX_MEMORY_MIB, MAX_VCPUS
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.accel import Accel
from agentvm_guest.mux import PORT_NAME

WORKSPACE_TAG = "workspace"


@dataclass(frozen=True)
class Resources:
    vcpus: int
    memory_mib: int
    disk_mib: int

    @classmethod
    def for_profile(
        cls, profile: ResourceProfile, vcpus: int = 0, memory_mib: int = 0, disk_mib: int = 0
    ) -> Resources:
        """Profile values with non-zero overrides, validated."""
        res = cls(
            vcpus or profile.vcpus, memory_mib or profile.memory_mib, disk_mib or profile.disk_mib
        )
        if not 1 <= res.vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"vcpus={res.vcpus}: use 1 to {MAX_VCPUS}")
        if not 128 <= res.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidArgument(f"memory_mib={res.memory_mib}: use 128 to {MAX_MEMORY_MIB}")
        if not 2048 <= res.disk_mib <= MAX_DISK_MIB:
            raise InvalidArgument(f"disk_mib={res.disk_mib}: use 2048 to {MAX_DISK_MIB}")
        return res


def random_mac(rng: random.Random | None = None) -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    r = rng or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))


@dataclass(frozen=True)
class ImageFiles:
    kernel: str
    initrd: str


@dataclass(frozen=True)
class VMTemplate:
    """Everything that decides a VM's domain XML except its identity."""

    profile: ResourceProfile
    network_mode: NetworkMode
    resources: Resources
    accel: Accel
    image: ImageFiles
    memory_limit: bool = True
    # Whether the host can weight block I/O (hostcaps.io_weight_supported).
    io_weight: bool = True
    vsock: bool = False
    # Host directory shared at /workspace (virtiofs), and the virtiofsd to use.
    workspace_dir: str | None = None
    virtiofsd: str | None = None

    def domain(
        self,
        *,
        name: str,
        uuid: str,
        overlay: str,
        console_log: str,
        metadata: dx.Metadata,
        boot_name: str | None = None,
        qemu_args: tuple[str, ...] = (),
        nic: dx.NetworkInterface | None = None,
        image_disk: dx.Disk | None = None,
    ) -> dx.Domain:
        """The domain XML. ``boot_name`` (default ``name``) goes on the kernel
        command line; clones of a memory template keep the template's, so the
        firmware configuration matches the saved state exactly."""
        cmdline = " ".join(
            [
                "console=ttyS0",
                "quiet",
                "panic=-1",
                "tsc=reliable",
                "no_timer_check",
                "random.trust_cpu=on",
                f"agentvm.name={boot_name or name}",
            ]
        )
        devices: list[dx.Element] = [
            dx.Disk(source=overlay),
            *([image_disk] if image_disk is not None else []),
            dx.SerialConsole(log_file=console_log),
            dx.Controller("usb", "none"),
            dx.VirtioSerialChannel(name=PORT_NAME),
            dx.RNG(),
        ]
        if nic is not None:
            devices.append(nic)
        if self.vsock:
            devices.append(dx.Vsock())
        if self.workspace_dir is not None:
            devices.append(
                dx.VirtioFS(source_dir=self.workspace_dir, tag=WORKSPACE_TAG, binary=self.virtiofsd)
            )
        devices.append(dx.MemBalloon("virtio", free_page_reporting=True))
        period = 100_000
        memtune = None
        if self.memory_limit:
            # Guest RAM plus QEMU's own needs (TCG's translation cache is large).
            overhead = 256 if self.accel is Accel.KVM else 1024
            memtune = dx.MemTune(hard_limit_kib=(self.resources.memory_mib + overhead) * 1024)
        return dx.Domain(
            name=name,
            uuid=uuid,
            domain_type=self.accel.domain_type,
            memory_mib=self.resources.memory_mib,
            vcpus=self.resources.vcpus,
            os=dx.OSBoot(kernel=self.image.kernel, initrd=self.image.initrd, cmdline=cmdline),
            devices=tuple(devices),
            metadata=metadata,
            cputune=dx.CPUTune(
                period_us=period, quota_us=period * self.profile.cpu_quota_pct // 100
            ),
            memtune=memtune,
            blkiotune=dx.BlkioTune(weight=self.profile.blkio_weight) if self.io_weight else None,
            memory_backing=dx.MemoryBacking() if self.workspace_dir is not None else None,
            qemu_args=qemu_args,
        )
