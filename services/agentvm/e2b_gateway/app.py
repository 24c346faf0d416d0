"""The gateway's one HTTP application: E2B's REST API, envd and the code interpreter.

The E2B SDKs reach everything through one URL. A request for a sandbox
carries ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` (49983 envd, 49999 the
code interpreter) and the sandbox's ``X-Access-Token``; anything else is the
REST API, authenticated by ``X-API-KEY``. Routing is by those headers.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentvm.e2b_gateway import metrics
from agentvm.e2b_gateway.backend import (
    ACCESS_TOKEN_HEADER,
    API_KEY_HEADER,
    SANDBOX_ID_HEADER,
    SANDBOX_PORT_HEADER,
    TRAFFIC_TOKEN_HEADER,
    Backend,
    json_object,
    read_body,
)
from agentvm.e2b_gateway.envd.filesystem.filesystem_connect import FilesystemASGIApplication
from agentvm.e2b_gateway.envd.process.process_connect import ProcessASGIApplication
from agentvm.e2b_gateway.envd_files import FileCalls, FilesystemService
from agentvm.e2b_gateway.envd_process import ProcessService
from agentvm.e2b_gateway.errors import GatewayError, guard, not_found
from agentvm.e2b_gateway.interpreter import Interpreter
from agentvm.e2b_gateway.sandboxes import Sandboxes, metadata_filter
from agentvm.e2b_gateway.tenants import AccessTokens, Key, KeyStore, TenantError

log = logging.getLogger("agentvm.e2b_gateway")

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
# Largest file an upload may carry (bytes).
MAX_UPLOAD = 1 << 30
# The host name of a sandbox's port when the SDK uses E2B_DOMAIN: PORT-ID.DOMAIN.
_SANDBOX_HOST = re.compile(r"(\d{1,5})-(sb-[0-9a-f]{1,32})\.")
# Requests served at once (streams included); more answer 503.
MAX_INFLIGHT = 512
# Largest body of a REST call (JSON).
MAX_BODY = 1 << 20
# ASGI plumbing types.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _api_of(port: str, path: str) -> str:
    """What a sandbox request is for, as e2b-gateway's metrics label it."""
    if port == str(INTERPRETER_PORT):
        return "interpreter"
    if port != str(ENVD_PORT):
        return "refused"
    if path == "/health":
        return "sandbox-health"
    if path.startswith("/process.Process/"):
        return "envd-process"
    if path.startswith("/filesystem.Filesystem/"):
        return "envd-filesystem"
    return "envd-http"


