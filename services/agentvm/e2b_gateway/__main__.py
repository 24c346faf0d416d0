"""e2b-gateway process: `python -m agentvm.e2b_gateway` (started by `agent-vm up`).

Serves gRPC health and reflection on AGENTVM_E2B_GATEWAY_ADDR like every
agent-vm service, and E2B's HTTP API on AGENTVM_E2B_HTTP_ADDR (hypercorn:
HTTP/1.1 and, over TLS, HTTP/2). Plain HTTP only on a loopback address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import grpc
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from agentvm.common import logging as jsonlog
from agentvm.common import tls
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument
from agentvm.common.grpc_util import aio_channel, serve, setup_auth, setup_tls
from agentvm.common.telemetry import start_metrics
from agentvm.e2b_gateway.app import Gateway
from agentvm.e2b_gateway.backend import Backend
from agentvm.e2b_gateway.tenants import AccessTokens, KeyStore
from agentvm.v1 import executor_pb2_grpc

log = logging.getLogger("agentvm.e2b_gateway")


def http_config(settings: Settings) -> Config:
    """Hypercorn's settings: the address, and TLS unless it is loopback."""
    config = Config()
    config.bind = [settings.e2b_http_addr]
    config.accesslog = None
    config.graceful_timeout = 5
    host = settings.e2b_http_addr.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if settings.e2b_tls_cert or settings.e2b_tls_key:
        if not (settings.e2b_tls_cert and settings.e2b_tls_key):
            raise InvalidArgument(
                "AGENTVM_E2B_TLS_CERT and AGENTVM_E2B_TLS_KEY go together: set both or neither"
            )
        config.certfile, config.keyfile = settings.e2b_tls_cert, settings.e2b_tls_key
    elif settings.e2b_tls == "ca":
        names = [n.strip() for n in settings.e2b_hostnames.split(",") if n.strip()]
        if not names:
            raise InvalidArgument("AGENTVM_E2B_HOSTNAMES is empty: name the hosts clients dial")
        files = tls.http_server_files(settings.tls_dir, "e2b-http", names)
        config.certfile, config.keyfile = str(files.cert), str(files.key)
    elif not loopback:
        raise InvalidArgument(
            f"AGENTVM_E2B_HTTP_ADDR={settings.e2b_http_addr}: plain HTTP is served on "
            "loopback only; set AGENTVM_E2B_TLS=ca (a certificate from the installation's "
            "CA) or AGENTVM_E2B_TLS_CERT and AGENTVM_E2B_TLS_KEY (docs/E2B.md)"
        )
    if config.certfile:
        config.alpn_protocols = ["h2", "http/1.1"]
    return config


async def run(settings: Settings) -> None:
    token_auth = setup_auth(settings)
    credentials = setup_tls(settings, "e2b-gateway")
    # E2B calls made while the executor restarts wait for it (their HTTP
    # requests are answered late instead of with 502).
    channel = aio_channel(settings.executor_addr, "executor", wait_for_restart=True)
    backend = Backend(executor_pb2_grpc.ExecutorServiceStub(channel))
    e2b_dir = settings.state_dir / "e2b"
    gateway = Gateway(backend, KeyStore(e2b_dir / "keys.json"), AccessTokens(e2b_dir / "secret"))
    config = http_config(settings)
    # Its requests by API and status (e2b_gateway/metrics.py), as every service's /metrics.
    stop_metrics = start_metrics(settings.metrics_addr("e2b-gateway"), "e2b-gateway")
    stop = asyncio.Event()
    http_task: asyncio.Task[None] | None = None

    async def ready() -> None:
        nonlocal http_task
        http_task = asyncio.create_task(
            hypercorn_serve(gateway, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0)
        log.info(
            "E2B API on http%s://%s", "s" if config.ssl_enabled else "", settings.e2b_http_addr
        )

    async def on_stop() -> None:
        stop.set()
        if http_task is not None:
            await http_task
        await channel.close(grace=None)
        stop_metrics()

    def register(server: grpc.aio.Server) -> None:
        return None

    await serve(
        service_name="e2b-gateway",
        address=settings.e2b_gateway_addr,
        register=register,
        full_service_names=[],
        on_stop=on_stop,
        ready=ready,
        credentials=credentials,
        interceptors=[token_auth] if token_auth is not None else (),
    )


def main() -> None:
    settings = Settings()
    jsonlog.setup("e2b-gateway", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
