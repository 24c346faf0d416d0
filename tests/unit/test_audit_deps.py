"""scripts/audit-deps.sh audits every pin of pyproject.toml (it cannot reach a
vulnerability service on these machines; docs/SECURITY.md)."""

from __future__ import annotations

import re
import subprocess
import tomllib

from tests.vmharness import REPO

SCRIPT = REPO / "scripts" / "audit-deps.sh"


def test_the_audit_covers_every_pinned_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        wanted += group
    assert all("==" in d for d in wanted), "every dependency is pinned"
    # The same extraction the script runs.
    line = next(x for x in SCRIPT.read_text().splitlines() if x.startswith("grep -oE"))
    command = line.split(">")[0]
    got = subprocess.run(
        ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(got) == sorted(wanted)


def test_the_audit_is_strict_and_pins_pip_audit() -> None:
    text = SCRIPT.read_text()
    assert re.search(r"^PIP_AUDIT_VERSION=\d+\.\d+\.\d+$", text, flags=re.M)
    assert "--strict" in text  # a dependency that cannot be audited fails the run
