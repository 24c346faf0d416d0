"""Ports: one TCP connection to a service on the guest's 127.0.0.1 per OpenPort call
(docs/SANDBOXES.md, section 5).

The host never reaches the guest's network: the agent connects locally and
carries the bytes over its own channel, so a forward works in ISOLATED mode.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import grpc

from agentvm.v1 import guest_agent_pb2

MAX_CONNECTIONS = 32
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 5.0

Request = guest_agent_pb2.GuestAgentServiceOpenPortRequest
Response = guest_agent_pb2.GuestAgentServiceOpenPortResponse


class PortError(Exception):
    """A refused OpenPort, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Ports:
    """The agent's forwarded connections (at most MAX_CONNECTIONS at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self._open >= MAX_CONNECTIONS:
                raise PortError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_CONNECTIONS} forwarded connections are open in this VM; close one first",
                )
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1

    def open(
        self, requests: Iterator[Request], context: grpc.ServicerContext
    ) -> Iterator[Response]:
        """Connect to the first request's port; then carry bytes both ways."""
        first = next(requests, None)
        if first is None:
            raise PortError(grpc.StatusCode.INVALID_ARGUMENT, "OpenPort needs a first message")
        port = first.port
        if not 1 <= port <= 65535:
            raise PortError(grpc.StatusCode.INVALID_ARGUMENT, f"port must be 1-65535, got {port}")
        with self._slot():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                raise PortError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"nothing accepts connections on port {port} in the guest "
                    f"({exc.strerror or exc}); start the service first, listening on "
                    "127.0.0.1 or 0.0.0.0",
                ) from exc
            sock.settimeout(None)
            context.add_callback(lambda: _shutdown(sock, socket.SHUT_RDWR))
            try:
                yield from self._carry(sock, first, requests)
            finally:
                sock.close()

    def _carry(
        self, sock: socket.socket, first: Request, requests: Iterator[Request]
    ) -> Iterator[Response]:
        writer = threading.Thread(
            target=_to_service, args=(sock, first, requests), name="port-in", daemon=True
        )
        writer.start()
        yield Response(connected=True)
        while True:
            try:
                data = sock.recv(CHUNK)
            except OSError:
                data = b""
            if not data:
                yield Response(eof=True)
                break
            yield Response(data=data)
        # The service closed its side; the host may still be sending (half-close).
        writer.join()


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _to_service(sock: socket.socket, first: Request, requests: Iterator[Request]) -> None:
    """The host's bytes to the service, until the host's eof or the call's end."""
    try:
        req: Request | None = first
        while req is not None:
            if req.data:
                sock.sendall(req.data)
            if req.eof:
                break
            req = next(requests, None)
    except (OSError, grpc.RpcError, ValueError):
        pass
    finally:
        _shutdown(sock, socket.SHUT_WR)
