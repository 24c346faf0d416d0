"""`agent-vm bench`: the latency a caller feels, each figure beside a baseline from the
same run (docs/BENCHMARKS.md, "What the user feels").

* one-shot ``agent_vm.run(["python3", "-c", "pass"])`` from a warm pool, against
  the same program's own time measured inside a guest; and how long after the
  result its VM was gone (the teardown follows the result);
* ``sb.close()`` as the caller waits for it, and when the VM was gone;
* ``sb.run(["/bin/true"])`` in a warm sandbox, against ``os.posix_spawn`` +
  wait of /bin/true inside that guest;
* the CLI's own start-up against a bare ``python -c pass``: ``agent-vm --help``, and
  ``agent-vm run`` until its first RPC (the moment it connects to the executor: a
  socket of the bench's own that never answers, so no service is involved).

The CLI timings drop PYTHONDONTWRITEBYTECODE and run once untimed first: what a user
runs has its bytecode cached (an environment that forbids the cache makes every
start compile the CLI's modules, about 70 ms more here).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from agentvm.common.errors import FailedPrecondition
from agentvm.v1 import vm_manager_pb2

if TYPE_CHECKING:
    from agentvm.cli.bench import Bench

# Runs in the guest: the guest's own cost of what the caller asks for.
GUEST_TIMER = r"""
import json, os, subprocess, sys, time
def spawn_true():
    t = time.perf_counter()
    pid = os.posix_spawn("/bin/true", ["/bin/true"], dict(os.environ))
    os.waitpid(pid, 0)
    return time.perf_counter() - t
