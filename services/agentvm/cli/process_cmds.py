"""`agent-vm sandbox shell|start|ps|logs|kill` and `agent-vm shell`: terminals and
background processes in sandboxes (docs/SANDBOXES.md, section 3)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time

import click

from agentvm.cli import sandbox_cmds
from agentvm.cli.base import (
    NETWORKS,
    PROFILES,
    handle_errors,
    image_option,
    network_option,
    print_json_list,
    print_table,
    profile_option,
    settings,
)
from agentvm.cli.group import fail
from agentvm.cli.sandbox_cmds import EXIT_TIMED_OUT, duration, executor_stub, pairs
from agentvm.cli.terminal import SHELL, Terminal
from agentvm.v1 import common_pb2, executor_pb2

PTY_SIZE = re.compile(r"(\d{1,4})x(\d{1,4})")


def _exit_code(status: common_pb2.ExitStatus) -> int:
    if status.timed_out:
        return EXIT_TIMED_OUT
    return 128 + status.signal if status.signal else status.exit_code


@click.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id", metavar="ID")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARG]...]")
@click.option("--cwd", default="", help="Working directory in the guest.")
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@handle_errors
def sandbox_shell(sandbox_id: str, argv: tuple[str, ...], cwd: str, env: tuple[str, ...]) -> None:
    """An interactive terminal in the sandbox (a shell, or CMD), like `ssh -t`;
    exits with its status (255 when the connection was lost)."""
    term = Terminal(
        executor_stub(), sandbox_id, list(argv) or SHELL, cwd=cwd, env=pairs("--env", env)
    )
    sys.exit(term.run())


@click.command("shell")
@image_option()
@profile_option()
@network_option()
@click.option(
    "--timeout", default="1h", show_default=True, help="Longest life of the sandbox (90, 15m, 2h)."
)
@handle_errors
def shell(image: str | None, profile: str, network: str, timeout: str) -> None:
    """A shell in a new sandbox, removed when the shell exits."""
    spec = executor_pb2.SandboxSpec(
        profile=PROFILES[profile], network_mode=NETWORKS[network], image=image or ""
    )
    spec.lifetime.FromNanoseconds(int(duration("--timeout", timeout) * 1e9))
    stub = executor_stub()
    sb = stub.CreateSandbox(executor_pb2.CreateSandboxRequest(spec=spec), timeout=600).sandbox
    try:
        code = Terminal(stub, sb.id, SHELL).run()
    finally:
        stub.CloseSandbox(executor_pb2.CloseSandboxRequest(sandbox_id=sb.id), timeout=120)
    sys.exit(code)


@click.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id", metavar="ID")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
@click.option("--cwd", default="", help="Working directory in the guest.")
@click.option("--env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--tag", default="", help="A label for `sandbox ps`.")
@click.option("--exec-id", default="", help="Its id (default: generated).")
@click.option("--pty", "pty", default=None, metavar="ROWSxCOLS", help="Run it on a terminal.")
@click.option("--timeout", default=None, help="Kill it after this long (90, 15m, 2h).")
@handle_errors
def sandbox_start(
    sandbox_id: str,
    argv: tuple[str, ...],
    cwd: str,
    env: tuple[str, ...],
    tag: str,
    exec_id: str,
    pty: str | None,
    timeout: str | None,
) -> None:
    """Start CMD in the background and print its exec id; it runs on after this."""
    req = executor_pb2.StartProcessRequest(
        sandbox_id=sandbox_id,
        program=common_pb2.Program(argv=common_pb2.Argv(args=list(argv))),
        cwd=cwd,
        env=pairs("--env", env),
        tag=tag,
        exec_id=exec_id,
    )
    if pty is not None:
        m = PTY_SIZE.fullmatch(pty)
        if m is None:
            fail(f"--pty {pty!r}: give ROWSxCOLS, e.g. 24x80")
        req.pty.size.rows, req.pty.size.cols = int(m.group(1)), int(m.group(2))
    if timeout is not None:
        req.timeout.FromNanoseconds(int(duration("--timeout", timeout) * 1e9))
    call = executor_stub().StartProcess(req, timeout=120)
    try:
        first = next(iter(call))
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    click.echo(first.exec_id)


@click.command("ps")
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the processes as JSON.")
@handle_errors
def sandbox_ps(sandbox_id: str, as_json: bool) -> None:
    """List the sandbox's background processes, running and ended."""
    procs = (
        executor_stub()
        .ListProcesses(executor_pb2.ListProcessesRequest(sandbox_id=sandbox_id), timeout=60)
        .processes
    )
    if as_json:
        print_json_list(procs)
        return
    now = time.time()
    print_table(
        ["EXEC ID", "PID", "TAG", "PTY", "STATUS", "AGE", "COMMAND"],
        [
            (
                p.exec_id,
                p.pid,
                p.tag or "-",
                "yes" if p.pty else "no",
                "running" if p.running else f"exited {_exit_code(p.exit_status)}",
                f"{max(0.0, now - p.started_at.ToNanoseconds() / 1e9):.0f}s",
                p.command[:60],
            )
            for p in procs
        ],
    )


