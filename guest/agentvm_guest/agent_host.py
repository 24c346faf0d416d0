"""What the host asks of and sets in its guest: status, identity, network, image root, power.

A mixin of :class:`agentvm_guest.agent.GuestAgent`: GetStatus, Shutdown,
ReseedRandom, ReclaimMemory, Reidentify, ConfigureNetwork, ConfigureRoot and
ApplyLayer. vm-manager calls these; the executor runs programs and moves
files through the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc

from agentvm.v1 import common_pb2, guest_agent_pb2
from agentvm_guest import __version__, imageroot, memory
from agentvm_guest.hostconf import configure_dhcp, configure_network, reidentify
from agentvm_guest.proctree import meminfo, read_first_line

log = logging.getLogger("agentvm_guest.agent")


def guest_info() -> common_pb2.GuestInfo:
    """What the agent reports about its VM."""
    info = common_pb2.GuestInfo(agent_version=__version__)
    uname = os.uname()
    info.kernel_release = uname.release
    info.hostname = uname.nodename
    uptime = read_first_line("/proc/uptime", "0 0").split()[0]
    info.uptime.FromNanoseconds(int(float(uptime) * 1e9))
    info.load1, info.load5, info.load15 = os.getloadavg()
    mem = meminfo()
    info.memory_total_bytes = mem.get("MemTotal", 0)
    info.memory_available_bytes = mem.get("MemAvailable", 0)
    st = os.statvfs("/")
    info.disk_total_bytes = st.f_blocks * st.f_frsize
    info.disk_free_bytes = st.f_bavail * st.f_frsize
    info.process_count = sum(1 for d in os.listdir("/proc") if d.isdigit())
    info.boot_id = read_first_line("/proc/sys/kernel/random/boot_id")
    info.machine_id = read_first_line("/etc/machine-id")
    return info


class HostService:
    """The host's view of and settings for its guest."""

    image: imageroot.ImageRoot

    def GetStatus(
        self, request: guest_agent_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.GetStatusResponse:
        return guest_agent_pb2.GetStatusResponse(info=guest_info())

    def Shutdown(
        self, request: guest_agent_pb2.ShutdownRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ShutdownResponse:
        threading.Thread(target=_power_off, daemon=True).start()
        return guest_agent_pb2.ShutdownResponse()

    def ReseedRandom(
        self, request: guest_agent_pb2.ReseedRandomRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReseedRandomResponse:
        if len(request.seed) < 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "seed must be at least 32 bytes")
        with open("/dev/urandom", "wb") as fh:
            fh.write(request.seed[:4096])
        return guest_agent_pb2.ReseedRandomResponse()

    def ReclaimMemory(
        self, request: guest_agent_pb2.ReclaimMemoryRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReclaimMemoryResponse:
        try:
            free, total = memory.reclaim()
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"cannot reclaim memory: {exc}")
        log.info("memory reclaimed: %d of %d MiB free", free >> 20, total >> 20)
        return guest_agent_pb2.ReclaimMemoryResponse(free_bytes=free, total_bytes=total)

    def Reidentify(
        self, request: guest_agent_pb2.ReidentifyRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReidentifyResponse:
        wall = request.wall_clock.ToNanoseconds() if request.HasField("wall_clock") else 0
        try:
            reidentify(request.hostname, request.machine_id, request.seed, wall)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"reidentify failed: {exc}")
        log.info("reidentified as %s", request.hostname)
        return guest_agent_pb2.ReidentifyResponse(info=guest_info())

    def ConfigureNetwork(
        self, request: guest_agent_pb2.ConfigureNetworkRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ConfigureNetworkResponse:
        try:
            if request.dhcp:
                if request.address or request.gateway or request.nameservers:
                    raise ValueError("dhcp excludes address, gateway and nameservers")
                address = configure_dhcp(request.mac)
            else:
                configure_network(
                    request.mac, request.address, request.gateway, list(request.nameservers)
                )
                address = request.address
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"network setup failed: {exc}")
        log.info("eth0 configured: %s", address)
        return guest_agent_pb2.ConfigureNetworkResponse(address=address)

    def ConfigureRoot(
        self, request: guest_agent_pb2.ConfigureRootRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ConfigureRootResponse:
        try:
            mount_point = self.image.configure(request)
        except imageroot.RootError as exc:
            context.abort(exc.code, str(exc))
        log.info("image root (disk %s) at %s", request.serial, mount_point)
        return guest_agent_pb2.ConfigureRootResponse(mount_point=mount_point)

    def ApplyLayer(
        self,
        request_iterator: Iterator[guest_agent_pb2.ApplyLayerRequest],
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.ApplyLayerResponse:
        try:
            result = self.image.apply_layer(request_iterator)
        except imageroot.RootError as exc:
            context.abort(exc.code, str(exc))
        return guest_agent_pb2.ApplyLayerResponse(
            entries=result.entries, whiteouts=result.whiteouts
        )


def _power_off() -> None:
    """Flush and power off; busybox init powers off on SIGUSR2."""
    time.sleep(0.2)
    os.sync()
    if os.getpid() != 1:
        with contextlib.suppress(OSError):
            os.kill(1, signal.SIGUSR2)
