"""Hostile guests against the network modes (issue 22, items 5 and 6), on real VMs.

Everything stays inside the tests' own namespaces: the NAT VM's traffic is
routed only into the test world (tests/networld.py), the bridged VMs sit on
a bridge this module creates whose only other port leads into a namespace.

* A DNS answer for an allowlisted name never opens the host's own network
  (the world's "host LAN", 198.18.1.0/24 on the uplink, special-purpose
  space as well): the guest gets no address, the firewall stays shut, a
  listener on the neighbour sees nothing, the egress log says why.
* BRIDGE mode refuses agent-vm's own bridges; bridged VMs are isolated from
  each other and cannot send frames under another MAC or address.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.integration.test_network import ALLOWED, FORGE, egress, has, probe, serving
from tests.networld import (
    BRIDGE_SERVER_IP,
    LAN_HOST_IP,
    LAN_NAMES,
    BridgeWorld,
    NetWorld,
    bridge_world,
)
from tests.vmharness import VMFactory, VMManagerProcess, execute, wait_for

NEIGHBOUR = LAN_NAMES["lan.test"]
# The rebinding attacker's policy: its own name next to a legitimate one.
POLICY = common_pb2.NetworkPolicy(allow_domains=["allowed.test", "lan.test"], ports=[80, 22])

# Runs in a namespace: prints "ready", then one line per TCP connection (the
# peer) or UDP datagram (the DNS name it carries).
LISTEN = r"""
import socket, sys
ip, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
if proto == "tcp":
    s.listen(16)
print("ready", flush=True)
while True:
    if proto == "tcp":
        c, peer = s.accept()
        print(peer[0], flush=True)
        c.close()
    else:
        data, peer = s.recvfrom(2048)
        labels, i = [], 12
        while i < len(data) and data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode(errors="replace"))
            i += 1 + data[i]
        print(".".join(labels), flush=True)
"""


@contextlib.contextmanager
def listener(ns: str, ip: str, port: int, proto: str) -> Iterator[list[str]]:
    """What a listener in namespace ``ns`` saw (lines, filled while it runs)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", LISTEN, ip, str(port), proto],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        reader = threading.Thread(target=lambda: seen.extend(iter_lines(proc)), daemon=True)
        reader.start()
        yield seen
    finally:
        proc.kill()
        proc.wait(10)


