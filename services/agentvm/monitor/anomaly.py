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

Not thread-safe: one :class:`Detector` is driven by one task/thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Final, Literal

from agentvm.common.errors import InvalidArgument
from agentvm.monitor.baselines import MAX_BASELINE_VMS, Baselines, RollingBaseline

__all__ = ["Baselines", "RollingBaseline"]  # re-exported: the detector's statistics

RULES_SETTING: Final = "AGENTVM_ANOMALY_RULES"
RESPONSES_SETTING: Final = "AGENTVM_ANOMALY_RESPONSES"


class Action(StrEnum):
    """What the monitor does about a detection."""

    ALERT = "alert"
    KILL = "kill"
    SNAPSHOT_AND_KILL = "snapshot_and_kill"


Severity = Literal["warning", "critical"]

# Rule names (Detection.rule, the "rule" attribute of anomaly.* events, Alert.rule).
PROCESS_STORM: Final = "process_storm"
EGRESS_DENIED: Final = "egress_denied"
CPU_PEGGED: Final = "cpu_pegged"
DISK_FULL: Final = "disk_full"
ZSCORE: Final = "zscore"
ZSCORE_PREFIX: Final = "zscore_"
RULES: Final = (PROCESS_STORM, EGRESS_DENIED, CPU_PEGGED, DISK_FULL)

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

# Upper bound of Thresholds.window (memory: len(FEATURES) deques of this many floats).
_MAX_WINDOW: Final = 10_000


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


# --- settings -------------------------------------------------------------------------------

_INT: Final = "int"
_FRACTION: Final = "fraction"
_SECONDS: Final = "seconds"
_POSITIVE: Final = "positive"

# Key in AGENTVM_ANOMALY_RULES -> (Thresholds field, kind).
_RULE_KEYS: Final[Mapping[str, tuple[str, str]]] = {
    "max_processes": ("max_processes", _INT),
    "denied_egress": ("denied_egress", _INT),
    "denied_window": ("denied_window_s", _SECONDS),
    "cpu_pegged": ("cpu_pegged", _FRACTION),
    "cpu_pegged_for": ("cpu_pegged_for_s", _SECONDS),
    "disk_full": ("disk_full", _FRACTION),
    "zscore": ("zscore", _POSITIVE),
    "warmup": ("warmup", _INT),
    "window": ("window", _INT),
}
_FIELD_KEYS: Final[Mapping[str, str]] = {name: key for key, (name, _) in _RULE_KEYS.items()}
_MIN_INT: Final[Mapping[str, int]] = {
    "max_processes": 1,
    "denied_egress": 1,
    "warmup": 2,
    "window": 2,
}