def python_pass():
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t
n = int(sys.argv[1])
spawn = [spawn_true() for _ in range(n)]
py = [python_pass() for _ in range(max(3, n // 5))]
print(json.dumps({"spawn_true": spawn, "python_pass": py}))
"""


def _p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def _pct_ms(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, round(q * (len(s) - 1)))] * 1000, 1)


def _series(values: list[float]) -> dict[str, Any]:
    """Seconds in, milliseconds out: n, p50, p99, min, max."""
    return {
        "n": len(values),
        "p50": _p50_ms(values),
        "p99": _pct_ms(values, 0.99),
        "min": round(min(values) * 1000, 1),
        "max": round(max(values) * 1000, 1),
    }


def guest_baseline(sb: Any, n: int) -> dict[str, list[float]]:
    """Seconds the guest itself takes: posix_spawn + wait of /bin/true, python3 -c pass."""
    res = sb.run(["python3", "-c", GUEST_TIMER, str(n)], timeout=300)
    if res.exit_code != 0:
        raise FailedPrecondition(f"the guest baseline failed ({res.exit_code}): {res.stderr}")
    data = json.loads(res.stdout)
    return {k: [float(x) for x in data[k]] for k in ("spawn_true", "python_pass")}


class Latency:
    """The figures above, through the public client against the running services."""

    def __init__(self, bench: Bench, progress: Callable[[str], None]) -> None:
        self.bench = bench
        self.progress = progress
        self.address = bench.settings.executor_addr

    def _gone_after(self, name: str, since: float, limit: float = 120.0) -> float:
        """Seconds from ``since`` until vm-manager no longer knows ``name``."""
        while time.perf_counter() - since < limit:
            try:
                self.bench.vmm.GetVM(vm_manager_pb2.GetVMRequest(name=name), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return time.perf_counter() - since
                raise
            time.sleep(0.02)
        raise FailedPrecondition(f"VM {name} was still there {limit:.0f} s after its result")

    def oneshot(self, n: int) -> dict[str, list[float]]:
        import agent_vm

        client, gone = [], []
        for i in range(n):
            self.progress(f"one-shot run {i + 1}/{n}")
            self.bench.wait_ready(full=True)
            t = time.perf_counter()
            res = agent_vm.run(["python3", "-c", "pass"], address=self.address, timeout=120)
            done = time.perf_counter()
            if res.exit_code != 0:
                raise FailedPrecondition(f"one-shot run failed ({res.exit_code}): {res.stderr}")
            client.append(done - t)
            gone.append(self._gone_after(res.vm_name, done))
        return {"client": client, "gone": gone}

    def sandbox(self, closes: int, commands: int) -> dict[str, list[float]]:
        """A warm sandbox's commands and the guest's own baseline, then closes."""
        import agent_vm

        out: dict[str, list[float]] = {"command": [], "close": [], "close_gone": []}
        self.bench.wait_ready(full=True)
        t = time.perf_counter()
        with agent_vm.Sandbox.create(address=self.address) as sb:
            sb.run(["/bin/true"])
            out["create_and_first"] = [time.perf_counter() - t]
            self.progress("guest baseline")
            out.update(guest_baseline(sb, max(20, commands)))
            self.progress(f"{commands} commands in a warm sandbox")
            for _ in range(commands):
                t = time.perf_counter()
                sb.run(["/bin/true"])
                out["command"].append(time.perf_counter() - t)
        for i in range(closes):
            self.progress(f"create + first command, close {i + 1}/{closes}")
            self.bench.wait_ready(full=True)
            t = time.perf_counter()
            sb = agent_vm.Sandbox.create(address=self.address)
            sb.run(["/bin/true"])
            out["create_and_first"].append(time.perf_counter() - t)
            t = time.perf_counter()
            sb.close()
            done = time.perf_counter()
            out["close"].append(done - t)
            out["close_gone"].append(self._gone_after(sb.vm_name, done))
        return out


def _cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def first_rpc_s(argv: list[str], timeout: float = 30.0) -> float:
    """Seconds from starting ``argv`` (a CLI command that calls the executor) until it
    connects to the executor: a listening socket of ours that never answers."""
    with tempfile.TemporaryDirectory(prefix="agentvm-bench-") as tmp:
        path = os.path.join(tmp, "executor.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(8)
            listener.settimeout(timeout)
            env = _cli_env(AGENTVM_EXECUTOR_ADDR=f"unix:{path}", AGENTVM_TLS="off")
            t = time.perf_counter()
            proc = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    raise FailedPrecondition(
                        f"{' '.join(argv[:3])} did not call the executor within {timeout:g} s"
                    ) from None
                elapsed = time.perf_counter() - t
                conn.close()
            finally:
                proc.kill()
                proc.wait()
    return elapsed


def cli_startup(n: int = 5) -> dict[str, list[float]]:
    """``agent-vm --help``, ``agent-vm run`` to its first RPC and a bare interpreter,
    seconds each."""
    cli = Path(sys.executable).with_name("agent-vm")
    argv = [str(cli)] if cli.exists() else [sys.executable, "-m", "agentvm.cli.main"]
    run = [*argv, "run", "--network", "isolated", "--cmd", "true"]

    def timed(cmd: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=_cli_env())
        return time.perf_counter() - t

    timed([*argv, "--help"])  # writes the bytecode caches, if they are not there
    first_rpc_s(run)
    return {
        "help": [timed([*argv, "--help"]) for _ in range(n)],
        "run_first_rpc": [first_rpc_s(run) for _ in range(n)],
        "python": [timed([sys.executable, "-c", "pass"]) for _ in range(n)],
    }


def figures(
    bench: Bench, oneshots: int, commands: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    lat = Latency(bench, progress)
    one = lat.oneshot(oneshots)
    sb = lat.sandbox(oneshots, commands)
    cli = cli_startup()
    py = statistics.median(sb["python_pass"])
    spawn = statistics.median(sb["spawn_true"])
    cmd = statistics.median(sb["command"])
    return {
        "oneshot_python_pass_ms": _series(one["client"]),
        "oneshot_vm_gone_after_result_ms": _series(one["gone"]),
        "guest_python_pass_ms": _series(sb["python_pass"]),
        "oneshot_target_ms": round(max(py + 0.15, 1.5 * py) * 1000, 1),
        "sandbox_create_and_first_command_ms": _series(sb["create_and_first"]),
        "close_ms": _series(sb["close"]),
        "close_vm_gone_after_ms": _series(sb["close_gone"]),
        "command_true_ms": _series(sb["command"]),
        "guest_spawn_true_ms": _series(sb["spawn_true"]),
        "cli_help_ms": _series(cli["help"]),
        "cli_run_first_rpc_ms": _series(cli["run_first_rpc"]),
        "host_python_pass_ms": _series(cli["python"]),
        "ratios": {
            "oneshot_over_guest_program": round(statistics.median(one["client"]) / py, 2),
            "command_p50_over_guest_spawn": round(cmd / spawn, 2),
            "command_p99_over_p50": round(_pct_ms(sb["command"], 0.99) / (cmd * 1000), 2),
            "create_and_first_over_command": round(
                statistics.median(sb["create_and_first"]) / cmd, 2
            ),
            "cli_help_over_python": round(
                statistics.median(cli["help"]) / statistics.median(cli["python"]), 2
            ),
            "cli_run_first_rpc_over_python": round(
                statistics.median(cli["run_first_rpc"]) / statistics.median(cli["python"]), 2
            ),
        },
    }


def render(fig: dict[str, Any]) -> list[str]:
    def row(label: str, key: str) -> str:
        s = fig[key]
        return f"{label}: p50 {s['p50']} ms, p99 {s['p99']} ms (min {s['min']}, n={s['n']})"

    q = fig["ratios"]
    return [
        row("one-shot run (python3 -c pass, warm pool)", "oneshot_python_pass_ms"),
        row("  the same program inside the guest", "guest_python_pass_ms")
        + f"; target {fig['oneshot_target_ms']} ms; ratio {q['oneshot_over_guest_program']}x",
        row("  its VM gone after the result", "oneshot_vm_gone_after_result_ms"),
        row("sandbox create + first command (warm pool)", "sandbox_create_and_first_command_ms")
        + f"; ratio to a warm command {q['create_and_first_over_command']}x",
        row("sandbox close", "close_ms"),
        row("  its VM gone after close returned", "close_vm_gone_after_ms"),
        row("command /bin/true in a warm sandbox", "command_true_ms"),
        row("  posix_spawn + wait of /bin/true in the guest", "guest_spawn_true_ms")
        + f"; ratio {q['command_p50_over_guest_spawn']}x, p99/p50 {q['command_p99_over_p50']}x",
        row("agent-vm --help", "cli_help_ms"),
        row("agent-vm run until its first RPC", "cli_run_first_rpc_ms") + "; goal 150 ms",
        row("  python -c pass on the host", "host_python_pass_ms")
        + f"; ratios {q['cli_help_over_python']}x, {q['cli_run_first_rpc_over_python']}x",
    ]
