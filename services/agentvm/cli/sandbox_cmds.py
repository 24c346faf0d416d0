"""`agent-vm sandbox ...`: sandboxes that outlive one command (docs/SANDBOXES.md).

Each subcommand is one executor call; a sandbox lives in the executor until
`sandbox rm` or the end of its lifetime, so a script can create one, exec in
it many times and remove it.
"""

from __future__ import annotations

import os
import re
import sys
import time

import click

from agentvm.cli.base import (
    NETWORKS,
    PROFILES,
    check_timeout,
    handle_errors,
    image_option,
    network_option,
    policy_of,
    policy_options,
    print_json,
    print_json_list,
    print_table,
    profile_option,
    service,
    settings,
)
from agentvm.cli.group import fail
from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc

DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
EXIT_TIMED_OUT = 124


def executor_stub() -> executor_pb2_grpc.ExecutorServiceStub:
    return executor_pb2_grpc.ExecutorServiceStub(service(settings().executor_addr, "executor"))


def duration(option: str, text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1.5h`` -> seconds; a usage error otherwise."""
    m = DURATION.fullmatch(text.strip())
    if m is None:
        fail(f"{option} {text!r}: give a duration such as 90, 90s, 15m or 2h")
    return float(m.group(1)) * UNITS[m.group(2)]


def pairs(option: str, values: tuple[str, ...]) -> dict[str, str]:
    """``K=V`` options as a dict (a usage error names the one without ``=``)."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{option} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def secret_pairs(values: tuple[str, ...]) -> dict[str, str]:
    """``--secret-env K=V``, or ``--secret-env K`` to take V from this environment
    (so the secret is not on the command line). Errors never show a value."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not key:
            fail("--secret-env with an empty name: expected NAME or NAME=VALUE")
        if not sep:
            if key not in os.environ:
                fail(f"--secret-env {key}: no such variable in this environment (or give {key}=V)")
            value = os.environ[key]
        out[key] = value
    return out


def _expires_in(sb: executor_pb2.Sandbox) -> str:
    left = sb.expires_at.ToNanoseconds() / 1e9 - time.time()
    return f"{max(left, 0):.0f}s"


@click.group()
def sandbox() -> None:
    """Sandboxes that live across commands: create, exec in, remove."""


@sandbox.command("create")
@image_option()
@profile_option()
@network_option()
@policy_options
@click.option("--bridge", default=None, help="Host bridge of --network bridge.")
@click.option(
    "--timeout",
    "timeout",
    default="1h",
    show_default=True,
    help="Lifetime: the sandbox is removed after it (90, 15m, 2h; at most 24h).",
)
@click.option(
    "--auto-pause",
    default=None,
    metavar="DURATION",
    help="Pause it after this long without a call (10s to 24h; default: never).",
)
@click.option("--metadata", multiple=True, metavar="K=V", help="Metadata pair (repeatable).")
@click.option(
    "--env", multiple=True, metavar="K=V", help="Default environment variable (repeatable)."
)
@click.option(
    "--secret-env",
    multiple=True,
    metavar="K[=V]",
    help="Secret variable (repeatable): never shown again; without =V its value is taken "
    "from this environment.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@handle_errors
def sandbox_create(
    image: str | None,
    profile: str,
    network: str,
    allow_domains: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    ports: tuple[int, ...],
    bridge: str | None,
    timeout: str,
    auto_pause: str | None,
    metadata: tuple[str, ...],
    env: tuple[str, ...],
    secret_env: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a sandbox and print its id (or, with --json, all of it)."""
    lifetime = duration("--timeout", timeout)
    check_timeout(lifetime)
    values = {k: executor_pb2.EnvValue(value=v) for k, v in pairs("--env", env).items()}
    for k, v in secret_pairs(secret_env).items():
        values[k] = executor_pb2.EnvValue(value=v, secret=True)
    spec = executor_pb2.SandboxSpec(
        profile=PROFILES[profile],
        network_mode=NETWORKS[network],
        network_policy=policy_of(network, allow_domains, allow_cidrs, ports),
        bridge=bridge or "",
        image=image or "",
    )
    spec.lifetime.FromNanoseconds(int(lifetime * 1e9))
    req = executor_pb2.CreateSandboxRequest(
        spec=spec, metadata=pairs("--metadata", metadata), env=values
    )
    if auto_pause is not None:
        req.auto_pause.FromNanoseconds(int(duration("--auto-pause", auto_pause) * 1e9))
    sb = executor_stub().CreateSandbox(req, timeout=600).sandbox
    if as_json:
        print_json(sb)
    else:
        click.echo(sb.id)


@sandbox.command("list")
@click.option(
    "--metadata",
    multiple=True,
    metavar="K=V",
    help="Only sandboxes with this pair (repeatable: all must match).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the sandboxes as JSON.")
@handle_errors
def sandbox_list(metadata: tuple[str, ...], as_json: bool) -> None:
    """List the running sandboxes."""
    req = executor_pb2.ListSandboxesRequest(metadata=pairs("--metadata", metadata))
    sandboxes = executor_stub().ListSandboxes(req, timeout=60).sandboxes
    if as_json:
        print_json_list(sandboxes)
        return
    print_table(
        ["ID", "VM", "STATE", "IMAGE", "EXPIRES IN", "METADATA"],
        [
            (
                sb.id,
                sb.vm_name,
                "paused" if sb.state == executor_pb2.SANDBOX_STATE_PAUSED else "running",
                sb.spec.image or "default",
                _expires_in(sb),
                ",".join(f"{k}={v}" for k, v in sorted(sb.metadata.items())) or "-",
            )
            for sb in sandboxes
        ],
    )


@sandbox.command("get")
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@handle_errors
def sandbox_get(sandbox_id: str, as_json: bool) -> None:
    """Show one sandbox."""
    req = executor_pb2.GetSandboxRequest(sandbox_id=sandbox_id)
    sb = executor_stub().GetSandbox(req, timeout=60).sandbox
    if as_json:
        print_json(sb)
        return
    click.echo(f"id:          {sb.id}")
    click.echo(f"vm:          {sb.vm_name}")
    click.echo(f"image:       {sb.spec.image or 'default'}")
    click.echo(f"expires in:  {_expires_in(sb)}")
    for k, v in sorted(sb.metadata.items()):
        click.echo(f"metadata:    {k}={v}")
    for k, v in sorted(sb.env.items()):
        click.echo(f"env:         {k}={v}")
    for k in sb.secret_env:
        click.echo(f"env:         {k}=(secret)")


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id", metavar="ID")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
@click.option("--cwd", default="", help="Working directory in the guest.")
@click.option(
    "--env",
    multiple=True,
    metavar="K=V",
    help="Environment variable over the default (repeatable).",
)
@click.option("--timeout", "timeout", default="300", show_default=True, help="Limit (90, 15m, 2h).")
@handle_errors
def sandbox_exec(
    sandbox_id: str, argv: tuple[str, ...], cwd: str, env: tuple[str, ...], timeout: str
) -> None:
    """Run CMD in the sandbox, streaming its output; exits with CMD's exit status
    (128+N when a signal N ended it, 124 when it timed out)."""
    limit = duration("--timeout", timeout)
    check_timeout(limit)
    req = executor_pb2.ExecRequest(
        sandbox_id=sandbox_id,
        program=common_pb2.Program(argv=common_pb2.Argv(args=list(argv))),
        cwd=cwd,
        env=pairs("--env", env),
    )
    req.timeout.FromNanoseconds(int(limit * 1e9))
    status: common_pb2.ExitStatus | None = None
    for ev in executor_stub().Exec(req, timeout=limit + 60):
        if ev.HasField("output"):
            out = sys.stdout if ev.output.stream == common_pb2.OUTPUT_STREAM_STDOUT else sys.stderr
            out.buffer.write(ev.output.data)
            out.flush()
        elif ev.HasField("exited"):
            status = ev.exited
    if status is None:
        fail("the command ended without an exit status", code=1)
    if status.timed_out:
        click.echo(f"agent-vm: the command timed out after {limit:g} s", err=True)
        sys.exit(EXIT_TIMED_OUT)
    sys.exit(128 + status.signal if status.signal else status.exit_code)


@sandbox.command("set-timeout")
@click.argument("sandbox_id", metavar="ID")
@click.argument("timeout", metavar="DURATION")
@handle_errors
def sandbox_set_timeout(sandbox_id: str, timeout: str) -> None:
    """End the sandbox DURATION from now (90, 15m, 2h; at most 24h)."""
    req = executor_pb2.SetSandboxTimeoutRequest(sandbox_id=sandbox_id)
    req.timeout.FromNanoseconds(int(duration("DURATION", timeout) * 1e9))
    sb = executor_stub().SetSandboxTimeout(req, timeout=60).sandbox
    click.echo(f"{sb.id} expires in {_expires_in(sb)}")


@sandbox.command("set-policy")
@click.argument("sandbox_id", metavar="ID")
@policy_options
@handle_errors
def sandbox_set_policy(
    sandbox_id: str,
    allow_domains: tuple[str, ...],
    allow_cidrs: tuple[str, ...],
    ports: tuple[int, ...],
) -> None:
    """Replace a running nat-filtered sandbox's egress policy, live (no option: the
    server's defaults). Connections the old policy allowed are ended."""
    policy = policy_of("nat-filtered", allow_domains, allow_cidrs, ports)
    req = executor_pb2.SetSandboxNetworkPolicyRequest(sandbox_id=sandbox_id, policy=policy)
    got = executor_stub().SetSandboxNetworkPolicy(req, timeout=60).sandbox.network_policy
    click.echo(
        f"{sandbox_id} may reach: {', '.join(got.allow_domains) or '-'} "
        f"(cidrs {', '.join(got.allow_cidrs) or '-'}; ports {', '.join(map(str, got.ports))})"
    )


@sandbox.command("rm")
@click.argument("sandbox_ids", nargs=-1, required=True, metavar="ID...")
@handle_errors
def sandbox_rm(sandbox_ids: tuple[str, ...]) -> None:
    """Remove sandboxes (their VM and workspace). Removing one that is gone is not an error."""
    stub = executor_stub()
    for sandbox_id in sandbox_ids:
        stub.CloseSandbox(executor_pb2.CloseSandboxRequest(sandbox_id=sandbox_id), timeout=120)
        click.echo(f"removed {sandbox_id}")


@sandbox.command("pause")
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@handle_errors
def sandbox_pause(sandbox_id: str, as_json: bool) -> None:
    """Save the sandbox's memory and disk and stop its VM (until `sandbox resume`)."""
    req = executor_pb2.PauseSandboxRequest(sandbox_id=sandbox_id)
    sb = executor_stub().PauseSandbox(req, timeout=1200).sandbox
    if as_json:
        print_json(sb)
    else:
        click.echo(f"{sb.id} paused")


@sandbox.command("resume")
@click.argument("sandbox_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@handle_errors
def sandbox_resume(sandbox_id: str, as_json: bool) -> None:
    """Bring a paused sandbox back, its processes and files as they were."""
    req = executor_pb2.ResumeSandboxRequest(sandbox_id=sandbox_id)
    sb = executor_stub().ResumeSandbox(req, timeout=1200).sandbox
    if as_json:
        print_json(sb)
    else:
        click.echo(f"{sb.id} resumed; expires in {_expires_in(sb)}")
