"""`agent-vm template` and `agent-vm pool`: memory templates and pools of warm VMs."""

from __future__ import annotations

import click

from agentvm.cli.base import (
    PROFILES,
    enum_word,
    handle_errors,
    human_bytes,
    network_word,
    print_json,
    print_json_list,
    print_table,
    profile_option,
    service,
    settings,
    vm_stub,
)
from agentvm.v1 import common_pb2, pool_manager_pb2, pool_manager_pb2_grpc, vm_manager_pb2


# -- memory templates -------------------------------------------------------------
@click.group()
def template() -> None:
    """Memory templates: VMs booted once and saved, restored in about a second."""


@template.command("prepare")
@profile_option()
@click.option("--force", is_flag=True, help="Rebuild even if a current template exists.")
@handle_errors
def template_prepare(profile: str, force: bool) -> None:
    """Build the template of PROFILE unless a current one exists."""
    req = vm_manager_pb2.PrepareTemplateRequest(profile=PROFILES[profile], force=force)
    resp = vm_stub().PrepareTemplate(req, timeout=900)
    print_json(resp)


@template.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the templates.")
@handle_errors
def template_list(as_json: bool) -> None:
    """List the memory templates on this host."""
    resp = vm_stub().ListTemplates(vm_manager_pb2.ListTemplatesRequest(), timeout=30)
    if as_json:
        print_json_list(resp.templates)
        return
    print_table(
        ("KEY", "PROFILE", "NETWORK", "MEMORY", "DISK", "BUILT IN", "QEMU"),
        (
            (
                t.key,
                enum_word(common_pb2.ResourceProfile, t.profile, "RESOURCE_PROFILE_"),
                network_word(t.network_mode),
                human_bytes(t.memory_state_bytes),
                human_bytes(t.disk_bytes),
                f"{t.build_duration.ToNanoseconds() / 1e9:.1f} s",
                t.qemu_version,
            )
            for t in resp.templates
        ),
    )


@template.command("delete")
@click.argument("key")
@handle_errors
def template_delete(key: str) -> None:
    """Delete template KEY (refused while VMs use it)."""
    vm_stub().DeleteTemplate(vm_manager_pb2.DeleteTemplateRequest(key=key), timeout=60)
    click.echo(f"template {key} deleted")


# -- pools --------------------------------------------------------------------
@click.group()
def pool() -> None:
    """The pool-manager's pools of pre-warmed VMs."""


@pool.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status message as JSON.")
@handle_errors
def pool_status(as_json: bool) -> None:
    """Show each pool: ready, in use and warming VMs, and its counters."""
    stub = pool_manager_pb2_grpc.PoolManagerServiceStub(
        service(settings().pool_manager_addr, "pool-manager")
    )
    resp = stub.GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=10)
    if as_json:
        print_json(resp)
        return
    for p in resp.pools:
        profile = common_pb2.ResourceProfile.Name(p.key.profile).removeprefix("RESOURCE_PROFILE_")
        source = "memory template" if p.template_ready else "cold boot (template not ready)"
        click.echo(
            f"{profile.lower()}: ready {p.ready}, in use {p.in_use}, warming {p.warming} "
            f"(min {p.min_size}, max {p.max_size}, ttl {p.ttl.seconds} s); new VMs from {source}"
        )
        click.echo(
            f"  acquired {p.acquired_total}, created {p.created_total}, on demand "
            f"{p.on_demand_total}, replaced unhealthy {p.replaced_unhealthy}, "
            f"evicted by ttl {p.evicted_ttl}"
        )
