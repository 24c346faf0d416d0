"""The soak's schedule is the seed's alone, and its judge is strict (issue 20)."""

from __future__ import annotations

import datetime
import itertools
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm.cli import soak_check, soak_faults, soak_plan
from agentvm.cli.e2b_cmds import gateway_url
from agentvm.cli.soak import Outcome, judge
from agentvm.cli.soak_faults import FaultDone
from agentvm.cli.soak_plot import render_svg
from agentvm.common.config import Settings
from agentvm.monitor.audit import AuditLog


@given(st.integers(0, 2**32), st.floats(2, 120), st.floats(15, 600))
def test_the_same_seed_gives_the_same_schedule_within_its_rules(
    seed: int, minutes: float, every: float
) -> None:
    first = soak_plan.fault_schedule(seed, minutes, soak_plan.FAULT_KINDS, every)
    assert first == soak_plan.fault_schedule(seed, minutes, soak_plan.FAULT_KINDS, every)
    ats = [f.at_s for f in first]
    assert all(b - a >= soak_plan.MIN_GAP_S - 1e-9 for a, b in itertools.pairwise(ats))
    assert all(soak_plan.MIN_GAP_S <= at < minutes * 60 - 60 for at in ats)
    # Kinds come in turn: none twice before every kind came once.
    kinds = [f.kind for f in first]
    n = len(soak_plan.FAULT_KINDS)
    for i in range(0, len(kinds), n):
        assert len(set(kinds[i : i + n])) == len(kinds[i : i + n])


def test_seeds_differ_and_the_operations_are_reproducible() -> None:
    a = soak_plan.fault_schedule(1, 60, soak_plan.FAULT_KINDS, 60)
    b = soak_plan.fault_schedule(2, 60, soak_plan.FAULT_KINDS, 60)
    assert a != b
    assert {f.kind for f in a} == set(soak_plan.FAULT_KINDS)
    ops = [k for k, _ in itertools.islice(soak_plan.operations(5, 0), 200)]
    assert ops == [k for k, _ in itertools.islice(soak_plan.operations(5, 0), 200)]
    assert ops != [k for k, _ in itertools.islice(soak_plan.operations(5, 1), 200)]
    assert set(ops) == set(soak_plan.OP_KINDS)
    # Each operation's own RNG too.
    r1 = [r.random() for _, r in itertools.islice(soak_plan.operations(5, 0), 5)]
    r2 = [r.random() for _, r in itertools.islice(soak_plan.operations(5, 0), 5)]
    assert r1 == r2
    assert soak_plan.fault_schedule(1, 60, (), 60) == []


def test_fault_kinds_are_parsed_and_unknown_ones_named() -> None:
    assert soak_plan.expand_kinds("all") == soak_plan.FAULT_KINDS
    assert soak_plan.expand_kinds("none") == ()
    kills = soak_plan.expand_kinds("kill")
    assert kills == tuple(f"kill:{s}" for s in soak_plan.KILLABLE)
    assert soak_plan.expand_kinds("disconnect,kill:executor,disconnect") == (
        "disconnect",
        "kill:executor",
    )
    # Filling the state disk is asked for by name only (it needs a file system of its own).
    assert "state-disk-full" not in soak_plan.expand_kinds("all")
    assert soak_plan.expand_kinds("state-disk-full,kill:monitor") == (
        "state-disk-full",
        "kill:monitor",
    )
    assert soak_plan.ALLOWED_CODES["state-disk-full"] == {"RESOURCE_EXHAUSTED"}
    with pytest.raises(ValueError, match=r"unknown fault kind 'kill:libvirtd'.*slow-reader"):
        soak_plan.expand_kinds("kill:libvirtd")


def test_network_targets_are_parsed_and_wrong_ones_named() -> None:
    assert soak_plan.parse_targets("") == ()
    assert soak_plan.parse_targets(" a.test:80, 10.0.0.1:22 ") == ("a.test:80", "10.0.0.1:22")
    for bad, why in [
        ("a.test", "not HOST:PORT"),
        (":80,b:80", "not HOST:PORT"),
        ("a:0,b:80", "not HOST:PORT"),
        ("a:70000,b:80", "not HOST:PORT"),
        ("a:80,a:80", "twice"),
        ("a:80", "one target"),
    ]:
        with pytest.raises(ValueError, match=why):
            soak_plan.parse_targets(bad)


