"""E2B's REST API for sandboxes onto the executor's sandbox calls.

A sandbox's tenant and template are executor metadata under the reserved
prefix ``agentvm.e2b/`` (hidden from E2B callers, who cannot set it), so the
gateway keeps nothing of its own and a tenant's list is a metadata filter.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
from typing import Any

import grpc
from google.protobuf import duration_pb2

from agentvm.e2b_gateway.backend import CALL_TIMEOUT, Backend, call
from agentvm.e2b_gateway.errors import GatewayError, not_found
from agentvm.e2b_gateway.tenants import AccessTokens, Key
from agentvm.v1 import common_pb2, executor_pb2

RESERVED = "agentvm.e2b/"
TENANT_KEY = RESERVED + "tenant"
TEMPLATE_KEY = RESERVED + "template"
# envd version reported: the features of envd this gateway implements (see docs/E2B.md).
ENVD_VERSION = "0.5.7"
CLIENT_ID = "agent-vm"
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 24 * 3600
# E2B template names -> agent-vm image ("" = the built-in image).
TEMPLATES = {"base": "", "code-interpreter-v1": "", "code-interpreter": ""}
_TEMPLATE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
# Resources of a sandbox as E2B reports them (agent-vm's standard profile).
_PROFILE_MB = {
    common_pb2.RESOURCE_PROFILE_LIGHT: 256,
    common_pb2.RESOURCE_PROFILE_STANDARD: 512,
    common_pb2.RESOURCE_PROFILE_INTENSIVE: 1024,
}


def _iso(ts: Any) -> str:
    dt: datetime.datetime = ts.ToDatetime(tzinfo=datetime.UTC)
    return dt.isoformat().replace("+00:00", "Z")


def _duration(seconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds)


def _timeout(value: object, default: int = DEFAULT_TIMEOUT_S) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TIMEOUT_S:
        raise GatewayError(400, f"timeout {value!r}: give whole seconds, 1 to {MAX_TIMEOUT_S}")
    return value


def _str_map(name: str, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise GatewayError(400, f"{name} must be an object of strings")
    return dict(value)


class Sandboxes:
    """Create, find, list, pause, connect and kill a tenant's sandboxes."""

    def __init__(self, backend: Backend, tokens: AccessTokens) -> None:
        self._stub = backend.stub
        self._tokens = tokens
        # Sandboxes being created, per tenant (counted against its limit).
        self._creating: dict[str, int] = {}

    # -- shaping -----------------------------------------------------------------

    def _visible_metadata(self, sb: executor_pb2.Sandbox) -> dict[str, str]:
        return {k: v for k, v in sb.metadata.items() if not k.startswith(RESERVED)}

    def brief(self, sb: executor_pb2.Sandbox) -> dict[str, object]:
        """What create and connect answer (E2B's ``Sandbox``)."""
        return {
            "templateID": sb.metadata.get(TEMPLATE_KEY, "base"),
            "sandboxID": sb.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self._tokens.token(sb.id),
            "trafficAccessToken": self._tokens.token(sb.id),
            "domain": None,
        }

    def detail(self, sb: executor_pb2.Sandbox) -> dict[str, object]:
        """What get and list answer (E2B's ``SandboxDetail`` / ``ListedSandbox``)."""
        resources = sb.spec.resources
        memory = resources.memory_mib or _PROFILE_MB.get(sb.spec.profile, 512)
        state = "paused" if sb.state == executor_pb2.SANDBOX_STATE_PAUSED else "running"
        return {
            **self.brief(sb),
            "startedAt": _iso(sb.created_at),
            "endAt": _iso(sb.expires_at),
            "cpuCount": resources.vcpus or 1,
            "memoryMB": memory,
            "diskSizeMB": resources.disk_mib or 1024,
            "state": state,
            "metadata": self._visible_metadata(sb),
        }

    # -- calls -------------------------------------------------------------------

    async def owned(self, key: Key, sandbox_id: str) -> executor_pb2.Sandbox:
        """The sandbox if it is ``key``'s tenant's; 404 otherwise (others' are not there)."""
        if not re.fullmatch(r"sb-[0-9a-f]{1,32}", sandbox_id):
            raise not_found(sandbox_id)
        try:
            resp = await call(
                "get sandbox",
                self._stub.GetSandbox(
                    executor_pb2.GetSandboxRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
                ),
            )
        except GatewayError as exc:
            if exc.status == 404 or exc.sandbox_gone:
                raise not_found(sandbox_id) from exc
            raise
        if resp.sandbox.metadata.get(TENANT_KEY) != key.tenant:
            raise not_found(sandbox_id)
        return resp.sandbox

    async def running(self, sandbox_id: str) -> bool:
        """Whether the sandbox exists and runs (any tenant's: ids are unguessable)."""
        try:
            resp = await self._stub.GetSandbox(
                executor_pb2.GetSandboxRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.sandbox.state == executor_pb2.SANDBOX_STATE_RUNNING)

    async def list(self, key: Key, metadata: dict[str, str]) -> list[executor_pb2.Sandbox]:
        resp = await call(
            "list sandboxes",
            self._stub.ListSandboxes(
                executor_pb2.ListSandboxesRequest(metadata={**metadata, TENANT_KEY: key.tenant}),
                timeout=CALL_TIMEOUT,
            ),
        )
        return sorted(resp.sandboxes, key=lambda sb: (sb.created_at.seconds, sb.id))

    async def create(self, key: Key, body: dict[str, object]) -> executor_pb2.Sandbox:
        template = body.get("templateID", "base")
        if not isinstance(template, str) or not _TEMPLATE.fullmatch(template):
            raise GatewayError(400, f"templateID {template!r}: give a template (image) name")
        metadata = _str_map("metadata", body.get("metadata"))
        for name in metadata:
            if name.startswith(RESERVED):
                raise GatewayError(
                    400, f"metadata key {name!r}: the prefix {RESERVED} is agent-vm's"
                )
        envs = _str_map("envVars", body.get("envVars"))
        timeout = _timeout(body.get("timeout"))
        held = len(await self.list(key, {})) + self._creating.get(key.tenant, 0)
        # No await between this check and the count going up: concurrent creates
        # of one tenant cannot all pass it.
        if held >= key.max_sandboxes:
            raise GatewayError(
                429,
                f"tenant {key.tenant!r} has {held} sandboxes, its limit: kill one "
                "(Sandbox.kill) or ask the operator for more "
                "(`agent-vm e2b key create NAME --max-sandboxes N`)",
            )
        self._creating[key.tenant] = self._creating.get(key.tenant, 0) + 1
        try:
            return await self._create(key, template, metadata, envs, timeout, body)
        finally:
            self._creating[key.tenant] -= 1
            if not self._creating[key.tenant]:
                del self._creating[key.tenant]

    async def _create(
        self,
        key: Key,
        template: str,
        metadata: dict[str, str],
        envs: dict[str, str],
        timeout: int,
        body: dict[str, object],
    ) -> executor_pb2.Sandbox:
        spec = executor_pb2.SandboxSpec(
            lifetime=_duration(timeout),
            image=TEMPLATES.get(template, template),
            # The API workspace: E2B sandboxes can always be paused (a shared one cannot).
            workspace_mode=common_pb2.WORKSPACE_MODE_API,
        )
        req = executor_pb2.CreateSandboxRequest(
            spec=spec,
            metadata={**metadata, TENANT_KEY: key.tenant, TEMPLATE_KEY: template},
            env={name: executor_pb2.EnvValue(value=value) for name, value in envs.items()},
        )
        if body.get("autoPause") is True:
            # E2B pauses such a sandbox at its timeout instead of killing it; here
            # it pauses once idle that long (agent-vm's auto-pause) and otherwise
            # lives to the 24 h limit (a paused sandbox does not expire).
            req.auto_pause.CopyFrom(_duration(max(timeout, 10)))
            req.spec.lifetime.CopyFrom(_duration(MAX_TIMEOUT_S))
        try:
            resp = await call(
                f"create sandbox from template {template!r}",
                self._stub.CreateSandbox(req, timeout=CALL_TIMEOUT * 5),
            )
        except GatewayError as exc:
            if exc.status == 404:
                raise GatewayError(
                    404,
                    f"template {template!r} not found: templates are agent-vm images "
                    "(`agent-vm image list`; build one with `agent-vm image build`)",
                ) from exc
            raise
        return resp.sandbox

    async def kill(self, key: Key, sandbox_id: str) -> None:
        await self.owned(key, sandbox_id)
        await call(
            "close sandbox",
            self._stub.CloseSandbox(
                executor_pb2.CloseSandboxRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT
            ),
        )

    async def set_timeout(self, key: Key, sandbox_id: str, body: dict[str, object]) -> None:
        await self.owned(key, sandbox_id)
        seconds = _timeout(body.get("timeout"), default=-1)
        await call(
            "set timeout",
            self._stub.SetSandboxTimeout(
                executor_pb2.SetSandboxTimeoutRequest(
                    sandbox_id=sandbox_id, timeout=_duration(seconds)
                ),
                timeout=CALL_TIMEOUT,
            ),
        )

    async def pause(self, key: Key, sandbox_id: str) -> None:
        sb = await self.owned(key, sandbox_id)
        if sb.state == executor_pb2.SANDBOX_STATE_PAUSED:
            raise GatewayError(409, f"sandbox {sandbox_id!r} is already paused")
        await call(
            "pause sandbox",
            self._stub.PauseSandbox(
                executor_pb2.PauseSandboxRequest(sandbox_id=sandbox_id), timeout=CALL_TIMEOUT * 5
            ),
        )

    async def connect(
        self, key: Key, sandbox_id: str, body: dict[str, object]
    ) -> tuple[executor_pb2.Sandbox, bool]:
        """The sandbox, resumed if it was paused (and whether it was)."""
        sb = await self.owned(key, sandbox_id)
        resumed = False
        if sb.state == executor_pb2.SANDBOX_STATE_PAUSED:
            resp = await call(
                "resume sandbox",
                self._stub.ResumeSandbox(
                    executor_pb2.ResumeSandboxRequest(sandbox_id=sandbox_id),
                    timeout=CALL_TIMEOUT * 5,
                ),
            )
            sb, resumed = resp.sandbox, True
        if body.get("timeout") is not None:
            await self.set_timeout(key, sandbox_id, body)
            sb = await self.owned(key, sandbox_id)
        return sb, resumed


def metadata_filter(query: str) -> dict[str, str]:
    """``metadata=k1%3Dv1%26k2%3Dv2`` (as the SDK encodes it) as a dict."""
    if not query:
        return {}
    out = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key.startswith(RESERVED):
            raise GatewayError(400, f"metadata key {key!r}: the prefix {RESERVED} is agent-vm's")
        out[key] = value
    return out
