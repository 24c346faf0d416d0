"""`agent-vm run`: one program in a fresh VM, its output live, its exit code."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from agentvm.cli.base import (
    check_timeout,
    image_option,
    network_option,
    policy_of,
    policy_options,
    profile_option,
    settings,
)
from agentvm.cli.bridge_opt import bridge_option, check_bridge
from agentvm.cli.group import fail
from agentvm.cli.program_args import ProgramCommand
from agentvm.cli.run_inputs import (
    MAX_INLINE_INPUT,
    Inputs,
    check_cwd,
    parse_env,
    read_stdin,
)
from agentvm.common.limits import MAX_MEMORY_MIB, MAX_VCPUS

__all__ = ["MAX_INLINE_INPUT", "run_cmd"]
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
MAX_OUTPUT = 1024 * 1024 * 1024


@click.command("run", cls=ProgramCommand, example="agent-vm run FILE.py -- --its-flag")
@click.argument("argv", nargs=-1)
@click.option("-c", "code", help="Python code to run (instead of FILE).")
@click.option("--cmd", "shell", help="Shell command to run (instead of FILE).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@profile_option()
@network_option()
@bridge_option()
@image_option()
@policy_options
@click.option(
    "--cpus", type=click.IntRange(0, MAX_VCPUS), default=0, help="vCPUs (default: the profile's)."
)
@click.option(
    "--memory",
    type=click.IntRange(0, MAX_MEMORY_MIB),
    default=0,
    help="Memory in MiB (default: the profile's).",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    help="File or directory to copy into /workspace/input (repeat).",
)
@click.option(
    "--output", "output_dir", type=click.Path(file_okay=False), help="Save /workspace/output here."
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Environment variable for the program (repeat).",
)
@click.option(
    "--cwd",
    metavar="DIR",
    help="Working directory in the VM, absolute (default /workspace/work; with --image, "
    "the image's working directory).",
)
@click.option(
    "--max-output",
    type=click.IntRange(1, MAX_OUTPUT),
    default=DEFAULT_MAX_OUTPUT,
    show_default=True,
    metavar="BYTES",
    help="Cap on each of stdout and stderr; past it the rest is dropped and stderr says so.",
)
@click.option(
    "--stdin/--no-stdin",
    "pass_stdin",
    default=True,
    help="Pass this command's stdin to the program when it is not a terminal (default); "
    "--no-stdin leaves it unread.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of live output."
)
def run_cmd(
    argv: tuple[str, ...],
    code: str | None,
    shell: str | None,
    timeout: float,
    profile: str,
    network: str,
    bridge: str | None,
    image: str | None,
    allow_domains: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    ports: tuple[int, ...],
    cpus: int,
    memory: int,
    inputs: tuple[str, ...],
    output_dir: str | None,
    env_pairs: tuple[str, ...],
    cwd: str | None,
    max_output: int,
    pass_stdin: bool,
    as_json: bool,
) -> None:
    """Run FILE.py [-- ARGS], -c CODE or --cmd 'SHELL' in a fresh VM; exit with its code.

    Options of agent-vm come first; the program's own options go after `--`
    (agent-vm run agent.py -- --verbose). With --image, `-- PROGRAM ARGS`
    runs PROGRAM of the image, and no program at all runs the image's default
    command (its Entrypoint + Cmd). Piped stdin is passed to the
    program. Exits 124 when the program timed out. Output files written to
    /workspace/output are saved with --output DIR (listed with --json); what
    is cut or not saved is said on stderr.
    """
    import agent_vm

    image_program = bool(image) and code is None and shell is None and not _is_script(argv)
    if not image_program and (
        sum(x is not None for x in (code, shell))
        + (1 if argv and code is None and shell is None else 0)
        != 1
    ):
        fail("give exactly one of FILE.py, -c CODE or --cmd 'SHELL COMMAND'")
    check_timeout(timeout)
    bridge = check_bridge(network, bridge) or None
    given = policy_of(network, allow_domains, allow_cidrs, ports)
    policy = None if given is None else agent_vm.NetworkPolicy.from_proto(given)
    env = parse_env(env_pairs)
    workdir = check_cwd(cwd)
    files = Inputs()
    files.add_paths(inputs)
    kwargs: dict[str, Any] = {}
    if image_program:
        # The image's own program (argv), or its default command (nothing).
        kwargs = {"cmd": list(argv)} if argv else {}
    elif code is not None:
        kwargs = {"code": code, "args": argv}
    elif shell is not None:
        kwargs = {"cmd": shell, "args": argv}
    else:
        script = Path(argv[0])
        if not script.is_file():
            fail(f"{argv[0]}: no such file (to run a command, use --cmd)")
        files.add(script.name, script)
        kwargs = {"cmd": ["python3", f"/workspace/input/{script.name}"], "args": argv[1:]}
    total = files.check_size()
    stdin = b""
    if pass_stdin and sys.stdin is not None:  # None: this process has no fd 0
        stdin = read_stdin(sys.stdin.buffer, MAX_INLINE_INPUT - total)

    def live(stream: Any) -> Callable[[str], object] | None:
        if as_json:
            return None
        return lambda text: (stream.write(text), stream.flush())

    try:
        result = agent_vm.run(
            **kwargs,
            inputs=files.files,
            env=env,
            cwd=workdir,
            stdin=stdin,
            max_output_bytes=max_output,
            timeout=timeout,
            profile=profile,  # type: ignore[arg-type]
            network=network,  # type: ignore[arg-type]
            bridge=bridge,
            image=image,
            policy=policy,
            cpus=cpus,
            memory_mib=memory,
            outputs_dir=output_dir,
            on_stdout=live(sys.stdout),
            on_stderr=live(sys.stderr),
            address=settings().executor_addr,
        )
    except agent_vm.UnavailableError as exc:
        if "agent-vm up" not in exc.message:
            fail(f"{exc.code}: {exc.message}")  # a service that is up says what is wrong
        # The client found a service down: name which, in the CLI's words.
        from agentvm.cli import services

        fail(f"UNAVAILABLE: {services.unreachable(settings(), 'connection failed', {})}")
    except agent_vm.AgentVMError as exc:
        fail(f"{exc.code}: {exc.message}")
    except OSError as exc:
        # Local files: an --output path that cannot be a directory, an unreadable input.
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"{where.strip() or 'a local file'}: {exc.strerror or exc} (check --input/--output)")
    for skipped in result.skipped_output_files:
        click.echo(f"agent-vm: output {skipped.path!r} not read: {skipped.detail}", err=True)
    if result.output_files_error:
        click.echo(f"agent-vm: {result.output_files_error}", err=True)
    for stream, cut in (("stdout", result.stdout_truncated), ("stderr", result.stderr_truncated)):
        if cut:
            click.echo(
                f"agent-vm: {stream} truncated at {max_output} bytes (--max-output): the rest "
                f"was dropped; raise --max-output (at most {MAX_OUTPUT}), or have the program "
                "write large output to /workspace/output/ and save it with --output DIR",
                err=True,
            )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "exit_code": result.exit_code,
                    "stdout": result.stdout,
                    "stderr": result.stderr,
                    "timed_out": result.timed_out,
                    "duration_s": round(result.duration_s, 3),
                    "boot_s": round(result.boot_s, 3),
                    "vm": result.vm_name,
                    "output_files": [
                        {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256}
                        | ({"truncated": True} if f.truncated else {})
                        for f in result.output_files
                    ],
                    "skipped_output_files": [
                        dataclasses.asdict(f) for f in result.skipped_output_files
                    ],
                    "output_files_error": result.output_files_error,
                    "stdout_truncated": result.stdout_truncated,
                    "stderr_truncated": result.stderr_truncated,
                    "network_log": [dataclasses.asdict(r) for r in result.network_log],
                }
            )
        )
    elif result.timed_out:
        click.echo(f"agent-vm: timed out after {timeout:g} s", err=True)
    sys.exit(result.exit_code)


def _is_script(argv: tuple[str, ...]) -> bool:
    """FILE.py (a local Python file, copied in and run with python3) rather than a program."""
    return bool(argv) and argv[0].endswith(".py") and Path(argv[0]).is_file()
