"""`agent-vm image`: the built-in guest image and named images (docs/IMAGES.md).

The built-in image is the system root every VM boots (`image build` without
a spec, `image status`); named images are root file systems the workload
runs in (`--image NAME` of `run`, `vm create`, `vm run`), built from a spec
or imported from an OCI image. Helpers are in :mod:`.image_support`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agentvm.cli.base import (
    handle_errors,
    human_bytes,
    print_json,
    print_json_list,
    print_table,
    vm_stub,
)
from agentvm.cli.group import fail
from agentvm.cli.image_support import (
    ProgressView,
    absolute_ref,
    check_name,
    created,
    describe,
    kind_word,
    short_id,
    spec_source,
)
from agentvm.v1 import vm_manager_pb2

BUILD_TIMEOUT_S = 1800
SPEC_BUILD_TIMEOUT_S = 4 * 3600
IMPORT_TIMEOUT_S = 3600


@click.group()
def image() -> None:
    """Images: the built-in guest image, and named images the workload runs in."""


def _names(image: vm_manager_pb2.Image) -> str:
    return ", ".join(image.names) or "(no name: use the id)"


@image.command("build")
@click.argument("spec_file", metavar="[FILE]", required=False, type=click.Path(path_type=Path))
@click.option(
    "--name",
    metavar="NAME",
    help="Name of the built image, NAME or NAME:TAG (default: the spec's name). Needs FILE.",
)
@click.option("--no-cache", is_flag=True, help="Ignore cached build steps. Needs FILE.")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date image exists.")
@handle_errors
def image_build(spec_file: Path | None, name: str | None, no_cache: bool, force: bool) -> None:
    """Build the built-in guest image, or a named image from spec FILE (TOML).

    Without FILE: the built-in image every VM boots. With FILE (e.g.
    images/coder.toml, docs/IMAGES.md): the spec is checked here first, and
    the files its [[files]] entries name are read from its directory and sent
    with it. Build output goes to stdout, progress to a live display.
    """
    if spec_file is None:
        if name is not None or no_cache:
            fail(
                "--name and --no-cache need a spec FILE: the built-in image is always "
                "'default' and has no build cache (agent-vm image build images/coder.toml)"
            )
        _build(vm_manager_pb2.BuildImageRequest(force=force), BUILD_TIMEOUT_S, builtin=True)
        return
    if name is not None:
        check_name("--name", name)
    req = vm_manager_pb2.BuildImageRequest(
        spec=spec_source(spec_file), name=name or "", no_cache=no_cache, force=force
    )
    _build(req, SPEC_BUILD_TIMEOUT_S, builtin=False)


def _build(req: vm_manager_pb2.BuildImageRequest, timeout: float, *, builtin: bool) -> None:
    done: vm_manager_pb2.Image | None = None
    with ProgressView() as view:
        for resp in vm_stub().BuildImage(req, timeout=timeout):
            kind = resp.WhichOneof("event")
            if kind == "image":
                done = resp.image
            elif kind == "progress":
                view.update(resp.progress)
            elif kind == "log_line":
                view.log(resp.log_line)
        view.finish()
    if done is None:
        fail("vm-manager ended the build without an image")
    if builtin:
        click.echo(
            f"image {done.id} ready: kernel {done.kernel_release}, "
            f"{len(done.packages)} packages, {done.path}"
        )
    else:
        click.echo(f"image {done.id} built: {_names(done)} ({human_bytes(done.size_bytes)})")


@image.command("import")
@click.argument("ref", metavar="REF")
@click.option(
    "--name",
    metavar="NAME",
    help="Name to give it, NAME or NAME:TAG (default: the archive's own name, if any).",
)
@handle_errors
def image_import(ref: str, name: str | None) -> None:
    """Import an OCI image as a named image: REF is oci-archive:PATH,
    docker-archive:PATH or oci:DIR[:TAG].

    The archive is read by vm-manager on its host (a relative PATH is taken
    from this directory): `docker save -o app.tar app` or `podman save
    --format oci-archive -o app.tar app` make one. Every blob is verified and
    hostile layers are refused; nothing is registered when the import fails.
    """
    if name is not None:
        check_name("--name", name)
    req = vm_manager_pb2.ImportImageRequest(ref=absolute_ref(ref), name=name or "")
    done: vm_manager_pb2.Image | None = None
    with ProgressView() as view:
        for resp in vm_stub().ImportImage(req, timeout=IMPORT_TIMEOUT_S):
            if resp.HasField("image"):
                done = resp.image
            elif resp.HasField("progress"):
                view.update(resp.progress)
        view.finish()
    if done is None:
        fail("vm-manager ended the import without an image")
    click.echo(f"image {done.id} imported: {_names(done)} ({human_bytes(done.size_bytes)})")


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the images.")
@handle_errors
def image_list(as_json: bool) -> None:
    """List the named images (the built-in one: agent-vm image status)."""
    images = vm_stub().ListImages(vm_manager_pb2.ListImagesRequest(), timeout=30).images
    if as_json:
        print_json_list(images)
        return
    print_table(
        ("NAME(S)", "ID", "KIND", "SIZE", "CREATED"),
        (
            (
                ", ".join(i.names) or "-",
                short_id(i.id),
                kind_word(i.kind),
                human_bytes(i.size_bytes),
                created(i),
            )
            for i in images
        ),
    )


@image.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the image as JSON.")
@handle_errors
def image_inspect(name: str, as_json: bool) -> None:
    """Show image NAME (a name, NAME:TAG, an id or its prefix; 'default': the built-in
    image): sizes, config, what uses it."""
    resp = vm_stub().GetImage(vm_manager_pb2.GetImageRequest(name=name), timeout=30)
    if not resp.present:
        fail(
            "the built-in image is not built yet: agent-vm image build"
            if name in ("", "default")
            else f"NOT_FOUND: no image {name!r} (agent-vm image list)"
        )
    if as_json:
        print_json(resp.image)
        return
    for line in describe(resp.image, resp.stale):
        click.echo(line)


@image.command("rm")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@handle_errors
def image_rm(names: tuple[str, ...]) -> None:
    """Remove image names; an image goes with its last name (an id removes all its names).

    Refused while a VM, a memory template or a pool uses the image.
    """
    for name in names:
        resp = vm_stub().DeleteImage(vm_manager_pb2.DeleteImageRequest(name=name), timeout=120)
        for untagged in resp.untagged:
            click.echo(f"untagged {untagged}")
        if resp.deleted:
            click.echo(f"deleted {resp.id} (freed {human_bytes(resp.freed_bytes)})")
        else:
            click.echo(f"kept {short_id(resp.id)}: other names still point at it")


@image.command("tag")
@click.argument("source", metavar="IMAGE")
@click.argument("name")
@handle_errors
def image_tag(source: str, name: str) -> None:
    """Give IMAGE (a name, NAME:TAG or an id) the name NAME (moved if another image had it)."""
    check_name("NAME", name)
    resp = vm_stub().TagImage(vm_manager_pb2.TagImageRequest(image=source, name=name), timeout=30)
    click.echo(f"{name} -> {resp.image.id} ({_names(resp.image)})")


@image.command("prune")
@click.option(
    "--build-cache",
    is_flag=True,
    help="Also empty the spec build cache (fetched packages and built steps): the next "
    "build of every spec starts from scratch. Refused while a build runs.",
)
@handle_errors
def image_prune(build_cache: bool) -> None:
    """Remove images no name points at and nothing uses, and what interrupted
    builds left in the build cache."""
    req = vm_manager_pb2.PruneImagesRequest(build_cache=build_cache)
    resp = vm_stub().PruneImages(req, timeout=600)
    for image_id in resp.removed_ids:
        click.echo(f"deleted {image_id}")
    if resp.build_entries_removed:
        click.echo(
            f"removed {resp.build_entries_removed} build cache entries "
            f"({human_bytes(resp.build_cache_freed_bytes)})"
        )
    if not resp.removed_ids and not resp.build_entries_removed:
        click.echo("nothing to prune")
        return
    click.echo(f"freed {human_bytes(resp.freed_bytes + resp.build_cache_freed_bytes)}")


@image.command("status")
@handle_errors
def image_status() -> None:
    """Show the built-in guest image (exit 1 if none is built for this version)."""
    resp = vm_stub().GetImage(vm_manager_pb2.GetImageRequest(), timeout=10)
    print_json(resp)
    sys.exit(0 if resp.present else 1)
