"""Resource profiles, network modes and resource validation (vm_manager.templates)."""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET

import pytest

from agentvm.common import limits
from agentvm.common.errors import InvalidArgument
from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.v1 import common_pb2
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager import templates
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.templates import ImageFiles, Resources, VMTemplate


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (common_pb2.RESOURCE_PROFILE_UNSPECIFIED, ResourceProfile.STANDARD),
        (common_pb2.RESOURCE_PROFILE_LIGHT, ResourceProfile.LIGHT),
        (common_pb2.RESOURCE_PROFILE_STANDARD, ResourceProfile.STANDARD),
        (common_pb2.RESOURCE_PROFILE_INTENSIVE, ResourceProfile.INTENSIVE),
    ],
)
def test_resource_profile_from_proto(value: int, expected: ResourceProfile) -> None:
    assert ResourceProfile.from_proto(value) is expected


def test_resource_profile_covers_every_proto_value() -> None:
    for value in common_pb2.ResourceProfile.values():
        profile = ResourceProfile.from_proto(value)
        if value != common_pb2.RESOURCE_PROFILE_UNSPECIFIED:
            assert profile.to_proto() == value


@pytest.mark.parametrize("value", [4, 99, -1])
def test_resource_profile_unknown(value: int) -> None:
    with pytest.raises(InvalidArgument, match="LIGHT, STANDARD or INTENSIVE"):
        ResourceProfile.from_proto(value)


def test_resource_profile_values() -> None:
    assert (ResourceProfile.LIGHT.vcpus, ResourceProfile.LIGHT.memory_mib) == (1, 256)
    assert ResourceProfile.STANDARD.disk_mib == 4096
    assert ResourceProfile.INTENSIVE.cpu_quota_pct == 100
    assert ResourceProfile.INTENSIVE.blkio_weight == 800
    for p in ResourceProfile:
        # Every profile is itself valid.
        assert Resources.for_profile(p) == Resources(p.vcpus, p.memory_mib, p.disk_mib)
        assert 100 <= p.blkio_weight <= 1000
        assert 0 < p.cpu_quota_pct <= 100


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (common_pb2.NETWORK_MODE_UNSPECIFIED, NetworkMode.NAT_FILTERED),
        (common_pb2.NETWORK_MODE_NAT_FILTERED, NetworkMode.NAT_FILTERED),
        (common_pb2.NETWORK_MODE_ISOLATED, NetworkMode.ISOLATED),
        (common_pb2.NETWORK_MODE_BRIDGE, NetworkMode.BRIDGE),
    ],
)
def test_network_mode_from_proto(value: int, expected: NetworkMode) -> None:
    assert NetworkMode.from_proto(value) is expected
    if value != common_pb2.NETWORK_MODE_UNSPECIFIED:
        assert expected.to_proto() == value


@pytest.mark.parametrize("value", [4, 1000, -3])
def test_network_mode_unknown(value: int) -> None:
    with pytest.raises(InvalidArgument, match="NAT_FILTERED, ISOLATED or BRIDGE"):
        NetworkMode.from_proto(value)


@pytest.mark.parametrize(
    ("kind", "source", "filterref"),
    [("network", "agent-vm-nat", None), ("bridge", "br0", "clean-traffic")],
)
def test_a_nic_is_rendered_with_its_mac_tap_and_filter(
    kind: str, source: str, filterref: str | None
) -> None:
    tmpl = VMTemplate(
        profile=ResourceProfile.LIGHT,
        network_mode=NetworkMode.NAT_FILTERED if kind == "network" else NetworkMode.BRIDGE,
        resources=Resources.for_profile(ResourceProfile.LIGHT),
        accel=Accel.TCG,
        image=ImageFiles("/k", "/i"),
    )
    nic = dx.NetworkInterface(kind, source, "52:54:00:01:02:03", filterref, target="avt1234ab")
    xml = tmpl.domain(
        name="n", uuid="u", overlay="/o", console_log="/c", metadata=dx.Metadata({}), nic=nic
    ).to_xml()
    iface = ET.fromstring(xml).find("devices/interface")
    assert iface is not None
    assert iface.get("type") == kind
    assert iface.find("mac").get("address") == "52:54:00:01:02:03"  # type: ignore[union-attr]
    assert iface.find("source").get(kind) == source  # type: ignore[union-attr]
    assert iface.find("target").get("dev") == "avt1234ab"  # type: ignore[union-attr]
    assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    ref = iface.find("filterref")
    assert (ref.get("filter") if ref is not None else None) == filterref
    # Without a NIC (ISOLATED) there is no interface at all.
    bare = tmpl.domain(name="n", uuid="u", overlay="/o", console_log="/c", metadata=dx.Metadata({}))
    assert ET.fromstring(bare.to_xml()).find("devices/interface") is None


def test_resources_overrides() -> None:
    res = Resources.for_profile(ResourceProfile.LIGHT, vcpus=4, memory_mib=2048, disk_mib=10240)
    assert res == Resources(4, 2048, 10240)
    partial = Resources.for_profile(ResourceProfile.INTENSIVE, memory_mib=4096)
    assert partial == Resources(2, 4096, 8192)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"vcpus": limits.MAX_VCPUS + 1}, "vcpus"),
        ({"vcpus": -1}, "vcpus"),
        ({"memory_mib": 127}, "memory_mib"),
        ({"memory_mib": limits.MAX_MEMORY_MIB + 1}, "memory_mib"),
        ({"disk_mib": 2047}, "disk_mib"),
        ({"disk_mib": limits.MAX_DISK_MIB + 1}, "disk_mib"),
    ],
)
def test_resources_out_of_range(kw: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}="):
        Resources.for_profile(ResourceProfile.STANDARD, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"vcpus": limits.MAX_VCPUS},
        {"vcpus": 1},
        {"memory_mib": 128},
        {"memory_mib": limits.MAX_MEMORY_MIB},
        {"disk_mib": 2048},
        {"disk_mib": limits.MAX_DISK_MIB},
    ],
)
def test_resources_bounds_are_inclusive(kw: dict[str, int]) -> None:
    Resources.for_profile(ResourceProfile.STANDARD, **kw)


def test_random_mac() -> None:
    macs = {templates.random_mac(random.Random(seed)) for seed in range(50)}
    assert len(macs) > 40
    for mac in macs:
        assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    assert templates.random_mac(random.Random(1)) == templates.random_mac(random.Random(1))
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", templates.random_mac())
