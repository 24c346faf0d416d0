"""Anomaly detection (agentvm.monitor.anomaly): settings, baselines, rules, de-duplication."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm.common.errors import InvalidArgument
from agentvm.monitor.anomaly import (
    FEATURES,
    Action,
    Detection,
    Detector,
    Responses,
    RollingBaseline,
    Thresholds,
)

VM = "agent-vm-test-1"
SB = "sb-1"
NORMAL: Mapping[str, float] = {
    "cpu_s": 1.0,
    "memory_peak_bytes": 100 * 2**20,
    "pids_peak": 5,
    "output_bytes": 1000,
    "denied_egress": 0,
    "duration_s": 2.0,
}


def detector(rules: str = "", responses: str = "", *, max_vms: int = 10_000) -> Detector:
    return Detector(Thresholds.parse(rules), Responses.parse(responses), max_vms=max_vms)


def rules_of(detections: list[Detection]) -> list[str]:
    return [d.rule for d in detections]


def warmed(det: Detector, n: int = 40) -> Detector:
    """Feed ``n`` slightly varying normal executions, 5 per VM (what each VM may give the
    shared prior), so the prior is warm and ``VM`` itself is new."""
    for i in range(n):
        wobble = (i % 5) * 0.01
        feats = {k: v * (1 + wobble) for k, v in NORMAL.items()}
        assert det.on_execution(f"agent-vm-warm-{i // 5}", SB, feats) == []
    return det


# --- settings -------------------------------------------------------------------------------


def test_thresholds_defaults() -> None:
    t = Thresholds.parse("")
    assert t == Thresholds()
    assert (t.max_processes, t.denied_egress, t.denied_window_s) == (256, 20, 60.0)
    assert (t.cpu_pegged, t.cpu_pegged_for_s, t.disk_full) == (0.95, 120.0, 0.95)
    assert (t.zscore, t.warmup, t.window) == (4.0, 30, 500)
    assert Thresholds.parse("  ,  ") == Thresholds()


def test_thresholds_full_and_partial() -> None:
    t = Thresholds.parse(
        "max_processes=100,denied_egress=5,denied_window=30,cpu_pegged=0.9,"
        "cpu_pegged_for=60,disk_full=0.8,zscore=3.5,warmup=10,window=50"
    )
    assert t == Thresholds(
        max_processes=100,
        denied_egress=5,
        denied_window_s=30.0,
        cpu_pegged=0.9,
        cpu_pegged_for_s=60.0,
        disk_full=0.8,
        zscore=3.5,
        warmup=10,
        window=50,
    )
    partial = Thresholds.parse(" max_processes = 64 , denied_window=10s ")
    assert partial == Thresholds(max_processes=64, denied_window_s=10.0)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus=1", "'bogus=1'"),
        ("max_processes", "'max_processes'"),
        ("max_processes=lots", "'max_processes=lots'"),
        ("max_processes=0", "'max_processes=0'"),
        ("max_processes=2.5", "'max_processes=2.5'"),
        ("denied_egress=-1", "'denied_egress=-1'"),
        ("cpu_pegged=0", "'cpu_pegged=0'"),
        ("cpu_pegged=1.5", "'cpu_pegged=1.5'"),
        ("disk_full=nan", "'disk_full=nan'"),
        ("denied_window=inf", "'denied_window=inf'"),
        ("cpu_pegged_for=0", "'cpu_pegged_for=0'"),
        ("zscore=-4", "'zscore=-4'"),
        ("warmup=1", "'warmup=1'"),
        ("window=10", "window=10"),  # smaller than the default warm-up of 30
        ("warmup=5,warmup=6", "'warmup=6'"),
    ],
)
def test_thresholds_errors(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Thresholds.parse(text)
    msg = info.value.message
    assert "AGENTVM_ANOMALY_RULES" in msg
    assert fragment in msg
    assert "max_processes" in msg
    assert "cpu_pegged_for" in msg  # the valid keys are listed


def test_thresholds_direct_construction_validated() -> None:
    with pytest.raises(InvalidArgument, match="warmup"):
        Thresholds(warmup=1)
    with pytest.raises(InvalidArgument, match="window"):
        Thresholds(warmup=10, window=5)


def test_responses_defaults_and_overrides() -> None:
    r = Responses.parse("")
    assert r == Responses()
    assert r.action("process_storm") == "kill"
    assert r.action("egress_denied") == "kill"
    assert r.action("cpu_pegged") == "alert"
    assert r.action("disk_full") == "alert"
    assert r.action("zscore_cpu_s") == "alert"
    r = Responses.parse(
        "process_storm=kill, egress_denied=snapshot_and_kill,\n  cpu_pegged=alert,"
        "disk_full=alert,zscore=kill"
    )
    assert r.action("egress_denied") == Action.SNAPSHOT_AND_KILL
    assert r.action("zscore_memory_peak_bytes") == Action.KILL
    assert r.action("zscore") == Action.KILL
    with pytest.raises(ValueError, match="nope"):
        r.action("nope")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus=kill", "'bogus=kill'"),
        ("process_storm=explode", "'process_storm=explode'"),
        ("process_storm", "'process_storm'"),
        ("zscore_cpu_s=kill", "'zscore_cpu_s=kill'"),
        ("disk_full=kill,disk_full=alert", "'disk_full=alert'"),
    ],
)
def test_responses_errors(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Responses.parse(text)
    assert "AGENTVM_ANOMALY_RESPONSES" in info.value.message
    assert fragment in info.value.message


# --- baseline -------------------------------------------------------------------------------


@given(
    st.lists(st.floats(min_value=-1e9, max_value=1e9), min_size=3, max_size=80),
    st.integers(min_value=2, max_value=20),
)
def test_baseline_matches_statistics(values: list[float], window: int) -> None:
    b = RollingBaseline(window=window, warmup=2)
    for i, x in enumerate(values):
        b.add(x)
        kept = values[max(0, i + 1 - window) : i + 1]
        assert b.count == len(kept)
        scale = max(1.0, *(abs(v) for v in kept))
        assert b.mean == pytest.approx(statistics.fmean(kept), rel=1e-9, abs=1e-9 * scale)
        assert b.std == pytest.approx(statistics.pstdev(kept), rel=1e-6, abs=1e-6 * scale)


def test_baseline_score_is_against_the_window_before() -> None:
    values = [10.0, 12.0, 11.0, 9.0, 13.0, 10.5, 11.5]
    b = RollingBaseline(window=100, warmup=3)
    for x in values:
        b.add(x)
    expected = (20.0 - statistics.fmean(values)) / statistics.pstdev(values)
    score = b.score(20.0)
    assert score == pytest.approx(expected)
    assert b.count == len(values)  # scoring does not add


def test_baseline_warmup_and_constant() -> None:
    b = RollingBaseline(window=10, warmup=3)
    assert b.score(1.0) is None
    b.add(5.0)
    b.add(5.0)
    assert b.score(100.0) is None
    b.add(5.0)
    assert b.score(5.0) == 0.0
    assert b.score(6.0) == math.inf
    assert b.score(4.0) == -math.inf
    assert b.score(math.nan) is None
    # Constant after many recomputes stays exactly constant.
    for _ in range(100):
        b.add(0.1)
    assert b.std == 0.0
    assert b.mean == 0.1


def test_baseline_large_values_small_spread() -> None:
    b = RollingBaseline(window=50, warmup=2)
    values = [1e12 + (i % 7) for i in range(500)]
    for x in values:
        b.add(x)
    assert b.std == pytest.approx(statistics.pstdev(values[-50:]), rel=1e-6)


def test_baseline_rejects_bad_values() -> None:
    b = RollingBaseline(window=5, warmup=2)
    for bad in (math.nan, math.inf, -math.inf, 1e308):
        with pytest.raises(ValueError, match="finite"):
            b.add(bad)
    assert b.count == 0
    with pytest.raises(ValueError, match="warmup"):
        RollingBaseline(window=2, warmup=5)


# --- statistical detector -------------------------------------------------------------------


def test_warmup_never_fires() -> None:
    det = detector("warmup=30")
    for _ in range(29):
        assert det.on_execution(VM, SB, NORMAL) == []
    # Still warming up: 29 values in the baseline, a spike is just added.
    assert det.on_execution(VM, SB, {"cpu_s": 500.0}) == []
    assert det.baseline("cpu_s", VM).count == 30
    # The VM gave the shared prior only its first few values.
    assert det.baseline("cpu_s").count == 5


def test_spike_fires_zscore_with_configured_action() -> None:
    det = warmed(detector(responses="zscore=snapshot_and_kill"))
    before = det.baseline("cpu_s").count
    out = det.on_execution("agent-vm-other", "sb-2", {**NORMAL, "cpu_s": 60.0})
    assert rules_of(out) == ["zscore_cpu_s"]
    (d,) = out
    assert d.vm == "agent-vm-other"
    assert d.sandbox == "sb-2"
    assert d.value == 60.0
    assert 1.0 < d.threshold < 60.0
    assert d.action == Action.SNAPSHOT_AND_KILL
    assert str(d.action) == "snapshot_and_kill"
    assert d.severity == "critical"
    assert "cpu_s" in d.description
    assert "standard deviations" in d.description
    # The spike was not added to the baseline; the normal features were.
    assert det.baseline("cpu_s").count == before
    assert det.baseline("cpu_s").mean < 1.1
    assert det.baseline("duration_s").count == before + 1
    # zscore rules are not de-duplicated: every anomalous execution fires.
    assert rules_of(det.on_execution(VM, SB, {"cpu_s": 60.0})) == ["zscore_cpu_s"]


def test_zscore_default_action_is_alert_warning() -> None:
    det = warmed(detector())
    (d,) = det.on_execution(VM, SB, {"output_bytes": 50 * 2**20})
    assert d.rule == "zscore_output_bytes"
    assert d.action == Action.ALERT
    assert d.severity == "warning"
    assert "MiB" in d.description


def test_floor_suppresses_small_bump_over_constant_baseline() -> None:
    det = detector()
    for _ in range(40):
        det.on_execution(VM, SB, NORMAL)
    assert det.baseline("cpu_s", VM).std == 0.0
    # Infinite z-score but below every floor: no anomaly, and the values join the baseline.
    bumped = {
        "cpu_s": 1.5,
        "memory_peak_bytes": 100 * 2**20 + 31 * 2**20,
        "pids_peak": 20,
        "output_bytes": 1000 + 2**19,
        "denied_egress": 4,
        "duration_s": 3.9,
    }
    assert det.on_execution(VM, SB, bumped) == []
    assert det.baseline("cpu_s", VM).count == 41
    # At the floor it fires.
    over = det.on_execution(VM, SB, {"cpu_s": 1.0 + 1.0 + 0.5, "denied_egress": 9})
    assert sorted(rules_of(over)) == ["zscore_cpu_s", "zscore_denied_egress"]


def test_values_below_the_mean_never_fire() -> None:
    det = warmed(detector())
    assert det.on_execution(VM, SB, dict.fromkeys(FEATURES, 0.0)) == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 1e308, -1e308])
def test_hostile_values_ignored(bad: float) -> None:
    det = warmed(detector())
    counts = {f: det.baseline(f).count for f in FEATURES}
    means = {f: det.baseline(f).mean for f in FEATURES}
    assert det.on_execution(VM, SB, dict.fromkeys(FEATURES, bad)) == []
    assert {f: det.baseline(f).count for f in FEATURES} == counts
    assert {f: det.baseline(f).mean for f in FEATURES} == means
    assert det.tracked_vms == 0
    # And the detector still works afterwards.
    assert rules_of(det.on_execution(VM, SB, {"cpu_s": 60.0})) == ["zscore_cpu_s"]


def test_hostile_types_and_keys_ignored() -> None:
    det = warmed(detector())
    junk: dict[str, object] = {
        "cpu_s": "lots",
        "memory_peak_bytes": None,
        "pids_peak": 10**400,
        "output_bytes": True,
        "duration_s": [1],
        "unknown": 1e9,
    }
    assert det.on_execution(VM, SB, junk) == []  # type: ignore[arg-type]
    assert det.on_execution(VM, SB, {}) == []


def test_hostile_stats_never_raise() -> None:
    det = detector()
    for bad in (math.nan, math.inf, -1.0, 1e308, -1e308):
        assert (
            det.on_vm_stats(
                VM,
                SB,
                10.0,
                cpu_fraction=bad,
                processes=bad,  # type: ignore[arg-type]
                disk_used_fraction=bad,
            )
            == []
        )
        assert det.on_egress(VM, SB, bad, denied=True) == []
    out = det.on_vm_stats(VM, SB, math.nan, cpu_fraction=1.0, processes=1, disk_used_fraction=0)
    assert out == []
    assert det.tracked_vms <= 1


# --- rules ----------------------------------------------------------------------------------


def test_process_storm_from_stats_fires_once_and_rearms() -> None:
    det = detector()

    def stats(n: int) -> list[Detection]:
        return det.on_vm_stats(VM, SB, 0.0, cpu_fraction=None, processes=n, disk_used_fraction=None)

    assert stats(256) == []
    (d,) = stats(412)
    assert d.rule == "process_storm"
    assert (d.value, d.threshold) == (412.0, 256.0)
    assert d.action == Action.KILL
    assert d.severity == "critical"
    assert d.description == "412 processes in the guest (limit 256)"
    assert stats(500) == []  # still storming: once
    assert (
        det.on_vm_stats(VM, SB, 1.0, cpu_fraction=None, processes=None, disk_used_fraction=0.1)
        == []
    )
    assert stats(300) == []  # None did not clear it
    assert stats(100) == []  # clears
    assert rules_of(stats(300)) == ["process_storm"]
    # Another VM is independent.
    assert rules_of(
        det.on_vm_stats("vm-b", SB, 0.0, cpu_fraction=None, processes=999, disk_used_fraction=None)
    ) == ["process_storm"]


def test_process_storm_from_pids_peak() -> None:
    det = detector("max_processes=100")
    out = det.on_execution(VM, SB, {"pids_peak": 150})
    assert rules_of(out) == ["process_storm"]
    assert "150" in out[0].description
    assert det.on_execution(VM, SB, {"pids_peak": 150}) == []  # once
    # The stats rule shares the (vm, rule) state.
    assert (
        det.on_vm_stats(VM, SB, 0.0, cpu_fraction=None, processes=200, disk_used_fraction=None)
        == []
    )
    assert det.on_execution(VM, SB, {"pids_peak": 10}) == []  # clears
    assert rules_of(det.on_execution(VM, SB, {"pids_peak": 101})) == ["process_storm"]


def test_cpu_pegged_needs_the_duration_and_resets() -> None:
    det = detector("cpu_pegged=0.95,cpu_pegged_for=120")

    def cpu(now: float, frac: float) -> list[Detection]:
        return det.on_vm_stats(
            VM, SB, now, cpu_fraction=frac, processes=None, disk_used_fraction=None
        )

    assert cpu(1000.0, 0.99) == []
    assert cpu(1060.0, 0.95) == []
    assert cpu(1119.0, 1.0) == []
    (d,) = cpu(1120.0, 0.97)
    assert d.rule == "cpu_pegged"
    assert d.action == Action.ALERT
    assert d.severity == "warning"
    assert (d.value, d.threshold) == (0.97, 0.95)
    assert "120 s" in d.description
    assert cpu(1200.0, 0.99) == []  # once
    assert cpu(1201.0, 0.5) == []  # reset and re-armed
    assert cpu(1202.0, 0.99) == []
    assert cpu(1300.0, 0.99) == []  # only 98 s since the run restarted
    assert rules_of(cpu(1322.0, 1.01)) == ["cpu_pegged"]  # jitter above 1 counts as 1
    # A None or nonsense sample neither resets nor fires.
    assert cpu(1330.0, 0.1) == []
    assert cpu(1331.0, 0.99) == []
    assert (
        det.on_vm_stats(VM, SB, 1400.0, cpu_fraction=None, processes=1, disk_used_fraction=None)
        == []
    )
    assert cpu(1451.0, math.nan) == []
    assert rules_of(cpu(1451.0, 0.99)) == ["cpu_pegged"]


def test_disk_full() -> None:
    det = detector("disk_full=0.9", "disk_full=kill")

    def disk(frac: float) -> list[Detection]:
        return det.on_vm_stats(
            VM, SB, 0.0, cpu_fraction=None, processes=None, disk_used_fraction=frac
        )

    assert disk(0.9) == []
    (d,) = disk(0.93)
    assert (d.rule, d.action, d.severity) == ("disk_full", Action.KILL, "critical")
    assert disk(0.99) == []
    assert disk(0.5) == []
    assert rules_of(disk(0.91)) == ["disk_full"]


def test_egress_fires_at_n_plus_one_within_the_window() -> None:
    det = detector("denied_egress=20,denied_window=60")
    for i in range(20):
        assert det.on_egress(VM, SB, 100.0 + i, denied=True) == []
        assert det.on_egress(VM, SB, 100.0 + i, denied=False) == []
    (d,) = det.on_egress(VM, SB, 130.0, denied=True)
    assert d.rule == "egress_denied"
    assert (d.value, d.threshold) == (21.0, 20.0)
    assert d.action == Action.KILL
    assert d.severity == "critical"
    assert "21 denied egress" in d.description
    # Fires once while the flood continues.
    for i in range(50):
        assert det.on_egress(VM, SB, 131.0 + i * 0.1, denied=True) == []


def test_egress_spread_over_a_longer_time_does_not_fire() -> None:
    det = detector("denied_egress=20,denied_window=60")
    # 100 denied records, 3.1 s apart: never more than 20 within 60 s.
    for i in range(100):
        assert det.on_egress(VM, SB, i * 3.1, denied=True) == []


def test_egress_rearms_at_half_the_limit() -> None:
    det = detector("denied_egress=10,denied_window=60")
    fired = [det.on_egress(VM, SB, float(t), denied=True) for t in range(15)]  # t = 0..14
    assert [rules_of(f) for f in fired] == [[]] * 10 + [["egress_denied"]] + [[]] * 4
    # At t=66.5 the records of t <= 6 have aged out: 8 left, more than half the limit (5),
    # so the rule stays fired even when the count goes back above the limit.
    assert det.on_egress(VM, SB, 66.5, denied=False) == []
    for i in range(3):
        assert det.on_egress(VM, SB, 66.6 + i * 0.1, denied=True) == []
    assert len(det._vms[VM].denied) == 11
    # Once the window drains to <= 5 the rule re-arms; the next flood fires once, at N+1.
    assert det.on_egress(VM, SB, 200.0, denied=False) == []
    fired = [det.on_egress(VM, SB, 201.0 + i * 0.1, denied=True) for i in range(20)]
    assert [rules_of(f) for f in fired] == [[]] * 10 + [["egress_denied"]] + [[]] * 9


def test_egress_window_deque_bounded() -> None:
    det = detector("denied_egress=3")
    for i in range(1000):
        det.on_egress(VM, SB, i * 0.001, denied=True)
    assert len(det._vms[VM].denied) <= 7


def test_allowed_egress_creates_no_state() -> None:
    det = detector()
    for i in range(100):
        assert det.on_egress(f"vm-{i}", SB, float(i), denied=False) == []
        assert (
            det.on_vm_stats(
                f"vm-{i}", SB, float(i), cpu_fraction=0.1, processes=3, disk_used_fraction=0.2
            )
            == []
        )
    assert det.tracked_vms == 0


def test_forget() -> None:
    det = detector("denied_egress=2")
    det.on_vm_stats(VM, SB, 0.0, cpu_fraction=None, processes=1000, disk_used_fraction=0.99)
    for i in range(3):
        det.on_egress(VM, SB, float(i), denied=True)
    assert det.tracked_vms == 1
    det.forget(VM)
    det.forget("never-seen")
    assert det.tracked_vms == 0
    # A new VM of the same name starts afresh.
    out = det.on_vm_stats(VM, SB, 0.0, cpu_fraction=None, processes=1000, disk_used_fraction=0.99)
    assert sorted(rules_of(out)) == ["disk_full", "process_storm"]
    assert det.on_egress(VM, SB, 10.0, denied=True) == []


def test_tracked_vms_bounded_oldest_evicted() -> None:
    det = detector(max_vms=3)
    for name in ("a", "b", "c"):
        det.on_vm_stats(name, SB, 0.0, cpu_fraction=None, processes=999, disk_used_fraction=None)
    det.on_vm_stats("a", SB, 1.0, cpu_fraction=None, processes=999, disk_used_fraction=None)
    det.on_vm_stats("d", SB, 1.0, cpu_fraction=None, processes=999, disk_used_fraction=None)
    assert det.tracked_vms == 3
    assert set(det._vms) == {"a", "c", "d"}  # "b" was least recently active


# --- properties -----------------------------------------------------------------------------

hostile_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 0.5, 0.99, 300.0, 1e308, -1.0]),
)
vm_names = st.sampled_from([f"vm-{i}" for i in range(8)])
calls = st.one_of(
    st.tuples(
        st.just("exec"),
        vm_names,
        st.dictionaries(st.sampled_from([*FEATURES, "other"]), hostile_floats, max_size=7),
    ),
    st.tuples(
        st.just("stats"),
        vm_names,
        st.tuples(
            hostile_floats,
            st.one_of(st.none(), hostile_floats),
            st.one_of(st.none(), st.integers(min_value=-10, max_value=10**6)),
            st.one_of(st.none(), hostile_floats),
        ),
    ),
    st.tuples(st.just("egress"), vm_names, st.tuples(hostile_floats, st.booleans())),
    st.tuples(st.just("forget"), vm_names, st.none()),
)


@given(st.lists(calls, max_size=120))
def test_random_calls_never_raise_and_stay_bounded(
    seq: list[tuple[str, str, object]],
) -> None:
    det = detector("denied_egress=2,denied_window=5,warmup=3,window=6,max_processes=8", max_vms=4)
    for kind, vm, arg in seq:
        if kind == "exec":
            assert isinstance(arg, dict)
            out = det.on_execution(vm, SB, arg)
        elif kind == "stats":
            assert isinstance(arg, tuple)
            now, cpu, procs, disk = arg
            out = det.on_vm_stats(
                vm, SB, now, cpu_fraction=cpu, processes=procs, disk_used_fraction=disk
            )
        elif kind == "egress":
            assert isinstance(arg, tuple)
            out = det.on_egress(vm, SB, arg[0], denied=arg[1])
        else:
            det.forget(vm)
            out = []
        for d in out:
            assert d.vm == vm
            assert math.isfinite(d.value)
            assert math.isfinite(d.threshold)
            assert d.severity in ("warning", "critical")
            assert d.action in tuple(Action)
        assert det.tracked_vms <= 4
        assert det.baseline_vms <= 4
        assert all(len(s.denied) <= 5 for s in det._vms.values())
        for f in FEATURES:
            b = det.baseline(f)
            assert b.count <= 6
            assert math.isfinite(b.mean)
            assert math.isfinite(b.std)


# --- per-VM baselines (issue 22, item 8) ------------------------------------------------------


def _flood(det: Detector, vm: str, n: int) -> None:
    """``vm`` creeps upward as far as it can without ever firing: each cpu_s just under
    the threshold of the baseline it is scored against (its own once warm, else the prior)."""
    for _ in range(n):
        b, _own = det._baselines.for_scoring(vm, "cpu_s")
        x = min(b.mean + max(0.9, 3.9 * b.std), 1e6)
        assert det.on_execution(vm, SB, {**NORMAL, "cpu_s": x}) == []


def test_one_vm_flooding_cannot_hide_a_new_vms_anomaly() -> None:
    det = warmed(detector(), 50)  # ten VMs, five executions each
    _flood(det, "agent-vm-flooder", 3000)
    # A new VM (scored against the prior) that spikes is still caught.
    out = det.on_execution("agent-vm-victim", "sb-v", {**NORMAL, "cpu_s": 60.0})
    assert rules_of(out) == ["zscore_cpu_s"]
    assert "across VMs" in out[0].description
    # The flooder raised its own baseline a long way, but gave the shared prior only
    # its first five values.
    assert det.baseline("cpu_s", "agent-vm-flooder").mean > 1000
    assert det.baseline("cpu_s").count == 55
    assert det.baseline("cpu_s").mean < 5


def test_one_vm_flooding_cannot_move_another_vms_own_baseline() -> None:
    det = warmed(detector(), 50)
    victim = "agent-vm-victim"
    for i in range(40):
        feats = {k: v * (1 + (i % 5) * 0.01) for k, v in NORMAL.items()}
        assert det.on_execution(victim, SB, feats) == []
    own = det.baseline("cpu_s", victim)
    before = (own.count, own.mean, own.std)
    _flood(det, "agent-vm-flooder", 3000)
    after = det.baseline("cpu_s", victim)
    assert (after.count, after.mean, after.std) == before
    out = det.on_execution(victim, SB, {**NORMAL, "cpu_s": 60.0})
    assert rules_of(out) == ["zscore_cpu_s"]
    assert "of this VM" in out[0].description


def test_many_vms_cannot_swamp_the_prior_one_value_at_a_time() -> None:
    det = warmed(detector("window=100"), 100)  # twenty VMs
    # Each flooder VM gives the prior at most five values.
    for i in range(4):
        _flood(det, f"agent-vm-flooder-{i}", 200)
    out = det.on_execution("agent-vm-victim", SB, {**NORMAL, "cpu_s": 60.0})
    assert rules_of(out) == ["zscore_cpu_s"]
    assert det.baseline("cpu_s").count == 100


def test_per_vm_baselines_are_bounded_and_forgotten() -> None:
    det = detector("warmup=3,window=500")
    for i in range(3000):
        det.on_execution(f"agent-vm-{i}", SB, NORMAL)
    assert det.baseline_vms == 1024  # the cap (MAX_BASELINE_VMS), oldest evicted
    assert det.baseline("cpu_s", "agent-vm-0").count == 0  # evicted
    assert det.baseline("cpu_s", "agent-vm-2999").count == 1
    # A long-lived VM keeps at most its own window.
    for _ in range(1000):
        det.on_execution("agent-vm-2999", SB, NORMAL)
    assert det.baseline("cpu_s", "agent-vm-2999").count == 64
    det.forget("agent-vm-2999")
    assert det.baseline_vms == 1023
    assert det.baseline("cpu_s", "agent-vm-2999").count == 0
    small = detector(max_vms=3)
    for i in range(10):
        small.on_execution(f"agent-vm-{i}", SB, NORMAL)
    assert small.baseline_vms == 3
