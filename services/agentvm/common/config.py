"""Settings as data, with environment-variable defaults (AGENTVM_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TOKEN_FILE = "/etc/agent-vm/token"  # noqa: S105 (a path, not a secret)
DEFAULT_TLS_DIR = "/etc/agent-vm/tls"

# Default /metrics ports of each service (AGENTVM_<SERVICE>_METRICS_ADDR overrides).
METRICS_PORTS = {
    "monitor": 9470,
    "vm-manager": 9471,
    "pool-manager": 9472,
    "executor": 9473,
    "e2b-gateway": 9474,
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    """Where things live and how services reach each other.

    Every field can be set by an environment variable named in its comment.
    """

    # AGENTVM_LIBVIRT_URI
    libvirt_uri: str = field(default_factory=lambda: _env("AGENTVM_LIBVIRT_URI", "qemu:///system"))
    # AGENTVM_STATE_DIR: VM overlays and metadata (must be traversable by QEMU's user).
    state_dir: Path = field(
        default_factory=lambda: Path(_env("AGENTVM_STATE_DIR", "/var/lib/agent-vm"))
    )
    # AGENTVM_RUN_DIR: service sockets, pid files, per-VM agent sockets.
    run_dir: Path = field(default_factory=lambda: Path(_env("AGENTVM_RUN_DIR", "/run/agent-vm")))
    # AGENTVM_WORKSPACE_CAP: loop (each shared workspace is a loop-mounted file system
    # as large as the VM's disk) | none (a plain directory: hosts without loop devices).
    workspace_cap: str = field(default_factory=lambda: _env("AGENTVM_WORKSPACE_CAP", "loop"))
    # AGENTVM_CACHE_DIR: guest images.
    cache_dir: Path = field(
        default_factory=lambda: Path(_env("AGENTVM_CACHE_DIR", "/var/cache/agent-vm"))
    )
    # AGENTVM_IMAGES_DIR: named images (docs/IMAGES.md); default CACHE_DIR/named-images.
    images_dir: Path = field(
        default_factory=lambda: Path(
            _env("AGENTVM_IMAGES_DIR", "")
            or Path(_env("AGENTVM_CACHE_DIR", "/var/cache/agent-vm")) / "named-images"
        )
    )
    # AGENTVM_MIN_FREE_DISK_MIB: free space STATE_DIR's file system must keep: below it
    # vm-manager refuses new VMs (RESOURCE_EXHAUSTED), and VMs QEMU paused because
    # their disk could not grow resume once it is free again (vm_manager/diskfull.py).
    min_free_disk_mib: int = field(
        default_factory=lambda: int(_env("AGENTVM_MIN_FREE_DISK_MIB", "1024"))
    )
    # AGENTVM_MAX_IMAGE_DISK_MIB: largest root disk of a named image (import or build).
    max_image_disk_mib: int = field(
        default_factory=lambda: int(_env("AGENTVM_MAX_IMAGE_DISK_MIB", "65536"))
    )
    # AGENTVM_LOG_DIR: service logs when started by `agent-vm up`.
    log_dir: Path = field(
        default_factory=lambda: Path(_env("AGENTVM_LOG_DIR", "/var/log/agent-vm"))
    )
    # AGENTVM_ACCEL: auto | kvm | tcg
    accel: str = field(default_factory=lambda: _env("AGENTVM_ACCEL", "auto"))
    # AGENTVM_VM_PREFIX: libvirt object names start with this (must start with "agent-vm-").
    vm_prefix: str = field(default_factory=lambda: _env("AGENTVM_VM_PREFIX", "agent-vm-"))
    # AGENTVM_VM_MANAGER_ADDR
    vm_manager_addr: str = field(
        default_factory=lambda: _env(
            "AGENTVM_VM_MANAGER_ADDR", "unix:/run/agent-vm/vm-manager.sock"
        )
    )
    # AGENTVM_EXECUTOR_ADDR
    executor_addr: str = field(
        default_factory=lambda: _env("AGENTVM_EXECUTOR_ADDR", "unix:/run/agent-vm/executor.sock")
    )
    # AGENTVM_EXECUTOR_GROUP: the executor replicas that serve the same sandboxes
    # (docs/SCALE_OUT.md): their VMs' agent-vm/executor label. Empty: this
    # executor's own address (one executor, as on a single host).
    executor_group: str = field(default_factory=lambda: _env("AGENTVM_EXECUTOR_GROUP", ""))
    # AGENTVM_EXECUTOR_RECORD_KEY: the key file sandbox records are sealed with
    # (executor/record_seal.py), shared by a group's replicas. Empty:
    # STATE/executor/record.key, made at the first start.
    executor_record_key: str = field(
        default_factory=lambda: _env("AGENTVM_EXECUTOR_RECORD_KEY", "")
    )
    # AGENTVM_POOL_MANAGER_ADDR: where pool-manager serves.
    pool_manager_addr: str = field(
        default_factory=lambda: _env(
            "AGENTVM_POOL_MANAGER_ADDR", "unix:/run/agent-vm/pool-manager.sock"
        )
    )
    # AGENTVM_POOLS: pool-manager's pools,
    # "profile:min=N,max=N,ttl=SECONDS,network=nat-filtered|isolated;..."
    # (default: standard VMs of both modes sandboxes come from a pool in).
    pools: str = field(
        default_factory=lambda: _env(
            "AGENTVM_POOLS",
            "standard:min=2,max=10,ttl=900,network=nat-filtered;"
            "standard:min=1,max=4,ttl=900,network=isolated",
        )
    )
    # AGENTVM_EXECUTOR_POOL: pool-manager address the executor takes VMs from;
    # empty means the executor creates every VM itself.
    executor_pool: str = field(default_factory=lambda: _env("AGENTVM_EXECUTOR_POOL", ""))
    # AGENTVM_SANDBOX_LIFETIME: default sandbox lifetime in seconds.
    sandbox_lifetime_s: float = field(
        default_factory=lambda: float(_env("AGENTVM_SANDBOX_LIFETIME", "3600"))
    )
    # AGENTVM_MAX_SANDBOXES: sandboxes (VMs) the executor runs at once.
    max_sandboxes: int = field(default_factory=lambda: int(_env("AGENTVM_MAX_SANDBOXES", "16")))
    # AGENTVM_MAX_OUTPUT_FILE_BYTES: the most bytes the executor reads of one
    # output file (Run) or file (ReadFile); larger and sparse files are refused.
    max_output_file_bytes: int = field(
        default_factory=lambda: int(_env("AGENTVM_MAX_OUTPUT_FILE_BYTES", str(2**30)))
    )
    # AGENTVM_MAX_OUTPUT_FILES_BYTES: the most bytes of output files one Run collects.
    max_output_files_bytes: int = field(
        default_factory=lambda: int(_env("AGENTVM_MAX_OUTPUT_FILES_BYTES", str(4 * 2**30)))
    )
    # AGENTVM_RECONCILE_INTERVAL: seconds between the executor's sweeps for VMs
    # it owns but no sandbox holds (a create cut short by a crash).
    reconcile_interval_s: float = field(
        default_factory=lambda: float(_env("AGENTVM_RECONCILE_INTERVAL", "60"))
    )
    # AGENTVM_NAT_SUBNET: IPv4 /16-/28 of the NAT_FILTERED network (gateway = first address).
    nat_subnet: str = field(default_factory=lambda: _env("AGENTVM_NAT_SUBNET", "10.213.0.0/24"))
    # AGENTVM_NAT_UPLINK: the only host interface NAT_FILTERED traffic may leave by
    # (empty: whichever the host routes it to).
    nat_uplink: str = field(default_factory=lambda: _env("AGENTVM_NAT_UPLINK", ""))
    # AGENTVM_NAT_DNS_UPSTREAM: resolver the NAT_FILTERED resolver forwards allowed
    # names to (empty: the first nameserver of the host's /etc/resolv.conf).
    nat_dns_upstream: str = field(default_factory=lambda: _env("AGENTVM_NAT_DNS_UPSTREAM", ""))
    # AGENTVM_NAT_DEFAULT_DOMAINS: comma-separated allowlist of a policy without domains.
    nat_default_domains: str = field(
        default_factory=lambda: _env(
            "AGENTVM_NAT_DEFAULT_DOMAINS",
            "pypi.org,files.pythonhosted.org,github.com,codeload.github.com,"
            "objects.githubusercontent.com,raw.githubusercontent.com,registry.npmjs.org,"
            "api.anthropic.com,api.openai.com",
        )
    )
    # AGENTVM_NAT_DEFAULT_PORTS: comma-separated TCP ports of a policy without ports.
    nat_default_ports: str = field(
        default_factory=lambda: _env("AGENTVM_NAT_DEFAULT_PORTS", "80,443,22")
    )
    # AGENTVM_NAT_DNS_ALLOW_PRIVATE: comma-separated networks a DNS answer may open
    # although they are special-purpose (private, benchmarking, ...) or the host's own
    # interface networks (empty: none; see docs/NETWORK_DESIGN.md).
    nat_dns_allow_private: str = field(
        default_factory=lambda: _env("AGENTVM_NAT_DNS_ALLOW_PRIVATE", "")
    )
    # AGENTVM_MONITOR_ADDR: where monitor serves and services report events
    # (empty: services report nothing).
    monitor_addr: str = field(
        default_factory=lambda: _env("AGENTVM_MONITOR_ADDR", "unix:/run/agent-vm/monitor.sock")
    )
    # AGENTVM_E2B_GATEWAY_ADDR: where e2b-gateway serves gRPC health and reflection.
    e2b_gateway_addr: str = field(
        default_factory=lambda: _env(
            "AGENTVM_E2B_GATEWAY_ADDR", "unix:/run/agent-vm/e2b-gateway.sock"
        )
    )
    # AGENTVM_E2B_HTTP_ADDR: HOST:PORT of the E2B-compatible HTTP API (docs/E2B.md);
    # plain HTTP on loopback only, else AGENTVM_E2B_TLS_CERT/KEY (PEM files) are needed.
    e2b_http_addr: str = field(
        default_factory=lambda: _env("AGENTVM_E2B_HTTP_ADDR", "127.0.0.1:49982")
    )
    e2b_tls_cert: str = field(default_factory=lambda: _env("AGENTVM_E2B_TLS_CERT", ""))
    e2b_tls_key: str = field(default_factory=lambda: _env("AGENTVM_E2B_TLS_KEY", ""))
    # AGENTVM_E2B_TLS: off | ca (HTTPS with a certificate from the installation's CA
    # for AGENTVM_E2B_HOSTNAMES, comma-separated names and addresses clients dial).
    e2b_tls: str = field(default_factory=lambda: _env("AGENTVM_E2B_TLS", "off"))
    e2b_hostnames: str = field(
        default_factory=lambda: _env("AGENTVM_E2B_HOSTNAMES", "localhost,127.0.0.1")
    )
    # AGENTVM_AUTH: token (every call but health checks needs the bearer token) | none
    auth: str = field(default_factory=lambda: _env("AGENTVM_AUTH", "token"))
    # AGENTVM_TOKEN_FILE: the installation's token (created by `agent-vm up`, mode 0600).
    token_file: Path = field(
        default_factory=lambda: Path(_env("AGENTVM_TOKEN_FILE", DEFAULT_TOKEN_FILE))
    )
    # AGENTVM_TLS: mutual (every service serves TLS only and requires a certificate
    # from the installation's CA; callers present one) | off
    tls: str = field(default_factory=lambda: _env("AGENTVM_TLS", "mutual"))
    # AGENTVM_TLS_DIR: the installation's CA and one certificate per identity (created
    # by `agent-vm up`); AGENTVM_TLS_CA/CERT/KEY point one process at other files.
    tls_dir: Path = field(default_factory=lambda: Path(_env("AGENTVM_TLS_DIR", DEFAULT_TLS_DIR)))
    # AGENTVM_AUDIT_DIR: monitor's audit log (audit.log, rotated audit-*.log, audit.head).
    audit_dir: Path = field(
        default_factory=lambda: Path(_env("AGENTVM_AUDIT_DIR", "/var/log/agent-vm/audit"))
    )
    # AGENTVM_AUDIT_MAX_BYTES / AGENTVM_AUDIT_MAX_AGE: rotate audit.log at this size / age (s).
    audit_max_bytes: int = field(
        default_factory=lambda: int(_env("AGENTVM_AUDIT_MAX_BYTES", str(64 * 2**20)))
    )
    audit_max_age_s: float = field(
        default_factory=lambda: float(_env("AGENTVM_AUDIT_MAX_AGE", "86400"))
    )
    # AGENTVM_AUDIT_SYSLOG: also send audit records to syslog ("/dev/log", "udp:HOST:PORT").
    audit_syslog: str = field(default_factory=lambda: _env("AGENTVM_AUDIT_SYSLOG", ""))
    # AGENTVM_MONITOR_INTERVAL: seconds between monitor's polls of VM stats and pools.
    monitor_interval_s: float = field(
        default_factory=lambda: float(_env("AGENTVM_MONITOR_INTERVAL", "2"))
    )
    # AGENTVM_ANOMALY_RULES / AGENTVM_ANOMALY_RESPONSES: see docs/MONITOR_DESIGN.md.
    anomaly_rules: str = field(default_factory=lambda: _env("AGENTVM_ANOMALY_RULES", ""))
    anomaly_responses: str = field(default_factory=lambda: _env("AGENTVM_ANOMALY_RESPONSES", ""))
    # AGENTVM_NODE_ID / AGENTVM_NODE_LABELS / AGENTVM_NODE_OVERCOMMIT /
    # AGENTVM_NODE_RESERVE: this vm-manager as a node (docs/SCALE_OUT.md,
    # vm_manager/node.py): its id (default the host name), labels ("k=v,..."),
    # how far committed vCPUs, memory and disk may exceed the host's
    # ("cpu=16,memory=1.5,disk=4")
    # and what is kept for the host ("memory=1024,disk=4096", MiB).
    node_id: str = field(default_factory=lambda: _env("AGENTVM_NODE_ID", ""))
    node_labels: str = field(default_factory=lambda: _env("AGENTVM_NODE_LABELS", ""))
    node_overcommit: str = field(
        default_factory=lambda: _env("AGENTVM_NODE_OVERCOMMIT", "cpu=16,memory=1.5,disk=4")
    )
    node_reserve: str = field(
        default_factory=lambda: _env("AGENTVM_NODE_RESERVE", "memory=1024,disk=4096")
    )
    # AGENTVM_NODES / _DNS / _KUBERNETES: where the vm-managers of a fleet are
    # (common/nodes.py): "[id=]address,...", "name:port" (one record per node) or
    # "[namespace/]service[:port]" (its EndpointSlices, watched); none: the one at
    # AGENTVM_VM_MANAGER_ADDR.
    nodes: str = field(default_factory=lambda: _env("AGENTVM_NODES", ""))
    nodes_dns: str = field(default_factory=lambda: _env("AGENTVM_NODES_DNS", ""))
    nodes_kubernetes: str = field(default_factory=lambda: _env("AGENTVM_NODES_KUBERNETES", ""))
    # AGENTVM_LOG_LEVEL
    log_level: str = field(default_factory=lambda: _env("AGENTVM_LOG_LEVEL", "INFO"))

    def __post_init__(self) -> None:
        from agentvm.common.errors import InvalidArgument

        if self.accel not in ("auto", "kvm", "tcg"):
            raise InvalidArgument(f"AGENTVM_ACCEL={self.accel!r}: use auto, kvm or tcg")
        if self.auth not in ("token", "none"):
            raise InvalidArgument(f"AGENTVM_AUTH={self.auth!r}: use token or none")
        if self.workspace_cap not in ("loop", "none"):
            raise InvalidArgument(f"AGENTVM_WORKSPACE_CAP={self.workspace_cap!r}: use loop or none")
        if self.e2b_tls not in ("off", "ca"):
            raise InvalidArgument(f"AGENTVM_E2B_TLS={self.e2b_tls!r}: use off or ca")
        if self.tls not in ("mutual", "off"):
            raise InvalidArgument(f"AGENTVM_TLS={self.tls!r}: use mutual or off")
        if not self.vm_prefix.startswith("agent-vm-"):
            raise InvalidArgument(
                f"AGENTVM_VM_PREFIX={self.vm_prefix!r} must start with 'agent-vm-'"
            )

    def metrics_addr(self, service: str) -> str:
        """``HOST:PORT`` of a service's own /metrics (AGENTVM_<SERVICE>_METRICS_ADDR; "" = off)."""
        var = f"AGENTVM_{service.upper().replace('-', '_')}_METRICS_ADDR"
        return _env(var, f"127.0.0.1:{METRICS_PORTS.get(service, 0)}")

    @property
    def executor_identity(self) -> str:
        """The executor group's label value: AGENTVM_EXECUTOR_GROUP, else the address."""
        return self.executor_group or self.executor_addr

    @property
    def executor_record_key_file(self) -> Path:
        return Path(self.executor_record_key or self.state_dir / "executor" / "record.key")

    @property
    def vms_state_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def vms_run_dir(self) -> Path:
        return self.run_dir / "vms"
