"""Hostile but well-formed requests to every method of vm-manager, executor and monitor (issue 21).

Every request decodes (tests/protofuzz.py builds it from the method's input
type: unknown enum numbers, extreme integers, NaN, path-like and huge
strings, thousands of repeated or map entries, unknown fields), so it reaches
the real handler, served in process: vm-manager over libvirt's test driver
and the executor (the stack of test_bad_input.py), the monitor, and the
pool-manager (its real PoolManager over test_pool.py's fake vm-manager
backend). tests/integration/test_malformed.py sends the undecodable half to
the four real service processes. Each
answer must be a deliberate status: never UNKNOWN or INTERNAL (a handler
bug), and what failed leaves nothing behind.

``AGENTVM_FUZZ_EXAMPLES=300`` runs a longer fuzz by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import given, settings

from agentvm.common.config import Settings
from agentvm.common.grpc_util import SERVER_OPTIONS
from agentvm.monitor.servicer import MonitorServicer
from agentvm.pool_manager.manager import PoolManager
from agentvm.pool_manager.servicer import PoolManagerServicer
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    monitor_pb2,
    monitor_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
)
from tests.protofuzz import wire_messages
from tests.unit.test_bad_input import Stack, image_cache, services  # noqa: F401 (fixture)
from tests.unit.test_monitor_service import new_monitor
from tests.unit.test_pool import KEY as POOL_KEY
from tests.unit.test_pool import FakeBackend
from tests.unit.test_pool import cfg as pool_cfg

EXAMPLES = int(os.environ.get("AGENTVM_FUZZ_EXAMPLES", "8"))
# The methods not fuzzed here, and why.
SKIPPED = {
    # Its one field (force) rebuilds the real guest image (minutes, mmdebstrap).
    "agentvm.v1.VMManagerService/BuildImage",
}
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def _methods() -> list[MethodDescriptor]:
    out = []
    for module, name in (
        (vm_manager_pb2, "VMManagerService"),
        (executor_pb2, "ExecutorService"),
        (monitor_pb2, "MonitorService"),
        (pool_manager_pb2, "PoolManagerService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        out += [m for m in service.methods if f"{service.full_name}/{m.name}" not in SKIPPED]
    return out


def _call(ch: grpc.Channel, m: MethodDescriptor, raw: bytes) -> grpc.StatusCode:
    path = f"/{m.containing_service.full_name}/{m.name}"
    # A watch that accepted its request streams until the deadline: half a second
    # shows whether it was accepted (the suite paid 5 s per example for each).
    wait = 0.5 if m.name.startswith("Watch") else 5
    try:
        if m.client_streaming:
            ch.stream_unary(path, None, None)(iter([raw]), timeout=5)
        elif m.server_streaming:
            for _ in ch.unary_stream(path, None, None)(raw, timeout=wait):
                pass
        else:
            ch.unary_unary(path, None, None)(raw, timeout=5)
    except grpc.RpcError as exc:
        err: Any = exc
        assert err.code() not in BUGS, (path, err.code(), (err.details() or "")[:300])
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def stack(tmp_path: Path, image_cache: Path) -> Iterator[Stack]:  # noqa: F811
    with services(tmp_path, image_cache) as s:
        yield s


@contextlib.contextmanager
def _served(
    addr: str, register: Callable[[grpc.aio.Server], None], up: Any, down: Any
) -> Iterator[None]:
    """Serve on a background loop: ``up()``, then the server; at the end, ``down()``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> grpc.aio.Server:
        await up()
        server = grpc.aio.server(options=SERVER_OPTIONS)
        register(server)
        server.add_insecure_port(addr)
        await server.start()
        return server

    async def stop(server: grpc.aio.Server) -> None:
        await server.stop(None)
        await down()

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(stop(server), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def monitor_addr(tmp_path: Path) -> Iterator[str]:
    """The real monitor servicer, served in process."""
    addr = f"unix:{tmp_path}/monitor.sock"
    mon = new_monitor(tmp_path / "mon")
    with _served(
        addr,
        lambda s: monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(mon), s),
        mon.start,
        mon.close,
    ):
        yield addr


class _Backend(FakeBackend):
    """test_pool's fake vm-manager, with what a PoolManager asks besides."""

    async def list_vms(self, labels: dict[str, str]) -> list[common_pb2.VM]:
        return []

    async def mark_leased(
        self, name: str, lessee: str, lease_id: str, labels: object = None
    ) -> common_pb2.VM:
        return common_pb2.VM(name=name, state=common_pb2.VM_STATE_READY)

    async def close(self) -> None:
        return None


@pytest.fixture
def pool_stack(tmp_path: Path) -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """The real pool-manager (PoolManager + servicer) over a fake vm-manager."""
    addr = f"unix:{tmp_path}/pool.sock"
    settings = dataclasses.replace(Settings(), state_dir=tmp_path / "state", pool_manager_addr=addr)
    backend = _Backend()
    manager = PoolManager(settings, cast(Any, backend), {POOL_KEY: pool_cfg(0, 2)})

    def leftovers() -> list[str]:
        """VMs the fake vm-manager holds and leases the journal keeps open."""
        leased = [f"lease {lid}" for lid in manager.journal.open()]
        return [f"vm {n}" for n in sorted(backend.alive)] + leased

    with _served(
        addr,
        lambda s: pool_manager_pb2_grpc.add_PoolManagerServiceServicer_to_server(
            PoolManagerServicer(manager), s
        ),
        manager.start,
        manager.close,
    ):
        yield addr, leftovers


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.name)
def test_hostile_wellformed_requests_get_deliberate_answers(
    request: pytest.FixtureRequest, method: MethodDescriptor
) -> None:
    left: Callable[[], list[str]] = list
    if method.containing_service.name == "MonitorService":
        addr = request.getfixturevalue("monitor_addr")
    elif method.containing_service.name == "PoolManagerService":
        addr, left = request.getfixturevalue("pool_stack")
    else:
        stack: Stack = request.getfixturevalue("stack")
        addr, left = (
            (
                stack.settings.executor_addr
                if method.containing_service.name == "ExecutorService"
                else stack.settings.vm_manager_addr
            ),
            stack.leftovers,
        )
    with grpc.insecure_channel(addr) as ch:

        @settings(max_examples=EXAMPLES, deadline=None)
        @given(raw=wire_messages(method.input_type))
        def check(raw: bytes) -> None:
            before = left()
            if _call(ch, method, raw) is not grpc.StatusCode.OK:
                assert left() == before, method.name

        check()
