"""Real-VM test harness: a vm-manager process of the tests' own and a VM factory.

The factory owns every VM it builds and destroys them all at teardown; the
session teardown checks that no domain, overlay or socket of the tests is
left (Firecracker's test framework is the model).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import libvirt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvm.common import tls
from agentvm.common.grpc_util import Caller, sync_channel
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from agentvm.vm_manager import workspace
from agentvm.vm_manager.network import NetNames

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VMManagerProcess:
    """vm-manager started as a real process with the tests' own dirs and VM prefix."""

    base: Path
    prefix: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    # Extra settings (the NAT network's uplink, resolver and subnet in tests).
    extra_env: dict[str, str] = field(default_factory=dict)
    # This process's own /metrics port (never the defaults an installation uses).
    metrics_port: int = field(default_factory=free_port)
    # The E2B API port of the gateway next to it (never the installation's 49982).
    e2b_http_port: int = field(default_factory=free_port)

    @property
    def service_name(self) -> str:
        return "vm-manager"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def log_path(self) -> Path:
        return self.base / "vm-manager.log"

    @property
    def images_dir(self) -> Path:
        """Named images of the tests (never the installation's)."""
        return self.base / "images"

    @property
    def address(self) -> str:
        return f"unix:{self.run_dir}/vm-manager.sock"

    @property
    def token_file(self) -> Path:
        """The installation's token (the first service to start creates it)."""
        return self.base / "token"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def tls_dir(self) -> Path:
        """The installation's CA and certificates (the first service to start makes them)."""
        return self.base / "tls"

    def caller(self, who: str = tls.CLIENT) -> Caller:
        """A caller with the token and the certificate of ``who`` (client, or a service)."""
        files = tls.for_identity("mutual", self.tls_dir, who)
        assert files is not None
        claim = None if who == tls.CLIENT else f"agent-vm-{who}"
        return Caller(self.token, tls.channel_credentials(files), claim)

    def channel(self, who: str = tls.CLIENT) -> grpc.Channel:
        """A blocking channel to this service that sends the token and ``who``'s certificate."""
        return self.caller(who).channel(self.address, self.service_name)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AGENTVM_RUN_DIR=str(self.run_dir),
            AGENTVM_STATE_DIR=str(self.state_dir),
            AGENTVM_VM_PREFIX=self.prefix,
            AGENTVM_VM_MANAGER_ADDR=f"unix:{self.run_dir}/vm-manager.sock",
            AGENTVM_EXECUTOR_ADDR=f"unix:{self.run_dir}/executor.sock",
            AGENTVM_POOL_MANAGER_ADDR=f"unix:{self.run_dir}/pool-manager.sock",
            AGENTVM_EXECUTOR_POOL="",
            AGENTVM_LOG_DIR=str(self.base / "log"),
            AGENTVM_LOG_LEVEL="DEBUG",
            AGENTVM_MONITOR_ADDR=f"unix:{self.run_dir}/monitor.sock",
            AGENTVM_E2B_GATEWAY_ADDR=f"unix:{self.run_dir}/e2b-gateway.sock",
            AGENTVM_E2B_HTTP_ADDR=f"127.0.0.1:{self.e2b_http_port}",
            AGENTVM_AUDIT_DIR=str(self.base / "audit"),
            AGENTVM_TOKEN_FILE=str(self.token_file),
            AGENTVM_TLS_DIR=str(self.tls_dir),
            AGENTVM_IMAGES_DIR=str(self.images_dir),
        )
        var = self.service_name.upper().replace("-", "_")
        env[f"AGENTVM_{var}_METRICS_ADDR"] = f"127.0.0.1:{self.metrics_port}"
        env.update(self.extra_env)
        return env

    module = "agentvm.vm_manager"

    def start(self, timeout: float = 30.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                stdout=log,
                stderr=log,
                cwd=REPO,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-3000:]}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"{self.module} did not become healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop_if_running(self) -> None:
        """Teardown: stop the process unless it was never started or already ended."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    def health(self) -> int:
        try:
            files = tls.for_identity("mutual", self.tls_dir, tls.CLIENT)
            assert files is not None
            with Caller(None, tls.channel_credentials(files)).bare(
                self.address, self.service_name
            ) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                return int(resp.status)
        except (grpc.RpcError, tls.TLSError):
            return -1

    def stub(self) -> vm_manager_pb2_grpc.VMManagerServiceStub:
        return vm_manager_pb2_grpc.VMManagerServiceStub(self.channel())


@dataclass
class NamedServiceProcess(VMManagerProcess):
    """A service next to a VMManagerProcess, with its socket and log named ``name``."""

    name: str = ""

    @property
    def service_name(self) -> str:
        return self.module.rpartition(".")[2].replace("_", "-")

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    @property
    def address(self) -> str:
        return f"unix:{self.run_dir}/{self.name}.sock"


@dataclass
class ExecutorProcess(NamedServiceProcess):
    """The executor as a real process, next to (and configured like) a VMManagerProcess."""

    name: str = "executor"
    # pool-manager address to take VMs from ("" = none).
    pool: str = ""
    module = "agentvm.executor"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(AGENTVM_EXECUTOR_ADDR=self.address, AGENTVM_EXECUTOR_POOL=self.pool)
        return env


@dataclass
class PoolManagerProcess(NamedServiceProcess):
    """pool-manager as a real process next to a VMManagerProcess (own socket name)."""

    name: str = "pool-manager"
    pools: str = "standard:min=2,max=4,ttl=600"
    module = "agentvm.pool_manager"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(AGENTVM_POOL_MANAGER_ADDR=self.address, AGENTVM_POOLS=self.pools)
        return env

    @property
    def labels(self) -> dict[str, str]:
        return {"agent-vm/pool-manager": self.address}

    def pool_stub(self) -> pool_manager_pb2_grpc.PoolManagerServiceStub:
        return pool_manager_pb2_grpc.PoolManagerServiceStub(self.channel())

    def status(self) -> pool_manager_pb2.PoolStatus:
        resp = self.pool_stub().GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=10)
        return resp.pools[0]

    def wait_status(
        self, check: Callable[[pool_manager_pb2.PoolStatus], bool], timeout: float = 120.0
    ) -> pool_manager_pb2.PoolStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if check(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"pool status never matched: {st}")
            time.sleep(0.2)


@dataclass
class GatewayProcess(NamedServiceProcess):
    """e2b-gateway as a real process in front of the executor next to a VMManagerProcess."""

    name: str = "e2b-gateway"
    module = "agentvm.e2b_gateway"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(AGENTVM_E2B_GATEWAY_ADDR=self.address)
        env.update(self.extra_env)  # the test's own settings win
        return env

    @property
    def http_port(self) -> int:
        return int(self.env["AGENTVM_E2B_HTTP_ADDR"].rpartition(":")[2])

    def cli(self, *args: str) -> str:
        """`agent-vm ARGS` with this gateway's settings; its stdout."""
        out = subprocess.run(
            [sys.executable, "-m", "agentvm.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        return out.stdout.strip()


@dataclass
class MonitorProcess(NamedServiceProcess):
    """monitor as a real process next to a VMManagerProcess."""

    name: str = "monitor"
    module = "agentvm.monitor"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(AGENTVM_MONITOR_ADDR=self.address, AGENTVM_MONITOR_INTERVAL="1")
        return env

    @property
    def audit_dir(self) -> Path:
        return self.base / "audit"


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    status: common_pb2.ExitStatus
    # (monotonic time, stream, data) for each output chunk, in arrival order.
    chunks: list[tuple[float, int, bytes]] = field(default_factory=list)
    finished_at: float = 0.0


def program(cmd: Sequence[str] | str) -> common_pb2.Program:
    """argv for a sequence, /bin/sh -c for a string."""
    if isinstance(cmd, str):
        return common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_SHELL, source=cmd)
        )
    return common_pb2.Program(argv=common_pb2.Argv(args=list(cmd)))


