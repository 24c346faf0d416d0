"""LeaseJournal: which pool VMs are handed out, surviving a pool-manager restart.

An append-only JSON-lines file, one record per lease and per release. The
write reaches the kernel before AcquireVM answers, so a killed pool-manager
loses nothing (a host crash takes the VMs with it anyway). At start the
journal is replayed, compacted to the leases still open, and rewritten
atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("agentvm.pool_manager.journal")


class LeaseJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> dict[str, dict[str, Any]]:
        """Replay, compact and open for appending; returns the open leases by id."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        open_leases: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                op, lease_id = rec["op"], str(rec["lease_id"])
            except (ValueError, KeyError, TypeError):
                # A torn last line after a crash; anything else is corruption.
                log.warning("lease journal %s line %d unreadable; skipped", self.path, n)
                continue
            if op == "lease":
                open_leases[lease_id] = rec
            elif op == "release":
                open_leases.pop(lease_id, None)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            for rec in open_leases.values():
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return open_leases

    def _append(self, rec: dict[str, Any]) -> None:
        if self._fd is None:
            raise RuntimeError("journal not open")
        os.write(self._fd, (json.dumps(rec, sort_keys=True) + "\n").encode())

    def lease(
        self, lease_id: str, vm_name: str, key: str, labels: dict[str, str], at: float
    ) -> None:
        self._append(
            {
                "op": "lease",
                "lease_id": lease_id,
                "vm": vm_name,
                "key": key,
                "labels": labels,
                "at": at,
            }
        )

    def release(self, lease_id: str) -> None:
        self._append({"op": "release", "lease_id": lease_id})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