def test_only_an_allowed_error_inside_a_faults_window_is_explained() -> None:
    kill = FaultDone("kill:executor", start_s=100.0, recovered_s=103.0)
    during = Outcome("files", 95.0, 101.0, error_code="UNAVAILABLE", message="down")
    assert judge(during, [kill]) == ""
    # After the window (recovery + grace) the same error is a failure.
    late = Outcome("files", 103.0 + soak_plan.GRACE_S + 1, 140.0, error_code="UNAVAILABLE")
    assert judge(late, [kill]).startswith("UNAVAILABLE")
    # An error no fault of that kind may cause is a failure even inside it.
    odd = Outcome("files", 99.0, 101.0, error_code="INTERNAL", message="boom")
    assert judge(odd, [kill]) == "INTERNAL: boom"
    # A monitor kill explains nothing.
    mon = FaultDone("kill:monitor", 100.0, 101.0)
    assert judge(during, [mon]) != ""
    # A gateway kill explains an E2B call's UNAVAILABLE, and nothing else's.
    gw = FaultDone("kill:e2b-gateway", 100.0, 102.0)
    e2b_call = Outcome("e2b", 99.0, 101.0, error_code="UNAVAILABLE", message="refused")
    assert judge(e2b_call, [gw]) == ""
    assert judge(during, [gw]) != ""
    # An allowed network target unreached is explained while vm-manager (its
    # DNS resolver) or libvirt is down, for network operations only.
    vmm = FaultDone("kill:vm-manager", 100.0, 104.0)
    unreached = Outcome("network", 99.0, 101.0, error_code="UNREACHABLE", message="x:80")
    assert judge(unreached, [vmm]) == ""
    assert judge(unreached, [FaultDone("libvirtd-restart", 100.0, 104.0)]) == ""
    assert judge(unreached, [kill]) == "UNREACHABLE: x:80"
    assert judge(Outcome("files", 99.0, 101.0, error_code="UNREACHABLE"), [vmm]) != ""
    # A wrong result is never explained.
    wrong = Outcome("files", 99.0, 101.0, wrong=True, message="hash of the download")
    assert judge(wrong, [kill]) == "wrong result: hash of the download"
    assert judge(Outcome("oneshot", 1.0, 2.0), []) == ""


def test_rss_growth_is_reported_over_the_longest_life_and_pooled_after_warm_up() -> None:
    s = soak_check.RssSample
    samples = [
        s(0, "executor", 10, 100 * 1024, 0),
        s(2, "executor", 10, 108 * 1024, 100),  # warm-up: not counted in the pool
        s(5, "executor", 10, 110 * 1024, 500),
        s(10, "executor", 11, 60 * 1024, 510),  # killed and started again
        s(12, "executor", 11, 70 * 1024, 610),
        s(15, "executor", 11, 71 * 1024, 810),
    ]
    got = soak_check.rss_growth(samples)["executor"]
    assert got["processes"] == 2
    assert got["longest_life_ops"] == 500
    assert got["growth_mib_per_1k_ops"] == 20.0
    assert (got["first_rss_mib"], got["last_rss_mib"], got["max_rss_mib"]) == (100, 71, 110)
    # 400 + 200 operations after warm-up, 2 + 1 MiB grown in them.
    assert got["pooled_ops"] == 600
    assert got["pooled_growth_mib_per_1k_ops"] == 5.0
    assert soak_check.memory_failures({"executor": got}) == []
    leaky = dict(got, pooled_growth_mib_per_1k_ops=80.0)
    assert soak_check.memory_failures({"executor": leaky}) == [
        "executor grew 80.0 MiB per 1 000 operations over 600 served after warm-up "
        "by 2 process(es) (bound 50)"
    ]
    short = dict(leaky, pooled_ops=499)  # too small a sample to judge
    assert soak_check.memory_failures({"executor": short}) == []


def test_a_leak_is_caught_although_no_life_is_long() -> None:
    """Six lives of 200 operations each, each growing 20 MiB after warm-up:
    no life reaches 500 operations, the pool of 600 does, at 200 MiB per 1 000."""
    s = soak_check.RssSample
    samples = []
    for life in range(6):
        base = life * 210
        samples += [
            s(base, "vm-manager", 100 + life, 70 * 1024, base),
            s(base + 1, "vm-manager", 100 + life, 75 * 1024, base + 100),
            s(base + 2, "vm-manager", 100 + life, 95 * 1024, base + 200),
        ]
    got = soak_check.rss_growth(samples)["vm-manager"]
    assert got["longest_life_ops"] == 200
    assert (got["pooled_ops"], got["pooled_growth_mib_per_1k_ops"]) == (600, 200.0)
    assert len(soak_check.memory_failures({"vm-manager": got})) == 1


