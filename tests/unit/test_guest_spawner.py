"""The guest agent's spawner (agentvm_guest.spawner): a real spawner process, real programs.

In a guest the agent forks the spawner before importing gRPC; here it runs as
``python -m agentvm_guest.spawner FD`` on one end of a socketpair, which is
the same serving code. The real-VM tests (test_guest_agent, test_hostile_code,
test_sandbox_processes) run every program of a VM through it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentvm_guest import confine, spawner

REPO = Path(__file__).resolve().parents[2]


class Spawner:
    def __init__(self) -> None:
        agent_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentvm_guest.spawner", str(spawner_end.fileno())],
            pass_fds=[spawner_end.fileno()],
            cwd=REPO / "guest",
        )
        spawner_end.close()
        self.client = spawner.connect(agent_end)
        self.killed = False


@pytest.fixture
def running() -> Iterator[Spawner]:
    s = Spawner()
    try:
        yield s
    finally:
        spawner.stop()
        # At EOF on its socket the spawner exits by itself.
        assert s.process.wait(10) == (-signal.SIGKILL if s.killed else 0)


def no_confinement() -> confine.Confiner:
    return confine.Confiner(None, drop_caps=False, hide=())


def quiet(argv: list[str]) -> spawner.Proc:
    """Start ``argv`` unconfined, without stdin or output."""
    return spawner.popen(
        argv,
        preexec=no_confinement(),
        cwd=None,
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(
    argv: list[str],
    *,
    preexec: confine.Confiner | None = None,
    env: dict[str, str] | None = None,
) -> tuple[spawner.Proc, bytes, bytes, int]:
    proc = spawner.popen(
        argv,
        preexec=preexec or no_confinement(),
        cwd=None,
        env=env or {"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return proc, out, err, proc.wait(10)


def test_a_program_runs_in_a_child_of_the_spawner_with_its_output_and_status(
    running: Spawner,
) -> None:
    proc, out, err, rc = run(["sh", "-c", 'echo "$PPID $$ $X" ; echo err >&2; exit 3'], env={
        "PATH": "/usr/bin:/bin", "X": "from-env",
    })  # fmt: skip
    assert isinstance(proc, spawner.SpawnedProcess)
    ppid, pid, x = out.decode().split()
    assert int(ppid) == running.process.pid  # not a child of this (the agent's) process
    assert int(pid) == proc.pid
    assert x == "from-env"
    assert err == b"err\n"
    assert rc == 3
    assert proc.poll() == 3


def test_cwd_stdin_pipe_and_a_new_session(running: Spawner, tmp_path: Path) -> None:
    proc = spawner.popen(
        ["sh", "-c", 'read line; echo "$line $(pwd) $(ps -o sid= -p $$)"'],
        preexec=no_confinement(),
        cwd=str(tmp_path),
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.close()
    line, cwd, sid = proc.stdout.read().decode().split()
    proc.stdout.close()
    assert (line, cwd) == ("hello", str(tmp_path))
    assert int(sid) == proc.pid  # start_new_session: its own session, as before
    assert proc.wait(10) == 0


def test_a_killed_program_is_reported_by_its_signal(running: Spawner) -> None:
    _, _, _, rc = run(["sh", "-c", "kill -KILL $$"])
    assert rc == -signal.SIGKILL


@pytest.mark.parametrize(
    ("argv", "exc", "words"),
    [
        (["/nonexistent/program"], FileNotFoundError, "No such file or directory"),
        (["no-such-program-anywhere"], FileNotFoundError, "No such file or directory"),
        (["/etc/passwd"], PermissionError, "Permission denied"),
        (["echo", "a\0b"], ValueError, "null byte"),
    ],
    ids=["absolute", "on-path", "not-executable", "nul"],
)
def test_a_program_that_cannot_start_raises_what_popen_raises(
    running: Spawner, argv: list[str], exc: type[Exception], words: str
) -> None:
    with pytest.raises(exc, match=words) as through:
        run(argv)
    spawner.stop()  # the same without the spawner: subprocess.Popen itself
    with pytest.raises(exc) as direct:
        run(argv)
    assert type(through.value) is type(direct.value)
    if isinstance(direct.value, OSError):
        assert isinstance(through.value, OSError)
        assert through.value.errno == direct.value.errno


def test_a_confinement_that_fails_never_runs_the_program(running: Spawner, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    refused = confine.Confiner(str(tmp_path / "no-such-cgroup"), drop_caps=False, hide=())
    with pytest.raises(subprocess.SubprocessError, match="preexec_fn"):
        run(["sh", "-c", f"touch {marker}"], preexec=refused)
    assert not marker.exists()
    assert run(["true"])[3] == 0  # the spawner goes on


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs root")
def test_the_confiner_runs_in_the_program_before_exec(running: Spawner) -> None:
    _, out, _, rc = run(
        ["sh", "-c", "grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status"],
        preexec=confine.Confiner(None, hide=()),
    )
    assert rc == 0
    fields = dict(line.split(":\t") for line in out.decode().splitlines())
    assert fields["NoNewPrivs"] == "1"
    kept = sum(1 << c for c in confine.KEEP_CAPS.values() if c <= confine.last_cap())
    assert int(fields["CapBnd"], 16) == kept


def test_a_terminal_becomes_the_programs_controlling_terminal(running: Spawner) -> None:
    master, slave = os.openpty()
    try:
        proc = spawner.popen(
            ["sh", "-c", "exec 3<>/dev/tty && echo has-a-tty"],
            preexec=no_confinement(),
            cwd=None,
            env={"PATH": "/usr/bin:/bin"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            tty=True,
        )
        os.close(slave)
        slave = -1
        assert proc.wait(10) == 0
        assert b"has-a-tty" in os.read(master, 4096)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_concurrent_spawns_each_get_their_own_program_and_status(running: Spawner) -> None:
    results: dict[int, tuple[bytes, int]] = {}

    def one(i: int) -> None:
        _, out, _, rc = run(["sh", "-c", f"echo {i}; exit {i % 7}"])
        results[i] = (out, rc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: (f"{i}\n".encode(), i % 7) for i in range(24)}


def test_when_the_spawner_dies_its_programs_are_reported_killed_and_the_agent_starts_them(
    running: Spawner,
) -> None:
    proc = quiet(["sleep", "30"])
    try:
        os.kill(running.process.pid, signal.SIGKILL)  # agent code may do this
        running.killed = True
        assert proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while running.client.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running.client.alive
        after, out, _, rc = run(["sh", "-c", "echo $PPID"])
        assert isinstance(after, subprocess.Popen)  # started by this process itself
        assert (int(out), rc) == (os.getpid(), 0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)


def replacement_of(first: spawner.SpawnerClient) -> spawner.SpawnerClient:
    """The spawner the agent started after ``first`` died (within 15 s)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = spawner.current()
        if now is not None and now is not first and now.alive:
            return now
        time.sleep(0.02)
    raise AssertionError("no new spawner was started")


