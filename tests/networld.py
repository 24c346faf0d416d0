"""A private "internet" for network tests: a namespace with DNS and servers.

Everything lives in a network namespace the test creates, reached from the
host over one veth pair on 198.18.0.0/24 (RFC 2544 benchmark addresses,
never routed on the internet). Nothing here sends a packet anywhere else,
and ``down`` removes the namespace, its processes and the veth pair, also
after a failed test.

    host avmw-<tag>h 198.18.0.1 <-veth-> avmw-<tag>p in netns avmw-<tag>:
        198.18.0.2   dnsmasq (the world's resolver)
        198.18.0.10  allowed.test  (HTTP on 80, TCP echo on 22 and 8080)
        198.18.0.11  other.test    (HTTP on 80)

    and a second network on the same veth that plays the host's own LAN:
    host 198.18.1.1/24, a "neighbour" 198.18.1.5 in the namespace, which the
    world's resolver gives out as lan.test (nothing listens there unless a
    test starts a listener).

All of it is in special-purpose space (198.18.0.0/15), which the NAT
resolver never opens from a DNS answer; the vm-manager of the tests lets the
world's internet through by configuration (``nat_env``:
AGENTVM_NAT_DNS_ALLOW_PRIVATE=198.18.0.0/24), not the LAN.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

HOST_IP = "198.18.0.1"
DNS_IP = "198.18.0.2"
NAMES = {"allowed.test": "198.18.0.10", "other.test": "198.18.0.11"}
# The world's "internet", opened to DNS answers by configuration.
WORLD_NET = "198.18.0.0/24"
# The host's LAN on the uplink, and a neighbour on it that a name points to.
LAN_HOST_IP = "198.18.1.1"
LAN_NET = "198.18.1.0/24"
LAN_NAMES = {"lan.test": "198.18.1.5"}
SERVER = r"""
import socket, sys, threading
def serve(addr, port, http):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, peer = s.accept()
        with c:
            c.settimeout(5)
            try:
                data = c.recv(4096)
            except OSError:
                continue
            body = f"{addr}:{port} saw {peer[0]}\n".encode()
            if http:
                c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            else:
                c.sendall(body + data)
