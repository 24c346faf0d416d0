"""NAT_FILTERED on real VMs, in the test world (tests/networld.py).

The vm-manager of the session routes its NAT network only into the test
world's namespace (uplink = the world's veth, plus a routing rule that makes
everything else unreachable), so none of these probes can leave the machine
even if agent-vm's filter were broken. Policy of the VMs here: the name
allowed.test on ports 80 and 22.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentvm.v1 import common_pb2, vm_manager_pb2
from tests.networld import BRIDGE_SERVER_IP, DNS_IP, HOST_IP, NAMES, NetWorld, bridge_world
from tests.vmharness import VMFactory, VMManagerProcess, execute, wait_for

ALLOWED = NAMES["allowed.test"]
OTHER = NAMES["other.test"]
POLICY = common_pb2.NetworkPolicy(allow_domains=["allowed.test"], ports=[80, 22])

# Runs in the guest: one probe per argument, JSON results on stdout.
PROBE = r"""
import json, socket, struct, sys

def resolve(name):
    try:
        return socket.gethostbyname(name)
    except OSError as exc:
        return f"ERR {exc}"

def connect(ip, port, src=""):
    s = socket.socket()
    s.settimeout(4)
    try:
        if src:
            s.bind((src, 0))
        s.connect((ip, int(port)))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return "OK " + s.recv(300).decode(errors="replace")
    except OSError as exc:
        return f"ERR {type(exc).__name__}" + (f" {exc.strerror}" if exc.errno else "")
    finally:
        s.close()

