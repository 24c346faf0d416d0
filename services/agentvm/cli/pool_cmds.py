"""`agent-vm template` and `agent-vm pool`: memory templates and pools of warm VMs."""

from __future__ import annotations

import math

import click

from agentvm.cli.base import (
    NETWORKS,
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
from agentvm.cli.group import fail
from agentvm.v1 import common_pb2, pool_manager_pb2, pool_manager_pb2_grpc, vm_manager_pb2

# The modes a memory template (and so a pool) can hold: a bridged VM's network
# is the caller's own, made per sandbox.
TEMPLATE_NETWORKS = ("nat-filtered", "isolated")


# -- memory templates -------------------------------------------------------------
@click.group()
def template() -> None:
    """Memory templates: VMs booted once and saved, restored in about a second."""


@template.command("prepare")
@profile_option()
@click.option(
    "--network",
    type=click.Choice(TEMPLATE_NETWORKS),
    default="nat-filtered",
    show_default=True,
    help="Network mode of the template's VMs: each pool restores from the template of its "
    "own mode (bridged VMs are never made from a template).",
)
@click.option("--force", is_flag=True, help="Rebuild even if a current template exists.")
@click.option(
    "--image",
    default="",
    metavar="NAME",
    help="Named image (name, name:tag or id) whose VMs the template is for; the built-in "
    "image when omitted.",
)
@handle_errors
def template_prepare(profile: str, network: str, force: bool, image: str) -> None:
    """Build the template of PROFILE and NETWORK (and IMAGE) unless a current one exists."""
    req = vm_manager_pb2.PrepareTemplateRequest(
        profile=PROFILES[profile], network_mode=NETWORKS[network], force=force, image=image
    )
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
        ("KEY", "PROFILE", "NETWORK", "IMAGE", "MEMORY", "DISK", "BUILT IN", "QEMU"),
        (
            (
                t.key,
                enum_word(common_pb2.ResourceProfile, t.profile, "RESOURCE_PROFILE_"),
                network_word(t.network_mode),
                t.workload_image_id[:12] or "default",
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


def pool_stub() -> pool_manager_pb2_grpc.PoolManagerServiceStub:
    return pool_manager_pb2_grpc.PoolManagerServiceStub(
        service(settings().pool_manager_addr, "pool-manager")
    )


def pool_key_word(key: pool_manager_pb2.PoolKey) -> str:
    """``standard/nat-filtered`` (``coder/standard/isolated`` for a named image's pool):
    a pool as `pool status` shows it and `pool set` takes it."""
    profile = common_pb2.ResourceProfile.Name(key.profile).removeprefix("RESOURCE_PROFILE_")
    word = f"{profile.lower()}/{network_word(key.network_mode)}"
    return f"{key.image}/{word}" if key.image else word


def template_source(p: pool_manager_pb2.PoolStatus) -> str:
    if p.template_ready:
        return "memory template"
    if p.template_building:
        return "building memory template (new VMs boot cold meanwhile)"
    return "cold boot (no memory template)"


@pool.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status message as JSON.")
@handle_errors
def pool_status(as_json: bool) -> None:
    """Show each pool: ready, in use and warming VMs, and its counters."""
    resp = pool_stub().GetPoolStatus(pool_manager_pb2.GetPoolStatusRequest(), timeout=10)
    if as_json:
        print_json(resp)
        return
    for p in resp.pools:
        click.echo(
            f"{pool_key_word(p.key)}: ready {p.ready}, in use {p.in_use}, warming {p.warming} "
            f"(min {p.min_size}, max {p.max_size}, ttl {p.ttl.seconds} s); "
            f"source: {template_source(p)}"
        )
        click.echo(
            f"  acquired {p.acquired_total}, created {p.created_total}, on demand "
            f"{p.on_demand_total}, replaced unhealthy {p.replaced_unhealthy}, "
            f"evicted by ttl {p.evicted_ttl}"
        )


def parse_key(text: str) -> pool_manager_pb2.PoolKey:
    """``[IMAGE/]PROFILE/NETWORK`` (as `pool status` shows it) -> PoolKey; exit 2 if not."""
    parts = text.strip().split("/")
    image = parts.pop(0) if len(parts) == 3 else "default"
    profile, network = (p.lower() for p in parts) if len(parts) == 2 else ("", "")
    if not image or profile not in PROFILES or network not in TEMPLATE_NETWORKS:
        fail(
            f"pool {text!r}: write [IMAGE/]PROFILE/NETWORK as `agent-vm pool status` shows it "
            f"(profiles {', '.join(PROFILES)}; networks {', '.join(TEMPLATE_NETWORKS)}), "
            "e.g. standard/isolated or coder/standard/isolated"
        )
    return pool_manager_pb2.PoolKey(
        profile=PROFILES[profile],
        network_mode=NETWORKS[network],
        image="" if image == "default" else image,
    )


@pool.command("set")
@click.argument("key")
@click.argument("settings_", metavar="min=N|max=N|ttl=SECONDS...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the pool's new status as JSON.")
@handle_errors
def pool_set(key: str, settings_: tuple[str, ...], as_json: bool) -> None:
    """Change pool KEY's min, max or ttl now, without restarting anything.

    KEY is the pool as `agent-vm pool status` shows it (e.g. standard/isolated).
    The pool warms VMs up to the new min and destroys idle VMs down to the new
    max; VMs in use are never touched. The change lasts until the pool-manager
    stops: put the sizes in AGENTVM_POOLS to keep them.
    """
    req = pool_manager_pb2.SetPoolConfigRequest(key=parse_key(key))
    seen: set[str] = set()
    for item in settings_:
        name, sep, value = item.partition("=")
        if not sep or name not in ("min", "max", "ttl"):
            fail(f"{item!r}: write min=N, max=N or ttl=SECONDS")
        if name in seen:
            fail(f"{name}= is given twice")
        seen.add(name)
        try:
            number = float(value) if name == "ttl" else int(value)
            if not math.isfinite(number):
                raise ValueError(value)
        except ValueError:
            fail(f"{name}={value!r} is not a {'number' if name == 'ttl' else 'whole number'}")
        if not 0 <= number < 2**32:
            fail(f"{name}={value} is out of range (0 or more)")
        if name == "min":
            req.min_size = int(number)
        elif name == "max":
            req.max_size = int(number)
        else:
            req.ttl.FromNanoseconds(int(number * 1e9))
    resp = pool_stub().SetPoolConfig(req, timeout=30)
    if as_json:
        print_json(resp)
        return
    p = resp.pool
    click.echo(
        f"{pool_key_word(p.key)}: min {p.min_size}, max {p.max_size}, ttl {p.ttl.seconds} s "
        f"(now ready {p.ready}, in use {p.in_use}, warming {p.warming})"
    )