def test_a_killed_spawner_is_replaced_and_programs_go_through_the_new_one() -> None:
    first = spawner.start_exec()  # how the agent replaces a spawner that died
    try:
        assert run(["true"])[3] == 0
        os.kill(first.pid, signal.SIGKILL)
        second = replacement_of(first)
        assert second.pid != first.pid
        _, out, _, rc = run(["sh", "-c", "echo $PPID"])
        assert (int(out), rc) == (second.pid, 0)
    finally:
        spawner.stop()
    assert spawner.current() is None


def test_a_spawner_that_stops_answering_is_killed_and_programs_still_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spawner, "SPAWN_TIMEOUT_S", 0.5)
    first = spawner.start_exec()
    try:
        assert first._process is not None
        assert run(["true"])[3] == 0
        os.kill(first.pid, signal.SIGSTOP)  # agent code may do this
        proc, out, _, rc = run(["sh", "-c", "echo $PPID"])
        assert isinstance(proc, subprocess.Popen)  # the agent started it itself
        assert (int(out), rc) == (os.getpid(), 0)
        assert first._process.wait(10) == -signal.SIGKILL  # not left stopped
        second = replacement_of(first)
        _, out, _, rc = run(["sh", "-c", "echo $PPID"])
        assert (int(out), rc) == (second.pid, 0)
        assert second.pid != first.pid
    finally:
        spawner.stop()


def test_a_program_that_stops_the_spawner_and_exits_is_not_waited_for_forever() -> None:
    from agentvm_guest import processes, proctree

    first = spawner.start_exec()
    try:
        assert first._process is not None
        proc = quiet(["sh", "-c", "kill -STOP $PPID; exit 3"])  # its status cannot come now
        start = time.monotonic()
        rc, timed_out = processes.wait_main(proc, proctree.ProcessTree(), start + 60)
        assert time.monotonic() - start < 15  # not its 60 s timeout
        assert (rc, timed_out) == (-signal.SIGKILL, False)  # its status went with the spawner
        assert first._process.wait(10) == -signal.SIGKILL
        assert replacement_of(first).alive
    finally:
        spawner.stop()
