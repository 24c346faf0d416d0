"""Anomaly detection: statistical (per execution) and rule-based (live), pure logic.

See docs/MONITOR_DESIGN.md, "Anomaly detection". Nothing here does I/O, reads the clock or
the environment: the caller passes settings text (``AGENTVM_ANOMALY_RULES``,
``AGENTVM_ANOMALY_RESPONSES``) and the monotonic time ``now`` in seconds, and gets back
:class:`Detection` objects to audit, count and act on.

Figures that come from a guest are hostile: a value that is missing, not a number, not
finite, negative or beyond what any real guest could report is ignored (it neither fires a
detection nor enters a baseline), so a guest cannot crash the detector, poison its
statistics or make it fire on nonsense.

* Statistical: per feature in :data:`FEATURES`, each VM is scored against its own
  baseline once that has ``warmup`` values, and against the installation-wide prior until
  then; each VM feeds the prior with only its first few values, so no guest can move
  another VM's baseline (:mod:`agentvm.monitor.baselines`). A value fires
  ``zscore_<feature>`` when its z-score against the window *before* it exceeds
  ``Thresholds.zscore`` and it is at least the feature's floor above the mean. Values that
  fire are not added to any baseline (an attack does not become the new normal); every
  anomalous execution fires (no de-duplication).
* Rules: ``process_storm``, ``egress_denied``, ``cpu_pegged``, ``disk_full``. Each fires once
  per (VM, rule) and re-arms when its condition clears.

Settings (:class:`Thresholds`, :class:`Responses`) are parsed in
:mod:`agentvm.monitor.anomaly_settings`, baselines kept in :mod:`agentvm.monitor.baselines`;
both are re-exported here.

Not thread-safe: one :class:`Detector` is driven by one task/thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from agentvm.monitor.anomaly_settings import (
    CPU_PEGGED,
    DISK_FULL,
    EGRESS_DENIED,
    PROCESS_STORM,
    RESPONSES_SETTING,
    RULES,
    RULES_SETTING,
    ZSCORE,
    ZSCORE_PREFIX,
    Action,
    Responses,
    Severity,
    Thresholds,
)
from agentvm.monitor.baselines import MAX_BASELINE_VMS, Baselines, RollingBaseline

# Re-exported: the settings (anomaly_settings.py) and statistics (baselines.py) of the detector.
__all__ = [
    "CPU_PEGGED",
    "DISK_FULL",
    "EGRESS_DENIED",
    "PROCESS_STORM",
    "RESPONSES_SETTING",
    "RULES",
    "RULES_SETTING",
    "ZSCORE",
    "ZSCORE_PREFIX",
    "Action",
    "Baselines",
    "Detection",
    "Detector",
    "Responses",
    "RollingBaseline",
    "Severity",
    "Thresholds",
]

# Per-execution features, in the order they are checked.
FEATURES: Final = (
    "cpu_s",
    "memory_peak_bytes",
    "pids_peak",
    "output_bytes",
    "denied_egress",
    "duration_s",
)

MiB: Final = 2**20

# A z-score alone does not fire unless the value is at least this far above the mean.
FEATURE_FLOORS: Final[Mapping[str, float]] = {
    "cpu_s": 1.0,
    "memory_peak_bytes": 32.0 * MiB,
    "pids_peak": 16.0,
    "output_bytes": 1.0 * MiB,
    "denied_egress": 5.0,
    "duration_s": 2.0,
}

# Largest value a real execution can report; anything above is a lie and is ignored.
# (Linux caps PIDs at 2**22; a petabyte of memory or output; ~115 days of CPU or wall time.)
PID_MAX_LIMIT: Final = 2**22
FEATURE_MAX: Final[Mapping[str, float]] = {
    "cpu_s": 1e7,
    "memory_peak_bytes": float(2**50),
    "pids_peak": float(PID_MAX_LIMIT),
    "output_bytes": float(2**50),
    "denied_egress": 1e9,
    "duration_s": 1e7,
}

# Fractions above 1 (sampling jitter) count as 1; above this they are nonsense and ignored.
_MAX_FRACTION: Final = 2.0

# Per-VM state is kept for at most this many VMs (least recently active evicted first).
MAX_TRACKED_VMS: Final = 10_000


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None (whatever a hostile sender put there)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _fraction(value: object) -> float | None:
    """A usage fraction in [0, 1] (jitter above 1 clamped), or None when it is nonsense."""
    x = _number(value)
    if x is None or x < 0.0 or x > _MAX_FRACTION:
        return None
    return min(x, 1.0)


def _plausible(feature: str, value: object) -> float | None:
    x = _number(value)
    if x is None or x < 0.0 or x > FEATURE_MAX[feature]:
        return None
    return x


def _fmt(feature: str, x: float) -> str:
    """A feature value in its unit, for descriptions."""
    if feature.endswith("_bytes"):
        return f"{x / MiB:.1f} MiB"
    if feature.endswith("_s"):
        return f"{x:.1f} s"
    return f"{x:.0f}"


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


# --- detections -----------------------------------------------------------------------------

# Rules that are critical whatever the response; any other is critical when the
# response destroys the VM, a warning otherwise.
_CRITICAL_RULES: Final = frozenset({PROCESS_STORM, EGRESS_DENIED})


@dataclass(frozen=True)
class Detection:
    """One anomaly: what fired, on which VM, and what the monitor should do."""

    rule: str
    vm: str
    sandbox: str
    # The observed figure and the limit it crossed, in the same unit
    # (z-score rules: the feature value and the smallest value that would have fired).
    value: float
    threshold: float
    severity: Severity
    description: str
    action: Action


# --- detector -------------------------------------------------------------------------------


@dataclass
class _VMState:
    active: set[str] = field(default_factory=set)  # rules that fired and have not cleared
    pegged_since: float | None = None  # first of the current run of CPU-pegged samples
    denied: deque[float] = field(default_factory=deque)  # times of recent denied egress


class Detector:
    """Turns executions, VM stats samples and egress records into :class:`Detection` lists."""

    def __init__(
        self,
        thresholds: Thresholds,
        responses: Responses,
        *,
        max_vms: int = MAX_TRACKED_VMS,
    ) -> None:
        if max_vms < 1:
            raise ValueError(f"max_vms must be >= 1, got {max_vms}")
        self.thresholds = thresholds
        self.responses = responses
        self.max_vms = max_vms
        self._baselines = Baselines(
            FEATURES,
            thresholds.window,
            thresholds.warmup,
            max_vms=min(max_vms, MAX_BASELINE_VMS),
        )
        self._vms: OrderedDict[str, _VMState] = OrderedDict()
        self._denied_keep = thresholds.denied_egress * 2 + 1

    # -- introspection (metrics, tests) --

    def baseline(self, feature: str, vm: str | None = None) -> RollingBaseline:
        """The installation-wide prior of one of :data:`FEATURES` (KeyError for others),
        or ``vm``'s own baseline of it (an empty one while it has none)."""
        prior = self._baselines.prior[feature]
        if vm is None:
            return prior
        own = self._baselines.own(vm, feature)
        return own if own is not None else RollingBaseline(prior.window, prior.warmup)

    @property
    def tracked_vms(self) -> int:
        """How many VMs have rule state (at most ``max_vms``)."""
        return len(self._vms)

    @property
    def baseline_vms(self) -> int:
        """How many VMs have baselines of their own (at most min(max_vms, 1024))."""
        return self._baselines.tracked_vms

    def forget(self, vm: str) -> None:
        """Drop the per-VM state and baselines of ``vm`` (it was destroyed)."""
        self._vms.pop(vm, None)
        self._baselines.forget(vm)

    # -- per-VM state --

    def _state(self, vm: str) -> _VMState:
        """The state of ``vm``, created if needed; marks it most recently active."""
        state = self._vms.get(vm)
        if state is None:
            while len(self._vms) >= self.max_vms:
                self._vms.popitem(last=False)
            state = _VMState(denied=deque(maxlen=self._denied_keep))
            self._vms[vm] = state
        else:
            self._vms.move_to_end(vm)
        return state

    def _existing(self, vm: str) -> _VMState | None:
        state = self._vms.get(vm)
        if state is not None:
            self._vms.move_to_end(vm)
        return state

    def _detection(
        self, rule: str, vm: str, sandbox: str, value: float, threshold: float, description: str
    ) -> Detection:
        action = self.responses.action(rule)
        severity: Severity = (
            "critical" if rule in _CRITICAL_RULES or action != Action.ALERT else "warning"
        )
        return Detection(
            rule=rule,
            vm=vm,
            sandbox=sandbox,
            value=value,
            threshold=threshold,
            severity=severity,
            description=description,
            action=action,
        )

    def _fire_once(
        self,
        rule: str,
        vm: str,
        sandbox: str,
        value: float,
        threshold: float,
        description: str,
    ) -> list[Detection]:
        state = self._state(vm)
        if rule in state.active:
            return []
        state.active.add(rule)
        return [self._detection(rule, vm, sandbox, value, threshold, description)]

    def _clear(self, vm: str, rule: str) -> None:
        state = self._existing(vm)
        if state is not None:
            state.active.discard(rule)

    def _process_storm(self, vm: str, sandbox: str, count: float, what: str) -> list[Detection]:
        limit = self.thresholds.max_processes
        if count > limit:
            return self._fire_once(
                PROCESS_STORM, vm, sandbox, count, float(limit), f"{what} (limit {limit})"
            )
        self._clear(vm, PROCESS_STORM)
        return []

    # -- inputs --

    def on_execution(self, vm: str, sandbox: str, features: Mapping[str, float]) -> list[Detection]:
        """A finished execution's figures (keys of :data:`FEATURES`; others ignored).

        Each feature is scored against ``vm``'s own baseline (the prior while that is
        still warming up), then added to the baselines unless it fired.
        ``pids_peak`` above ``max_processes`` also fires ``process_storm`` (once per VM until
        an execution or stats sample shows the count back within the limit).
        """
        out: list[Detection] = []
        values: dict[str, float] = {}
        for feature in FEATURES:
            try:
                raw: object = features.get(feature)
            except Exception:  # noqa: BLE001 - a hostile mapping must not break detection
                raw = None
            x = _plausible(feature, raw)
            if x is not None:
                values[feature] = x
        pids = values.get("pids_peak")
        if pids is not None:
            out += self._process_storm(
                vm, sandbox, pids, f"an execution peaked at {pids:.0f} processes in the guest"
            )
        zlimit = self.thresholds.zscore
        for feature, x in values.items():
            baseline, own = self._baselines.for_scoring(vm, feature)
            z = baseline.score(x)
            mean = baseline.mean
            floor = FEATURE_FLOORS[feature]
            if z is not None and z > zlimit and x - mean >= floor:
                boundary = mean + max(zlimit * baseline.std, floor)
                sigmas = "infinitely many" if math.isinf(z) else f"{z:.1f}"
                out.append(
                    self._detection(
                        ZSCORE_PREFIX + feature,
                        vm,
                        sandbox,
                        x,
                        boundary,
                        f"{feature} {_fmt(feature, x)} is {sigmas} standard deviations above "
                        f"the mean {_fmt(feature, mean)} of the last {baseline.count} "
                        f"executions {'of this VM' if own else 'across VMs'} "
                        f"(limit {zlimit:g})",
                    )
                )
            else:
                self._baselines.add(vm, feature, x)
        return out

    def on_vm_stats(
        self,
        vm: str,
        sandbox: str,
        now: float,
        *,
        cpu_fraction: float | None,
        processes: int | None,
        disk_used_fraction: float | None,
    ) -> list[Detection]:
        """One stats sample of a VM (None or nonsense figures are ignored, not "clear").

        ``cpu_fraction`` is the share of the VM's vCPUs in use (0..1), ``processes`` the
        guest's process count, ``disk_used_fraction`` the guest disk's used share.
        """
        out: list[Detection] = []
        t = self.thresholds
        count = _number(processes)
        if count is not None and 0 <= count <= PID_MAX_LIMIT:
            out += self._process_storm(vm, sandbox, count, f"{count:.0f} processes in the guest")

        cpu = _fraction(cpu_fraction)
        if cpu is not None and math.isfinite(now):
            if cpu >= t.cpu_pegged:
                state = self._state(vm)
                if state.pegged_since is None or now < state.pegged_since:
                    state.pegged_since = now
                elapsed = now - state.pegged_since
                if elapsed >= t.cpu_pegged_for_s:
                    out += self._fire_once(
                        CPU_PEGGED,
                        vm,
                        sandbox,
                        cpu,
                        t.cpu_pegged,
                        f"CPU at {_pct(cpu)} of its vCPUs for {elapsed:.0f} s "
                        f"(limit {_pct(t.cpu_pegged)} for {t.cpu_pegged_for_s:g} s)",
                    )
            else:
                state_or_none = self._existing(vm)
                if state_or_none is not None:
                    state_or_none.pegged_since = None
                    state_or_none.active.discard(CPU_PEGGED)

        disk = _fraction(disk_used_fraction)
        if disk is not None:
            if disk > t.disk_full:
                out += self._fire_once(
                    DISK_FULL,
                    vm,
                    sandbox,
                    disk,
                    t.disk_full,
                    f"guest disk {_pct(disk)} full (limit {_pct(t.disk_full)})",
                )
            else:
                self._clear(vm, DISK_FULL)
        return out

    def on_egress(self, vm: str, sandbox: str, now: float, denied: bool) -> list[Detection]:
        """One egress record of ``vm`` at ``now``.

        Fires ``egress_denied`` when more than ``denied_egress`` denied records fall within
        the last ``denied_window_s``; re-arms once that count is back to half the limit.
        """
        if not math.isfinite(now):
            return []
        t = self.thresholds
        state = self._state(vm) if denied else self._existing(vm)
        if state is None:
            return []
        dq = state.denied
        cutoff = now - t.denied_window_s
        while dq and dq[0] < cutoff:
            dq.popleft()
        if denied:
            dq.append(now)
        count = len(dq)
        if count <= t.denied_egress / 2:
            state.active.discard(EGRESS_DENIED)
        if count > t.denied_egress:
            return self._fire_once(
                EGRESS_DENIED,
                vm,
                sandbox,
                float(count),
                float(t.denied_egress),
                f"{count} denied egress connections within {t.denied_window_s:g} s "
                f"(limit {t.denied_egress})",
            )
        return []
