"""What the host configures in the guest through the agent: identity and network.

``reidentify`` makes a VM restored from a memory template its own (host name,
machine id, clock, CRNG); ``configure_network`` / ``configure_dhcp`` give
eth0 the MAC and address vm-manager assigned. Each validates its input and
raises ValueError naming what is wrong (the host is trusted, but a typo in it
must not break the guest).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import socket
import struct
import subprocess
import tempfile
import time

from agentvm_guest import netif

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAC_RE = re.compile(r"^[0-9a-f][02468ace](?::[0-9a-f]{2}){5}$")


def reidentify(hostname: str, machine_id: str, seed: bytes, wall_clock_ns: int) -> None:
    """Make a VM restored from a memory template its own (raises ValueError on bad input).

    Every clone of a template wakes up with the template's hostname, machine
    id, clock and, worst, CRNG state: two clones would draw the same "random"
    numbers. The seed is credited to the input pool and the CRNG reseeded at
    once, so nothing drawn afterwards is shared with a sibling.
    """
    if not HOSTNAME_RE.match(hostname):
        raise ValueError(f"hostname {hostname!r} is not a valid host name")
    if not MACHINE_ID_RE.match(machine_id):
        raise ValueError("machine_id must be 32 lowercase hexadecimal digits")
    if len(seed) < 32:
        raise ValueError("seed must be at least 32 bytes")
    seed = seed[:512]
    with open("/dev/random", "wb", buffering=0) as fh:
        fcntl.ioctl(fh, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fh, RNDRESEEDCRNG)
    if wall_clock_ns > 0:
        time.clock_settime_ns(time.CLOCK_REALTIME, wall_clock_ns)
    socket.sethostname(hostname)
    for path, text in (("/etc/hostname", hostname), ("/etc/machine-id", machine_id)):
        tmp = f"{path}.agentvm-tmp"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)


def _eth0_address() -> str:
    iface = netif.ipv4("eth0")
    return str(iface) if iface is not None else ""


def _prepare_eth0(mac: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists("/sys/class/net/eth0"):
        if time.monotonic() > deadline:
            raise OSError("this VM has no eth0 (no virtio NIC, or virtio_net not loaded)")
        time.sleep(0.05)
    with (
        contextlib.suppress(OSError),
        open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as fh,
    ):
        fh.write("1")
    netif.set_up("eth0", False)
    netif.set_mac("eth0", mac)


def configure_dhcp(mac: str) -> str:
    """Give eth0 its MAC and take an address by DHCP (user bridges); the address got.

    udhcpc returns once it has a lease and stays in the background to renew
    it (so the LAN never hands the address to someone else while we use it).
    """
    if not MAC_RE.match(mac):
        raise ValueError(f"mac {mac!r} is not a lowercase unicast MAC address")
    _prepare_eth0(mac)
    netif.set_up("eth0")
    # A second ConfigureNetwork replaces the client of the first.
    subprocess.run(["busybox", "pkill", "-f", "udhcpc -i eth0"], capture_output=True, check=False)
    # The daemon keeps the inherited descriptors: a file, not a pipe we would wait on.
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(
            ["busybox", "udhcpc", "-i", "eth0", "-n", "-t", "10", "-T", "2",
             "-s", "/usr/local/sbin/agentvm-dhcp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            check=False, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise OSError(f"no DHCP lease on eth0: {text[-300:]}")
    return _eth0_address()


def configure_network(mac: str, address: str, gateway: str, nameservers: list[str]) -> None:
    """Give eth0 its MAC, static address, default route and resolvers.

    Raises ValueError on bad input and OSError when the interface cannot be
    set up. vm-manager hands out addresses itself (there is no DHCP on its
    networks), and the host drops every frame whose MAC and address do not
    match what it assigned, so a guest that ignores this only cuts itself off.
    IPv6 is switched off on eth0: the host filters it anyway.
    """
    if not MAC_RE.match(mac):
        raise ValueError(f"mac {mac!r} is not a lowercase unicast MAC address")
    try:
        iface = ipaddress.IPv4Interface(address)
        gw = ipaddress.IPv4Address(gateway)
        resolvers = [ipaddress.IPv4Address(n) for n in nameservers]
    except ValueError as exc:
        raise ValueError(f"network configuration: {exc}") from None
    if iface.network.prefixlen in (0, 32) or gw not in iface.network:
        raise ValueError(f"gateway {gw} is not on {iface.network}")
    if len(resolvers) > 3:
        raise ValueError("at most 3 nameservers")
    _prepare_eth0(mac)
    netif.set_ipv4("eth0", iface)  # replaces the address it had (a template's)
    netif.set_up("eth0")
    netif.replace_default_route(gw)
    tmp = "/etc/resolv.conf.agentvm-tmp"
    with open(tmp, "w") as fh:
        fh.write("".join(f"nameserver {n}\n" for n in resolvers) + "options timeout:2 attempts:2\n")
    os.replace(tmp, "/etc/resolv.conf")
