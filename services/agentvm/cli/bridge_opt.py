"""`--bridge NAME`: the host bridge of a bridge-mode VM (run, vm create, vm run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from agentvm.cli.group import fail

F = TypeVar("F", bound=Callable[..., Any])


def bridge_option() -> Callable[[F], F]:
    """The option, with the same words on every command."""
    return click.option(
        "--bridge",
        metavar="NAME",
        default=None,
        help="The existing host bridge to attach the VM to (e.g. br0; "
        "`ip link show type bridge` lists them). Needs --network bridge, which needs it.",
    )


def check_bridge(network: str, bridge: str | None) -> str:
    """The bridge name, or exit 2 when it and --network do not go together."""
    if bridge is not None and network != "bridge":
        fail(f"--bridge {bridge} needs --network bridge (the network is {network})")
    if network == "bridge" and not bridge:
        fail("--network bridge needs --bridge NAME: an existing host bridge (e.g. br0)")
    return bridge or ""
