"""Clamp what a guest says about an execution to what the host knows is possible.

The guest is hostile (docs/SECURITY.md): an ExitStatus it sends may claim a negative or
centuries-long duration, more CPU time than its vCPUs could burn, more memory than the
VM has, more processes than Linux allows, or an invalid protobuf Duration that breaks
every later JSON rendering. Everything the host passes on (to its caller, to the
monitor's detector, to the audit log) goes through :func:`clamp_exit_status` first,
which bounds each figure by what the host measured itself (the execution's wall time on
the host, the VM's vCPUs and memory) and returns a note per figure it changed, so the
lie is recorded rather than silently repaired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from google.protobuf import duration_pb2

from agentvm.v1 import common_pb2

# Linux's ceiling for PIDs (pid_max cannot exceed 2**22).
PID_MAX_LIMIT: Final = 2**22
# Exit codes are one byte; signals are 1..64 on Linux.
MAX_EXIT_CODE: Final = 255
MAX_SIGNAL: Final = 64
# Slack on the host's own measurement (the guest's clock starts after the host's).
SLACK_S: Final = 1.0
# The largest google.protobuf.Duration (10,000 years), whatever the host measured.
MAX_DURATION_S: Final = 315_576_000_000


@dataclass(frozen=True)
class Bounds:
    """What the host knows about the execution: its wall time, and the VM's size."""

    elapsed_s: float
    vcpus: int
    memory_bytes: int

    @classmethod
    def of_vm(cls, vm: common_pb2.VM, elapsed_s: float) -> Bounds:
        return cls(elapsed_s, vm.resources.vcpus, vm.resources.memory_mib * 2**20)

    @property
    def wall_s(self) -> float:
        x = self.elapsed_s if math.isfinite(self.elapsed_s) else MAX_DURATION_S
        return min(max(x, 0.0) + SLACK_S, MAX_DURATION_S)


def _seconds(d: duration_pb2.Duration) -> float | None:
    """A Duration's value, or None when it is not a valid Duration."""
    if not -MAX_DURATION_S <= d.seconds <= MAX_DURATION_S or not -(10**9) < d.nanos < 10**9:
        return None
    if (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
        return None
    return d.seconds + d.nanos / 1e9


def _clamp_duration(d: duration_pb2.Duration, high: float, what: str, notes: list[str]) -> None:
    value = _seconds(d)
    if value is not None and 0.0 <= value <= high:
        return
    shown = "an invalid Duration" if value is None else f"{value:g} s"
    fixed = 0.0 if value is None or value < 0 else high
    d.FromNanoseconds(int(fixed * 1e9))
    notes.append(f"{what} {shown} -> {fixed:g} s (at most {high:g} s)")


def _clamp_int(value: int, high: int, what: str, notes: list[str], *, low: int = 0) -> int:
    if low <= value <= high:
        return value
    fixed = low if value < low else high
    notes.append(f"{what} {value} -> {fixed} (must be {low}..{high})")
    return fixed


def clamp_exit_status(status: common_pb2.ExitStatus, bounds: Bounds) -> list[str]:
    """Bound every figure of ``status`` (changed in place); one note per changed figure."""
    notes: list[str] = []
    code = status.exit_code
    if not 0 <= code <= MAX_EXIT_CODE:
        # Never turn a failure into a success: an impossible code is an error code.
        status.exit_code = MAX_EXIT_CODE
        notes.append(f"exit_code {code} -> {MAX_EXIT_CODE} (must be 0..{MAX_EXIT_CODE})")
    status.signal = _clamp_int(status.signal, MAX_SIGNAL, "signal", notes)
    wall = bounds.wall_s
    _clamp_duration(status.duration, wall, "duration", notes)
    usage = status.usage
    _clamp_duration(usage.cpu_time, wall * max(bounds.vcpus, 1), "usage.cpu_time", notes)
    memory = max(bounds.memory_bytes, 0)
    usage.memory_peak_bytes = _clamp_int(
        usage.memory_peak_bytes, memory, "usage.memory_peak_bytes", notes
    )
    usage.memory_limit_bytes = _clamp_int(
        usage.memory_limit_bytes, memory, "usage.memory_limit_bytes", notes
    )
    usage.pids_peak = _clamp_int(usage.pids_peak, PID_MAX_LIMIT, "usage.pids_peak", notes)
    usage.pids_limit = _clamp_int(usage.pids_limit, PID_MAX_LIMIT, "usage.pids_limit", notes)
    # pids_limit_hits and oom_kills count events over time: nothing the host knows bounds
    # them, and as uint32 they are finite and non-negative already.
    return notes