for spec in sys.argv[1:]:
    a, p, kind = spec.split(":")
    threading.Thread(target=serve, args=(a, int(p), kind == "http"), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@dataclass
class _Namespace:
    """A namespace ``avmw-<tag>`` and the processes the test runs in it."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"avmw-{self.tag}"

    def _serve(self, *specs: str) -> None:
        """Start the TCP/HTTP servers ``addr:port:kind`` inside, and wait for them."""
        srv = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, *specs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tempfile.gettempdir(),
        )
        self.procs.append(srv)
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "ready":
            raise RuntimeError(
                f"test world servers did not start: {srv.stderr.read() if srv.stderr else ''}"
            )

    def _stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs.clear()


@dataclass
class NetWorld(_Namespace):
    # The VM bridges confined to this world (their NAT networks' subnets).
    bridges: dict[str, str] = field(default_factory=dict)
    table: str = ""

    @property
    def host_if(self) -> str:
        return f"avmw-{self.tag}h"

    @property
    def peer_if(self) -> str:
        return f"avmw-{self.tag}p"

    def up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        sh("ip", "link", "set", self.peer_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.host_if)
        sh("ip", "addr", "add", f"{LAN_HOST_IP}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        inside = ["ip", "netns", "exec", self.ns]
        sh(*inside, "ip", "link", "set", "lo", "up")
        for ip in (DNS_IP, *NAMES.values(), *LAN_NAMES.values()):
            sh(*inside, "ip", "addr", "add", f"{ip}/24", "dev", self.peer_if)
        sh(*inside, "ip", "link", "set", self.peer_if, "up")
        dns = [
            *inside, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={DNS_IP}", "--except-interface=lo",
            "--pid-file=", "--user=root", "--log-queries", "--log-facility=-",
            *(f"--address=/{name}/{ip}" for name, ip in {**NAMES, **LAN_NAMES}.items()),
        ]  # fmt: skip
        self.procs.append(
            subprocess.Popen(dns, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
        allowed, other = NAMES["allowed.test"], NAMES["other.test"]
        specs = [
            f"{allowed}:80:http",
            f"{allowed}:22:echo",
            f"{allowed}:8080:echo",
            f"{other}:80:http",
        ]
        self._serve(*specs)
        deadline = time.monotonic() + 10
        while not self._dns_listening():
            if time.monotonic() > deadline:
                raise RuntimeError("dnsmasq in the test world did not start")
            time.sleep(0.05)

    def confine(self, bridge: str, subnet: str) -> None:
        """Route everything that enters by ``bridge`` into this world, or nowhere.

        A policy-routing rule independent of agent-vm's own filter: packets
        from the VMs' bridge are looked up in a table that only knows the
        world's subnet (everything else is unreachable), so even a broken
        filter cannot send a packet anywhere but into this namespace. Several
        installations' bridges (each its own subnet) may be confined at once.
        """
        if not self.table:
            self.table = str(4000 + int(self.tag, 16) % 50000)
            sh("ip", "route", "add", WORLD_NET, "dev", self.host_if, "table", self.table)
            # The "host LAN" is reachable too: only agent-vm's resolver keeps VMs off it.
            sh("ip", "route", "add", LAN_NET, "dev", self.host_if, "table", self.table)
            sh("ip", "route", "add", "unreachable", "default", "table", self.table)
        # VM to VM falls through to the main table (the bridge's own route), so
        # it reaches the forward hook and agent-vm's own rule must stop it.
        sh("ip", "route", "add", "throw", subnet, "table", self.table)
        sh("ip", "rule", "add", "iif", bridge, "lookup", self.table, "priority", "1000")
        self.bridges[bridge] = subnet

    def release(self, bridge: str) -> None:
        """Undo :meth:`confine` of ``bridge`` (once its installation is down)."""
        subnet = self.bridges.pop(bridge, None)
        if subnet is None:
            return
        for cmd in (
            ["ip", "rule", "del", "iif", bridge, "lookup", self.table],
            ["ip", "route", "del", "throw", subnet, "table", self.table],
        ):
            subprocess.run(cmd, capture_output=True, check=False)

    def _dns_listening(self) -> bool:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ss", "-Hlun", f"src {DNS_IP}:53"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        return DNS_IP in out

    def down(self) -> None:
        self._stop()
        for bridge in list(self.bridges):
            self.release(bridge)
        if self.table:
            subprocess.run(
                ["ip", "route", "flush", "table", self.table], capture_output=True, check=False
            )
            self.table = ""
        subprocess.run(["ip", "link", "delete", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", self.ns], capture_output=True, check=False)


@contextlib.contextmanager
def networld() -> Iterator[NetWorld]:
    world = NetWorld()
    try:
        world.up()
        yield world
    finally:
        world.down()


BRIDGE_SERVER_IP = "198.19.0.1"


@dataclass
class BridgeWorld(_Namespace):
    """A user's LAN for NETWORK_MODE_BRIDGE: a host bridge with no host address,
    whose only other port leads into a namespace with a DHCP server (dnsmasq,
    198.19.0.100-120) and an HTTP server on 198.19.0.1. Nothing on it can
    reach the host or anything beyond the namespace."""

    @property
    def bridge(self) -> str:
        return f"avmb-{self.tag}"

    def up(self) -> None:
        host_if, peer_if = f"avmb-{self.tag}h", f"avmb-{self.tag}p"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", host_if, "master", self.bridge)
        sh("ip", "link", "set", peer_if, "netns", self.ns)
        for dev in (host_if, self.bridge):
            sh("ip", "link", "set", dev, "up")
        inside = ["ip", "netns", "exec", self.ns]
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{BRIDGE_SERVER_IP}/24", "dev", peer_if)
        sh(*inside, "ip", "link", "set", peer_if, "up")
        dhcp = [
            *inside, "dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--interface={peer_if}", "--except-interface=lo",
            "--pid-file=", "--user=root", "--log-facility=-", "--dhcp-authoritative",
            "--dhcp-leasefile=/dev/null",
            "--dhcp-range=198.19.0.100,198.19.0.120,255.255.255.0,1h",
        ]  # fmt: skip
        self.procs.append(
            subprocess.Popen(dhcp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
        self._serve(f"{BRIDGE_SERVER_IP}:80:http")

    def down(self) -> None:
        self._stop()
        for cmd in (
            ["ip", "link", "delete", f"avmb-{self.tag}h"],
            ["ip", "link", "delete", self.bridge],
            ["ip", "netns", "delete", self.ns],
        ):
            subprocess.run(cmd, capture_output=True, check=False)


@contextlib.contextmanager
def bridge_world() -> Iterator[BridgeWorld]:
    world = BridgeWorld()
    try:
        world.up()
        yield world
    finally:
        world.down()


def nat_env(world: NetWorld) -> dict[str, str]:
    """vm-manager settings that point its NAT network at ``world``."""
    return {
        "AGENTVM_NAT_UPLINK": world.host_if,
        "AGENTVM_NAT_DNS_UPSTREAM": DNS_IP,
        "AGENTVM_NAT_SUBNET": f"10.214.{int(world.tag, 16) % 250 + 1}.0/24",
        "AGENTVM_NAT_DEFAULT_DOMAINS": "allowed.test",
        # The world's internet is special-purpose space: opened by configuration.
        "AGENTVM_NAT_DNS_ALLOW_PRIVATE": WORLD_NET,
    }


def leftovers() -> list[str]:
    """Test-world namespaces still present (should be none after any test)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith("avmw-")]
