"""What vm-manager promises is what the guest gets: the profile's disk, seen by
the workload, and boot durations reported by how the VM came up (cold boot,
restore from a memory template, revert to a memory snapshot)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.vmharness import MonitorProcess, VMFactory, VMManagerProcess, execute, wait_for

pytestmark = pytest.mark.vm

MiB = 1 << 20
# ext4's own metadata (inode tables, journal, group descriptors) is not in
# statvfs' f_blocks; on 2-8 GiB it is a few percent.
FS_OVERHEAD = 0.06
# Larger than the 2 GiB every root file system was before it was grown.
BEYOND_OLD_LIMIT = "2560M"

DISK_FIGURES = """
import json, os
out = {"device": int(open("/sys/block/vda/size").read()) * 512}
for p in ("/", "/workspace"):
    s = os.statvfs(p)
    out[p] = s.f_blocks * s.f_frsize
print(json.dumps(out))
"""


def disk_figures(vm: common_pb2.VM) -> dict[str, int]:
    prog = common_pb2.Program(
        code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=DISK_FIGURES)
    )
    res = execute(vm.agent_endpoint, prog)
    assert res.status.exit_code == 0, res.stderr
    figures: dict[str, int] = json.loads(res.stdout)
    return figures


def assert_sees_its_disk(vm: common_pb2.VM) -> None:
    """The block device is the VM's disk and the file systems the workload writes
    to (/ and /workspace, the same one here) span it, less ext4's overhead."""
    disk = vm.resources.disk_mib * MiB
    figures = disk_figures(vm)
    assert figures["device"] == disk, figures
    for path in ("/", "/workspace"):
        assert disk * (1 - FS_OVERHEAD) <= figures[path] <= disk, (path, figures, disk)


def fallocate(vm: common_pb2.VM, size: str) -> tuple[int, str]:
    """Reserve ``size`` in the workspace (allocated, not written: quick under TCG)."""
    res = execute(
        vm.agent_endpoint,
        f"fallocate -l {size} /workspace/work/big; rc=$?; rm -f /workspace/work/big; exit $rc",
    )
    return res.status.exit_code, res.stderr.decode()


def test_cold_booted_vms_get_the_disk_their_profile_promises(
    factory: VMFactory, shared_vm: common_pb2.VM
) -> None:
    assert shared_vm.profile == common_pb2.RESOURCE_PROFILE_STANDARD
    assert shared_vm.resources.disk_mib == 4096
    assert_sees_its_disk(shared_vm)
    code, err = fallocate(shared_vm, BEYOND_OLD_LIMIT)
    assert code == 0, err

    light = factory.booted(profile=common_pb2.RESOURCE_PROFILE_LIGHT)
    assert light.resources.disk_mib == 2048
    assert_sees_its_disk(light)
    # The light profile promises 2 GiB and no more.
    code, err = fallocate(light, BEYOND_OLD_LIMIT)
    assert code != 0
    assert "No space left" in err, err


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a local test URL
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def boots(samples: Samples) -> dict[str, float]:
    """Observations of agentvm_vm_boot_duration_seconds by kind."""
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "agentvm_vm_boot_duration_seconds_count":
            kind = dict(labels)["kind"]
            out[kind] = out.get(kind, 0.0) + v
    return out


def test_clones_get_the_templates_disk_and_each_boot_is_counted_by_kind(
    factory: VMFactory,
    vmm: VMManagerProcess,
    template: vm_manager_pb2.Template,
    monitor_proc: MonitorProcess,
) -> None:
    url = monitor_proc.metrics_url
    before = boots(scrape(url))

    def delta() -> dict[str, float]:
        now = boots(scrape(url))
        return {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}

    # A VM restored from the template: its disk came from the template, whose
    # profile fixed its size; the restore is one boot of kind "restore".
    vm = factory.clone()
    assert wait_for(lambda: delta() == {"restore": 1}, 20), delta()
    assert vm.from_template
    assert vm.resources.disk_mib == template.resources.disk_mib == 4096
    assert_sees_its_disk(vm)
    code, err = fallocate(vm, BEYOND_OLD_LIMIT)
    assert code == 0, err

    # Back to a memory snapshot (of a clone: started with -incoming, which the
    # snapshot must not keep): the agent answering again is a "snapshot" boot.
    stub = vmm.stub()
    execute(vm.agent_endpoint, "echo before > /dev/shm/mark")
    stub.CreateSnapshot(
        vm_manager_pb2.CreateSnapshotRequest(
            vm_name=vm.name, snapshot_name="s", include_memory=True
        ),
        timeout=300,
    )
    execute(vm.agent_endpoint, "echo after > /dev/shm/mark")
    stub.RestoreSnapshot(
        vm_manager_pb2.RestoreSnapshotRequest(vm_name=vm.name, snapshot_name="s"), timeout=300
    )
    again = factory.wait_ready(vm.name)
    assert again.boot_duration.ToNanoseconds() > 0
    assert execute(again.agent_endpoint, "cat /dev/shm/mark").stdout == b"before\n"
    assert wait_for(lambda: delta() == {"restore": 1, "snapshot": 1}, 20), delta()

    # Stopped and started, the clone boots cold from its own disk: one "cold" boot,
    # counted once.
    stub.StopVM(vm_manager_pb2.StopVMRequest(name=vm.name), timeout=60)
    stub.StartVM(vm_manager_pb2.StartVMRequest(name=vm.name), timeout=60)
    factory.wait_ready(vm.name)
    assert wait_for(lambda: delta() == {"restore": 1, "snapshot": 1, "cold": 1}, 20), delta()