def dns_direct(server, name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(q, (server, 53))
        return "OK %d bytes" % len(s.recv(512))
    except OSError as exc:
        return f"ERR {type(exc).__name__}"

out = []
for arg in sys.argv[1:]:
    op, _, rest = arg.partition(":")
    out.append({"resolve": resolve, "connect": connect, "dns": dns_direct}[op](*rest.split(",")))
print(json.dumps(out))
"""


def probe(vm: common_pb2.VM, *ops: str) -> list[str]:
    code = common_pb2.Program(
        code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_PYTHON, source=PROBE, args=ops)
    )
    res = execute(vm.agent_endpoint, code, timeout=120)
    assert res.status.exit_code == 0, res.stderr.decode()
    out: list[str] = json.loads(res.stdout)
    return out


@contextlib.contextmanager
def serving(vm: common_pb2.VM, port: int) -> Iterator[None]:
    """An HTTP server in ``vm`` on ``port`` (an Execute's processes die with it,
    so it runs as a long Execute of its own), checked to answer locally."""
    ip = vm.network.address.split("/")[0]
    pidfile = f"/tmp/http-{port}.pid"
    cmd = f"echo $$ > {pidfile}; exec timeout 120 python3 -m http.server {port}"
    thread = threading.Thread(target=execute, args=(vm.agent_endpoint, cmd), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: probe(vm, f"connect:{ip},{port}")[0].startswith("OK"), 30)
        yield
    finally:
        execute(vm.agent_endpoint, f"kill $(cat {pidfile})")
        thread.join(30)


def egress(vmm: VMManagerProcess, name: str) -> list[common_pb2.EgressRecord]:
    req = vm_manager_pb2.WatchEgressRequest(name=name)
    return [r.record for r in vmm.stub().WatchEgress(req, timeout=30)]


def has(
    records: list[common_pb2.EgressRecord],
    kind: common_pb2.EgressKind.ValueType,
    verdict: common_pb2.EgressVerdict.ValueType,
    **fields: object,
) -> bool:
    return any(
        r.kind == kind
        and r.verdict == verdict
        and all(getattr(r, k) == v for k, v in fields.items())
        for r in records
    )


@pytest.fixture(scope="module")
def nat_vms(vmm: VMManagerProcess) -> Iterator[tuple[common_pb2.VM, common_pb2.VM]]:
    """Two NAT_FILTERED VMs (booted together) with the allowed.test policy."""
    f = VMFactory(vmm)
    try:
        made = [f.create(network=common_pb2.NETWORK_MODE_NAT_FILTERED, policy=POLICY) for _ in "ab"]
        a, b = (f.wait_ready(vm.name) for vm in made)
        yield a, b
    finally:
        f.cleanup()


def test_a_nat_vm_gets_its_address_and_only_the_gateway_as_resolver(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM],
) -> None:
    a, b = nat_vms
    assert a.network.address != b.network.address
    assert a.network_mode == common_pb2.NETWORK_MODE_NAT_FILTERED
    assert list(a.network.policy.allow_domains) == ["allowed.test"]
    assert list(a.network.policy.ports) == [22, 80]
    res = execute(
        a.agent_endpoint,
        "busybox ip -4 addr show eth0; cat /etc/resolv.conf; cat /sys/class/net/eth0/address",
    )
    text = res.stdout.decode()
    assert a.network.address in text
    assert f"nameserver {a.network.gateway}" in text
    assert a.network.mac in text


def test_allowed_name_resolves_and_connects_others_do_not(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    a, _ = nat_vms
    out = probe(
        a,
        "resolve:allowed.test",
        f"connect:{ALLOWED},80",
        f"connect:{ALLOWED},22",
        "resolve:other.test",
        "resolve:secret-data.exfil.example",
        f"connect:{OTHER},80",
        f"connect:{ALLOWED},8080",
        f"dns:{DNS_IP},allowed.test",
    )
    assert out[0] == ALLOWED
    # NAT: the world sees the host's uplink address, not the VM's.
    assert out[1].startswith("OK HTTP/1.0 200"), out[1]
    assert f"{ALLOWED}:80 saw {HOST_IP}" in out[1], out[1]
    assert f"{ALLOWED}:22 saw {HOST_IP}" in out[2], out[2]
    assert out[3].startswith("ERR"), out[3]
    assert out[4].startswith("ERR"), out[4]
    assert out[5].startswith("ERR"), out[5]  # a server of the world, but not allowed
    assert out[6].startswith("ERR"), out[6]  # an allowed host on a port not allowed
    assert out[7].startswith("ERR"), out[7]  # DNS to another resolver

    def logged() -> bool:
        recs = egress(vmm, a.name)
        dns, conn = common_pb2.EGRESS_KIND_DNS, common_pb2.EGRESS_KIND_CONNECT
        ok, no = common_pb2.EGRESS_VERDICT_ALLOWED, common_pb2.EGRESS_VERDICT_DENIED
        return all(
            [
                has(recs, dns, ok, name="allowed.test", address=ALLOWED),
                has(recs, dns, no, name="other.test"),
                has(recs, dns, no, name="secret-data.exfil.example"),
                has(recs, conn, ok, address=ALLOWED, port=80, name="allowed.test"),
                has(recs, conn, no, address=OTHER, port=80),
                has(recs, conn, no, address=ALLOWED, port=8080, reason="port 8080 not in ports"),
                has(recs, conn, no, address=DNS_IP, port=53, protocol="udp"),
            ]
        )

    assert wait_for(logged, 10), [str(r) for r in egress(vmm, a.name)]


def test_host_other_vms_and_spoofed_sources_are_unreachable(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    a, b = nat_vms
    b_ip = b.network.address.split("/")[0]
    spoof = str(ipaddress.IPv4Interface(a.network.address).network[200])
    execute(a.agent_endpoint, f"busybox ip addr add {spoof}/32 dev eth0")
    # B listens on 80 and answers itself, so a failure below is the filter's doing.
    with serving(b, 80):
        out = probe(
            a,
            f"connect:{b_ip},80",
            f"connect:{a.network.gateway},22",
            f"connect:{a.network.gateway},80",
            f"connect:{HOST_IP},22",
            "resolve:allowed.test",
            f"connect:{ALLOWED},80,{spoof}",
            f"connect:{ALLOWED},80",
        )
    # On the link, B is simply not there (isolated bridge ports: no ARP answer).
    assert out[0] == "ERR OSError No route to host", out
    # Dropped silently (a timeout), not refused: nothing there even answered.
    assert out[1:4] == ["ERR TimeoutError"] * 3, out
    # Routed through the gateway instead, A reaches the host's forward path,
    # where agent-vm's rule drops it.
    execute(a.agent_endpoint, f"busybox ip route add {b_ip}/32 via {a.network.gateway}")
    with serving(b, 80):
        assert probe(a, f"connect:{b_ip},80") == ["ERR TimeoutError"]
    execute(a.agent_endpoint, f"busybox ip route del {b_ip}/32")
    assert out[5].startswith("ERR"), out  # a source address that is not the VM's
    assert out[6].startswith("OK"), out  # the VM itself still works
    denied = common_pb2.EGRESS_KIND_CONNECT, common_pb2.EGRESS_VERDICT_DENIED

    def logged() -> bool:
        recs = egress(vmm, a.name)
        return all(
            [
                has(recs, *denied, address=b_ip, port=80, reason="other VMs are unreachable"),
                has(recs, *denied, address=a.network.gateway, port=22),
                has(recs, *denied, address=a.network.gateway, port=80),
                has(recs, *denied, address=HOST_IP, port=22),
            ]
        )

    assert wait_for(logged, 10), [str(r) for r in egress(vmm, a.name)]


# Runs in the guest: DNS queries sent as raw Ethernet frames with any source.
FORGE = r"""
import socket, struct, sys

def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF

def frame(src_mac, src_ip, dst_mac, dst_ip, name):
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(q), 0) + q
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    mac = lambda m: bytes.fromhex(m.replace(":", ""))
    return mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
