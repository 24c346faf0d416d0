"""`agent-vm image`: the guest images."""

from __future__ import annotations

import sys

import click

from agentvm.cli.base import (
    handle_errors,
    print_json,
    vm_stub,
)
from agentvm.v1 import vm_manager_pb2


# -- images -------------------------------------------------------------------
@click.group()
def image() -> None:
    """The guest image."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date image exists.")
@handle_errors
def image_build(force: bool) -> None:
    """Build the guest image through vm-manager (streams progress)."""
    for resp in vm_stub().BuildImage(vm_manager_pb2.BuildImageRequest(force=force), timeout=1800):
        if resp.HasField("image"):
            click.echo(
                f"image {resp.image.id} ready: kernel {resp.image.kernel_release}, "
                f"{len(resp.image.packages)} packages, {resp.image.path}"
            )
        else:
            click.echo(resp.log_line)


@image.command("status")
@handle_errors
def image_status() -> None:
    """Show the guest image (exit 1 if none is built for this version)."""
    resp = vm_stub().GetImage(vm_manager_pb2.GetImageRequest(), timeout=10)
    print_json(resp)
    sys.exit(0 if resp.present else 1)
