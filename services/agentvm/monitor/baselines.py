"""Baselines of the statistical detector: one per VM, with a shared prior.

A z-score baseline shared by every VM lets one guest move what counts as normal for
all: a VM whose executions creep upward (each value just under the threshold, so each
joins the baseline) raises the mean and spread until another tenant's anomaly no longer
stands out. So (issue 22, item 8):

* every VM has its own :class:`RollingBaseline` per feature (the last
  :data:`VM_WINDOW` values), and once it holds ``warmup`` values a VM's executions are
  scored against its own history only;
* until then they are scored against the **prior**, one installation-wide baseline per
  feature, to which each VM contributes at most its first :data:`PRIOR_PER_VM` values:
  moving the prior takes many VMs (each a boot), not one guest's loop;
* per-VM state is dropped when the VM is destroyed (:meth:`Baselines.forget`) and kept
  for at most :data:`MAX_BASELINE_VMS` VMs (least recently active evicted first), so
  memory is bounded: ``MAX_BASELINE_VMS * len(features) * VM_WINDOW`` floats plus the
  prior's ``len(features) * window``.

Pure logic, no I/O; not thread-safe (driven by the monitor's one task).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

# Each VM's own window (at least the warm-up), and how many VMs keep one.
VM_WINDOW: Final = 64
MAX_BASELINE_VMS: Final = 1024
# How many of a VM's values may ever enter the shared prior (per feature).
PRIOR_PER_VM: Final = 5

# RollingBaseline refuses values this large: their squares would overflow.
_MAX_ABS: Final = 1e150
# RollingBaseline recomputes exactly when n * variance falls below this share of its peak.
_CANCELLATION: Final = 1e-6


class RollingBaseline:
    """Mean and population standard deviation of the last ``window`` values.

    Sums are kept incrementally around a shift close to the data (so large values with a
    small spread do not cancel catastrophically) and recomputed exactly (two passes,
    math.fsum) every ``window`` additions, and whenever removing a large value has cancelled
    most of the sum of squares, so rounding error can neither accumulate nor dominate.
    """

    def __init__(self, window: int, warmup: int) -> None:
        if window < 1 or warmup < 1 or warmup > window:
            raise ValueError(f"need 1 <= warmup <= window, got window={window} warmup={warmup}")
        self.window = window
        self.warmup = warmup
        self._values: deque[float] = deque(maxlen=window)
        self._shift = 0.0
        self._sum = 0.0  # sum of (x - shift)
        self._sumsq = 0.0  # sum of (x - shift) ** 2
        self._peak = 0.0  # largest _sumsq since the last exact recompute
        self._adds = 0  # since the last exact recompute

    @property
    def count(self) -> int:
        return len(self._values)

    @property
    def mean(self) -> float:
        n = len(self._values)
        return self._shift + self._sum / n if n else 0.0

    @property
    def variance(self) -> float:
        """Population variance (as statistics.pvariance), never negative."""
        n = len(self._values)
        if n == 0:
            return 0.0
        m = self._sum / n
        return max(self._sumsq / n - m * m, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def add(self, x: float) -> None:
        """Add ``x`` (dropping the oldest value once the window is full).

        Raises ValueError for a value that is not finite or whose magnitude is above 1e150.
        """
        if not math.isfinite(x) or abs(x) > _MAX_ABS:
            raise ValueError(f"baseline value must be finite and at most {_MAX_ABS:g}, got {x!r}")
        if not self._values:
            self._shift, self._sum, self._sumsq, self._peak, self._adds = x, 0.0, 0.0, 0.0, 0
        elif len(self._values) == self.window:
            d = self._values[0] - self._shift
            self._sum -= d
            self._sumsq -= d * d
        self._values.append(x)
        d = x - self._shift
        self._sum += d
        self._sumsq += d * d
        self._peak = max(self._peak, self._sumsq)
        self._adds += 1
        # n * variance; when it is tiny next to the largest sum of squares since the last
        # exact recompute, subtraction has cancelled the significant digits: recompute.
        spread = self._sumsq - self._sum * self._sum / len(self._values)
        if self._adds >= self.window or spread < self._peak * _CANCELLATION:
            self._recompute()

    def _recompute(self) -> None:
        values = self._values
        n = len(values)
        self._shift = values[0] if min(values) == max(values) else math.fsum(values) / n
        diffs = [v - self._shift for v in values]
        self._sum = math.fsum(diffs)
        self._sumsq = math.fsum(d * d for d in diffs)
        self._peak = self._sumsq
        self._adds = 0

    def score(self, x: float) -> float | None:
        """z-score of ``x`` against the current window (x is not added).

        None during warm-up (fewer than ``warmup`` values) or when ``x`` is not finite.
        Over a constant window: 0.0 for the same value, +/-inf for any other.
        """
        if len(self._values) < self.warmup or not math.isfinite(x):
            return None
        diff = x - self.mean
        std = self.std
        if std == 0.0:
            return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        return diff / std


@dataclass
class _VMBaselines:
    own: dict[str, RollingBaseline] = field(default_factory=dict)
    # Values this VM has put into the prior, per feature (at most PRIOR_PER_VM each).
    given: dict[str, int] = field(default_factory=dict)


class Baselines:
    """Per-VM baselines of ``features`` with an installation-wide prior."""

    def __init__(
        self,
        features: Iterable[str],
        window: int,
        warmup: int,
        *,
        max_vms: int = MAX_BASELINE_VMS,
        vm_window: int = VM_WINDOW,
        prior_per_vm: int = PRIOR_PER_VM,
    ) -> None:
        if max_vms < 1 or prior_per_vm < 1:
            raise ValueError(
                f"need max_vms >= 1 and prior_per_vm >= 1, got {max_vms} and {prior_per_vm}"
            )
        self.features = tuple(features)
        self.warmup = warmup
        self.vm_window = max(warmup, min(window, vm_window))
        self.max_vms = max_vms
        self.prior_per_vm = prior_per_vm
        self.prior = {f: RollingBaseline(window, warmup) for f in self.features}
        self._vms: OrderedDict[str, _VMBaselines] = OrderedDict()

    @property
    def tracked_vms(self) -> int:
        """How many VMs have baselines of their own (at most ``max_vms``)."""
        return len(self._vms)

    def own(self, vm: str, feature: str) -> RollingBaseline | None:
        """``vm``'s own baseline of ``feature`` (None while it has none)."""
        state = self._vms.get(vm)
        return None if state is None else state.own.get(feature)

    def for_scoring(self, vm: str, feature: str) -> tuple[RollingBaseline, bool]:
        """The baseline ``vm``'s next ``feature`` value is scored against, and whether it
        is the VM's own (warmed up) rather than the prior."""
        own = self.own(vm, feature)
        if own is not None and own.count >= self.warmup:
            return own, True
        return self.prior[feature], False

    def add(self, vm: str, feature: str, x: float) -> None:
        """A value that did not fire: into ``vm``'s own baseline, and into the prior
        while ``vm`` has given it fewer than ``prior_per_vm`` values of ``feature``."""
        state = self._touch(vm)
        own = state.own.get(feature)
        if own is None:
            own = state.own[feature] = RollingBaseline(self.vm_window, self.warmup)
        own.add(x)
        given = state.given.get(feature, 0)
        if given < self.prior_per_vm:
            self.prior[feature].add(x)
            state.given[feature] = given + 1

    def forget(self, vm: str) -> None:
        """Drop ``vm``'s baselines (it was destroyed); what it gave the prior stays."""
        self._vms.pop(vm, None)

    def _touch(self, vm: str) -> _VMBaselines:
        state = self._vms.get(vm)
        if state is None:
            while len(self._vms) >= self.max_vms:
                self._vms.popitem(last=False)
            state = self._vms[vm] = _VMBaselines()
        else:
            self._vms.move_to_end(vm)
        return state
