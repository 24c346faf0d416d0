"""Network interface settings by ioctl: what ``ip link``, ``ip addr`` and ``ip route``
did for the agent, without a program each.

Under TCG an exec costs about 45 ms in the guest, and a NAT VM's
ConfigureNetwork ran six of them (on every cold boot and every restore from a
template). These are the kernel's classic interface ioctls (SIOCSIF*,
SIOCADDRT): one system call each. x86_64 layouts (the guest's only
architecture). Each raises OSError naming the interface and what failed.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct

SIOCADDRT, SIOCDELRT = 0x890B, 0x890C
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCGIFADDR, SIOCSIFADDR = 0x8915, 0x8916
SIOCGIFNETMASK, SIOCSIFNETMASK = 0x891B, 0x891C
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
IFREQ_SIZE = 40  # struct ifreq: a 16-byte name and a 24-byte union
# struct rtentry (x86_64): pad1, dst, gateway, genmask, flags, pad2, pad3,
# pad4, metric, dev, mtu, window, irtt; then padding to 120 bytes.
RTENTRY = struct.Struct("@L16s16s16sHhLPhPLLH6x")


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < 16:
        raise OSError(errno.EINVAL, f"bad interface name {name!r}")
    return raw.ljust(16, b"\0") + payload.ljust(IFREQ_SIZE - 16, b"\0")


def _sockaddr_in(addr: ipaddress.IPv4Address) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, addr.packed)


def _ioctl(request: int, arg: bytes, what: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return fcntl.ioctl(s, request, arg)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: {exc.strerror}") from None


def flags(name: str) -> int:
    out = _ioctl(SIOCGIFFLAGS, _ifreq(name), f"read the flags of {name}")
    return int(struct.unpack_from("=H", out, 16)[0])


def set_up(name: str, up: bool = True) -> None:
    """``ip link set NAME up`` (or down)."""
    old = flags(name)
    new = old | IFF_UP if up else old & ~IFF_UP
    if new != old:
        state = "up" if up else "down"
        _ioctl(SIOCSIFFLAGS, _ifreq(name, struct.pack("=H", new)), f"set {name} {state}")


def set_mac(name: str, mac: str) -> None:
    """``ip link set NAME address MAC`` (``mac`` as "52:54:00:12:34:56")."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise OSError(errno.EINVAL, f"bad MAC address {mac!r}")
    payload = struct.pack("=H", ARPHRD_ETHER) + raw
    _ioctl(SIOCSIFHWADDR, _ifreq(name, payload), f"set the MAC of {name} to {mac}")


def set_ipv4(name: str, iface: ipaddress.IPv4Interface) -> None:
    """Make ``iface`` (address and prefix) the address of ``name``: it replaces the
    one it had (and its prefix route)."""
    _ioctl(SIOCSIFADDR, _ifreq(name, _sockaddr_in(iface.ip)), f"set {iface} on {name}")
    mask = _sockaddr_in(iface.netmask)
    _ioctl(SIOCSIFNETMASK, _ifreq(name, mask), f"set the netmask of {iface} on {name}")


def ipv4(name: str) -> ipaddress.IPv4Interface | None:
    """The address of ``name`` with its prefix, or None when it has none."""
    try:
        addr = _ioctl(SIOCGIFADDR, _ifreq(name), f"read the address of {name}")
        mask = _ioctl(SIOCGIFNETMASK, _ifreq(name), f"read the netmask of {name}")
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    ip = ipaddress.IPv4Address(addr[20:24])
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{ipaddress.IPv4Address(mask[20:24])}").prefixlen
    return ipaddress.IPv4Interface(f"{ip}/{prefix}")


def _rtentry(gateway: ipaddress.IPv4Address | None) -> bytes:
    any_ = _sockaddr_in(ipaddress.IPv4Address(0))
    gw = _sockaddr_in(gateway) if gateway is not None else any_
    rt_flags = RTF_UP | (RTF_GATEWAY if gateway is not None else 0)
    return RTENTRY.pack(0, any_, gw, any_, rt_flags, 0, 0, 0, 0, 0, 0, 0, 0)


def replace_default_route(gateway: ipaddress.IPv4Address) -> None:
    """``ip route replace default via GATEWAY``: every default route goes, then this one."""
    for _ in range(16):
        try:
            _ioctl(SIOCDELRT, _rtentry(None), "remove the default route")
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                break
            raise
    _ioctl(SIOCADDRT, _rtentry(gateway), f"add the default route via {gateway}")