def iter_lines(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield line.strip()


@pytest.fixture(scope="module")
def nat_vm(vmm: VMManagerProcess) -> Iterator[common_pb2.VM]:
    """A NAT_FILTERED VM whose policy allows allowed.test and the attacker's lan.test."""
    f = VMFactory(vmm)
    try:
        made = f.create(network=common_pb2.NETWORK_MODE_NAT_FILTERED, policy=POLICY)
        yield f.wait_ready(made.name)
    finally:
        f.cleanup()


def test_an_allowlisted_name_never_opens_the_hosts_own_network(
    nat_vm: common_pb2.VM, net_world: NetWorld, vmm: VMManagerProcess
) -> None:
    """lan.test is allowlisted, but its DNS (the attacker's) answers with a neighbour
    on the host's LAN: the guest gets no address, cannot connect to it either, and
    the listener there sees nothing, while the world's internet still works."""
    with listener(net_world.ns, NEIGHBOUR, 80, "tcp") as seen:
        # The listener is live and reachable (from the host, which is on that LAN).
        socket.create_connection((NEIGHBOUR, 80), timeout=5).close()
        assert wait_for(lambda: seen == [LAN_HOST_IP], 10), seen
        out = probe(
            nat_vm, "resolve:lan.test", f"connect:{NEIGHBOUR},80", "resolve:allowed.test",
            f"connect:{ALLOWED},80",
        )  # fmt: skip
        # Rebound to the LAN: no address for the guest, and the firewall stays shut.
        assert out[0].startswith("ERR"), out
        assert out[1] == "ERR TimeoutError", out
        # The world's internet (opened by AGENTVM_NAT_DNS_ALLOW_PRIVATE) still works.
        assert out[2] == ALLOWED, out
        assert out[3].startswith("OK"), out
        assert seen == [LAN_HOST_IP], seen  # nothing from the VM
    dns_kind = common_pb2.EGRESS_KIND_DNS, common_pb2.EGRESS_VERDICT_DENIED
    connect = common_pb2.EGRESS_KIND_CONNECT, common_pb2.EGRESS_VERDICT_DENIED

    def logged() -> bool:
        recs = egress(vmm, nat_vm.name)
        refused = [
            r
            for r in recs
            if (r.kind, r.verdict) == dns_kind and r.name == "lan.test" and r.address == NEIGHBOUR
        ]
        return bool(refused) and has(recs, *connect, address=NEIGHBOUR, port=80)

    assert wait_for(logged, 10), [str(r) for r in egress(vmm, nat_vm.name)]
    reasons = {r.reason for r in egress(vmm, nat_vm.name) if r.name == "lan.test" and r.address}
    assert any("host's own network 198.18.1.0/24" in r for r in reasons), reasons


def test_bridge_mode_refuses_agent_vms_own_bridges(
    nat_vm: common_pb2.VM, vmm: VMManagerProcess
) -> None:
    """The session vm-manager's NAT bridge (it exists: nat_vm is on it), and any
    bridge named like another vm-manager's, are refused with what to do instead."""
    own = nat_vm.network.bridge
    assert (Path("/sys/class/net") / own / "bridge").is_dir()
    before = {vm.name for vm in vmm.stub().ListVMs(vm_manager_pb2.ListVMsRequest()).vms}
    other = f"avb{secrets.token_hex(2)}"
    for bridge in (own, other):
        req = vm_manager_pb2.CreateVMRequest(
            network_mode=common_pb2.NETWORK_MODE_BRIDGE, bridge=bridge, labels={"test": "1"}
        )
        with pytest.raises(grpc.RpcError) as err:
            vmm.stub().CreateVM(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert f"bridge {bridge} is (named as) the bridge of an agent-vm NAT network" in details
        assert "ip link add br-agents type bridge" in details
        assert "NETWORK_MODE_NAT_FILTERED" in details
    after = {vm.name for vm in vmm.stub().ListVMs(vm_manager_pb2.ListVMsRequest()).vms}
    assert not after - before  # nothing was created (an earlier test's VM may go meanwhile)


@pytest.fixture(scope="module")
def lan() -> Iterator[BridgeWorld]:
    with bridge_world() as world:
        yield world


@pytest.fixture(scope="module")
def bridged_vms(
    vmm: VMManagerProcess, lan: BridgeWorld
) -> Iterator[tuple[common_pb2.VM, common_pb2.VM]]:
    f = VMFactory(vmm)
    try:
        made = [f.create(network=common_pb2.NETWORK_MODE_BRIDGE, bridge=lan.bridge) for _ in "ab"]
        a, b = (f.wait_ready(vm.name) for vm in made)
        yield a, b
    finally:
        f.cleanup()


def test_bridged_vms_cannot_reach_each_other(
    bridged_vms: tuple[common_pb2.VM, common_pb2.VM],
) -> None:
    """Two VMs on the same user bridge: each reaches the LAN, never the other
    (port isolation of agent-vm's bridged taps)."""
    a, b = bridged_vms
    b_ip = b.network.address.split("/")[0]
    with serving(b, 8000):
        out = probe(a, f"connect:{b_ip},8000", f"connect:{BRIDGE_SERVER_IP},80")
    assert out[0].startswith("ERR"), out
    assert out[1].startswith("OK"), out


def test_a_bridged_vm_cannot_send_frames_as_someone_else(
    bridged_vms: tuple[common_pb2.VM, common_pb2.VM], lan: BridgeWorld
) -> None:
    """Raw frames from A under B's MAC, a made-up MAC, or an address it did not
    lease never leave its tap; the same frame under its own identity does."""
    a, b = bridged_vms
    a_ip, b_ip = (vm.network.address.split("/")[0] for vm in (a, b))
    peer = f"avmb-{lan.tag}p"
    server_mac = subprocess.run(
        ["ip", "netns", "exec", lan.ns, "cat", f"/sys/class/net/{peer}/address"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tag = secrets.token_hex(3)
    specs = [
        f"{b.network.mac},{b_ip},as-b-{tag}.test",
        f"{b.network.mac},{a_ip},b-mac-{tag}.test",
        f"52:54:00:12:34:56,{a_ip},made-up-mac-{tag}.test",
        f"{a.network.mac},198.19.0.200,other-ip-{tag}.test",
        f"{a.network.mac},{a_ip},self-{tag}.test",  # last: when it is there, all are
    ]
    with listener(lan.ns, BRIDGE_SERVER_IP, 53, "udp") as seen:
        code = common_pb2.Program(
            code=common_pb2.Code(
                language=common_pb2.CODE_LANGUAGE_PYTHON,
                source=FORGE,
                args=[server_mac, BRIDGE_SERVER_IP, *specs],
            )
        )
        res = execute(a.agent_endpoint, code)
        assert res.stdout == b"sent\n", res.stderr
        assert wait_for(lambda: f"self-{tag}.test" in seen, 10), seen
    assert [n for n in seen if tag in n] == [f"self-{tag}.test"], seen


def test_another_bridged_vm_coming_and_going_keeps_the_learnt_leases(
    bridged_vms: tuple[common_pb2.VM, common_pb2.VM], lan: BridgeWorld, vmm: VMManagerProcess
) -> None:
    """The bridged taps' table is updated when a VM is created or destroyed; A's
    lease, learnt at its boot, must survive both (A does not ask DHCP again)."""
    a, _ = bridged_vms
    f = VMFactory(vmm)
    try:
        c = f.create(network=common_pb2.NETWORK_MODE_BRIDGE, bridge=lan.bridge, start=False)
        assert probe(a, f"connect:{BRIDGE_SERVER_IP},80")[0].startswith("OK")
        f.destroy(c.name)
        assert probe(a, f"connect:{BRIDGE_SERVER_IP},80")[0].startswith("OK")
    finally:
        f.cleanup()


def test_bridged_taps_stay_filtered_across_a_vm_manager_restart(
    bridged_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    """A restarted vm-manager adopts the bridged VMs and re-applies their table:
    A still reaches the LAN under its own address, still never B, and a forged
    source still does not leave its tap. (The guests take their leases again
    after the restart; that a table update keeps the leases of running VMs is
    test_nftables' test_the_bridged_taps_table_loads_and_keeps_learnt_leases.)"""
    a, b = bridged_vms
    b_ip = b.network.address.split("/")[0]
    vmm.stop(signal.SIGTERM)
    vmm.start()
    for vm in (a, b):
        req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
        req.timeout.FromSeconds(60)
        vmm.stub().WaitVM(req, timeout=70)
    execute(a.agent_endpoint, "busybox ip addr replace 198.19.0.200/24 dev eth0")
    out = probe(
        a, f"connect:{BRIDGE_SERVER_IP},80", f"connect:{b_ip},8001",
        f"connect:{BRIDGE_SERVER_IP},80,198.19.0.200",
    )  # fmt: skip
    assert out[0].startswith("OK"), out
    # Nothing listens on B's 8001: reachable, B would refuse; isolated, B is not there.
    assert out[1] == "ERR OSError No route to host", out
    assert out[2].startswith("ERR"), out