async def _send_error(send: Send, exc: GatewayError) -> None:
    body = json.dumps(exc.json()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _parts(upload: UploadFile) -> AsyncIterator[bytes]:
    while piece := await upload.read(1 << 20):
        yield piece


class Gateway:
    """The ASGI application (see the module's docstring)."""

    def __init__(self, backend: Backend, keys: KeyStore, tokens: AccessTokens) -> None:
        self.keys = keys
        self.tokens = tokens
        self.inflight = 0
        self.sandboxes = Sandboxes(backend, tokens)
        self.files = FileCalls(backend)
        self.process_app = ProcessASGIApplication(ProcessService(backend))
        self.filesystem_app = FilesystemASGIApplication(FilesystemService(self.files))
        self.interpreter = Interpreter(backend)
        self.rest = Starlette(routes=self._rest_routes())
        self.envd_http = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/files", self._read_file, methods=["GET"]),
                Route("/files", self._write_file, methods=["POST"]),
            ]
        )

    # -- routing -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.rest(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def counted(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if self.inflight >= MAX_INFLIGHT:
                # A caller cannot exhaust the gateway (or the executor behind it).
                scope[metrics.SCOPE_KEY] = "refused"
                await _send_error(
                    counted,
                    GatewayError(
                        503, f"the gateway is serving {MAX_INFLIGHT} requests: try again shortly"
                    ),
                )
                return
            self.inflight += 1
            try:
                await self._route(scope, receive, counted)
            finally:
                self.inflight -= 1
        finally:
            # 0: the connection ended before any answer (the client went away).
            metrics.observe(
                str(scope.get(metrics.SCOPE_KEY, "rest")),
                str(scope.get("method", "")),
                status[0],
                time.monotonic() - started,
            )

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        sandbox_id = headers.get(SANDBOX_ID_HEADER)
        port = headers.get(SANDBOX_PORT_HEADER, str(ENVD_PORT))
        if sandbox_id is None:
            # Without E2B_SANDBOX_URL the SDKs dial PORT-ID.E2B_DOMAIN (a wildcard
            # name the operator points here, with a certificate for it).
            by_host = _SANDBOX_HOST.match(headers.get("host", ""))
            if by_host is None:
                await self.rest(scope, receive, send)
                return
            port, sandbox_id = by_host.group(1), by_host.group(2)
        path: str = scope["path"]
        scope[metrics.SCOPE_KEY] = _api_of(port, path)
        if port == str(ENVD_PORT) and path == "/health":
            await self._sandbox_health(sandbox_id, send)
            return
        # The code interpreter SDK sends only the traffic token on some calls.
        token = headers.get(ACCESS_TOKEN_HEADER) or headers.get(TRAFFIC_TOKEN_HEADER, "")
        if not token or not self.tokens.valid(token, sandbox_id):
            await _send_error(send, not_found(sandbox_id))
            return
        if port == str(ENVD_PORT):
            if path.startswith("/process.Process/"):
                await self.process_app(scope, receive, send)
            elif path.startswith("/filesystem.Filesystem/"):
                await self.filesystem_app(scope, receive, send)
            else:
                await self.envd_http(scope, receive, send)
        elif port == str(INTERPRETER_PORT):
            await self.interpreter.app(scope, receive, send)
        else:
            await _send_error(
                send,
                GatewayError(
                    502,
                    f"port {port}: the gateway reaches envd ({ENVD_PORT}) and the code "
                    f"interpreter ({INTERPRETER_PORT}); for other ports use agent-vm's "
                    "`sandbox port-forward`",
                ),
            )

    async def _sandbox_health(self, sandbox_id: str, send: Send) -> None:
        """204 while the sandbox runs; 502 "... was not found" (the SDK's "not running")."""
        if await self.sandboxes.running(sandbox_id):
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await _send_error(send, GatewayError(502, f"The sandbox {sandbox_id} was not found"))

    # -- REST ------------------------------------------------------------------------

    def _rest_routes(self) -> list[Route]:
        sb = "/sandboxes/{sandbox_id}"
        return [
            Route("/health", self._health, methods=["GET"]),
            Route("/sandboxes", self._create, methods=["POST"]),
            Route("/v2/sandboxes", self._create, methods=["POST"]),
            Route("/sandboxes", self._list_v1, methods=["GET"]),
            Route("/v2/sandboxes", self._list_v2, methods=["GET"]),
            Route(sb, self._get, methods=["GET"]),
            Route(sb, self._kill, methods=["DELETE"]),
            Route(sb + "/timeout", self._set_timeout, methods=["POST"]),
            Route(sb + "/pause", self._pause, methods=["POST"]),
            Route(sb + "/connect", self._connect, methods=["POST"]),
            Route("/v2" + sb + "/connect", self._connect, methods=["POST"]),
            Route(sb + "/resume", self._resume, methods=["POST"]),
        ]

    def _key(self, request: Request) -> Key:
        presented = request.headers.get(API_KEY_HEADER, "")
        if not presented:
            raise GatewayError(
                401, "no API key: set E2B_API_KEY (`agent-vm e2b key create NAME` makes one)"
            )
        try:
            key = self.keys.verify(presented)
        except TenantError as exc:
            raise GatewayError(500, str(exc)) from exc
        if key is None:
            raise GatewayError(
                401, "invalid API key (unknown or revoked): `agent-vm e2b key create NAME`"
            )
        return key

    async def _health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def _create(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            body = json_object(await read_body(request, MAX_BODY))
            created = await self.sandboxes.create(key, body)
            log.info("tenant %s created %s", key.tenant, created.id)
            return JSONResponse(self.sandboxes.brief(created), status_code=201)

        return await guard(run)

    async def _list(self, request: Request) -> list[dict[str, object]]:
        key = self._key(request)
        metadata = metadata_filter(request.query_params.get("metadata", ""))
        states = {
            s for value in request.query_params.getlist("state") for s in value.split(",") if s
        }
        out = [self.sandboxes.detail(s) for s in await self.sandboxes.list(key, metadata)]
        return [d for d in out if not states or d["state"] in states]

    async def _list_v1(self, request: Request) -> Response:
        async def run() -> Response:
            return JSONResponse(await self._list(request))

        return await guard(run)

    async def _list_v2(self, request: Request) -> Response:
        async def run() -> Response:
            items = await self._list(request)
            try:
                limit = int(request.query_params.get("limit", "100"))
                start = int(request.query_params.get("nextToken") or 0)
            except ValueError as exc:
                raise GatewayError(400, "limit and nextToken must be whole numbers") from exc
            if not 1 <= limit <= 1000 or start < 0:
                raise GatewayError(400, "limit: 1 to 1000; nextToken: as a previous page gave it")
            page = items[start : start + limit]
            headers = {}
            if start + limit < len(items):
                headers["x-next-token"] = str(start + limit)
            return JSONResponse(page, headers=headers)

        return await guard(run)

    async def _get(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            sb = await self.sandboxes.owned(key, request.path_params["sandbox_id"])
            return JSONResponse(self.sandboxes.detail(sb))

        return await guard(run)

    async def _kill(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            await self.sandboxes.kill(key, request.path_params["sandbox_id"])
            return Response(status_code=204)

        return await guard(run)

    async def _set_timeout(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            body = json_object(await read_body(request, MAX_BODY))
            await self.sandboxes.set_timeout(key, request.path_params["sandbox_id"], body)
            return Response(status_code=204)

        return await guard(run)

    async def _pause(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            await self.sandboxes.pause(key, request.path_params["sandbox_id"])
            return Response(status_code=204)

        return await guard(run)

    async def _connect(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            body = json_object(await read_body(request, MAX_BODY))
            sb, resumed = await self.sandboxes.connect(key, request.path_params["sandbox_id"], body)
            return JSONResponse(self.sandboxes.brief(sb), status_code=201 if resumed else 200)

        return await guard(run)

    async def _resume(self, request: Request) -> Response:
        async def run() -> Response:
            key = self._key(request)
            body = json_object(await read_body(request, MAX_BODY))
            sb, resumed = await self.sandboxes.connect(key, request.path_params["sandbox_id"], body)
            if not resumed:
                raise GatewayError(409, f"sandbox {sb.id!r} is not paused")
            return JSONResponse(self.sandboxes.brief(sb), status_code=201)

        return await guard(run)

    # -- envd's plain HTTP ---------------------------------------------------------------

    async def _read_file(self, request: Request) -> Response:
        async def run() -> Response:
            sandbox_id = request.headers[SANDBOX_ID_HEADER]
            path = request.query_params.get("path", "")
            chunks = await self.files.read(sandbox_id, path)
            return StreamingResponse(chunks, media_type="application/octet-stream")

        return await guard(run)

    async def _write_file(self, request: Request) -> Response:
        async def run() -> Response:
            sandbox_id = request.headers[SANDBOX_ID_HEADER]
            path = request.query_params.get("path", "")
            ctype = request.headers.get("content-type", "")
            written = []
            if ctype.startswith("multipart/form-data"):
                # Parts are spooled to temporary files by the parser, then streamed.
                async with request.form(max_files=16, max_part_size=MAX_UPLOAD) as form:
                    for _, value in form.multi_items():
                        if isinstance(value, str):
                            continue
                        target = path or value.filename or ""
                        written.append(await self.files.write(sandbox_id, target, _parts(value)))
            else:
                written.append(await self.files.write(sandbox_id, path, request.stream()))
            if not written:
                raise GatewayError(400, "no file in the request (multipart field 'file')")
            return JSONResponse([{"name": e.name, "type": "file", "path": e.path} for e in written])

        return await guard(run)