gw_mac, gw_ip = sys.argv[1], sys.argv[2]
for spec in sys.argv[3:]:
    src_mac, src_ip, name = spec.split(",")
    s.send(frame(src_mac, src_ip, gw_mac, gw_ip, name))
print("sent")
"""


def test_a_vm_cannot_speak_as_another(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    """Raw frames from A carrying B's MAC and address (or a mix) never reach the
    resolver as B; the same frame with A's own identity does (so it is well formed)."""
    a, b = nat_vms
    gw_mac = (Path("/sys/class/net") / a.network.bridge / "address").read_text().strip()
    a_ip, b_ip = (vm.network.address.split("/")[0] for vm in (a, b))
    tag = secrets.token_hex(3)
    specs = [
        f"{a.network.mac},{a_ip},self-{tag}.test",
        f"{b.network.mac},{b_ip},as-b-{tag}.test",
        f"{a.network.mac},{b_ip},a-mac-b-ip-{tag}.test",
        f"{b.network.mac},{a_ip},b-mac-a-ip-{tag}.test",
    ]
    code = common_pb2.Program(
        code=common_pb2.Code(
            language=common_pb2.CODE_LANGUAGE_PYTHON,
            source=FORGE,
            args=[gw_mac, a.network.gateway, *specs],
        )
    )
    res = execute(a.agent_endpoint, code)
    assert res.stdout == b"sent\n", res.stderr

    def names() -> set[tuple[str, str]]:
        req = vm_manager_pb2.WatchEgressRequest()
        return {(r.record.vm_name, r.record.name) for r in vmm.stub().WatchEgress(req, timeout=30)}

    assert wait_for(lambda: (a.name, f"self-{tag}.test") in names(), 10)
    time.sleep(1)
    forged = {n for _vm, n in names() if tag in n and not n.startswith("self-")}
    assert not forged, forged


