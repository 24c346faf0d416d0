"""The executor's checks of what a guest streams about its processes (executor/processes.py)
and its sandbox journal (executor/journal.py): a hostile guest, a damaged record."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agentvm.common.errors import DataLoss, InvalidArgument
from agentvm.executor import processes
from agentvm.executor.journal import Journal, Record
from agentvm.executor.sandbox import SandboxState
from agentvm.executor.sandbox_env import SandboxEnv
from agentvm.v1 import common_pb2, executor_pb2


def sandbox() -> SandboxState:
    vm = common_pb2.VM(name="agent-vm-x", resources=common_pb2.Resources(vcpus=2, memory_mib=512))
    return cast(SandboxState, SimpleNamespace(vm=vm, created_at=time.time() - 10))


def out(data: bytes, offset: int, stream: Any = common_pb2.OUTPUT_STREAM_STDOUT) -> Any:
    return common_pb2.ProcessEvent(
        output=common_pb2.ProcessOutput(stream=stream, data=data, offset=offset)
    )


def test_a_well_behaved_stream_passes() -> None:
    s = processes.ProcessStream(sandbox(), "p1", 0)
    s.check(out(b"abc", 0))
    s.check(common_pb2.ProcessEvent(dropped=common_pb2.OutputDropped(from_offset=3, to_offset=9)))
    s.check(out(b"x", 9, common_pb2.OUTPUT_STREAM_PTY))
    s.check(common_pb2.ProcessEvent(exited=common_pb2.ExitStatus(exit_code=0)))
    assert s.ended
    assert s.pos == 10


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ([out(b"abc", 1)], "at offset 1, expected 0"),
        ([out(b"abc", 0), out(b"d", 2)], "at offset 2, expected 3"),
        ([out(b"a", 0, 7)], "unknown stream 7"),
        ([out(b"", 0)], "a chunk of 0 bytes"),
        ([out(b"a" * (64 * 1024 + 1), 0)], "a chunk of 65537 bytes"),
        (
            [common_pb2.ProcessEvent(dropped=common_pb2.OutputDropped(from_offset=0, to_offset=0))],
            "reported dropped output 0-0",
        ),
        (
            [common_pb2.ProcessEvent(dropped=common_pb2.OutputDropped(from_offset=5, to_offset=9))],
            "at offset 0",
        ),
        (
            [common_pb2.ProcessEvent(exited=common_pb2.ExitStatus()), out(b"a", 0)],
            "after the exit status",
        ),
        ([common_pb2.ProcessEvent()], "empty or unexpected event"),
        ([common_pb2.ProcessEvent(started=common_pb2.ProcessStarted(pid=3))], "unexpected event"),
    ],
    ids=[
        "late-start",
        "overlap",
        "stream",
        "empty",
        "oversized",
        "empty-gap",
        "gap-elsewhere",
        "after-exit",
        "no-event",
        "started-again",
    ],
)
def test_a_hostile_stream_is_data_loss(events: list[Any], words: str) -> None:
    s = processes.ProcessStream(sandbox(), "p1", 0)
    for ev in events[:-1]:
        s.check(ev)
    with pytest.raises(DataLoss, match=words):
        s.check(events[-1])


def test_impossible_exit_figures_are_clamped() -> None:
    s = processes.ProcessStream(sandbox(), "p1", 0)
    status = common_pb2.ExitStatus(exit_code=0)
    status.duration.FromSeconds(10**6)
    status.usage.cpu_time.FromSeconds(10**6)
    ev = s.check(common_pb2.ProcessEvent(exited=status))
    assert ev.exited.duration.ToSeconds() < 3600
    assert ev.exited.usage.cpu_time.ToSeconds() < 3600


def test_listed_processes_are_checked() -> None:
    processes.check_listed(common_pb2.ProcessInfo(exec_id="pr-1", pid=4, tag="t"))
    with pytest.raises(DataLoss, match="invalid exec_id"):
        processes.check_listed(common_pb2.ProcessInfo(exec_id="bad id"))
    with pytest.raises(DataLoss, match="oversized"):
        processes.check_listed(common_pb2.ProcessInfo(exec_id="a", tag="x" * 129))
    with pytest.raises(DataLoss, match="pid -1"):
        processes.check_listed(common_pb2.ProcessInfo(exec_id="a", pid=-1))


def test_caller_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="exec_id must be"):
        processes.check_exec_id("../x")
    with pytest.raises(InvalidArgument, match="pty size"):
        processes.check_pty_size(common_pb2.PtySize(rows=0, cols=80))
    with pytest.raises(InvalidArgument, match="pty size"):
        processes.check_pty_size(common_pb2.PtySize(rows=24, cols=1001))


def record(sid: str = "sb-0123456789ab", **kw: Any) -> Record:
    base: dict[str, Any] = {
        "id": sid,
        "vm_name": "agent-vm-x",
        "spec": executor_pb2.SandboxSpec(image="coder"),
        "workspace_mode": common_pb2.WORKSPACE_MODE_API,
        "created_at": 1.0,
        "expires_at": 2.0,
        "boot_duration": 0.5,
        "lease_id": "",
        "metadata": {"k": "v"},
        "env": SandboxEnv(values={"A": "1", "T": "s3cret"}, secret=frozenset({"T"})),
        "paused": True,
        "paused_left": 99.0,
        "auto_pause": 30.0,
    }
    base.update(kw)
    return Record(**base)


def test_the_journal_keeps_a_record_private_and_whole(tmp_path: Path) -> None:
    j = Journal(tmp_path, "unix:/run/x.sock")
    j.save(record())
    path = j.dir / "sb-0123456789ab.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(j.dir.stat().st_mode) == 0o700
    [back] = j.load()
    assert back.spec.image == "coder"
    assert back.env.values["T"] == "s3cret"
    assert back.env.secret == frozenset({"T"})
    assert (back.paused, back.paused_left, back.auto_pause) == (True, 99.0, 30.0)
    j.remove("sb-0123456789ab")
    assert j.load() == []
    j.remove("sb-0123456789ab")  # idempotent
    # Another executor (address) has a journal of its own.
    assert Journal(tmp_path, "unix:/run/y.sock").dir != j.dir


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: "not json",
        lambda d: json.dumps({**d, "version": 2}),
        lambda d: json.dumps({**d, "spec": "!!"}),
        lambda d: json.dumps({**d, "id": "sb-ffffffffffff"}),
        lambda d: json.dumps({**d, "workspace_mode": 99}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "env"}),
    ],
    ids=["garbage", "version", "spec", "other-id", "mode", "missing"],
)
def test_a_damaged_record_is_set_aside_never_trusted(tmp_path: Path, damage: Any) -> None:
    j = Journal(tmp_path, "unix:/run/x.sock")
    j.save(record())
    path = j.dir / "sb-0123456789ab.json"
    path.write_text(damage(json.loads(path.read_text())))
    assert j.load() == []
    assert (j.dir / "sb-0123456789ab.bad").exists()
    assert not path.exists()


def test_the_journal_refuses_names_that_are_not_sandbox_ids(tmp_path: Path) -> None:
    j = Journal(tmp_path, "unix:/run/x.sock")
    with pytest.raises(ValueError, match="not a sandbox id"):
        j.save(record(sid="../../etc"))
    assert not os.path.exists(tmp_path / "etc")
