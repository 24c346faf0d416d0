"""`agent-vm run`'s own failures are one line, exit 2, in the CLI's words (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AGENTVM_RUN_DIR=str(tmp_path), AGENTVM_TLS="off")
    for name in ("EXECUTOR", "VM_MANAGER", "POOL_MANAGER", "MONITOR"):
        env[f"AGENTVM_{name}_ADDR"] = f"unix:{tmp_path}/{name.lower()}.sock"  # nothing listens
    return subprocess.run(
        [sys.executable, "-m", "agentvm.cli.main", "run", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_services_down_names_them_and_the_commands_not_python_keywords(tmp_path: Path) -> None:
    proc = run(tmp_path, "--cmd", "true")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"executor (unix:{tmp_path}/executor.sock)" in line
    assert "`agent-vm status`" in line
    assert "`agent-vm up`" in line
    assert "address=" not in line


def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    proc = run(tmp_path, "--output", str(tmp_path / "afile" / "sub"), "--cmd", "true")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "Not a directory" in line
    assert "Traceback" not in proc.stderr
