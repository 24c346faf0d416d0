"""Undecodable requests to every method of every real service (issue 21).

Each service process of the session (vm-manager, executor, monitor, and a
pool-manager of this module's own) gets, for every method of its contract,
hypothesis-made bytes that are no valid request message: fields cut short,
varints that never end, wire types 6 and 7, group ends without starts,
nesting past the decoder's depth limit, invalid UTF-8 in string fields,
behind a valid prefix or alone. Every call must be answered
INVALID_ARGUMENT naming the method and the message; afterwards every
process is the same process, healthy, its log grew by at most a few lines
without a traceback, and no VM or sandbox was made.

The budget is small in CI; ``AGENTVM_FUZZ_EXAMPLES=500`` runs a longer fuzz by hand.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentvm.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    monitor_pb2,
    pool_manager_pb2,
    vm_manager_pb2,
)
from tests.protofuzz import varint as _varint
from tests.vmharness import (
    ExecutorProcess,
    MonitorProcess,
    PoolManagerProcess,
    VMManagerProcess,
    libvirt_domains,
)

pytestmark = pytest.mark.vm

EXAMPLES = int(os.environ.get("AGENTVM_FUZZ_EXAMPLES", "6"))
# Lines a burst of malformed requests from one caller may add to a service log.
LOG_BURST = 5


def _string_fields(desc: Descriptor) -> list[int]:
    return [f.number for f in desc.fields if f.type == FieldDescriptor.TYPE_STRING]


def undecodable(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that no decoder may accept as a ``desc`` message."""
    field = st.integers(min_value=1, max_value=40)
    tails = [
        # A length-delimited field whose bytes run out.
        st.builds(
            lambda n, k, data: _varint(n << 3 | 2) + _varint(len(data) + k) + data,
            field,
            st.integers(min_value=1, max_value=1 << 20),
            st.binary(max_size=32),
        ),
        # A varint that never ends.
        st.builds(
            lambda n, k: _varint(n << 3) + b"\xff" * k, field, st.integers(min_value=1, max_value=9)
        ),
        # Wire types that do not exist.
        st.builds(lambda n, t: _varint(n << 3 | t), field, st.sampled_from([6, 7])),
        # An end-group with no start.
        st.builds(lambda n: _varint(n << 3 | 4), field),
        # Groups nested past the decoder's depth limit.
        st.integers(min_value=120, max_value=2000).map(lambda d: b"\x0b" * d + b"\x0c" * d),
    ]
    strings = _string_fields(desc)
    if strings:
        # Invalid UTF-8 in a string field of this very message.
        tails.append(
            st.builds(
                lambda n, bad: _varint(n << 3 | 2) + _varint(len(bad)) + bad,
                st.sampled_from(strings),
                st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xfe\xfe"]),
            )
        )
    prefix = st.sampled_from([b"", _valid_prefix(desc)])
    return st.builds(lambda p, t: p + t, prefix, st.one_of(tails))


def _valid_prefix(desc: Descriptor) -> bytes:
    """A well-formed field of ``desc`` (so the bad bytes come after a good start)."""
    strings = _string_fields(desc)
    if not strings:
        return b""
    return _varint(strings[0] << 3 | 2) + _varint(3) + b"abc"


def _methods(service: ServiceDescriptor) -> list[tuple[str, Descriptor, bool, bool]]:
    return [
        (
            f"/{service.full_name}/{m.name}",
            m.input_type,
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.methods
    ]


def _call(
    ch: grpc.Channel, method: str, client_stream: bool, server_stream: bool, raw: bytes
) -> None:
    if client_stream:
        if server_stream:
            list(ch.stream_stream(method, None, None)(iter([raw]), timeout=30))
        else:
            ch.stream_unary(method, None, None)(iter([raw]), timeout=30)
    elif server_stream:
        list(ch.unary_stream(method, None, None)(raw, timeout=30))
    else:
        ch.unary_unary(method, None, None)(raw, timeout=30)


def _refuses(ch: grpc.Channel, method: str, desc: Descriptor, streams: tuple[bool, bool]) -> None:
    """Hypothesis: every undecodable ``desc`` sent to ``method`` is INVALID_ARGUMENT."""

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(raw=undecodable(desc))
    def check(raw: bytes) -> None:
        with pytest.raises(grpc.RpcError) as info:
            _call(ch, method, *streams, raw)
        err: Any = info.value
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, raw, err)
        want = f"{method.lstrip('/')}: the request is not a valid {desc.full_name}"
        assert want in (err.details() or "")

    check()


def _fuzz(proc: VMManagerProcess, service: ServiceDescriptor) -> None:
    assert proc.proc is not None
    pid = proc.proc.pid
    log_before = proc.log_path.read_text(errors="replace")
    start = time.monotonic()
    with proc.channel() as ch:
        for method, desc, client_stream, server_stream in _methods(service):
            _refuses(ch, method, desc, (client_stream, server_stream))
    # At most a burst of lines per caller and minute (a longer fuzz spans more minutes).
    bound = (LOG_BURST + 1) * (2 + int((time.monotonic() - start) // 60))
    assert proc.proc.poll() is None, proc.log_path.read_text()[-3000:]
    assert proc.proc.pid == pid
    assert proc.health() == health_pb2.HealthCheckResponse.SERVING
    added = proc.log_path.read_text(errors="replace")[len(log_before) :]
    refused = [line for line in added.splitlines() if "malformed" in line]
    assert 1 <= len(refused) <= bound, refused
    assert "Traceback" not in added, added[-3000:]


@pytest.fixture(scope="module")
def pool_manager(vmm: VMManagerProcess) -> Iterator[PoolManagerProcess]:
    """A pool-manager whose pool makes nothing unless asked (min 0)."""
    proc = PoolManagerProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="pool-malformed",
        pools="standard:min=0,max=1,ttl=600",
    )
    proc.start()
    try:
        # Even at min 0 a pool builds its memory template (a VM for a while):
        # the fuzz starts once it is built, so every VM it sees is the fuzz's.
        proc.wait_status(lambda s: s.template_ready, timeout=900)
        yield proc
    finally:
        proc.stop_if_running()


def test_every_method_of_every_service_refuses_undecodable_requests(
    vmm: VMManagerProcess,
    executor: ExecutorProcess,
    monitor_proc: MonitorProcess,
    pool_manager: PoolManagerProcess,
) -> None:
    domains = set(libvirt_domains(vmm.prefix))
    stub = executor_pb2_grpc.ExecutorServiceStub(executor.channel())
    sandboxes = {s.id for s in stub.ListSandboxes(executor_pb2.ListSandboxesRequest()).sandboxes}
    for proc, descriptor in (
        (vmm, vm_manager_pb2.DESCRIPTOR.services_by_name["VMManagerService"]),
        (executor, executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"]),
        (monitor_proc, monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"]),
        (pool_manager, pool_manager_pb2.DESCRIPTOR.services_by_name["PoolManagerService"]),
    ):
        _fuzz(proc, descriptor)
    # Nothing was made: no VM, no sandbox.
    assert set(libvirt_domains(vmm.prefix)) <= domains
    after = {s.id for s in stub.ListSandboxes(executor_pb2.ListSandboxesRequest()).sandboxes}
    assert after <= sandboxes