def execute(
    endpoint: str,
    cmd: Sequence[str] | str | common_pb2.Program,
    *,
    timeout: float = 60.0,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cwd: str = "",
    max_output: int = 0,
    channel: grpc.Channel | None = None,
) -> ExecResult:
    """Run a program through the guest agent and collect everything it sent.

    Opens a channel per call unless ``channel`` (a persistent one) is given.
    """
    prog = cmd if isinstance(cmd, common_pb2.Program) else program(cmd)
    req = guest_agent_pb2.ExecuteRequest(
        program=prog, stdin=stdin, env=env or {}, cwd=cwd, max_output_bytes=max_output
    )
    req.timeout.FromNanoseconds(int(timeout * 1e9))
    out, err = bytearray(), bytearray()
    chunks: list[tuple[float, int, bytes]] = []
    status = None
    with contextlib.ExitStack() as stack:
        ch = channel if channel is not None else stack.enter_context(sync_channel(endpoint))
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        for ev in stub.Execute(req, timeout=timeout + 30):
            if ev.HasField("output"):
                chunks.append((time.monotonic(), ev.output.stream, ev.output.data))
                (out if ev.output.stream == common_pb2.OUTPUT_STREAM_STDOUT else err).extend(
                    ev.output.data
                )
            elif ev.HasField("exited"):
                status = ev.exited
    assert status is not None, "the agent ended the stream without an exit status"
    return ExecResult(bytes(out), bytes(err), status, chunks, time.monotonic())


