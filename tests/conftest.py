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
from tests.networld import NetWorld, nat_env, networld
from tests.vmharness import (
    BOOT_TIMEOUT_S,
    ExecutorProcess,
    VMFactory,
    VMManagerProcess,
    leftovers,
    new_vmm,
    remove_vmm_dirs,
)


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
def vmm(guest_image: Path, net_world: NetWorld) -> Iterator[VMManagerProcess]:
    """A vm-manager process of the tests' own (own dirs, own VM name prefix).

    Its NAT network leaves only into the test world: the uplink is the
    world's veth, its resolver forwards to the world's DNS, and a routing
    rule sends whatever enters by its bridge into the world or nowhere.
    """
    proc = new_vmm()
    proc.extra_env = nat_env(net_world)
    net_world.confine(NetNames.for_prefix(proc.prefix).bridge, proc.extra_env["AGENTVM_NAT_SUBNET"])
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()
        left = leftovers(proc)
        remove_vmm_dirs(proc)
        assert not left, f"the tests left resources behind: {left}"


@pytest.fixture(scope="session")
def executor(vmm: VMManagerProcess) -> Iterator[ExecutorProcess]:
    """The executor process, talking to the tests' vm-manager; sets AGENTVM_EXECUTOR_ADDR."""
    proc = ExecutorProcess(base=vmm.base, prefix=vmm.prefix)
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
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


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
