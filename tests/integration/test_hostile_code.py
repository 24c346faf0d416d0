"""Hostile agent code in a real VM: each attack ends with its documented outcome.

The documented outcomes are in docs/SECURITY.md ("Agent code in the guest").
Every test also checks that the guest is still the same, healthy guest
(same boot id, the agent answers at once) and the host kept its bounds.
These tests share one VM of their own: they leave it as they found it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent_vm
from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc, vm_manager_pb2
from agentvm.vm_manager import workspace
from agentvm_guest.confine import PIDS_MAX
from tests.vmharness import (
    BOOT_TIMEOUT_S,
    ExecutorProcess,
    VMFactory,
    VMManagerProcess,
    execute,
    lone_vmm_process,
)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def lone_vmm(guest_image: Path) -> Iterator[VMManagerProcess]:
    """A vm-manager the session's monitor does not watch.

    The monitor would kill a fork bomb's VM within seconds (test_monitor.py
    proves that); these tests are about what the guest does on its own.
    """
    with lone_vmm_process() as proc:
        yield proc


@pytest.fixture(scope="module")
def victim(lone_vmm: VMManagerProcess) -> Iterator[common_pb2.VM]:
    f = VMFactory(lone_vmm)
    try:
        yield f.booted()
    finally:
        f.cleanup()


def status(vm: common_pb2.VM, timeout: float = 10) -> common_pb2.GuestInfo:
    with sync_channel(vm.agent_endpoint) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        return stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=timeout).info


@pytest.fixture
def healthy_after(victim: common_pb2.VM) -> Iterator[common_pb2.GuestInfo]:
    """The guest before the attack; afterwards: same boot, agent answers, nothing left running."""
    before = status(victim)
    yield before
    t = time.monotonic()
    status(victim)
    assert time.monotonic() - t < 5, "the agent is slow to answer after the attack"
    # Only the cgroup of this very command has processes, at most one empty
    # one is left (made ahead for the next command), and the process count is
    # back to normal (a big tree takes the guest a moment to reap).
    busy: list[str] = []
    idle: list[str] = []
    after = before
    for _ in range(30):
        out = sh(victim, LIST_CGROUPS)[1].split("\n")
        busy = [line for line in out if line.endswith(" busy")]
        idle = [line for line in out if line.endswith(" empty")]
        after = status(victim)
        if len(busy) == 1 and len(idle) <= 1 and after.process_count < before.process_count + 20:
            break
        time.sleep(1)
    assert len(busy) == 1, busy
    assert len(idle) <= 1, idle
    assert after.process_count < before.process_count + 20
    assert after.boot_id == before.boot_id, "the guest rebooted"


LIST_CGROUPS = (
    "for d in /sys/fs/cgroup/agentvm/exec-*; do "
    'if [ -n "$(cat $d/cgroup.procs)" ]; then echo "$d busy"; else echo "$d empty"; fi; done'
)


def sh(vm: common_pb2.VM, cmd: str, timeout: float = 60) -> tuple[int, str]:
    res = execute(vm.agent_endpoint, cmd, timeout=timeout)
    return res.status.exit_code, (res.stdout + res.stderr).decode(errors="replace")


def refused(vm: common_pb2.VM, cmd: str, message: str) -> str:
    """Run ``cmd``: it must fail, saying ``message`` (case-insensitive)."""
    rc, out = sh(vm, cmd)
    assert rc != 0, f"{cmd!r} succeeded: {out}"
    assert message.lower() in out.lower(), out
    return out


def test_fork_bomb_hits_the_process_limit(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    # The classic: every process forks two more, forever.
    res = execute(victim.agent_endpoint, "bomb() { bomb | bomb & }; bomb; sleep 8", timeout=8)
    usage = res.status.usage
    assert usage.pids_limit == PIDS_MAX
    assert usage.pids_limit_hits > 0, usage
    assert usage.pids_peak <= PIDS_MAX
    # Meanwhile the guest itself could still fork: the limit is per execution.
    assert sh(victim, "echo alive")[1] == "alive\n"


def test_memory_hog_is_killed_inside_its_cgroup(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    hog = "x = []\nwhile True:\n    x.append(bytearray(32 * 1024 * 1024))\n"
    res = execute(
        victim.agent_endpoint,
        common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=hog)
        ),
        timeout=120,
    )
    usage = res.status.usage
    assert res.status.signal == 9, res.status
    assert usage.oom_kills >= 1, usage
    total = healthy_after.memory_total_bytes
    assert 0 < usage.memory_limit_bytes < total
    # The kernel may charge a little past memory.max while it reclaims and kills
    # (seen: one page over); at most its per-CPU charge batch, 64 pages.
    assert usage.memory_peak_bytes <= usage.memory_limit_bytes + 64 * 4096
    # The agent was not the victim: same process, same boot.
    assert status(victim).memory_available_bytes > total - usage.memory_limit_bytes // 2


def test_cpu_spin_times_out_and_the_agent_keeps_answering(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    answers: list[float] = []

    def ask() -> None:
        time.sleep(2)
        t = time.monotonic()
        status(victim, timeout=20)
        answers.append(time.monotonic() - t)

    asker = threading.Thread(target=ask)
    asker.start()
    res = execute(victim.agent_endpoint, "while :; do :; done & while :; do :; done", timeout=6)
    asker.join()
    assert res.status.timed_out
    assert res.status.exit_code == 124
    assert res.status.usage.cpu_time.ToNanoseconds() > 1e9
    assert len(answers) == 1
    assert answers[0] < 5, answers


def test_disk_fill_ends_with_enospc_and_the_overlay_keeps_its_size(
    victim: common_pb2.VM, lone_vmm: VMManagerProcess, healthy_after: common_pb2.GuestInfo
) -> None:
    _rc, out = sh(victim, "dd if=/dev/zero of=/root/fill bs=1M 2>&1; df -k /; sync", timeout=600)
    assert "No space left on device" in out, out
    overlay = next((lone_vmm.state_dir / "vms" / victim.name).glob("*.qcow2"))
    disk_bytes = victim.resources.disk_mib * 2**20
    # qcow2 metadata is well under 1 %; the host never gives more than the disk.
    assert os.stat(overlay).st_blocks * 512 < disk_bytes * 1.02
    assert sh(victim, "rm /root/fill && echo removed")[1] == "removed\n"
    assert status(victim).disk_free_bytes > 256 * 2**20


def test_a_shared_workspace_fills_up_at_its_cap_and_leaves_nothing_mounted(
    lone_vmm: VMManagerProcess,
) -> None:
    """A shared (virtiofs) workspace writes onto the host: it is a file system of its
    own, as large as the VM's disk, so a guest that fills it gets ENOSPC and the
    host's state directory keeps its space; destroying the VM unmounts it."""
    f = VMFactory(lone_vmm)
    req = vm_manager_pb2.CreateVMRequest(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        start=True,
        shared_workspace=True,
        resources=common_pb2.Resources(disk_mib=2048),
        labels={"test": "1"},
    )
    vm = lone_vmm.stub().CreateVM(req, timeout=BOOT_TIMEOUT_S).vm
    f.names.append(vm.name)
    vm_dir = lone_vmm.state_dir / "vms" / vm.name
    image = vm_dir / "workspace.img"
    try:
        vm = f.wait_ready(vm.name)
        assert os.path.ismount(vm_dir / "workspace")
        assert (vm_dir / "workspace").stat().st_mode & 0o777 == 0o700
        # More than the cap at once: refused.
        refused(vm, "fallocate -l 3G /workspace/work/big", "No space left on device")
        # Nearly all of it, then plain writes until the file system is full.
        _rc, out = sh(
            vm,
            "rm -f /workspace/work/big && fallocate -l 1700M /workspace/work/big && "
            "head -c 419430400 /dev/zero > /workspace/output/more; echo rc=$?",
            timeout=300,
        )
        assert "No space left on device" in out, out
        assert os.stat(image).st_blocks * 512 <= 2048 * 2**20
        # The host side still reads what the guest wrote.
        assert (vm_dir / "workspace" / "output" / "more").stat().st_size > 0, out
    finally:
        f.cleanup()
    assert not vm_dir.exists()
    assert not workspace.mounts_under(vm_dir)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    assert str(image) not in loops.stdout


