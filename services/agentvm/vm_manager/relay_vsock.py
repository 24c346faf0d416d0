"""vsock transport of the host relay: one AF_VSOCK connection per client.

KVM hosts with /dev/vhost-vsock only (these development machines have none:
see docs/ARCHITECTURE.md). No multiplexing: each client connection of the
relay's socket is carried on a connection of its own to the guest's port,
with the same time bounds as the virtio-serial transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from agentvm_guest import mux


async def carry(
    cid: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    connect_timeout: float,
    write_timeout: float,
) -> None:
    """Pump bytes both ways between a client and the guest's vsock port until both end.

    A peer that takes longer than ``write_timeout`` to accept a write ends
    the connection. Does not close ``writer``'s transport beyond half-closing.
    """
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.sock_connect(sock, (cid, mux.VSOCK_PORT))
    except BaseException:
        sock.close()
        raise
    g_reader, g_writer = await asyncio.open_connection(sock=sock)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(mux.MAX_PAYLOAD):
                dst.write(data)
                async with asyncio.timeout(write_timeout):
                    await dst.drain()
        finally:
            dst.close()
            if dst.transport.get_write_buffer_size():
                loop.call_later(write_timeout, dst.transport.abort)

    try:
        await asyncio.gather(pump(reader, g_writer), pump(g_reader, writer), return_exceptions=True)
    finally:
        g_writer.transport.abort()
        with contextlib.suppress(OSError, ConnectionError):
            await g_writer.wait_closed()
