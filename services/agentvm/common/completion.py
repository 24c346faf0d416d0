"""Steps that must finish once started, whoever stops waiting for them.

A gRPC handler is cancelled when its caller goes away (a client killed, a
deadline, a server stopping). A libvirt call in a thread cannot be cancelled:
it goes on, and a handler that stops waiting for it would leave the books
(a VM's state, its relay, its files) telling something else than what
happened. Such a step runs here to its end, and only then does the caller
see its cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["to_completion"]

T = TypeVar("T")


async def to_completion(step: Awaitable[T]) -> T:
    """Await ``step`` to its end, however often the caller is cancelled meanwhile;
    then raise CancelledError if it was, else return ``step``'s result (or raise its
    error)."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():  # the step itself was cancelled, or ended meanwhile
                if task.cancelled():
                    raise
                result = task.result()
                cancelled = True
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