def test_the_world_cannot_connect_in(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], net_world: NetWorld, vmm: VMManagerProcess
) -> None:
    _, b = nat_vms
    b_ip = b.network.address.split("/")[0]
    subnet = str(ipaddress.IPv4Interface(b.network.address).network)
    ns = ["ip", "netns", "exec", net_world.ns]
    subprocess.run([*ns, "ip", "route", "replace", subnet, "via", HOST_IP], check=True)
    try:
        with serving(b, 8081):
            code = (
                "import socket; s = socket.socket(); s.settimeout(3); "
                f"print(s.connect_ex(('{b_ip}', 8081)))"
            )
            attempt = subprocess.run(
                [*ns, "python3", "-c", code], capture_output=True, text=True, check=False
            )
            assert attempt.stdout.strip() not in ("", "0"), attempt
    finally:
        subprocess.run([*ns, "ip", "route", "del", subnet], check=False)
    # The attempt reached the host and was dropped there (not lost on the way).
    assert wait_for(
        lambda: any("inbound" in r.reason and r.port == 8081 for r in egress(vmm, b.name)),
        10,
    )


def test_an_isolated_vm_has_no_network_at_all(shared_vm: common_pb2.VM) -> None:
    res = execute(shared_vm.agent_endpoint, "ls /sys/class/net")
    assert res.stdout.split() == [b"lo"]
    assert not shared_vm.HasField("network")


def test_a_new_policy_applies_at_once(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    _, b = nat_vms
    assert probe(b, "resolve:other.test")[0].startswith("ERR")
    new = common_pb2.NetworkPolicy(allow_domains=["other.test"], ports=[80])
    vm = (
        vmm.stub()
        .UpdateNetworkPolicy(
            vm_manager_pb2.UpdateNetworkPolicyRequest(name=b.name, policy=new), timeout=30
        )
        .vm
    )
    assert list(vm.network.policy.allow_domains) == ["other.test"]
    out = probe(b, "resolve:other.test", f"connect:{OTHER},80", "resolve:allowed.test")
    assert out[0] == OTHER
    assert out[1].startswith("OK"), out
    assert out[2].startswith("ERR"), out
    # The same policy again changes nothing: what the VM resolved stays reachable
    # without a new lookup (a real change forgets it, as allowed.test above).
    same = vm_manager_pb2.UpdateNetworkPolicyRequest(name=b.name, policy=new)
    assert vmm.stub().UpdateNetworkPolicy(same, timeout=30).vm.network == vm.network
    assert probe(b, f"connect:{OTHER},80")[0].startswith("OK")
    bad = common_pb2.NetworkPolicy(allow_domains=["bad name; drop"])
    req = vm_manager_pb2.UpdateNetworkPolicyRequest(name=b.name, policy=bad)
    with pytest.raises(grpc.RpcError) as err:
        vmm.stub().UpdateNetworkPolicy(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allow_domains" in (err.value.details() or "")


def test_the_network_survives_a_vm_manager_restart(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    """Killed or stopped, a restarted vm-manager re-creates resolver, tables and policies."""
    a, b = nat_vms
    for sig in (signal.SIGKILL, signal.SIGTERM):
        vmm.stop(sig)
        vmm.start()
        for vm in (a, b):
            req = vm_manager_pb2.WaitVMRequest(name=vm.name, state=common_pb2.VM_STATE_READY)
            req.timeout.FromSeconds(60)
            vmm.stub().WaitVM(req, timeout=70)
        got = vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=b.name), timeout=10).vm
        # b's policy was replaced by test_a_new_policy_applies_at_once: still in force.
        assert list(got.network.policy.allow_domains) == ["other.test"]
        assert got.network.address == b.network.address
        out = probe(a, "resolve:allowed.test", f"connect:{ALLOWED},80", f"connect:{OTHER},80")
        assert out[0] == ALLOWED
        assert out[1].startswith("OK"), out
        assert out[2].startswith("ERR"), out
        other, refused = probe(b, "resolve:other.test", "resolve:allowed.test")
        assert other == OTHER
        assert refused.startswith("ERR"), refused
    assert wait_for(
        lambda: has(
            egress(vmm, a.name),
            common_pb2.EGRESS_KIND_CONNECT,
            common_pb2.EGRESS_VERDICT_DENIED,
            address=OTHER,
        ),
        10,
    )


def test_watch_egress_follows_every_vm(
    nat_vms: tuple[common_pb2.VM, common_pb2.VM], vmm: VMManagerProcess
) -> None:
    """What the monitor consumes: one stream with the records of all VMs, as they happen."""
    a, b = nat_vms
    stream = vmm.stub().WatchEgress(vm_manager_pb2.WatchEgressRequest(follow=True), timeout=120)
    seen: list[common_pb2.EgressRecord] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):
            for resp in stream:
                seen.append(resp.record)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
        probe(a, "resolve:watch-a.test")
        probe(b, "resolve:watch-b.test")
        assert wait_for(
            lambda: (
                {("watch-a.test", a.name), ("watch-b.test", b.name)}
                <= {(r.name, r.vm_name) for r in seen}
            ),
            15,
        ), [str(r) for r in seen[-5:]]
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]
        thread.join(10)


