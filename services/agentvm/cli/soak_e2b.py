"""The soak's E2B operation: the E2B-compatible API over plain HTTP, as an SDK speaks it.

Create a sandbox (REST, ``X-API-Key``), upload bytes and read them back
through envd's ``/files`` (``E2b-Sandbox-Id``, ``E2b-Sandbox-Port``,
``X-Access-Token``: the headers the SDKs send), kill it. Runs only when the
soak is given an API key (`--e2b-key`, or ``E2B_API_KEY``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import agent_vm

__all__ = ["E2B", "e2b"]

ENVD_PORT = "49983"
TIMEOUT_S = 300.0
KILL_RETRY_S = 30.0
# HTTP statuses as the gRPC codes the soak judges errors by.
_CODES = {404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class E2B:
    url: str
    key: str
    run_id: str
    label: str

    def _call(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> bytes:
        req = urllib.request.Request(  # noqa: S310 - the gateway's http(s) URL
            self.url.rstrip("/") + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as exc:
            text = exc.read()[:300].decode(errors="replace")
            code = _CODES.get(exc.code, f"HTTP_{exc.code}")
            raise agent_vm.AgentVMError(f"E2B {method} {path}: {exc.code} {text}", code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise agent_vm.AgentVMError(f"E2B {method} {path}: {exc}", "UNAVAILABLE") from exc

    def create(self) -> dict[str, Any]:
        body = {"templateID": "base", "timeout": 600, "metadata": {self.label: self.run_id}}
        raw = self._call(
            "POST",
            "/sandboxes",
            json.dumps(body).encode(),
            {"X-API-Key": self.key, "Content-Type": "application/json"},
        )
        made: dict[str, Any] = json.loads(raw)
        return made

    def kill(self, sandbox_id: str) -> None:
        """DELETE the sandbox, again while the gateway or executor is restarting
        (as close() does); a sandbox already gone (404) is killed."""
        give_up = time.monotonic() + KILL_RETRY_S
        while True:
            try:
                self._call("DELETE", f"/sandboxes/{sandbox_id}", None, {"X-API-Key": self.key})
                return
            except agent_vm.AgentVMError as exc:
                if exc.code == "NOT_FOUND":
                    return
                if exc.code != "UNAVAILABLE" or time.monotonic() > give_up:
                    raise
            time.sleep(1.0)

    def envd(self, made: dict[str, Any], method: str, path: str, body: bytes | None) -> bytes:
        headers = {
            "E2b-Sandbox-Id": str(made["sandboxID"]),
            "E2b-Sandbox-Port": ENVD_PORT,
            "X-Access-Token": str(made["envdAccessToken"]),
        }
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        return self._call(method, path, body, headers)


def _round_trip(api: E2B, data: bytes) -> None:
    made = api.create()
    try:
        query = "/files?" + urllib.parse.urlencode({"path": "work/soak-e2b"})
        api.envd(made, "POST", query, data)
        got = api.envd(made, "GET", query, None)
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            from agentvm.cli.soak_ops import WrongResult

            raise WrongResult(f"E2B file read back: {len(got)} bytes, not the {len(data)} sent")
    finally:
        api.kill(str(made["sandboxID"]))


async def e2b(api: E2B, rng: random.Random) -> None:
    """Through the E2B API: a sandbox, a file up and back byte for byte, killed."""
    data = rng.randbytes(rng.randint(1024, 512 * 1024))
    await asyncio.to_thread(_round_trip, api, data)
