"""Host side of the virtio-serial session handshake (see agentvm_guest/mux.py).

PAD, then SYNC with a random nonce, repeated every ``SYNC_RETRY_S`` until
the exact SYNC_ACK comes back; every byte before it is discarded (stale
frames of an earlier session, a restarted agent's RESET, or a hostile
guest's noise).
"""

from __future__ import annotations

import asyncio
import secrets

from agentvm_guest import mux

SYNC_RETRY_S = 0.5


class SessionError(Exception):
    """No session with the guest could be established (or it ended)."""


async def handshake(
    channel_path: str, deadline: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open the port's socket and handshake; the reader, the writer and the bytes
    read after the SYNC_ACK. TimeoutError at ``deadline`` (loop time).

    The deadline is checked here as well as by the caller's timeout: a guest
    that floods the port keeps every read ready, and a cancellation racing a
    completed read can be lost.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(channel_path)
    except OSError as exc:
        raise SessionError(f"cannot open its agent channel: {exc}") from exc
    nonce = secrets.token_bytes(mux.NONCE_SIZE)
    scanner = mux.PatternScanner(mux.sync_ack(nonce))
    loop = asyncio.get_running_loop()
    try:
        writer.write(mux.PAD)
        while True:
            writer.write(mux.encode(mux.FrameType.SYNC, 0, nonce))
            await writer.drain()
            retry_at = min(deadline, loop.time() + SYNC_RETRY_S)
            while (remaining := retry_at - loop.time()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        data = await reader.read(mux.MAX_PAYLOAD)
                except TimeoutError:
                    break
                if not data:
                    raise SessionError("its agent channel closed during the handshake")
                rest = scanner.feed(data)
                if rest is not None:
                    return reader, writer, rest
            if loop.time() >= deadline:
                raise TimeoutError
    except BaseException:
        writer.transport.abort()  # unsent PAD/SYNC bytes must not hold the close
        raise