def test_a_clone_of_a_nat_template_gets_its_own_address(
    vmm: VMManagerProcess, factory: VMFactory
) -> None:
    req = vm_manager_pb2.PrepareTemplateRequest(
        profile=common_pb2.RESOURCE_PROFILE_STANDARD,
        network_mode=common_pb2.NETWORK_MODE_NAT_FILTERED,
    )
    tpl = vmm.stub().PrepareTemplate(req, timeout=600).template
    assert tpl.key.endswith("-nat")
    started = time.monotonic()
    vm = factory.create(
        network=common_pb2.NETWORK_MODE_NAT_FILTERED, policy=POLICY, from_template=True
    )
    assert vm.from_template
    assert vm.state == common_pb2.VM_STATE_READY
    assert time.monotonic() - started < 60
    out = probe(vm, "resolve:allowed.test", f"connect:{ALLOWED},80", "resolve:other.test")
    assert out[0] == ALLOWED
    assert out[1].startswith("OK"), out
    assert out[2].startswith("ERR"), out
    mac = execute(vm.agent_endpoint, "cat /sys/class/net/eth0/address").stdout.decode().strip()
    assert mac == vm.network.mac
    factory.destroy(vm.name)
    vmm.stub().DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=tpl.key), timeout=30)


def test_bridge_mode_gets_dhcp_and_cannot_spoof(factory: VMFactory) -> None:
    with bridge_world() as lan:
        made = factory.create(network=common_pb2.NETWORK_MODE_BRIDGE, bridge=lan.bridge)
        vm = factory.wait_ready(made.name)
        assert vm.network.bridge == lan.bridge
        assert vm.network.address.startswith("198.19.0.1"), vm.network  # .100-.120
        ip = vm.network.address.split("/")[0]
        mac = execute(vm.agent_endpoint, "cat /sys/class/net/eth0/address").stdout.decode()
        assert mac.strip() == vm.network.mac
        execute(vm.agent_endpoint, "busybox ip addr add 198.19.0.200/24 dev eth0")
        out = probe(
            vm, f"connect:{BRIDGE_SERVER_IP},80", f"connect:{BRIDGE_SERVER_IP},80,198.19.0.200"
        )
        assert out[0].startswith("OK"), out
        assert f"saw {ip}" in out[0], out  # no NAT on a bridge
        assert out[1].startswith("ERR"), out  # clean-traffic: not the address it leased
        factory.destroy(vm.name)


def test_bridge_mode_needs_an_existing_bridge(vmm: VMManagerProcess) -> None:
    for bridge, code, words in (
        ("", grpc.StatusCode.INVALID_ARGUMENT, "needs bridge"),
        ("avmb-nosuch", grpc.StatusCode.FAILED_PRECONDITION, "no bridge named avmb-nosuch"),
        ("lo", grpc.StatusCode.FAILED_PRECONDITION, "no bridge named lo"),
        ("x y", grpc.StatusCode.INVALID_ARGUMENT, "interface name"),
    ):
        req = vm_manager_pb2.CreateVMRequest(
            network_mode=common_pb2.NETWORK_MODE_BRIDGE, bridge=bridge
        )
        with pytest.raises(grpc.RpcError) as err:
            vmm.stub().CreateVM(req, timeout=30)
        assert err.value.code() == code
        assert words in (err.value.details() or "")
