"""Every figure a guest reports about an execution is clamped on the host (issue 22, item 8).

A hostile guest sends an ExitStatus with negative, invalid, impossible or absurd figures;
the executor passes on (to its caller, the monitor and the audit log) only figures
within what the host measured itself, and records each clamp.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from agentvm.common.grpc_util import guest_channel
from agentvm.common.guest_figures import (
    MAX_EXIT_CODE,
    MAX_SIGNAL,
    PID_MAX_LIMIT,
    SLACK_S,
    Bounds,
    clamp_exit_status,
)
from agentvm.monitor.anomaly import FEATURE_MAX
from agentvm.v1 import common_pb2, guest_agent_pb2

from .helpers import run_async
from .test_hostile_guest import Ctx, exec_request, executor, fake_agent, run_exec, sandbox, started

MiB = 2**20
BOUNDS = Bounds(elapsed_s=2.0, vcpus=2, memory_bytes=512 * MiB)


def hostile_status() -> common_pb2.ExitStatus:
    status = common_pb2.ExitStatus(exit_code=-7, signal=9999, timed_out=False)
    status.duration.seconds = -5
    status.usage.cpu_time.seconds = 10**6  # a million CPU seconds in a 2 s run
    status.usage.cpu_time.nanos = -3  # and an invalid Duration (signs differ)
    status.usage.memory_peak_bytes = 2**64 - 1
    status.usage.memory_limit_bytes = 2**40
    status.usage.pids_peak = 2**32 - 1
    status.usage.pids_limit = 2**32 - 1
    return status


def durations_are_valid(status: common_pb2.ExitStatus) -> None:
    # Renders as JSON (an invalid Duration raises here: the CLI, evidence, audit log).
    json_format.MessageToJson(status)


def test_hostile_figures_are_clamped_and_noted() -> None:
    status = hostile_status()
    notes = clamp_exit_status(status, BOUNDS)
    assert status.exit_code == MAX_EXIT_CODE  # never turned into a success
    assert status.signal == MAX_SIGNAL
    assert status.duration.ToNanoseconds() == 0
    assert status.usage.cpu_time.ToNanoseconds() == 0  # invalid Duration: zero
    assert status.usage.memory_peak_bytes == 512 * MiB
    assert status.usage.memory_limit_bytes == 512 * MiB
    assert status.usage.pids_peak == PID_MAX_LIMIT
    assert status.usage.pids_limit == PID_MAX_LIMIT
    durations_are_valid(status)
    assert len(notes) == 8
    assert any(n.startswith("exit_code -7 -> 255") for n in notes)
    assert any(n.startswith("duration -5 s -> 0 s") for n in notes)
    assert any(n.startswith("usage.cpu_time an invalid Duration") for n in notes)


def test_cpu_time_and_duration_are_bounded_by_the_hosts_own_clock() -> None:
    status = common_pb2.ExitStatus(exit_code=0)
    status.duration.FromSeconds(10**9)  # 31 years in a 2 s run
    status.usage.cpu_time.FromSeconds(3600)
    notes = clamp_exit_status(status, BOUNDS)
    wall = 2.0 + SLACK_S
    assert status.duration.ToNanoseconds() == int(wall * 1e9)
    assert status.usage.cpu_time.ToNanoseconds() == int(wall * 2 * 1e9)  # two vCPUs
    assert len(notes) == 2
    # Plausible figures pass untouched and unnoted.
    honest = common_pb2.ExitStatus(exit_code=3, signal=0)
    honest.duration.FromMilliseconds(1500)
    honest.usage.cpu_time.FromMilliseconds(2500)
    honest.usage.memory_peak_bytes = 100 * MiB
    honest.usage.pids_peak = 7
    before = honest.SerializeToString()
    assert clamp_exit_status(honest, BOUNDS) == []
    assert honest.SerializeToString() == before


@given(
    code=st.integers(-(2**31), 2**31 - 1),
    signal=st.integers(-(2**31), 2**31 - 1),
    seconds=st.integers(-(2**63), 2**63 - 1),
    nanos=st.integers(-(2**31), 2**31 - 1),
    cpu_seconds=st.integers(-(2**63), 2**63 - 1),
    cpu_nanos=st.integers(-(2**31), 2**31 - 1),
    memory=st.integers(0, 2**64 - 1),
    pids=st.integers(0, 2**32 - 1),
    elapsed=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1.0)),
)
def test_any_exit_status_comes_out_bounded(
    code: int,
    signal: int,
    seconds: int,
    nanos: int,
    cpu_seconds: int,
    cpu_nanos: int,
    memory: int,
    pids: int,
    elapsed: float,
) -> None:
    status = common_pb2.ExitStatus(exit_code=code, signal=signal)
    status.duration.seconds, status.duration.nanos = seconds, nanos
    status.usage.cpu_time.seconds, status.usage.cpu_time.nanos = cpu_seconds, cpu_nanos
    status.usage.memory_peak_bytes = memory
    status.usage.pids_peak = pids
    bounds = Bounds(elapsed_s=elapsed, vcpus=1, memory_bytes=256 * MiB)
    clamp_exit_status(status, bounds)
    durations_are_valid(status)
    assert 0 <= status.exit_code <= MAX_EXIT_CODE
    assert 0 <= status.signal <= MAX_SIGNAL
    wall = bounds.wall_s
    assert 0 <= status.duration.ToNanoseconds() / 1e9 <= wall + 1e-9
    assert 0 <= status.usage.cpu_time.ToNanoseconds() / 1e9 <= wall + 1e-9
    assert status.usage.memory_peak_bytes <= 256 * MiB
    assert status.usage.pids_peak <= PID_MAX_LIMIT
    # And what reaches the monitor is a figure its detector takes, never a lie it drops.
    assert status.duration.ToNanoseconds() / 1e9 <= FEATURE_MAX["duration_s"]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(
        self, type_: str, *, vm: str = "", sandbox: str = "", severity: str = "info", **attrs: Any
    ) -> None:
        self.events.append((type_, {"vm": vm, "severity": severity, **attrs}))


def test_the_executor_passes_on_only_clamped_figures_and_records_the_lie(tmp_path: Path) -> None:
    hostile = guest_agent_pb2.ExecuteResponse(exited=hostile_status()).SerializeToString()

    async def execute(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
        yield started()
        yield hostile

    recorder = Recorder()

    async def body() -> Any:
        async with (
            fake_agent(tmp_path / "a.sock", stream={"Execute": execute}) as target,
            guest_channel(target) as ch,
        ):
            ex = executor()
            ex.events = recorder
            sb = sandbox(ch, limit=10)
            sb.vm.resources.vcpus = 1
            sb.vm.resources.memory_mib = 512
            res = await run_exec(ex, sb, exec_request(timeout_s=5))
            await asyncio.sleep(0)
            return res

    res = run_async(body())
    assert res.error is None
    (status,) = res.exits
    # What the caller got.
    assert status.exit_code == MAX_EXIT_CODE
    assert status.duration.ToNanoseconds() == 0
    assert status.usage.memory_peak_bytes == 512 * MiB
    assert status.usage.pids_peak == PID_MAX_LIMIT
    durations_are_valid(status)
    # The clamp is on record, and the monitor gets bounded figures only.
    kinds = [k for k, _ in recorder.events]
    assert "guest.figures_clamped" in kinds
    clamped = next(a for k, a in recorder.events if k == "guest.figures_clamped")
    assert clamped["severity"] == "warning"
    assert any("memory_peak_bytes" in n for n in clamped["clamped"])
    finished = next(a for k, a in recorder.events if k == "execution.finished")
    assert finished["memory_peak_bytes"] == 512 * MiB
    assert finished["pids_peak"] == PID_MAX_LIMIT
    assert finished["duration_s"] == 0
    assert math.isfinite(finished["cpu_s"])
    assert finished["cpu_s"] >= 0
