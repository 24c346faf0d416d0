"""A test run stopped with SIGTERM still tears its fixtures down (tests/pytest_sigterm.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.vmharness import REPO

SESSION = """
import time
from pathlib import Path

import pytest

OUT = Path({out!r})


@pytest.fixture(scope="session")
def resource():
    (OUT / "set-up").touch()
    yield
    (OUT / "torn-down").touch()


def test_long(resource):
    time.sleep(60)
"""


def test_sigterm_tears_session_fixtures_down(tmp_path: Path) -> None:
    test_file = tmp_path / "test_long.py"
    test_file.write_text(SESSION.format(out=str(tmp_path)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.pytest_sigterm", "-p",
         "no:cacheprovider", "--rootdir", str(tmp_path), "-c", "/dev/null", str(test_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "set-up").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the fixture never ran"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "torn-down").exists(), out
    assert proc.returncode != 0
    assert "stopped by signal" in out
