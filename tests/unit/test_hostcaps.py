"""Host capability probes (vm_manager/hostcaps.py) against made-up cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentvm.common.profiles import NetworkMode, ResourceProfile
from agentvm.vm_manager import domain_xml as dx
from agentvm.vm_manager.accel import Accel
from agentvm.vm_manager.hostcaps import io_weight_supported
from agentvm.vm_manager.templates import ImageFiles, Resources, VMTemplate


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # cgroup v1, mq-deadline (no weight file): libvirt would refuse the domain.
        ({"blkio/blkio.throttle.read_bps_device": ""}, False),
        ({"blkio/blkio.bfq.weight": "100"}, True),
        ({"blkio/blkio.weight": "500"}, True),
        ({"cgroup.controllers": "cpuset cpu io memory pids"}, True),
        ({"cgroup.controllers": "cpuset cpu memory pids"}, False),
        ({}, False),
    ],
)
def test_io_weight_is_offered_only_where_the_kernel_has_one(
    tmp_path: Path, files: dict[str, str], expected: bool
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert io_weight_supported(tmp_path) is expected


@pytest.mark.parametrize("io_weight", [True, False])
def test_the_domain_has_an_io_weight_only_when_the_host_can_apply_it(io_weight: bool) -> None:
    profile = ResourceProfile.STANDARD
    template = VMTemplate(
        profile=profile,
        network_mode=NetworkMode.ISOLATED,
        resources=Resources.for_profile(profile),
        accel=Accel.TCG,
        image=ImageFiles(kernel="/k", initrd="/i"),
        io_weight=io_weight,
    )
    xml = template.domain(
        name="agent-vm-x",
        uuid="6f1c1c9e-1111-2222-3333-444455556666",
        overlay="/o.qcow2",
        console_log="/c.log",
        metadata=dx.Metadata({}, {}),
    ).to_xml()
    assert ("<blkiotune>" in xml) is io_weight
