"""The per-VM egress log of NAT_FILTERED VMs: a bounded ring per VM and live subscribers."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from agentvm.vm_manager.dnsproxy import EgressRecord

RING_SIZE = 2000
SUBSCRIBER_QUEUE = 4096


class EgressLog:
    """A bounded ring of records per VM, and live subscribers (one VM or all)."""

    def __init__(self) -> None:
        self._rings: dict[str, collections.deque[EgressRecord]] = {}
        self._subs: list[tuple[str, asyncio.Queue[EgressRecord | None]]] = []
        self.dropped = 0

    def add(self, rec: EgressRecord) -> None:
        if not rec.vm:
            return
        self._rings.setdefault(rec.vm, collections.deque(maxlen=RING_SIZE)).append(rec)
        for name, queue in self._subs:
            if name in ("", rec.vm):
                try:
                    queue.put_nowait(rec)
                except asyncio.QueueFull:
                    self.dropped += 1

    def records(self, vm: str) -> list[EgressRecord]:
        if vm:
            return list(self._rings.get(vm, ()))
        return sorted((r for ring in self._rings.values() for r in ring), key=lambda r: r.time)

    def forget(self, vm: str) -> None:
        self._rings.pop(vm, None)
        for name, queue in self._subs:
            if name == vm:
                # The end marker must arrive even when the subscriber lags.
                while queue.full():
                    queue.get_nowait()
                    self.dropped += 1
                queue.put_nowait(None)

    async def follow(self, vm: str) -> AsyncIterator[EgressRecord]:
        """Records kept so far, then new ones until the VM is forgotten."""
        queue: asyncio.Queue[EgressRecord | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        entry = (vm, queue)
        self._subs.append(entry)
        try:
            for rec in self.records(vm):
                yield rec
            while (rec2 := await queue.get()) is not None:
                yield rec2
        finally:
            self._subs.remove(entry)
