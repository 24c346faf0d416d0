"""Hostile but well-formed requests to every method of vm-manager, executor and monitor (issue 21).

Every request decodes (tests/protofuzz.py builds it from the method's input
type: unknown enum numbers, extreme integers, NaN, path-like and huge
strings, thousands of repeated or map entries, unknown fields), so it reaches
the real handler, served in process: vm-manager over libvirt's test driver
and the executor (the stack of test_bad_input.py), and the monitor. The
pool-manager's handlers need a vm-manager that boots VMs: its process gets
the undecodable half of this in tests/integration/test_malformed.py. Each
answer must be a deliberate status: never UNKNOWN or INTERNAL (a handler
bug), and what failed leaves nothing behind.

``AGENTVM_FUZZ_EXAMPLES=300`` runs a longer fuzz by hand.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import given, settings

from agentvm.common.grpc_util import SERVER_OPTIONS
from agentvm.monitor.servicer import MonitorServicer
from agentvm.v1 import executor_pb2, monitor_pb2, monitor_pb2_grpc, vm_manager_pb2
from tests.protofuzz import wire_messages
from tests.unit.test_bad_input import Stack, image_cache, services  # noqa: F401 (fixture)
from tests.unit.test_monitor_service import new_monitor

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
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        out += [m for m in service.methods if f"{service.full_name}/{m.name}" not in SKIPPED]
    return out


def _call(ch: grpc.Channel, m: MethodDescriptor, raw: bytes) -> grpc.StatusCode:
    path = f"/{m.containing_service.full_name}/{m.name}"
    try:
        if m.client_streaming:
            ch.stream_unary(path, None, None)(iter([raw]), timeout=5)
        elif m.server_streaming:
            for _ in ch.unary_stream(path, None, None)(raw, timeout=5):
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


@pytest.fixture
def monitor_addr(tmp_path: Path) -> Iterator[str]:
    """The real monitor servicer, served in process on a background loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    addr = f"unix:{tmp_path}/monitor.sock"
    mon = new_monitor(tmp_path / "mon")

    async def start() -> grpc.aio.Server:
        await mon.start()
        server = grpc.aio.server(options=SERVER_OPTIONS)
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(mon), server)
        server.add_insecure_port(addr)
        await server.start()
        return server

    async def stop(server: grpc.aio.Server) -> None:
        await server.stop(None)
        await mon.close()

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield addr
    finally:
        asyncio.run_coroutine_threadsafe(stop(server), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.name)
def test_hostile_wellformed_requests_get_deliberate_answers(
    request: pytest.FixtureRequest, method: MethodDescriptor
) -> None:
    left: Callable[[], list[str]] = list
    if method.containing_service.name == "MonitorService":
        addr = request.getfixturevalue("monitor_addr")
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
            if _call(ch, method, raw) is not grpc.StatusCode.OK:
                assert left() == [], method.name

        check()
