"""A guest whose root replaces the agent cannot exhaust vm-manager nor slow other VMs.

Issue 22, item 2, on real VMs. Agent code runs as root in the guest (with a
reduced capability set, see guest/agentvm_guest/confine.py, which leaves it
CAP_KILL and write access to the root file system): it replaces the guest's
agent program (/usr/local/sbin/agentvm-agent, which the guest's init
respawns) with a program that opens the virtio-serial port, writes bytes that
are not frames (so the host ends its session) and then reads and drops
everything, never answering a SYNC, and kills the running agent. Nothing
test-only is involved: this is what any guest root (or guest kernel) can do.

The host then connects to that VM's agent socket 300 times and keeps the
connections open, while callers ask both that VM and a healthy one. The
test counts the open descriptors of the test's own vm-manager process
(/proc/PID/fd).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm.vm_manager import relay as relay_mod
from agentvm.vm_manager import relay_refuse
from tests.vmharness import VMFactory, VMManagerProcess, execute, lone_vmm_process, wait_for

pytestmark = pytest.mark.vm

FLOOD = 300
# What one hostile VM may add to vm-manager's descriptors: every client
# connection the relay carries or lets wait, those being answered UNAVAILABLE,
# its connection to the guest's port, and a little for vm-manager's own
# bookkeeping meanwhile (log files, libvirt calls).
BOUND = relay_mod.MAX_CLIENTS + relay_mod.MAX_REFUSING + 1 + 8

# The program that takes the agent's place (run by the guest's init, as root).
IMPOSTOR = r"""#!/usr/bin/python3
import glob, os, time

def port():
    for entry in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(entry) as fh:
            if fh.read().strip() == "org.agentvm.agent.0":
                return "/dev/" + entry.split("/")[-2]
    raise OSError("no port")

while True:
    try:
        fd = os.open(port(), os.O_RDWR)
        break
    except OSError:
        time.sleep(0.1)
os.write(fd, b"\xff" * 64)  # not a frame: the host ends its session
while True:  # read and drop everything; never answer
    if not os.read(fd, 65536):
        time.sleep(0.05)
"""

TAKEOVER = f"""
import os, signal
with open("/usr/local/sbin/agentvm-agent.new", "w") as fh:
    fh.write({IMPOSTOR!r})
os.chmod("/usr/local/sbin/agentvm-agent.new", 0o755)
os.rename("/usr/local/sbin/agentvm-agent.new", "/usr/local/sbin/agentvm-agent")
agents = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{{pid}}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\\0")
    except OSError:
        continue
    if argv[1:3] == [b"-m", b"agentvm_guest"]:
        agents.append(int(pid))
print("agents", agents, flush=True)
for pid in agents:
    os.kill(pid, signal.SIGKILL)
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def call_status(vm: common_pb2.VM, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    """GetStatus on a channel of its own: (OK, agent version) or (code, details)."""
    with sync_channel(vm.agent_endpoint) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        try:
            resp = stub.GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            call: Any = exc
            return call.code(), str(call.details())
        return grpc.StatusCode.OK, resp.info.agent_version


class Flood:
    """``n`` connections to an agent socket, each sending the HTTP/2 preface, held open."""

    def __init__(self, path: str, n: int) -> None:
        self.socks: list[socket.socket] = []
        self.connect_errors: list[OSError] = []
        self._thread = threading.Thread(target=self._run, args=(path, n), daemon=True)
        self._thread.start()

    def _run(self, path: str, n: int) -> None:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socks.append(s)
            try:
                s.connect(path)
            except OSError as exc:
                self.connect_errors.append(exc)
                continue
            # Past the relay's caps it hangs up at once: then this write fails.
            with contextlib.suppress(OSError):
                s.sendall(relay_refuse.PREFACE)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def close(self) -> None:
        self._thread.join(30)
        for s in self.socks:
            s.close()


@pytest.fixture(scope="module")
def lone_vmm(guest_image: Path) -> Iterator[VMManagerProcess]:
    """A vm-manager of this module's own: its descriptors are these tests' alone."""
    with lone_vmm_process() as proc:
        yield proc


def test_a_guest_that_replaces_its_agent_costs_the_host_bounded_descriptors(
    lone_vmm: VMManagerProcess,
) -> None:
    assert lone_vmm.proc is not None
    pid = lone_vmm.proc.pid
    f = VMFactory(lone_vmm)
    flood: Flood | None = None
    try:
        victim = f.booted()
        bystander = f.booted()
        assert call_status(victim)[0] is grpc.StatusCode.OK
        assert call_status(bystander)[0] is grpc.StatusCode.OK
        before = open_fds(pid)

        # The guest's root takes the port over. The Execute itself dies with the agent.
        with pytest.raises(grpc.RpcError):
            execute(
                victim.agent_endpoint,
                common_pb2.Program(
                    code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=TAKEOVER)
                ),
                timeout=60,
            )
        # The impostor holds the port once calls stop being answered.
        assert wait_for(lambda: call_status(victim, timeout=20)[0] is not grpc.StatusCode.OK, 180)
        baseline = open_fds(pid)

        # 300 connections held open; vm-manager's descriptors are sampled throughout.
        peak = baseline
        flood = Flood(victim.agent_endpoint.removeprefix("unix:"), FLOOD)
        # Sampled until the relay has answered or dropped every one of them (its
        # descriptors back near the baseline although all 300 are still open on
        # this side), or for 30 s after the last connect.
        give_up = None
        while True:
            fds = open_fds(pid)
            peak = max(peak, fds)
            if give_up is None and flood.done():
                give_up = time.monotonic() + 30
            if give_up is not None and (fds <= baseline + 2 or time.monotonic() > give_up):
                break
            time.sleep(0.02)
        assert flood.connect_errors == []
        sys.stderr.write(
            f"vm-manager descriptors: {before} before the attack, {baseline} after the "
            f"takeover, peak {peak} during {FLOOD} held connections (bound {baseline + BOUND})\n"
        )
        assert peak <= baseline + BOUND, (peak, baseline)
        # ...and it let go of every one although this side still holds them open.
        assert fds <= baseline + 2, (fds, baseline)

        # With the flood still held: callers of the hostile VM get UNAVAILABLE (not
        # their deadline) saying what is wrong and what to do, and the other VM
        # answers every call.
        for _ in range(5):
            code, details = call_status(victim, timeout=60)
            assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
            assert f"the guest agent of VM {victim.name} is not answering" in details
            assert "destroy the VM" in details
        latencies = []
        for _ in range(10):
            t = time.monotonic()
            assert call_status(bystander, timeout=60)[0] is grpc.StatusCode.OK
            latencies.append(time.monotonic() - t)
        sys.stderr.write(
            "bystander GetStatus during the flood: "
            + ", ".join(f"{x * 1000:.0f} ms" for x in latencies)
            + "\n"
        )
        assert open_fds(pid) <= baseline + BOUND

        # Destroying the hostile VM gives everything back.
        flood.close()
        f.destroy(victim.name)
        f.names.remove(victim.name)
        assert wait_for(lambda: open_fds(pid) <= before, timeout=30), (open_fds(pid), before)
        assert call_status(bystander)[0] is grpc.StatusCode.OK
    finally:
        if flood is not None:
            flood.close()
        f.cleanup()