def _split_items(text: str) -> list[tuple[str, str, str]]:
    """``"a=1, b=2"`` -> [(item, key, value)]; an item without "=" has key == item."""
    out: list[tuple[str, str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        out.append((item, key.strip(), value.strip() if sep else ""))
    return out


def _field_problem(name: str, value: object) -> str | None:
    """What is wrong with a Thresholds field value, or None."""
    kind = _RULE_KEYS[_FIELD_KEYS[name]][1]
    if kind == _INT:
        low = _MIN_INT[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}"
        if name == "window" and value > _MAX_WINDOW:
            return f"must be at most {_MAX_WINDOW}"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "must be a finite number"
    if kind == _FRACTION and not 0.0 < value <= 1.0:
        return "must be a fraction in (0, 1]"
    if value <= 0.0:
        return "must be > 0"
    return None


@dataclass(frozen=True)
class Thresholds:
    """Limits of the rules and of the statistical detector (``AGENTVM_ANOMALY_RULES``)."""

    max_processes: int = 256
    denied_egress: int = 20
    denied_window_s: float = 60.0
    cpu_pegged: float = 0.95
    cpu_pegged_for_s: float = 120.0
    disk_full: float = 0.95
    zscore: float = 4.0
    warmup: int = 30
    window: int = 500

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _field_problem(f.name, getattr(self, f.name))
            if problem:
                key = _FIELD_KEYS[f.name]
                raise InvalidArgument(
                    f"{RULES_SETTING}: {key}={getattr(self, f.name)!r} {problem}; "
                    f"valid keys: {_valid_rule_keys()}"
                )
        if self.window < self.warmup:
            raise InvalidArgument(
                f"{RULES_SETTING}: window={self.window} is smaller than warmup={self.warmup}: "
                f"the window must hold the warm-up; valid keys: {_valid_rule_keys()}"
            )

    @classmethod
    def parse(cls, text: str) -> Thresholds:
        """``"max_processes=256,denied_window=60,..."`` (any subset; "" = the defaults).

        Durations (``denied_window``, ``cpu_pegged_for``) are seconds, optionally written
        with an ``s`` suffix. Raises InvalidArgument naming the bad item and the valid keys.
        """
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for item, key, raw in _split_items(text):
            if key not in _RULE_KEYS:
                raise InvalidArgument(
                    f"{RULES_SETTING}: unknown key in {item!r}; valid keys: {_valid_rule_keys()} "
                    f"(e.g. max_processes=256,denied_egress=20)"
                )
            if key in seen:
                raise InvalidArgument(
                    f"{RULES_SETTING}: {key} is set twice ({item!r}); set each key once; "
                    f"valid keys: {_valid_rule_keys()}"
                )
            seen.add(key)
            name, kind = _RULE_KEYS[key]
            value: int | float
            number = raw[:-1].strip() if kind == _SECONDS and raw.endswith("s") else raw
            try:
                value = int(number) if kind == _INT else float(number)
            except ValueError:
                expected = "an integer" if kind == _INT else "a number"
                raise InvalidArgument(
                    f"{RULES_SETTING}: {item!r}: {key} must be {expected}; "
                    f"valid keys: {_valid_rule_keys()}"
                ) from None
            problem = _field_problem(name, value)
            if problem:
                raise InvalidArgument(
                    f"{RULES_SETTING}: {item!r}: {key} {problem}; valid keys: {_valid_rule_keys()}"
                )
            values[name] = value
        return replace(cls(), **values)


def _valid_rule_keys() -> str:
    return ", ".join(_RULE_KEYS)


def _valid_actions() -> str:
    return ", ".join(a.value for a in Action)


_RESPONSE_RULES: Final = (*RULES, ZSCORE)


@dataclass(frozen=True)
class Responses:
    """What to do per rule (``AGENTVM_ANOMALY_RESPONSES``); ``zscore`` covers every
    ``zscore_<feature>`` rule."""

    process_storm: Action = Action.KILL
    egress_denied: Action = Action.KILL
    cpu_pegged: Action = Action.ALERT
    disk_full: Action = Action.ALERT
    zscore: Action = Action.ALERT

    def __post_init__(self) -> None:
        for rule in _RESPONSE_RULES:
            value = getattr(self, rule)
            try:
                action = Action(value)
            except ValueError:
                raise InvalidArgument(
                    f"{RESPONSES_SETTING}: {rule}={value!r} is not an action; "
                    f"valid actions: {_valid_actions()}"
                ) from None
            object.__setattr__(self, rule, action)

    @classmethod
    def parse(cls, text: str) -> Responses:
        """``"process_storm=kill,egress_denied=snapshot_and_kill,..."`` ("" = the defaults).

        Raises InvalidArgument naming the bad item, the valid rules and the valid actions.
        """
        values: dict[str, Action] = {}
        for item, rule, raw in _split_items(text):
            if rule not in _RESPONSE_RULES:
                raise InvalidArgument(
                    f"{RESPONSES_SETTING}: unknown rule in {item!r}; valid rules: "
                    f"{', '.join(_RESPONSE_RULES)}; valid actions: {_valid_actions()}"
                )
            if rule in values:
                raise InvalidArgument(
                    f"{RESPONSES_SETTING}: {rule} is set twice ({item!r}); set each rule once"
                )
            try:
                values[rule] = Action(raw)
            except ValueError:
                raise InvalidArgument(
                    f"{RESPONSES_SETTING}: {item!r}: unknown action; valid actions: "
                    f"{_valid_actions()} (valid rules: {', '.join(_RESPONSE_RULES)})"
                ) from None
        return replace(cls(), **values)

    def action(self, rule: str) -> Action:
        """The action for ``rule``; every ``zscore_<feature>`` rule uses the ``zscore`` entry."""
        if rule.startswith(ZSCORE_PREFIX) or rule == ZSCORE:
            return self.zscore
        if rule in RULES:
            action: Action = getattr(self, rule)
            return action
        raise ValueError(f"unknown anomaly rule {rule!r}: use one of {', '.join(_RESPONSE_RULES)}")


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