@click.command("logs")
@click.argument("sandbox_id", metavar="ID")
@click.argument("exec_id", metavar="EXEC_ID")
@click.option("--offset", default=0, show_default=True, help="Output offset to start from.")
@click.option(
    "-f", "--follow", is_flag=True, help="Go on until it ends, then exit with its status."
)
@handle_errors
def sandbox_logs(sandbox_id: str, exec_id: str, offset: int, follow: bool) -> None:
    """Print a background process's output (what the sandbox still holds of it)."""
    stub = executor_stub()
    end = None
    if not follow:
        listed = stub.ListProcesses(
            executor_pb2.ListProcessesRequest(sandbox_id=sandbox_id), timeout=60
        ).processes
        info = next((p for p in listed if p.exec_id == exec_id), None)
        if info is None:
            fail(f"sandbox {sandbox_id} has no process {exec_id!r} (see `agent-vm sandbox ps`)")
        end = info.output_bytes
        if end <= offset:
            return
    req = executor_pb2.ConnectProcessRequest(sandbox_id=sandbox_id, exec_id=exec_id, offset=offset)
    call = stub.ConnectProcess(req)
    try:
        for resp in call:
            ev = resp.event
            kind = ev.WhichOneof("event")
            if kind == "output":
                out = (
                    sys.stderr
                    if ev.output.stream == common_pb2.OUTPUT_STREAM_STDERR
                    else sys.stdout
                )
                out.buffer.write(ev.output.data)
                out.flush()
                if end is not None and ev.output.offset + len(ev.output.data) >= end:
                    return
            elif kind == "dropped":
                click.echo(
                    f"agent-vm: [{ev.dropped.to_offset - ev.dropped.from_offset} bytes of "
                    "output no longer held]",
                    err=True,
                )
            elif kind == "exited":
                sys.exit(_exit_code(ev.exited) if follow else 0)
    finally:
        call.cancel()  # type: ignore[no-untyped-call]


@click.command("kill")
@click.argument("sandbox_id", metavar="ID")
@click.argument("exec_id", metavar="EXEC_ID")
@click.option("-s", "--signal", "signame", default="TERM", show_default=True, help="Signal name.")
@handle_errors
def sandbox_kill(sandbox_id: str, exec_id: str, signame: str) -> None:
    """Send a signal to a process (on a terminal: to its foreground job)."""
    name = signame.upper().removeprefix("SIG")
    try:
        signum = signal.Signals["SIG" + name]
    except KeyError:
        fail(f"--signal {signame!r}: not a signal name (TERM, INT, KILL, HUP...)")
    executor_stub().SignalExec(
        executor_pb2.SignalExecRequest(sandbox_id=sandbox_id, exec_id=exec_id, signal=signum),
        timeout=60,
    )


FORWARD = re.compile(
    r"(?:(?P<host>\[[0-9a-fA-F:]+\]|[^:\[\]]+):)?(?P<port>\d{1,5}):(?P<guest>\d{1,5})"
)


@click.command("port-forward")
@click.argument("sandbox_id", metavar="ID")
@click.argument("spec", metavar="[HOST:]PORT:GUEST_PORT")
@click.option(
    "--unix",
    "unix_path",
    default=None,
    metavar="PATH",
    help="Listen on this Unix socket instead (SPEC is then GUEST_PORT).",
)
@handle_errors
def sandbox_port_forward(sandbox_id: str, spec: str, unix_path: str | None) -> None:
    """Forward connections to this host's PORT (on 127.0.0.1 unless HOST is given; 0:
    any free port) to GUEST_PORT on the sandbox's 127.0.0.1, until Ctrl-C or the
    sandbox closes. Works in every network mode."""
    if unix_path is not None:
        if not spec.isdigit():
            fail(f"{spec!r}: with --unix give GUEST_PORT alone, e.g. 8000")
        host, port, guest = "", 0, int(spec)
    else:
        m = FORWARD.fullmatch(spec)
        if m is None:
            fail(f"{spec!r}: give [HOST:]PORT:GUEST_PORT, e.g. 8080:8000 or 0:8000")
        host = (m.group("host") or "127.0.0.1").strip("[]")
        port, guest = int(m.group("port")), int(m.group("guest"))
    if not 1 <= guest <= 65535 or port > 65535:
        fail(f"{spec!r}: ports are 1-65535 (0 for PORT: any free one)")
    asyncio.run(_forward(sandbox_id, host, port, guest, unix_path or ""))


async def _forward(sandbox_id: str, host: str, port: int, guest: int, unix_path: str) -> None:
    import agent_vm

    sb = await agent_vm.AsyncSandbox.connect(sandbox_id, address=settings().executor_addr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        fwd = await sb.ports.forward(guest, host=host, port=port, unix_path=unix_path)
        click.echo(f"Forwarding from {fwd.address} -> {guest}")
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2)
            try:
                running = await agent_vm.AsyncSandbox.list(address=settings().executor_addr)
            except agent_vm.UnavailableError:
                continue  # the executor restarts: try again
            if all(s.id != sandbox_id for s in running):
                click.echo(f"sandbox {sandbox_id} is closed; stopping", err=True)
                return
    except agent_vm.AgentVMError as exc:
        fail(str(exc))
    finally:
        await sb.disconnect()


# `agent-vm sandbox` with the commands above (main.py names this module for it).
sandbox = sandbox_cmds.sandbox
for _command in (
    sandbox_shell,
    sandbox_start,
    sandbox_ps,
    sandbox_logs,
    sandbox_kill,
    sandbox_port_forward,
):
    sandbox.add_command(_command)
