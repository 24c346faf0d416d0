"""Settings of the anomaly detector: thresholds (``AGENTVM_ANOMALY_RULES``) and the
response per rule (``AGENTVM_ANOMALY_RESPONSES``), parsed strictly.

Split from :mod:`agentvm.monitor.anomaly` (which re-exports every name here); see
docs/MONITOR_DESIGN.md, "Anomaly detection".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any, Final, Literal

from agentvm.common.errors import InvalidArgument

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

# Upper bound of Thresholds.window (memory: len(FEATURES) deques of this many floats).
_MAX_WINDOW: Final = 10_000


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
