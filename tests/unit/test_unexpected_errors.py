"""An error that escaped a handler: INTERNAL, unless the service registered what it
means (grpc_util.translate_unexpected). vm-manager registers a libvirt connection
lost mid-call, which the 60-minute soak found raised raw from two reads during
libvirtd restarts: it is UNAVAILABLE "try again" wherever it is raised."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import libvirt
import pytest

from agentvm.common import grpc_util, wire
from agentvm.common.grpc_util import grpc_errors, grpc_stream_errors
from agentvm.vm_manager import libvirt_conn


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def done(self) -> bool:
        return self.status is not None

    async def abort(self, code: grpc.StatusCode, details: str, *_md: Any) -> None:
        self.status = (code, details)
        raise _Aborted


def _libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, 2, None, None, None, 0, 0)
    return exc


LOST = _libvirt_error(
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "End of file while reading data"
)
OTHER = _libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, "qemu said no")


class _Servicer:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    @grpc_errors
    async def Unary(self, request: Any, context: Any) -> Any:
        raise self.exc

    @grpc_stream_errors
    async def Streamed(self, request: Any, context: Any) -> Any:
        yield None
        raise self.exc


def _status(exc: Exception, streamed: bool) -> tuple[grpc.StatusCode, str]:
    async def main() -> tuple[grpc.StatusCode, str]:
        ctx = _Context()
        servicer = _Servicer(exc)

        async def call() -> None:
            if streamed:
                async for _ in servicer.Streamed(None, ctx):
                    pass
            else:
                await servicer.Unary(None, ctx)

        with pytest.raises(_Aborted):
            await call()
        assert ctx.status is not None
        return ctx.status

    return asyncio.run(main())


@pytest.mark.parametrize("streamed", [False, True])
def test_a_lost_libvirt_connection_that_escaped_a_handler_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    monkeypatch.setattr(grpc_util, "_FALLBACKS", [])
    # Its own rate-limited log: the shared one's burst for this caller is other tests'.
    monkeypatch.setattr(wire, "CALLER_LOG", wire.QuietLog(logging.getLogger("t.unexpected")))
    assert _status(LOST, streamed)[0] is grpc.StatusCode.INTERNAL  # nothing registered
    grpc_util.translate_unexpected(libvirt_conn.connection_lost)
    grpc_util.translate_unexpected(libvirt_conn.connection_lost)  # once is enough
    assert len(grpc_util._FALLBACKS) == 1
    code, details = _status(LOST, streamed)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "End of file while reading data" in details
    assert "try again" in details
    # Any other escaped error is still the bug it is.
    assert _status(OTHER, streamed)[0] is grpc.StatusCode.INTERNAL
    assert _status(ValueError("x"), streamed)[0] is grpc.StatusCode.INTERNAL
