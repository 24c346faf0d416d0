"""confine.py: the limits and the preexec confinement, run in forked children on the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentvm_guest import confine


def run_confined(confiner: confine.Confiner, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=False, preexec_fn=confiner
    )


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs root")
def test_the_child_loses_the_dropped_capabilities_and_cannot_regain_any() -> None:
    out = run_confined(confine.Confiner(None, hide=()), "cat /proc/self/status")
    fields = status_fields(out.stdout)
    assert fields["NoNewPrivs"] == "1"
    bnd = int(fields["CapBnd"], 16)
    assert bnd == sum(1 << c for c in confine.KEEP_CAPS.values())
    assert int(fields["CapEff"], 16) == bnd
    # The parent keeps everything.
    mine = status_fields(Path("/proc/self/status").read_text())
    assert int(mine["CapBnd"], 16) & ~bnd


def test_without_root_only_no_new_privs() -> None:
    out = run_confined(confine.Confiner(None, drop_caps=False, hide=()), "cat /proc/self/status")
    fields = status_fields(out.stdout)
    assert fields["NoNewPrivs"] == "1"
    assert fields["CapBnd"] == status_fields(Path("/proc/self/status").read_text())["CapBnd"]


def test_the_child_resets_the_agents_oom_shield() -> None:
    out = run_confined(
        confine.Confiner(None, drop_caps=False, hide=()), "cat /proc/self/oom_score_adj"
    )
    assert out.stdout.strip() == "0"


def test_a_cgroup_that_cannot_be_joined_means_no_run(tmp_path: Path) -> None:
    """Never an unconfined run: the program is not started at all."""
    confiner = confine.Confiner(str(tmp_path / "missing"), drop_caps=False, hide=())
    with pytest.raises(subprocess.SubprocessError, match="preexec_fn"):
        run_confined(confiner, "echo ran > " + str(tmp_path / "ran"))
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
def test_hidden_directories_are_covered_in_the_child_only(tmp_path: Path) -> None:
    secret = tmp_path / "agent"
    secret.mkdir()
    (secret / "agent.sock").write_text("x")
    confiner = confine.Confiner(None, drop_caps=True, hide=(str(secret),))
    out = run_confined(confiner, f"ls -A {secret}; touch {secret}/new; echo rc=$?")
    assert out.stdout.splitlines()[0] == "rc=1", out
    assert "Read-only file system" in out.stderr
    assert (secret / "agent.sock").exists()
    assert not (secret / "new").exists()


def test_dropped_caps_cover_everything_but_the_kept_ones() -> None:
    dropped = confine.dropped_caps()
    keep = set(confine.KEEP_CAPS.values())
    assert not keep & set(dropped)
    assert {16, 17, 19, 21, 22, 25, 27, 39} <= set(dropped)
    assert sorted(keep | set(dropped)) == list(range(confine.last_cap() + 1))


@given(st.integers(min_value=-(2**40), max_value=2**45))
def test_memory_limit_leaves_a_reserve(total: int) -> None:
    limit = confine.memory_limit(total)
    if total <= 0:
        assert limit == 0
        return
    assert total // 2 <= limit <= total
    assert limit <= total - min(confine.MEMORY_RESERVE_BYTES, total // 2)


def test_memory_limit_of_the_standard_profile() -> None:
    total = 480 * 2**20
    assert confine.memory_limit(total) == total - 64 * 2**20
    assert confine.memory_limit(4 * 2**30) == 4 * 2**30 - 512 * 2**20
