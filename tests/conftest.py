"""Fixtures for real-VM tests: vm-manager process -> factory -> booted VM."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentvm.common.config import Settings
from agentvm.v1 import common_pb2, vm_manager_pb2
from agentvm.vm_manager.image import ImageStore
from agentvm.vm_manager.network import NetNames
from tests.imagebuild import CODER_SPEC, spec_source
from tests.imagebuild import build as build_spec
from tests.networld import NetWorld, nat_env, networld
from tests.otelcollector import Collector, otlp_collector
from tests.vmharness import (
    BOOT_TIMEOUT_S,
    ExecutorProcess,
    MonitorProcess,
    VMFactory,
    VMManagerProcess,
    leftovers,
    new_vmm,
    remove_vmm_dirs,
)

# SIGTERM tears the session down like Ctrl-C (no services, VMs or networks left).
pytest_plugins = ["tests.pytest_sigterm"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)  # type: ignore[attr-defined]
    return rep


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The guest image for this version (built once if missing: ~1 minute)."""
    store = ImageStore(Settings().cache_dir)

    def log(line: str) -> None:
        sys.stderr.write(f"[image] {line}\n")

    store.build(log=log)
    paths = store.require_current()
    return paths.root


@pytest.fixture(scope="session")
def net_world() -> Iterator[NetWorld]:
    """The tests' private internet (see tests/networld.py), shared by the session."""
    with networld() as world:
        yield world


@pytest.fixture(scope="session")
def otel() -> Iterator[tuple[Collector, dict[str, str]]]:
    """A real OTLP receiver every test service exports its spans to, and their env."""
    with otlp_collector() as (collector, endpoint):
        yield (
            collector,
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "300",
            },
        )


# What the session monitor detects and how it responds: thresholds no ordinary
# test reaches, so only the tests that misbehave on purpose are stopped.
MONITOR_RULES = "max_processes=150,denied_egress=60,denied_window=60,warmup=30"
MONITOR_RESPONSES = "process_storm=kill,egress_denied=snapshot_and_kill,zscore=alert"


@pytest.fixture(scope="session")
def monitor_proc(
    otel: tuple[Collector, dict[str, str]], vmm_base: VMManagerProcess
) -> Iterator[MonitorProcess]:
    """The monitor every test service reports to (audit log, metrics, anomaly responses)."""
    proc = MonitorProcess(base=vmm_base.base, prefix=vmm_base.prefix)
    proc.extra_env = {
        **otel[1],
        "AGENTVM_ANOMALY_RULES": MONITOR_RULES,
        "AGENTVM_ANOMALY_RESPONSES": MONITOR_RESPONSES,
        # Small files: the session's log is rotated several times.
        "AGENTVM_AUDIT_MAX_BYTES": "40000",
    }
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()


@pytest.fixture(scope="session")
def vmm_base() -> Iterator[VMManagerProcess]:
    """The session vm-manager's identity (dirs, prefix), before it starts; its dirs go last."""
    proc = new_vmm()
    # The Python client and the CLI of the tests send the session's token and
    # present the session's client certificate.
    ours = {"AGENTVM_TOKEN_FILE": str(proc.token_file), "AGENTVM_TLS_DIR": str(proc.tls_dir)}
    old = {name: os.environ.get(name) for name in ours}
    os.environ.update(ours)
    try:
        yield proc
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        remove_vmm_dirs(proc)


@pytest.fixture(scope="session")
def vmm(
    guest_image: Path,
    net_world: NetWorld,
    vmm_base: VMManagerProcess,
    otel: tuple[Collector, dict[str, str]],
    monitor_proc: MonitorProcess,
) -> Iterator[VMManagerProcess]:
    """A vm-manager process of the tests' own (own dirs, own VM name prefix).

    Its NAT network leaves only into the test world: the uplink is the
    world's veth, its resolver forwards to the world's DNS, and a routing
    rule sends whatever enters by its bridge into the world or nowhere.
    """
    proc = vmm_base
    proc.extra_env = {**nat_env(net_world), **otel[1]}
    net_world.confine(NetNames.for_prefix(proc.prefix).bridge, proc.extra_env["AGENTVM_NAT_SUBNET"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()
        left = leftovers(proc)
        assert not left, f"the tests left resources behind: {left}"


@pytest.fixture(scope="session")
def executor(
    vmm: VMManagerProcess, otel: tuple[Collector, dict[str, str]]
) -> Iterator[ExecutorProcess]:
    """The executor process, talking to the tests' vm-manager; sets AGENTVM_EXECUTOR_ADDR."""
    proc = ExecutorProcess(base=vmm.base, prefix=vmm.prefix, extra_env=dict(otel[1]))
    proc.start()
    old = os.environ.get("AGENTVM_EXECUTOR_ADDR")
    os.environ["AGENTVM_EXECUTOR_ADDR"] = proc.address
    try:
        yield proc
    finally:
        if old is None:
            os.environ.pop("AGENTVM_EXECUTOR_ADDR", None)
        else:
            os.environ["AGENTVM_EXECUTOR_ADDR"] = old
        proc.stop_if_running()


@pytest.fixture
def factory(vmm: VMManagerProcess, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    """Builds VMs for one test and destroys them all afterwards (console log on failure)."""
    f = VMFactory(vmm)
    yield f
    rep = getattr(request.node, "rep_call", None)
    f.cleanup(report=bool(rep is not None and rep.failed))


@pytest.fixture(scope="session")
def template(vmm: VMManagerProcess) -> vm_manager_pb2.Template:
    """The memory template of the standard profile (built once per session)."""
    req = vm_manager_pb2.PrepareTemplateRequest(profile=common_pb2.RESOURCE_PROFILE_STANDARD)
    return vmm.stub().PrepareTemplate(req, timeout=BOOT_TIMEOUT_S * 2).template


@pytest.fixture(scope="session")
def shared_vm(vmm: VMManagerProcess) -> Iterator[common_pb2.VM]:
    """One booted VM shared by tests that only run commands in it."""
    f = VMFactory(vmm)
    try:
        yield f.booted()
    finally:
        f.cleanup()


@pytest.fixture(scope="session")
def coder_image(vmm: VMManagerProcess) -> vm_manager_pb2.Image:
    """images/coder.toml built once per session (its build steps are cached across runs)."""
    built = build_spec(vmm, spec_source(CODER_SPEC))
    assert built.image is not None
    return built.image
