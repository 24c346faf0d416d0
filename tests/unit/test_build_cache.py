"""Pruning the spec build cache (build_cache.py): what goes, what stays, and
that it never races a build."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentvm.common.errors import FailedPrecondition, Unavailable
from agentvm.vm_manager import build_cache


def _cache(tmp_path: Path) -> Path:
    build = tmp_path / "build"
    build_cache.run_step(tmp_path, "a" * 64, "root", print, _fill(4096))
    build_cache.run_step(tmp_path, "b" * 64, "pip", print, _fill(100))
    (build / f"{'c' * 64}.tmp-x1").mkdir()  # an interrupted step
    (build / f"{'c' * 64}.tmp-x1" / "root.raw").write_bytes(b"\0" * 8192)
    (build / "spec-abc").mkdir()  # an interrupted build's scratch
    (build / ("d" * 64)).mkdir()  # a key directory without done
    return build


def _fill(size: int) -> build_cache.Build:
    def build(out: Path) -> dict[str, object]:
        (out / "data").write_bytes(b"x" * size)
        return {"size": size}

    return build


def test_prune_removes_only_scratch_unless_asked_for_everything(tmp_path: Path) -> None:
    build = _cache(tmp_path)
    pruned = build_cache.prune(build, everything=False)
    assert pruned.entries == 3
    assert pruned.freed_bytes >= 8192
    assert sorted(p.name for p in build.iterdir()) == ["a" * 64, "b" * 64]
    # The finished steps are still hits.
    _, result, cached = build_cache.run_step(tmp_path, "a" * 64, "root", print, _fill(1))
    assert (result, cached) == ({"size": 4096}, True)
    pruned = build_cache.prune(build, everything=True)
    assert pruned.entries == 2
    assert pruned.freed_bytes >= 4096
    assert list(build.iterdir()) == []
    assert build_cache.prune(tmp_path / "missing", everything=True) == build_cache.Pruned()


def test_pruning_waits_for_no_build_and_builds_wait_for_no_pruning() -> None:
    use = build_cache.CacheUse()
    with use.building():
        # A build's scratch is not stale: only images are pruned meanwhile.
        with use.exclusive(everything=False) as free:
            assert not free
        refused = pytest.raises(FailedPrecondition, match="1 image build\\(s\\) running")
        with refused, use.exclusive(everything=True):
            pass
    with use.exclusive(everything=True) as free:
        assert free
        with pytest.raises(Unavailable, match="being pruned: build again"), use.building():
            pass
    assert (use.builds, use.pruning) == (0, False)
