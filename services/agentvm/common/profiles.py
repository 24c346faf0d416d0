"""The VM shapes every service names: resource profiles and network modes.

Shared through common because the executor, the pool-manager and vm-manager
all translate them to and from the protos; only vm-manager turns them into
domain XML (vm_manager.templates).
"""

from __future__ import annotations

from enum import Enum

from agentvm.common.errors import InvalidArgument
from agentvm.v1 import common_pb2


class ResourceProfile(Enum):
    """Resource profiles: (vCPUs, memory MiB, disk MiB, CPU quota % per vCPU, I/O weight)."""

    LIGHT = (1, 256, 2048, 50, 200)
    STANDARD = (1, 512, 4096, 100, 500)
    INTENSIVE = (2, 1024, 8192, 100, 800)

    @property
    def vcpus(self) -> int:
        return self.value[0]

    @property
    def memory_mib(self) -> int:
        return self.value[1]

    @property
    def disk_mib(self) -> int:
        return self.value[2]

    @property
    def cpu_quota_pct(self) -> int:
        return self.value[3]

    @property
    def blkio_weight(self) -> int:
        return self.value[4]

    @classmethod
    def from_proto(cls, value: int) -> ResourceProfile:
        if value == common_pb2.RESOURCE_PROFILE_UNSPECIFIED:
            return cls.STANDARD
        names: dict[int, ResourceProfile] = {
            common_pb2.RESOURCE_PROFILE_LIGHT: cls.LIGHT,
            common_pb2.RESOURCE_PROFILE_STANDARD: cls.STANDARD,
            common_pb2.RESOURCE_PROFILE_INTENSIVE: cls.INTENSIVE,
        }
        if value not in names:
            raise InvalidArgument(
                f"unknown resource profile {value}: use LIGHT, STANDARD or INTENSIVE"
            )
        return names[value]

    def to_proto(self) -> common_pb2.ResourceProfile.ValueType:
        return {
            ResourceProfile.LIGHT: common_pb2.RESOURCE_PROFILE_LIGHT,
            ResourceProfile.STANDARD: common_pb2.RESOURCE_PROFILE_STANDARD,
            ResourceProfile.INTENSIVE: common_pb2.RESOURCE_PROFILE_INTENSIVE,
        }[self]


class NetworkMode(Enum):
    """Network modes. NAT_FILTERED is the default."""

    NAT_FILTERED = "nat_filtered"
    ISOLATED = "isolated"
    BRIDGE = "bridge"

    @classmethod
    def from_proto(cls, value: int) -> NetworkMode:
        mapping: dict[int, NetworkMode] = {
            common_pb2.NETWORK_MODE_UNSPECIFIED: cls.NAT_FILTERED,
            common_pb2.NETWORK_MODE_NAT_FILTERED: cls.NAT_FILTERED,
            common_pb2.NETWORK_MODE_ISOLATED: cls.ISOLATED,
            common_pb2.NETWORK_MODE_BRIDGE: cls.BRIDGE,
        }
        if value not in mapping:
            raise InvalidArgument(
                f"unknown network mode {value}: use NAT_FILTERED, ISOLATED or BRIDGE"
            )
        return mapping[value]

    def to_proto(self) -> common_pb2.NetworkMode.ValueType:
        return {
            NetworkMode.NAT_FILTERED: common_pb2.NETWORK_MODE_NAT_FILTERED,
            NetworkMode.ISOLATED: common_pb2.NETWORK_MODE_ISOLATED,
            NetworkMode.BRIDGE: common_pb2.NETWORK_MODE_BRIDGE,
        }[self]
