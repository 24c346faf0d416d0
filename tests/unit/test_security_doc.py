"""docs/SECURITY.md maps defences to tests: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "SECURITY.md").read_text()


def defined_tests() -> dict[str, set[str]]:
    """test function name -> the test files that define it."""
    out: dict[str, set[str]] = {}
    for path in (REPO / "tests").rglob("test_*.py"):
        for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), flags=re.M):
            out.setdefault(name, set()).add(path.name)
    return out


def test_every_test_named_in_security_md_exists() -> None:
    tests = defined_tests()
    named = set(re.findall(r"\b(test_\w+)\b", DOC))
    # A name is a test function, or a test file (test_network.py -> "test_network").
    missing = sorted(
        n for n in named if n not in tests and not any((REPO / "tests").rglob(f"{n}.py"))
    )
    assert len(named) > 40
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"


def test_file_qualified_names_point_at_the_right_file() -> None:
    tests = defined_tests()
    wrong = [
        f"{file}::{name}"
        for file, name in re.findall(r"\b(test_\w+\.py)::(test_\w+)", DOC)
        if file not in tests.get(name, set())
    ]
    assert not wrong, f"SECURITY.md points at the wrong file: {wrong}"
