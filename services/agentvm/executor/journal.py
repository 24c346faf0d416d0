"""The executor's sandbox journal: one record per open sandbox, so sandboxes survive an
executor that is killed or crashes (docs/SANDBOXES.md, section 4).

Each record is a JSON file ``STATE/executor/<executor>/sandboxes/<id>.json``
written atomically (temporary file, fsync, rename) whenever the sandbox
changes (created, timeout set, paused, resumed) and removed when it closes.
The directory is 0700 and the files 0600 (the default environment's secret
values are in them: only root on the executor's host reads them). A record
that does not parse is set aside as ``.bad`` and logged, never trusted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from agentvm.executor.sandbox_env import SandboxEnv
from agentvm.v1 import common_pb2, executor_pb2

log = logging.getLogger("agentvm.executor.journal")

VERSION = 1
SANDBOX_ID = re.compile(r"sb-[0-9a-f]{12}")


@dataclass
class Record:
    """What the executor needs to take a sandbox up again."""

    id: str
    vm_name: str
    spec: executor_pb2.SandboxSpec
    workspace_mode: int
    created_at: float
    expires_at: float
    boot_duration: float
    lease_id: str
    metadata: dict[str, str]
    env: SandboxEnv
    paused: bool
    paused_left: float
    auto_pause: float = 0.0
    # Kept with the VM (records.py): closed, its teardown under way; a one-shot
    # Run's sandbox (nobody can reconnect to it); when a call last used it
    # (wall clock), for replicas that did not serve that call.
    closing: bool = False
    oneshot: bool = False
    active_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "id": self.id,
            "vm_name": self.vm_name,
            "spec": base64.b64encode(self.spec.SerializeToString()).decode(),
            "workspace_mode": self.workspace_mode,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "boot_duration": self.boot_duration,
            "lease_id": self.lease_id,
            "metadata": self.metadata,
            "env": self.env.values,
            "secret": sorted(self.env.secret),
            "paused": self.paused,
            "paused_left": self.paused_left,
            "auto_pause": self.auto_pause,
            "closing": self.closing,
            "oneshot": self.oneshot,
            "active_at": self.active_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
        spec = executor_pb2.SandboxSpec()
        spec.ParseFromString(base64.b64decode(data["spec"], validate=True))
        mode = int(data["workspace_mode"])
        if mode not in common_pb2.WorkspaceMode.values():
            raise ValueError(f"workspace_mode {mode}")
        sid = str(data["id"])
        if not SANDBOX_ID.fullmatch(sid):
            raise ValueError(f"sandbox id {sid[:40]!r}")
        values = {str(k): str(v) for k, v in dict(data["env"]).items()}
        return cls(
            id=sid,
            vm_name=str(data["vm_name"]),
            spec=spec,
            workspace_mode=mode,
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            boot_duration=float(data["boot_duration"]),
            lease_id=str(data["lease_id"]),
            metadata={str(k): str(v) for k, v in dict(data["metadata"]).items()},
            env=SandboxEnv(values=values, secret=frozenset(map(str, data["secret"]))),
            paused=bool(data["paused"]),
            paused_left=float(data["paused_left"]),
            auto_pause=float(data.get("auto_pause", 0.0)),
            closing=bool(data.get("closing", False)),
            oneshot=bool(data.get("oneshot", False)),
            active_at=float(data.get("active_at", 0.0)),
        )


class Journal:
    """The records of one executor (by its address), in a directory of its own."""

    def __init__(self, state_dir: Path, executor_addr: str) -> None:
        key = hashlib.sha256(executor_addr.encode()).hexdigest()[:16]
        self.dir = state_dir / "executor" / key / "sandboxes"

    def _path(self, sandbox_id: str) -> Path:
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise ValueError(f"not a sandbox id: {sandbox_id!r}")
        return self.dir / f"{sandbox_id}.json"

    def save(self, record: Record) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(record.id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record.to_json()).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sandbox_id).unlink()

    def load(self) -> list[Record]:
        """Every record that parses; the others are renamed ``.bad`` and logged."""
        out: list[Record] = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = Record.from_json(json.loads(path.read_text()))
                if path.stem != record.id:
                    raise ValueError(f"file {path.name} holds sandbox {record.id}")
            except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
                log.warning("sandbox record %s is unreadable (%s); set aside", path, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            out.append(record)
        return out
