"""The guest agent in a real VM: commands run under the guest's kernel."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest

from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from tests.vmharness import execute, wait_for

pytestmark = pytest.mark.vm


def test_command_runs_under_the_guest_kernel(shared_vm: common_pb2.VM, guest_image: object) -> None:
    from pathlib import Path

    manifest = json.loads((Path(str(guest_image)) / "manifest.json").read_text())
    res = execute(shared_vm.agent_endpoint, ["uname", "-r"])
    assert res.status.exit_code == 0
    guest_release = res.stdout.decode().strip()
    assert guest_release == manifest["kernel_release"]
    assert guest_release != os.uname().release
    # The guest's own hostname and boot id, not the host's.
    res = execute(shared_vm.agent_endpoint, "hostname; cat /proc/sys/kernel/random/boot_id")
    hostname, boot_id = res.stdout.decode().split()
    assert hostname == shared_vm.name
    host_boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()  # noqa: SIM115
    assert boot_id != host_boot_id


def test_the_cgroup_tree_is_mounted_for_a_move_per_command(shared_vm: common_pb2.VM) -> None:
    """nsdelegate keeps a command in its cgroup; favordynmods spares each command's
    move into its cgroup an RCU grace period (sysinit.py, docs/BENCHMARKS.md)."""
    script = "awk '$2 == \"/sys/fs/cgroup\" {print $3, $4}' /proc/mounts"
    res = execute(shared_vm.agent_endpoint, script)
    assert res.status.exit_code == 0, res.stderr
    fstype, options = res.stdout.decode().split()
    assert fstype == "cgroup2"
    assert {"nsdelegate", "favordynmods"} <= set(options.split(",")), options


def test_programs_are_started_by_the_spawner_not_the_agent(shared_vm: common_pb2.VM) -> None:
    """The parent of a program is the spawner: one thread, forked by the agent (which
    runs gRPC's threads) before it imported grpc (agentvm_guest/spawner.py)."""
    script = (
        "spawner=$PPID; agent=$(awk '/^PPid:/ {print $2}' /proc/$spawner/status); "
        "for p in $spawner $agent; do awk '/^Threads:/ {print $2}' /proc/$p/status; "
        "tr '\\0' ' ' < /proc/$p/cmdline; echo; done"
    )
    res = execute(shared_vm.agent_endpoint, script)
    assert res.status.exit_code == 0, res.stderr
    spawner_threads, spawner_cmd, agent_threads, agent_cmd = res.stdout.decode().splitlines()
    assert "agentvm_guest" in spawner_cmd
    assert "agentvm_guest" in agent_cmd
    assert int(spawner_threads) == 1
    assert int(agent_threads) > 1


def test_a_spawner_killed_by_agent_code_is_replaced(shared_vm: common_pb2.VM) -> None:
    """Programs keep CAP_KILL: one may kill the spawner. Its own status is then lost
    (reported killed), and the next programs go through a new spawner."""
    parent = "p=$PPID; echo $p $(awk '/^Threads:/ {print $2}' /proc/$p/status)"
    old = execute(shared_vm.agent_endpoint, parent).stdout.split()
    res = execute(shared_vm.agent_endpoint, "kill -KILL $PPID; sleep 1")
    assert res.status.signal == 9
    seen: list[list[bytes]] = []

    def replaced() -> bool:
        seen.append(execute(shared_vm.agent_endpoint, parent).stdout.split())
        return seen[-1][1] == b"1" and seen[-1][0] != old[0]

    assert wait_for(replaced, 60, interval=0.5), (old, seen[-3:])


def test_a_spawner_stopped_by_agent_code_is_replaced(shared_vm: common_pb2.VM) -> None:
    """A program may also SIGSTOP the spawner and exit: its status cannot come, yet
    the call ends long before its timeout, and the next programs run."""
    parent = "echo $PPID"
    old = execute(shared_vm.agent_endpoint, parent).stdout
    start = time.monotonic()
    res = execute(shared_vm.agent_endpoint, "kill -STOP $PPID; exit 3", timeout=120)
    assert time.monotonic() - start < 60
    assert res.status.signal == 9  # what is known: its status went with the spawner
    assert not res.status.timed_out
    after = execute(shared_vm.agent_endpoint, parent)
    assert after.status.exit_code == 0
    assert after.stdout != old


def test_status_reports_guest_health(shared_vm: common_pb2.VM) -> None:
    with sync_channel(shared_vm.agent_endpoint) as ch:
        info = (
            guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
            .GetStatus(guest_agent_pb2.GetStatusRequest(), timeout=10)
            .info
        )
    assert info.agent_version
    assert info.kernel_release.endswith("cloud-amd64")
    assert info.uptime.ToNanoseconds() > 0
    # STANDARD profile: 512 MiB of guest RAM.
    assert 400 * 2**20 < info.memory_total_bytes <= 512 * 2**20
    assert 0 < info.disk_free_bytes < info.disk_total_bytes
    assert info.process_count > 1


def test_exit_code_stdout_stderr_and_python(shared_vm: common_pb2.VM) -> None:
    res = execute(shared_vm.agent_endpoint, "echo out; echo err >&2; exit 7")
    assert (res.stdout, res.stderr, res.status.exit_code) == (b"out\n", b"err\n", 7)
    code = common_pb2.Program(
        code=common_pb2.Code(
            language=common_pb2.CODE_LANGUAGE_PYTHON,
            source="import sys, platform; print(platform.python_version(), sys.argv[1:])",
            args=["a", "b c"],
        )
    )
    res = execute(shared_vm.agent_endpoint, code)
    assert res.status.exit_code == 0
    assert res.stdout.decode().startswith("3.11.")
    assert "['a', 'b c']" in res.stdout.decode()


def test_stdin_env_and_cwd_are_honoured(shared_vm: common_pb2.VM) -> None:
    res = execute(
        shared_vm.agent_endpoint,
        'pwd; echo "$GREETING"; cat',
        stdin=b"from stdin\n",
        env={"GREETING": "hello env"},
        cwd="/tmp",
    )
    assert res.stdout == b"/tmp\nhello env\nfrom stdin\n"


def test_timeout_kills_the_whole_tree_and_keeps_partial_output(shared_vm: common_pb2.VM) -> None:
    start = time.monotonic()
    res = execute(
        shared_vm.agent_endpoint,
        "echo before; (sleep 1000 &); setsid sleep 1001 & sleep 1002",
        timeout=3,
    )
    elapsed = time.monotonic() - start
    assert res.status.timed_out
    assert res.status.exit_code == 124
    assert res.stdout == b"before\n"
    assert elapsed < 30
    # Nothing of the tree survived, not even the setsid() escapee.
    ps = execute(shared_vm.agent_endpoint, "ps -eo args || busybox ps -o args")
    assert b"sleep 100" not in ps.stdout, ps.stdout.decode()


def test_a_program_that_closes_its_output_is_still_killed_at_its_timeout(
    shared_vm: common_pb2.VM,
) -> None:
    """EOF on stdout and stderr is not the end of a program: it can close both
    and run on (a daemon does). Its timeout still holds, for its whole tree."""
    start = time.monotonic()
    res = execute(
        shared_vm.agent_endpoint,
        "echo before; exec >&- 2>&-; sleep 1003 & sleep 1004",
        timeout=3,
    )
    assert res.status.timed_out
    assert res.status.exit_code == 124
    assert res.stdout == b"before\n"
    assert time.monotonic() - start < 30
    ps = execute(shared_vm.agent_endpoint, "busybox ps -o args")
    assert b"sleep 100" not in ps.stdout, ps.stdout.decode()


def test_background_children_die_with_the_main_process(shared_vm: common_pb2.VM) -> None:
    res = execute(shared_vm.agent_endpoint, "setsid sleep 999 >/dev/null 2>&1 & echo started")
    assert res.status.exit_code == 0
    ps = execute(shared_vm.agent_endpoint, "busybox ps -o args")
    assert b"sleep 999" not in ps.stdout


def test_output_is_streamed_before_the_process_ends(shared_vm: common_pb2.VM) -> None:
    res = execute(shared_vm.agent_endpoint, "echo one; sleep 2; echo two")
    assert res.stdout == b"one\ntwo\n"
    first_chunk_at = res.chunks[0][0]
    assert res.finished_at - first_chunk_at > 1.5, "output arrived only at the end"


def test_output_cap_truncates_and_flags(shared_vm: common_pb2.VM) -> None:
    res = execute(
        shared_vm.agent_endpoint, "head -c 300000 /dev/zero; echo x >&2", max_output=100_000
    )
    assert len(res.stdout) == 100_000
    assert res.status.stdout_truncated
    assert not res.status.stderr_truncated
    assert res.stderr == b"x\n"


def test_signal_process_by_exec_id(shared_vm: common_pb2.VM) -> None:
    req = guest_agent_pb2.ExecuteRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["sleep", "300"])), exec_id="job-1"
    )
    with sync_channel(shared_vm.agent_endpoint) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        events = stub.Execute(req, timeout=60)
        first = next(iter(events))
        assert first.HasField("started")
        stub.SignalProcess(
            guest_agent_pb2.SignalProcessRequest(exec_id="job-1", signal=15), timeout=10
        )
        rest = list(events)
    exited = rest[-1].exited
    assert exited.signal == 15
    assert exited.exit_code == 128 + 15


def test_bad_requests_get_invalid_argument(shared_vm: common_pb2.VM) -> None:
    with sync_channel(shared_vm.agent_endpoint) as ch:
        stub = guest_agent_pb2_grpc.GuestAgentServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Execute(guest_agent_pb2.ExecuteRequest(), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "program" in (err.value.details() or "")
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])), cwd="/nonexistent"
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Execute(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        req = guest_agent_pb2.ExecuteRequest(
            program=common_pb2.Program(argv=common_pb2.Argv(args=["/no/such/binary"]))
        )
        # The agent starts the program itself (no shell in between): a missing
        # binary is an error naming it, not an exit code.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Execute(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "/no/such/binary" in (err.value.details() or "")


def test_many_concurrent_calls_share_one_session(shared_vm: common_pb2.VM) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> bytes:
        return execute(shared_vm.agent_endpoint, ["echo", str(i)]).stdout

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(run, range(16)))
    assert outs == [f"{i}\n".encode() for i in range(16)]