class VMFactory:
    """Builds VMs through vm-manager and destroys every one of them at teardown."""

    def __init__(self, vmm: VMManagerProcess) -> None:
        self.vmm = vmm
        self.names: list[str] = []

    def create(
        self,
        *,
        start: bool = True,
        profile: common_pb2.ResourceProfile.ValueType = common_pb2.RESOURCE_PROFILE_STANDARD,
        network: common_pb2.NetworkMode.ValueType = common_pb2.NETWORK_MODE_ISOLATED,
        policy: common_pb2.NetworkPolicy | None = None,
        from_template: bool = False,
        bridge: str = "",
        image: str = "",
    ) -> common_pb2.VM:
        req = vm_manager_pb2.CreateVMRequest(
            image=image,
            profile=profile,
            network_mode=network,
            bridge=bridge,
            start=start,
            labels={"test": "1"},
            network_policy=policy,
            from_template=from_template,
        )
        vm = self.vmm.stub().CreateVM(req, timeout=BOOT_TIMEOUT_S).vm
        self.names.append(vm.name)
        return vm

    def clone(self) -> common_pb2.VM:
        """A READY standard VM restored from the memory template (see the template fixture)."""
        req = vm_manager_pb2.CreateVMRequest(
            profile=common_pb2.RESOURCE_PROFILE_STANDARD,
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            labels={"test": "1"},
            from_template=True,
        )
        vm = self.vmm.stub().CreateVM(req, timeout=BOOT_TIMEOUT_S).vm
        self.names.append(vm.name)
        return vm

    def wait_ready(self, name: str, timeout: float = BOOT_TIMEOUT_S) -> common_pb2.VM:
        req = vm_manager_pb2.WaitVMRequest(name=name, state=common_pb2.VM_STATE_READY)
        req.timeout.FromNanoseconds(int(timeout * 1e9))
        return self.vmm.stub().WaitVM(req, timeout=timeout + 10).vm

    def booted(
        self, profile: common_pb2.ResourceProfile.ValueType = common_pb2.RESOURCE_PROFILE_STANDARD
    ) -> common_pb2.VM:
        vm = self.create(profile=profile)
        return self.wait_ready(vm.name)

    def destroy(self, name: str) -> None:
        self.vmm.stub().DestroyVM(vm_manager_pb2.DestroyVMRequest(name=name), timeout=60)

    def console_log(self, name: str) -> str:
        path = self.vmm.state_dir / "vms" / name / "console.log"
        try:
            return path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no console log)"

    def cleanup(self, *, report: bool = False) -> None:
        for name in self.names:
            if report:
                sys.stderr.write(f"--- console of {name} ---\n{self.console_log(name)}\n")
            try:
                self.destroy(name)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        self.names.clear()


def libvirt_domains(prefix: str) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    finally:
        conn.close()


def new_vmm() -> VMManagerProcess:
    tag = secrets.token_hex(3)
    base = Path("/var/lib/agent-vm-tests") / tag
    return VMManagerProcess(base=base, prefix=f"agent-vm-test{tag}-")


def remove_vmm_dirs(vmm: VMManagerProcess) -> None:
    workspace.remove_tree(vmm.base)  # unmounts a workspace a failed test left first


def net_leftovers(prefix: str) -> list[str]:
    """This vm-manager's libvirt network and nftables tables, if still there."""
    names = NetNames.for_prefix(prefix)
    left = []
    conn = libvirt.open("qemu:///system")
    try:
        left += [f"network {n}" for n in conn.listNetworks() + conn.listDefinedNetworks()
                 if n == names.network]  # fmt: skip
    finally:
        conn.close()
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=False
    ).stdout
    left += [f"nft {line}" for line in tables.splitlines() if line.endswith(f" {names.table}")]
    return left


def leftovers(vmm: VMManagerProcess) -> list[str]:
    """Everything of this vm-manager's VMs still on the machine."""
    left = [f"domain {n}" for n in libvirt_domains(vmm.prefix)] + net_leftovers(vmm.prefix)
    for d in (vmm.state_dir / "vms", vmm.run_dir / "vms"):
        if d.exists():
            left += [f"path {p}" for p in d.iterdir()]
    left += [f"mount {p}" for p in workspace.mounts_under(vmm.state_dir)]
    staging = vmm.images_dir / ".staging"
    if staging.exists():
        left += [f"image staging {p}" for p in staging.iterdir()]
    return left


def new_leftovers(vmm: VMManagerProcess, before: Iterable[str], settle: float = 60.0) -> list[str]:
    """What :func:`leftovers` finds that was not there ``before``, once the
    teardowns in flight had ``settle`` seconds to end (a close returns before
    its VM is destroyed: docs/ARCHITECTURE.md, "Teardown").

    Tests on the session's vm-manager use this: the session's shared VM (and
    any other session fixture's) is not theirs to clean up.
    """
    seen = set(before)
    found: list[str] = []

    def settled() -> bool:
        found[:] = [x for x in leftovers(vmm) if x not in seen]
        return not found

    wait_for(settled, settle)
    return found


@contextlib.contextmanager
def lone_vmm_process() -> Iterator[VMManagerProcess]:
    """A vm-manager of its own (no monitor watches it); asserts it left nothing behind."""
    proc = new_vmm()
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()
        left = leftovers(proc)
        remove_vmm_dirs(proc)
        assert not left, f"left behind: {left}"


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