def test_100k_small_files(victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo) -> None:
    make = (
        "import os\nos.makedirs('/root/many')\nos.chdir('/root/many')\n"
        "for i in range(100_000):\n"
        "    fd = os.open(str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL)\n"
        "    os.write(fd, b'x')\n"
        "    os.close(fd)\n"
        "print(len(os.listdir('.')))\n"
    )
    res = execute(
        victim.agent_endpoint,
        common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=make)
        ),
        timeout=600,
    )
    assert (res.status.exit_code, res.stdout) == (0, b"100000\n"), res.stderr[-500:]
    assert sh(victim, "rm -rf /root/many && echo gone", timeout=600)[1] == "gone\n"


def test_kernel_memory_modules_and_mounts_are_refused(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    refused(victim, "head -c 16 /dev/mem", "Operation not permitted")
    iopl = (
        "python3 -c 'import ctypes, os; r = ctypes.CDLL(None, use_errno=True).iopl(3); "
        "print(os.strerror(ctypes.get_errno())); raise SystemExit(r != 0)'"
    )
    refused(victim, iopl, "Operation not permitted")
    module = "$(find /lib/modules -name '*.ko*' | head -n 1)"
    refused(victim, f'm={module}; test -n "$m" && insmod "$m"', "Operation not permitted")
    refused(victim, "mount -t tmpfs none /mnt", "permission denied")
    refused(victim, "date -s 2001-01-01", "Operation not permitted")
    # setuid and file capabilities cannot bring anything back.
    _rc, out = sh(victim, "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert fields["NoNewPrivs"] == "1"
    assert fields["CapEff"] == fields["CapBnd"]
    eff = int(fields["CapEff"], 16)
    for cap in (16, 17, 19, 21, 22, 25, 27):  # module, rawio, ptrace, admin, boot, time, mknod
        assert not eff & (1 << cap), hex(eff)


def test_code_cannot_leave_its_cgroup_nor_raise_its_limits(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    rc, out = sh(victim, "cat /proc/self/cgroup")
    assert out == "0::/\n", "the execution does not see its own cgroup as the root"
    rc, out = sh(victim, "echo $$ > /sys/fs/cgroup/cgroup.procs && cat /proc/self/cgroup")
    assert rc != 0, out
    own = "/sys/fs/cgroup/agentvm/$(ls /sys/fs/cgroup/agentvm)"
    rc, out = sh(victim, f"echo max > {own}/pids.max && cat {own}/pids.max")
    assert rc != 0, out
    rc, out = sh(victim, f"echo max > {own}/memory.max && cat {own}/memory.max")
    assert rc != 0, out


def test_forged_calls_toward_the_host_go_nowhere(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    # The agent's own socket is hidden from agent code ...
    out = sh(victim, "ls -A /run/agentvm; echo end")[1]
    assert out == "end\n", out
    # ... and the host channel is held by the agent: nobody else can open it
    # to speak to the host as if it were the agent.
    _rc, out = sh(
        victim,
        'for p in /dev/virtio-ports/* /dev/vport*; do [ -e "$p" ] || continue; '
        'echo forged > "$p" && echo "$p opened"; done; echo end',
    )
    assert "opened" not in out, out
    assert "end\n" in out, out
    assert "Device or resource busy" in out, out
    # Bytes the guest pushes at the host are never a call to it: the host relay
    # only carries host-initiated streams (tests/unit/test_host_relay.py), and
    # no host service listens where the guest can reach (test_network.py).


def test_agent_process_is_out_of_reach(
    victim: common_pb2.VM, healthy_after: common_pb2.GuestInfo
) -> None:
    find = (
        "for p in /proc/[0-9]*; do grep -qs agentvm_guest $p/cmdline && echo ${p#/proc/}; done"
        " | head -n 1"
    )
    pid = sh(victim, find)[1].strip()
    assert pid.isdigit()
    for what in ("environ", "mem", "root/run/agentvm"):
        refused(victim, f"cat /proc/{pid}/{what}", "Permission denied")
    assert sh(victim, f"cat /proc/{pid}/oom_score_adj")[1].strip() == "-900"
    assert sh(victim, "cat /proc/self/oom_score_adj")[1].strip() == "0"


def test_a_guest_kernel_panic_ends_only_its_own_run(executor: ExecutorProcess) -> None:
    """The panic takes the VM down (on_crash/on_reboot: destroy): a clear error, in bounded
    time, for that sandbox only."""
    with agent_vm.Sandbox.create() as bystander, agent_vm.Sandbox.create() as victim_sb:
        start = time.monotonic()
        with pytest.raises(agent_vm.AgentVMError) as err:
            victim_sb.run("echo c > /proc/sysrq-trigger; sleep 300", timeout=300)
        assert time.monotonic() - start < 60
        message = str(err.value)
        assert victim_sb.vm_name in message, message
        assert "stopped" in message or "gone" in message, message
        # Told apart from a guest that powered off by its console (vm_manager/console.py).
        assert "the guest kernel panicked (Kernel panic - not syncing" in message, message
        assert bystander.run("echo fine").stdout == "fine\n"
