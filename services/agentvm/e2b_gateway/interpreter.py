"""The code interpreter's HTTP API (port 49999 of an E2B sandbox) onto background processes.

A context is one background process in the sandbox running
:mod:`.interpreter_guest` (tag ``e2b-ctx:ID``), so contexts survive a restart
of the gateway and go with the sandbox. ``POST /execute`` writes the request
to the context's stdin and turns its marked output lines into E2B's
newline-delimited JSON. The guest is hostile: every line is parsed, typed and
bounded here before it reaches the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import signal as signals
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentvm.e2b_gateway.backend import (
    CALL_TIMEOUT,
    SANDBOX_ID_HEADER,
    Backend,
    KeyedLocks,
    call,
    json_object,
    read_body,
    signal_process,
    write_stdin,
)
from agentvm.e2b_gateway.errors import GatewayError, guard
from agentvm.e2b_gateway.paths import HOME
from agentvm.v1 import common_pb2, executor_pb2

TAG = "e2b-ctx:"
DEFAULT_CONTEXT = "default"
_CONTEXT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Largest request (the code and its variables).
MAX_REQUEST = 16 << 20
# One line of a context's output (bytes); a longer one is cut.
MAX_LINE = 1 << 20
_TYPES = {"stdout", "stderr", "result", "error", "number_of_executions", "end_of_execution"}
_SOURCE = resources.files("agentvm.e2b_gateway").joinpath("interpreter_guest.py").read_text()


def _marker(sandbox_id: str, context_id: str) -> str:
    digest = hashlib.sha256(f"{sandbox_id}/{context_id}".encode()).hexdigest()[:24]
    return f"\x1e{digest}:"


def checked(raw: bytes) -> dict[str, object] | None:
    """One marked line from the guest, as a dict of E2B's shape, or None if it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") not in _TYPES:
        return None
    kind = data["type"]
    if kind in ("stdout", "stderr"):
        text, ts = data.get("text"), data.get("timestamp")
        if not isinstance(text, str) or not isinstance(ts, int):
            return None
        return {"type": kind, "text": text, "timestamp": ts}
    if kind == "result":
        text = data.get("text")
        if not isinstance(text, str):
            return None
        return {"type": "result", "text": text, "is_main_result": True}
    if kind == "error":
        fields = [data.get(k) for k in ("name", "value", "traceback")]
        if not all(isinstance(f, str) for f in fields):
            return None
        return {"type": "error", "name": fields[0], "value": fields[1], "traceback": fields[2]}
    if kind == "number_of_executions":
        count = data.get("execution_count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
        return {"type": kind, "execution_count": count}
    return {"type": "end_of_execution"}


class Interpreter:
    """Contexts and executions of the sandboxes' code interpreters."""

    def __init__(self, backend: Backend) -> None:
        self._stub = backend.stub
        self._locks = KeyedLocks()
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/execute", self._execute, methods=["POST"]),
                Route("/contexts", self._create, methods=["POST"]),
                Route("/contexts", self._list, methods=["GET"]),
                Route("/contexts/{context_id}", self._delete, methods=["DELETE"]),
                Route("/contexts/{context_id}/restart", self._restart, methods=["POST"]),
            ]
        )

    async def _health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def _contexts(self, sandbox_id: str) -> dict[str, common_pb2.ProcessInfo]:
        resp = await call(
            "list contexts",
            self._stub.ListProcesses(
                executor_pb2.ListProcessesRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
            ),
        )
        return {p.tag[len(TAG) :]: p for p in resp.processes if p.running and p.tag.startswith(TAG)}

    async def _start(self, sandbox_id: str, context_id: str, cwd: str) -> None:
        req = executor_pb2.StartProcessRequest(
            sandbox_id=sandbox_id,
            program=common_pb2.Program(
                argv=common_pb2.Argv(
                    args=["python3", "-u", "-c", _SOURCE, _marker(sandbox_id, context_id)]
                )
            ),
            cwd=cwd,
            tag=TAG + context_id,
            exec_id="e2b-ctx-" + secrets.token_hex(6),
            keep_stdin_open=True,
        )
        stream = self._stub.StartProcess(req, timeout=CALL_TIMEOUT)
        try:
            async for resp in stream:
                if resp.event.WhichOneof("event") == "started":
                    return
                if resp.event.WhichOneof("event") == "exited":
                    break
        except Exception as exc:
            raise GatewayError(500, f"start the code interpreter: {exc}") from exc
        finally:
            stream.cancel()
        raise GatewayError(
            500, "the code interpreter did not start: the template needs python3 in its image"
        )

    @staticmethod
    def _sandbox(request: Request) -> str:
        return request.headers[SANDBOX_ID_HEADER]

    @staticmethod
    async def _json(request: Request) -> dict[str, object]:
        return json_object(await read_body(request, MAX_REQUEST))

    @staticmethod
    def _language(body: dict[str, object]) -> str:
        language = body.get("language") or "python"
        if language != "python":
            raise GatewayError(400, f"language {language!r}: agent-vm's interpreter runs python")
        return "python"

    async def _create(self, request: Request) -> Response:
        async def run() -> Response:
            body = await self._json(request)
            self._language(body)
            cwd = body.get("cwd") or HOME
            if not isinstance(cwd, str) or not cwd.startswith("/"):
                raise GatewayError(400, "cwd must be an absolute path")
            context_id = secrets.token_hex(8)
            await self._start(self._sandbox(request), context_id, cwd)
            return JSONResponse({"id": context_id, "language": "python", "cwd": cwd})

        return await guard(run)

    async def _list(self, request: Request) -> Response:
        async def run() -> Response:
            contexts = await self._contexts(self._sandbox(request))
            return JSONResponse(
                [{"id": cid, "language": "python", "cwd": HOME} for cid in sorted(contexts)]
            )

        return await guard(run)

    async def _kill(self, sandbox_id: str, context_id: str) -> None:
        contexts = await self._contexts(sandbox_id)
        if context_id not in contexts:
            raise GatewayError(404, f"context {context_id!r} not found")
        await signal_process(
            self._stub, sandbox_id, contexts[context_id].exec_id, int(signals.SIGKILL)
        )
        # Gone from the running ones before a restart takes its id again.
        for _ in range(100):
            if context_id not in await self._contexts(sandbox_id):
                return
            await asyncio.sleep(0.05)
        raise GatewayError(500, f"context {context_id!r} did not stop after SIGKILL")

    async def _delete(self, request: Request) -> Response:
        async def run() -> Response:
            await self._kill(self._sandbox(request), request.path_params["context_id"])
            return Response(status_code=204)

        return await guard(run)

    async def _restart(self, request: Request) -> Response:
        async def run() -> Response:
            sandbox_id, context_id = self._sandbox(request), request.path_params["context_id"]
            await self._kill(sandbox_id, context_id)
            await self._start(sandbox_id, context_id, HOME)
            return Response(status_code=204)

        return await guard(run)

    async def _execute(self, request: Request) -> Response:
        return await guard(lambda: self._execute_checked(request))

    async def _execute_checked(self, request: Request) -> Response:
        body = await self._json(request)
        self._language(body)
        code = body.get("code")
        if not isinstance(code, str):
            raise GatewayError(400, "code must be a string")
        env = body.get("env_vars") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise GatewayError(400, "env_vars must be an object of strings")
        context_id = body.get("context_id") or DEFAULT_CONTEXT
        if not isinstance(context_id, str) or not _CONTEXT_ID.fullmatch(context_id):
            raise GatewayError(400, f"context_id {context_id!r} is not a context's id")
        sandbox_id = self._sandbox(request)
        contexts = await self._contexts(sandbox_id)
        if context_id not in contexts:
            if context_id != DEFAULT_CONTEXT:
                raise GatewayError(404, f"context {context_id!r} not found")
            await self._start(sandbox_id, context_id, HOME)
            contexts = await self._contexts(sandbox_id)
        proc = contexts[context_id]
        rid = secrets.token_hex(8)
        line = json.dumps({"id": rid, "code": code, "env": env}).encode() + b"\n"
        lines = self._run(sandbox_id, context_id, proc, line, rid)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    async def _run(
        self,
        sandbox_id: str,
        context_id: str,
        proc: common_pb2.ProcessInfo,
        line: bytes,
        rid: str,
    ) -> AsyncIterator[bytes]:
        async with self._locks.hold((sandbox_id, context_id)):
            # Re-read where its output stands now (an earlier execution may have run).
            contexts = await self._contexts(sandbox_id)
            current = contexts.get(context_id)
            if current is None or current.exec_id != proc.exec_id:
                yield self._line(_ended())
                return
            stream = self._stub.ConnectProcess(
                executor_pb2.ConnectProcessRequest(
                    sandbox_id=sandbox_id, exec_id=proc.exec_id, offset=current.output_bytes
                )
            )
            finished = False
            try:
                await write_stdin(self._stub, sandbox_id, proc.exec_id, line)
                async for item in self._outputs(sandbox_id, context_id, stream, rid):
                    yield self._line(item)
                    if item["type"] == "end_of_execution":
                        finished = True
                        return
                yield self._line(_ended())
                finished = True
            finally:
                stream.cancel()
                if not finished:
                    # The caller went away (or ran out of time): interrupt the cell.
                    await asyncio.shield(self._interrupt(sandbox_id, proc.exec_id))

    async def _interrupt(self, sandbox_id: str, exec_id: str) -> None:
        try:
            await signal_process(self._stub, sandbox_id, exec_id, int(signals.SIGINT), timeout=10)
        except GatewayError:  # it may have ended; nothing else to do
            return

    async def _outputs(
        self,
        sandbox_id: str,
        context_id: str,
        stream: grpc.aio.UnaryStreamCall[Any, executor_pb2.ConnectProcessResponse],
        rid: str,
    ) -> AsyncIterator[dict[str, object]]:
        mark = _marker(sandbox_id, context_id).encode()
        ours = rid.encode()
        pending = b""
        async for resp in stream:
            kind = resp.event.WhichOneof("event")
            if kind == "exited":
                return
            if kind != "output":
                continue
            if resp.event.output.stream == common_pb2.OUTPUT_STREAM_STDERR:
                text = resp.event.output.data.decode(errors="replace")
                yield {"type": "stderr", "text": text, "timestamp": time.time_ns()}
                continue
            pending += resp.event.output.data
            while b"\n" in pending or len(pending) > MAX_LINE:
                cut = pending.find(b"\n")
                if cut < 0:
                    cut = MAX_LINE
                raw, pending = pending[:cut], pending[cut + 1 :]
                item = None
                if raw.startswith(mark):
                    who, _, payload = raw[len(mark) :].partition(b"\x1f")
                    if who != ours:
                        continue  # a late line of an interrupted cell before this one
                    item = checked(payload)
                if item is None:
                    text = raw.decode(errors="replace") + "\n"
                    item = {"type": "stdout", "text": text, "timestamp": time.time_ns()}
                yield item

    @staticmethod
    def _line(item: dict[str, object]) -> bytes:
        return json.dumps(item).encode() + b"\n"


def _ended() -> dict[str, object]:
    return {
        "type": "error",
        "name": "ContextEnded",
        "value": "the context's interpreter ended (exit(), a crash or a kill): "
        "run the code again (a new default context starts) or create_code_context()",
        "traceback": "",
    }