def test_the_plot_draws_each_service_each_percentile_and_each_fault() -> None:
    s = soak_check.RssSample
    samples = [s(t, svc, 7, 50 * 1024 + t, int(t)) for t in (0, 60, 120) for svc in ("a", "b")]
    report: dict[str, Any] = {
        "seed": 4,
        "minutes": 3,
        "rss_over_time": soak_check.rss_series(samples),
        "latency_per_minute": [
            {"minute": 0, "ok": 3, "p50_s": 2.0, "p99_s": 5.0},
            {"minute": 1, "ok": 0, "p50_s": None, "p99_s": None},
            {"minute": 2, "ok": 2, "p50_s": 3.0, "p99_s": 4.0},
        ],
        "faults": [{"kind": "kill:<executor>", "at_s": 30.0}],
    }
    assert report["rss_over_time"]["a"] == [[0, 50.0, 7], [60, 50.1, 7], [120, 50.1, 7]]
    svg = ET.fromstring(render_svg(report))
    ns = "{http://www.w3.org/2000/svg}"
    titles = {p.findtext(f"{ns}title") for p in svg.iter(f"{ns}polyline")}
    assert titles == {"a", "b", "p50", "p99"}
    p50 = next(p for p in svg.iter(f"{ns}polyline") if p.findtext(f"{ns}title") == "p50")
    assert len(p50.get("points", "").split()) == 2  # the minute without results is skipped
    faults = [line.findtext(f"{ns}title") for line in svg.iter(f"{ns}line")]
    assert faults == ["kill:<executor> at 30.0 s"] * 2  # escaped, one per panel


def test_e2b_operations_come_only_with_a_key_and_the_url_is_the_gateways() -> None:
    plain = {k for k, _ in itertools.islice(soak_plan.operations(3, 0), 300)}
    assert soak_plan.E2B_OP not in plain
    kinds = (*soak_plan.OP_KINDS, soak_plan.E2B_OP)
    assert soak_plan.E2B_OP in {
        k for k, _ in itertools.islice(soak_plan.operations(3, 0, kinds), 300)
    }
    plain_gw = Settings(e2b_http_addr="0.0.0.0:49982", e2b_tls="off", e2b_tls_cert="")
    assert gateway_url(plain_gw) == "http://127.0.0.1:49982"
    own_ca = Settings(
        e2b_http_addr="0.0.0.0:443", e2b_tls="ca", e2b_tls_cert="", e2b_hostnames="gw.example"
    )
    assert gateway_url(own_ca) == "https://gw.example:443"


def test_the_audit_check_names_missing_restarts_and_events_logged_twice(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.open()

    def rec(event_id: str, type_: str, service: str = "executor") -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return {
            "event_id": event_id,
            "time": now,
            "service": service,
            "type": type_,
            "attributes": {},
        }

    since = time.time() - 1
    log.append([rec("executor/a/1", "sandbox.paused"), rec("s/1", "service.restarted")])
    assert soak_check.audit_problems(tmp_path, since, {"executor": 1}) == []
    assert soak_check.audit_problems(tmp_path, since, {"executor": 2}) == [
        "executor was killed 2 times; the audit log has 1 service.restarted records for it"
    ]
    log.append([rec("executor/a/1", "sandbox.paused")])  # the same event again
    log.close()
    assert soak_check.audit_problems(tmp_path, since, {"executor": 1}) == [
        "1 events logged more than once, e.g. executor/a/1"
    ]
    # Records from before the run are not the run's.
    assert soak_check.audit_problems(tmp_path, time.time() + 60, {}) == []


def test_the_audit_check_wants_each_panicked_guest_and_libvirtd_restart(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.open()
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    since = time.time() - 1
    log.append(
        [
            {"event_id": "v/1", "time": now, "service": "vm-manager", "type": "vm.failed",
             "vm": "agent-vm-a", "attributes": {}},
            {"event_id": "v/2", "time": now, "service": "vm-manager",
             "type": "libvirt.reconnected", "attributes": {}},
        ]
    )  # fmt: skip
    log.close()
    assert soak_check.audit_problems(tmp_path, since, {}, ["agent-vm-a"], 1) == []
    assert soak_check.audit_problems(tmp_path, since, {}, ["agent-vm-a", "agent-vm-b"], 2) == [
        "the guest of agent-vm-b panicked; the audit log has no vm.failed record of it",
        "libvirtd was restarted 2 times; the audit log has 1 libvirt.reconnected records",
    ]


def test_the_state_disk_is_filled_only_when_it_is_a_file_system_of_its_own(tmp_path: Path) -> None:
    assert not soak_faults.own_file_system(tmp_path)  # a directory of the host's disk
    assert not soak_faults.own_file_system(Path("/"))
    assert not soak_faults.own_file_system(tmp_path / "missing")
    assert soak_faults.own_file_system(Path("/proc"))  # a mount point
