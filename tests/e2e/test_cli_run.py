"""`agent-vm run` end to end: nothing the user asked for is dropped (issue 23 items 1, 2).

The real CLI against the tests' executor and real VMs. Each run boots a VM,
so each test checks several things of one run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.installation import agent_vm
from tests.vmharness import ExecutorProcess

pytestmark = pytest.mark.vm


def test_a_mistyped_option_stops_the_run_before_any_vm(executor: ExecutorProcess) -> None:
    """The reported case ran `sleep 8` to the end with --timout in its argv."""
    start = time.monotonic()
    proc = agent_vm(executor.env, "run", "--timout", "3", "--cmd", "sleep 8; echo slept")
    assert time.monotonic() - start < 8
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no such option --timout; did you mean --timeout?" in proc.stderr
    proc = agent_vm(executor.env, "run", "-c", "import sys; print(sys.argv)", "--networkk", "x")
    assert proc.returncode == 2
    assert "did you mean --network?" in proc.stderr
    for flag in ("-h", "--help"):
        proc = agent_vm(executor.env, "run", flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ")


def test_stdin_env_cwd_and_program_options_reach_the_program(
    executor: ExecutorProcess, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, sys\n"
        "print('stdin', repr(sys.stdin.read()))\n"
        "print('env', os.environ.get('GREETING'), repr(os.environ.get('EMPTY')))\n"
        "print('cwd', os.getcwd())\n"
        "print('argv', sys.argv[1:])\n"
    )
    proc = agent_vm(
        executor.env,
        "run",
        str(script),
        "--network",
        "isolated",
        "--env",
        "GREETING=hello=world",
        "--env",
        "EMPTY=",
        "--cwd",
        "/workspace/input",
        "--",
        "--its-flag",
        "-h",
        stdin=b"hi\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "stdin 'hi\\n'" in proc.stdout
    assert "env hello=world ''" in proc.stdout
    assert "cwd /workspace/input" in proc.stdout
    assert "argv ['--its-flag', '-h']" in proc.stdout
    # A working directory the VM does not have: one line, naming it.
    proc = agent_vm(
        executor.env, "run", "--network", "isolated", "--cwd", "/nowhere", "--cmd", "true"
    )
    assert proc.returncode == 2
    assert "/nowhere" in proc.stderr
    assert "not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cut_output_and_unsaved_output_files_are_said_on_stderr(
    executor: ExecutorProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = agent_vm(
        executor.env,
        "run",
        "--network",
        "isolated",
        "--max-output",
        "1000",
        "--output",
        str(out),
        "--cmd",
        "head -c 5000 /dev/zero | tr '\\0' x; "
        "cd /workspace/output && echo ok > ok.txt && ln -s /etc/passwd link && mkfifo fifo",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "x" * 1000
    assert "stdout truncated at 1000 bytes (--max-output)" in proc.stderr
    assert "output 'link' not read: a symlink" in proc.stderr
    assert "output 'fifo' not read: a FIFO" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ok.txt"]
