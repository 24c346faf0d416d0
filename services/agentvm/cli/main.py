"""`agent-vm`: the command line (bring-up, doctor, images, VMs, sandboxes, runs).

One module per command family, imported only when one of its commands runs
(:class:`.group.LazyGroup`): :mod:`.bringup_cmds` (up, down, status, restart),
:mod:`.run_cmd`, :mod:`.vm_cmds`, :mod:`.pool_cmds` (templates and pools),
:mod:`.image_cmds`, :mod:`.sandbox_cmds` with :mod:`.process_cmds`,
:mod:`.e2b_cmds`, :mod:`.maint_cmds` (gc, doctor, bench, alerts, audit); what
they share is in :mod:`.base`.
"""

from __future__ import annotations

import click

from agentvm.cli.group import LazyGroup

__all__ = ["COMMANDS", "cli", "main"]

_C = "agentvm.cli."
# name -> ("module:command", the first line of its help, as `--help` lists it).
COMMANDS: dict[str, tuple[str, str]] = {
    "alerts": (
        _C + "maint_cmds:alerts_cmd",
        "Print the monitor's alerts (anomalies and the responses taken) as they happen.",
    ),
    "audit": (_C + "maint_cmds:audit", "The monitor's audit log (hash-chained JSON lines)."),
    "bench": (
        _C + "maint_cmds:bench",
        "Measure cold boot, template restore, pool acquire, concurrent runs and the "
        "latency a caller feels.",
    ),
    "doctor": (
        _C + "maint_cmds:doctor",
        "Check prerequisites; exit 1 if agent-vm cannot run VMs here.",
    ),
    "down": (
        _C + "bringup_cmds:down",
        "Stop every agent-vm service started by `agent-vm up`, and its supervisor (idempotent).",
    ),
    "e2b": (
        _C + "e2b_cmds:e2b",
        "The E2B-compatible API (docs/E2B.md): keys and client settings.",
    ),
    "gc": (
        _C + "maint_cmds:gc",
        "Reclaim VMs whose owner no longer holds them (sandboxes that are not open).",
    ),
    "image": (
        _C + "image_cmds:image",
        "Images: the built-in guest image, and named images the workload runs in.",
    ),
    "nodes": (
        _C + "node_cmds:nodes",
        "The vm-manager nodes (from AGENTVM_NODES*, else the local one) and their capacity.",
    ),
    "pool": (_C + "pool_cmds:pool", "The pool-manager's pools of pre-warmed VMs."),
    "soak": (
        _C + "soak:soak_cmd",
        "Run real work with faults injected from a seed; check every result and leaks.",
    ),
    "restart": (
        _C + "bringup_cmds:restart",
        "Restart one service (or all, in start order) under the supervisor of `agent-vm up`.",
    ),
    "run": (
        _C + "run_cmd:run_cmd",
        "Run FILE.py [-- ARGS], -c CODE or --cmd 'SHELL' in a fresh VM; exit with its code.",
    ),
    "sandbox": (
        _C + "process_cmds:sandbox",
        "Sandboxes that live across commands: create, exec in, remove.",
    ),
    "shell": (_C + "process_cmds:shell", "A shell in a new sandbox, removed when the shell exits."),
    "status": (
        _C + "bringup_cmds:status",
        "Show each service: health, pid, uptime, restarts, last exit.",
    ),
    "template": (
        _C + "pool_cmds:template",
        "Memory templates: VMs booted once and saved, restored in about a second.",
    ),
    "up": (
        _C + "bringup_cmds:up",
        "Start every agent-vm service under a supervisor (idempotent).",
    ),
    "vm": (_C + "vm_cmds:vm", "Create, inspect and remove VMs directly through vm-manager."),
}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option("0.1.0", prog_name="agent-vm")
def cli() -> None:
    """Run untrusted agent code in throw-away KVM/QEMU virtual machines."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
