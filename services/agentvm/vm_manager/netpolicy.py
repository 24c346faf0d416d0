"""Names, policies and attachments of one vm-manager's NAT_FILTERED network (pure data)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field

from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.v1 import common_pb2
from agentvm.vm_manager import nftables as nft
from agentvm.vm_manager.dnsproxy import DomainAllowlist, check_pattern

MAX_DOMAINS = 256
MAX_CIDRS = 64
MAX_PORTS = 32


@dataclass(frozen=True)
class NetNames:
    """Names of one vm-manager's network objects (interface names are <= 15 chars)."""

    network: str
    bridge: str
    tap_prefix: str
    table: str
    log_group: int
    # bridge-family table of this vm-manager's BRIDGE-mode taps
    bridged_table: str

    @classmethod
    def for_prefix(cls, prefix: str) -> NetNames:
        tag = hashlib.sha256(prefix.encode()).hexdigest()[:4]
        return cls(
            network=f"{prefix}nat",
            bridge=f"avb{tag}",
            tap_prefix=f"avt{tag}",
            table=f"agentvm_{tag}",
            log_group=100 + int(tag, 16) % 60000,
            bridged_table=f"agentvm_{tag}_u",
        )

    def tap(self, vm_id: str) -> str:
        return f"{self.tap_prefix}{vm_id}"

    def bridge_tap(self, vm_id: str) -> str:
        """Tap of a BRIDGE-mode VM: outside ``tap_prefix``, so the NAT rules never see it."""
        return f"{nft.BRIDGED_TAPS}{self.tap_prefix[3:]}{vm_id}"

    @property
    def bridged_prefix(self) -> str:
        return f"{nft.BRIDGED_TAPS}{self.tap_prefix[3:]}"


@dataclass(frozen=True)
class Policy:
    """A VM's egress policy with the server defaults filled in."""

    domains: tuple[str, ...]
    cidrs: tuple[str, ...]
    ports: tuple[int, ...]

    @classmethod
    def from_proto(cls, p: common_pb2.NetworkPolicy, settings: Settings) -> Policy:
        """Validated; each empty field takes its default (AGENTVM_NAT_DEFAULT_*)."""
        domains = list(p.allow_domains) or [
            d for d in settings.nat_default_domains.split(",") if d.strip()
        ]
        ports = list(p.ports) or [int(x) for x in settings.nat_default_ports.split(",") if x]
        if len(domains) > MAX_DOMAINS or len(p.allow_cidrs) > MAX_CIDRS or len(ports) > MAX_PORTS:
            raise InvalidArgument(
                f"network policy too large: at most {MAX_DOMAINS} domains, {MAX_CIDRS} CIDRs "
                f"and {MAX_PORTS} ports (use '*.' wildcards for many names of one zone)"
            )
        cidrs = []
        for c in p.allow_cidrs:
            try:
                net = ipaddress.IPv4Network(c.strip(), strict=True)
            except ValueError as exc:
                raise InvalidArgument(
                    f"allow_cidrs entry {c!r} is not an IPv4 network ({exc}); write it like "
                    "'203.0.113.0/24' with the host bits zero"
                ) from None
            cidrs.append(str(net))
        for port in ports:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"ports entry {port} is not a TCP port (1-65535)")
        return cls(
            tuple(dict.fromkeys(check_pattern(d) for d in domains)),
            tuple(dict.fromkeys(cidrs)),
            tuple(sorted(set(ports))),
        )

    def to_proto(self) -> common_pb2.NetworkPolicy:
        return common_pb2.NetworkPolicy(
            allow_domains=self.domains, allow_cidrs=self.cidrs, ports=self.ports
        )

    def to_json(self) -> str:
        return json.dumps({"d": self.domains, "c": self.cidrs, "p": self.ports})

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        return cls(tuple(data["d"]), tuple(data["c"]), tuple(int(p) for p in data["p"]))


@dataclass
class Attachment:
    """One VM on the network."""

    vm_name: str
    vm_id: str
    ip: str
    mac: str
    prefixlen: int
    gateway: str
    policy: Policy
    allowlist: DomainAllowlist = field(init=False)

    def __post_init__(self) -> None:
        self.allowlist = DomainAllowlist(list(self.policy.domains))

    @property
    def rules(self) -> nft.VMRules:
        return nft.VMRules(self.vm_id, self.ip, self.mac, self.policy.ports, self.policy.cidrs)

    def to_proto(self, bridge: str) -> common_pb2.NetworkAttachment:
        return common_pb2.NetworkAttachment(
            address=f"{self.ip}/{self.prefixlen}",
            mac=self.mac,
            gateway=self.gateway,
            policy=self.policy.to_proto(),
            bridge=bridge,
        )
