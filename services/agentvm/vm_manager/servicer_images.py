"""The image RPCs of VMManagerService (docs/IMAGES.md), mixed into VMManagerServicer.

GetImage without a name (or "default") describes the built-in image, as it
always did; with one it resolves a named image in the manager's image store.
Every change is audited: image.deleted, image.tagged, image.pruned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentvm.common import identity
from agentvm.common.errors import InvalidArgument
from agentvm.common.grpc_util import grpc_errors, grpc_stream_errors
from agentvm.v1 import vm_manager_pb2, vm_manager_pb2_grpc
from agentvm.vm_manager import build_cache
from agentvm.vm_manager.image import ImageStore, Manifest
from agentvm.vm_manager.image_manifest import BUILTIN
from agentvm.vm_manager.image_store import StoredImage
from agentvm.vm_manager.importer import ImageImporter
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.spec_build import SpecBuilder

Ctx = grpc.aio.ServicerContext[Any, Any]


def image_to_proto(manifest: Manifest, path: str) -> vm_manager_pb2.Image:
    """The built-in image."""
    msg = vm_manager_pb2.Image(
        id=manifest.id,
        distribution=manifest.distribution,
        kernel_release=manifest.kernel_release,
        packages=manifest.packages,
        agent_version=manifest.agent_version,
        path=path,
        kind=vm_manager_pb2.IMAGE_KIND_BUILTIN,
    )
    msg.built_at.FromNanoseconds(int(manifest.built_at * 1e9))
    return msg


class ImageRPCs(vm_manager_pb2_grpc.VMManagerServiceServicer):
    """GetImage, ImportImage, ListImages, DeleteImage, TagImage, PruneImages, and
    BuildImage's named-image half (:meth:`build_named`)."""

    manager: VMManager
    # The built-in image (image.py); named images are ``manager.image_store``.
    images: ImageStore
    # Spec builds in flight vs pruning the build cache.
    build_cache_use: build_cache.CacheUse

    def _named(self, image: StoredImage) -> vm_manager_pb2.Image:
        return image.to_proto(self.manager.image_users(image.id))

    @grpc_errors
    async def GetImage(
        self, request: vm_manager_pb2.GetImageRequest, context: Ctx
    ) -> vm_manager_pb2.GetImageResponse:
        if request.name not in ("", BUILTIN):
            store = self.manager.image_store
            image = await asyncio.to_thread(store.resolve, request.name)
            named = await asyncio.to_thread(self._named, image)
            return vm_manager_pb2.GetImageResponse(present=True, image=named)
        current = self.images.current()
        if current is not None:
            return vm_manager_pb2.GetImageResponse(
                present=True, image=image_to_proto(current.load_manifest(), str(current.root))
            )
        other = self.images.any_built()
        if other is not None:
            return vm_manager_pb2.GetImageResponse(
                present=False,
                stale=True,
                image=image_to_proto(other.load_manifest(), str(other.root)),
            )
        return vm_manager_pb2.GetImageResponse(present=False)

    @grpc_errors
    async def ListImages(
        self, request: vm_manager_pb2.ListImagesRequest, context: Ctx
    ) -> vm_manager_pb2.ListImagesResponse:
        def collect() -> list[vm_manager_pb2.Image]:
            return [self._named(i) for i in self.manager.image_store.list()]

        return vm_manager_pb2.ListImagesResponse(images=await asyncio.to_thread(collect))

    @grpc_errors
    async def DeleteImage(
        self, request: vm_manager_pb2.DeleteImageRequest, context: Ctx
    ) -> vm_manager_pb2.DeleteImageResponse:
        if request.name in ("", BUILTIN):
            raise InvalidArgument(
                "name is required (a name, name:tag or id of a named image); the built-in "
                "image is not deleted this way"
            )
        store = self.manager.image_store
        result = await asyncio.to_thread(store.delete, request.name, self.manager.image_users)
        self.manager.events.emit(
            "image.deleted",
            image=result.id,
            ref=request.name,
            untagged=result.untagged,
            deleted=result.deleted,
            freed_bytes=result.freed_bytes,
            caller=identity.caller(context),
        )
        return vm_manager_pb2.DeleteImageResponse(
            id=result.id,
            untagged=result.untagged,
            deleted=result.deleted,
            freed_bytes=result.freed_bytes,
        )

    @grpc_errors
    async def TagImage(
        self, request: vm_manager_pb2.TagImageRequest, context: Ctx
    ) -> vm_manager_pb2.TagImageResponse:
        if not request.image or not request.name:
            raise InvalidArgument(
                "image and name are both required (agent-vm image tag IMAGE NAME)"
            )
        image = await asyncio.to_thread(self.manager.image_store.tag, request.image, request.name)
        self.manager.events.emit(
            "image.tagged",
            image=image.id,
            ref=request.image,
            name=request.name,
            caller=identity.caller(context),
        )
        return vm_manager_pb2.TagImageResponse(image=await asyncio.to_thread(self._named, image))

    @grpc_errors
    async def PruneImages(
        self, request: vm_manager_pb2.PruneImagesRequest, context: Ctx
    ) -> vm_manager_pb2.PruneImagesResponse:
        store = self.manager.image_store
        cache = build_cache.Pruned()
        with self.build_cache_use.exclusive(request.build_cache) as free:
            result = await asyncio.to_thread(store.prune, self.manager.image_users)
            if free:
                build_dir = self.manager.settings.cache_dir / "build"
                cache = await asyncio.to_thread(build_cache.prune, build_dir, request.build_cache)
        if result.removed_ids or cache.entries:
            self.manager.events.emit(
                "image.pruned",
                removed=result.removed_ids,
                freed_bytes=result.freed_bytes,
                build_entries=cache.entries,
                build_freed_bytes=cache.freed_bytes,
                caller=identity.caller(context),
            )
        return vm_manager_pb2.PruneImagesResponse(
            removed_ids=result.removed_ids,
            freed_bytes=result.freed_bytes,
            build_entries_removed=cache.entries,
            build_cache_freed_bytes=cache.freed_bytes,
        )

    @grpc_stream_errors
    async def ImportImage(
        self, request: vm_manager_pb2.ImportImageRequest, context: Ctx
    ) -> AsyncIterator[vm_manager_pb2.ImportImageResponse]:
        if not request.ref:
            raise InvalidArgument(
                "ref is empty: give oci-archive:PATH, docker-archive:PATH or oci:DIR[:TAG]"
            )
        importer = ImageImporter(
            self.manager,
            self.manager.image_store,
            self.manager.settings.max_image_disk_mib << 20,
        )
        async for event in importer.run(request.ref, request.name):
            yield event

    async def build_named(
        self, request: vm_manager_pb2.BuildImageRequest
    ) -> AsyncIterator[vm_manager_pb2.BuildImageResponse]:
        """BuildImage with a spec (servicer.py's BuildImage hands it here)."""
        builder = SpecBuilder(
            self.manager, self.manager.image_store, self.manager.settings.cache_dir
        )
        with self.build_cache_use.building():
            async for event in builder.run(request.spec, request.name, request.no_cache):
                yield event
