"""A mock Kubernetes API server: EndpointSlices of one namespace, list and watch, over HTTPS.

Enough of the API for discovery's tests (no cluster runs on these machines):
a list answers with the current slices and a resourceVersion; a watch from a
version replays what changed after it, then streams changes as the test makes
them, ends at ``timeoutSeconds``, and answers 410 Gone from a version older
than the server keeps. The test can also send a 410 on open watches, cut their
connections, refuse every request with a status, and read the requests made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "port": 7001, "protocol": "TCP"}] if ports is None else ports,
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


@dataclass
class MockAPIServer:
    namespace: str
    token: str
    version: int = 100
    oldest: int = 100  # a watch from before this version gets 410 Gone
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    refuse: tuple[int, str] | None = None  # answer every request with this status
    lists: int = 0
    watches: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _open: set[web.StreamResponse] = field(default_factory=set)
    _gone: bool = False
    _stopping: bool = False
    _runner: web.AppRunner | None = None
    port: int = 0

    async def start(self, cert: str, key: str) -> str:
        app = web.Application()
        app.router.add_get(PATH, self._endpointslices)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return str(self.port)

    async def stop(self) -> None:
        self._stopping = True
        async with self._changed:
            self._changed.notify_all()
        await self.cut()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what a test does to the cluster ---------------------------------------------

    async def put(self, obj: dict[str, Any], announce: bool = True) -> None:
        """Create or change a slice; ``announce=False``: a change the watch misses."""
        name = obj["metadata"]["name"]
        kind = "MODIFIED" if name in self.slices else "ADDED"
        await self._change(kind, obj, announce)

    async def delete(self, name: str) -> None:
        await self._change("DELETED", self.slices[name], True)

    async def _change(self, kind: str, obj: dict[str, Any], announce: bool) -> None:
        self.version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.slices.pop(obj["metadata"]["name"])
        else:
            self.slices[obj["metadata"]["name"]] = obj
        if announce:
            self.history.append((self.version, kind, obj))
        else:
            self.oldest = self.version + 1  # the server compacted what was missed
        async with self._changed:
            self._changed.notify_all()

    async def expire(self) -> None:
        """Every open watch gets 410 Gone (its version was compacted away)."""
        self.oldest = self.version + 1
        self._gone = True
        async with self._changed:
            self._changed.notify_all()

    async def cut(self) -> None:
        """Break every open watch's connection (a load balancer dropping it)."""
        for resp in list(self._open):
            transport = resp._req.transport if resp._req is not None else None
            if transport is not None:
                transport.abort()

    # -- the API ---------------------------------------------------------------------

    async def _endpointslices(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            {"authorization": request.headers.get("Authorization", ""), **request.query}
        )
        auth = request.headers.get("Authorization", "")
        if auth.lower() != f"bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.refuse is not None:
            code, message = self.refuse
            return web.json_response(status(code, "Forbidden", message), status=code)
        if request.match_info["namespace"] != self.namespace:
            return web.json_response(status(403, "Forbidden", "not your namespace"), status=403)
        selector = request.query.get("labelSelector", "")
        key, _, service = selector.partition("=")
        if key != "kubernetes.io/service-name" or not service:
            return web.json_response(status(400, "BadRequest", "bad selector"), status=400)

        def wanted(obj: dict[str, Any]) -> bool:
            return bool(obj["metadata"]["labels"].get("kubernetes.io/service-name") == service)

        if request.query.get("watch") not in ("true", "1", "True"):
            self.lists += 1
            return web.json_response(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": [s for s in self.slices.values() if wanted(s)],
                }
            )
        self.watches += 1
        return await self._watch(request, wanted)

    async def _watch(self, request: web.Request, wanted: Any) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        self._open.add(resp)
        self._gone = False
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        try:
            if since < self.oldest:
                await send("ERROR", status(410, "Expired", f"too old resource version: {since}"))
                return resp
            while loop.time() < end and not self._stopping:
                for version, kind, obj in self.history:
                    if version > since and wanted(obj):
                        await send(kind, obj)
                since = self.version
                if request.query.get("allowWatchBookmarks") == "true":
                    await send("BOOKMARK", {"metadata": {"resourceVersion": str(since)}})
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), end - loop.time())
                if self._gone:
                    await send("ERROR", status(410, "Expired", "too old resource version"))
                    return resp
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        finally:
            self._open.discard(resp)
