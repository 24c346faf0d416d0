"""The probes of deploy/kubernetes, run against real gRPC health servers over mutual TLS."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvm.cli.services import NAMES, service_specs
from agentvm.common import tls
from tests.deploy.manifests import (
    ROOT,
    Obj,
    container,
    env_of,
    render,
    settings_under,
    workloads,
)


# -- probes ----------------------------------------------------------------------------------
def probe_commands(workload: Obj) -> dict[str, list[str]]:
    c = container(workload)
    return {
        kind: c[kind]["exec"]["command"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if "exec" in c.get(kind, {})
    }


def test_exec_probes_check_their_own_service(objects: tuple[Obj, ...]) -> None:
    for name, workload in workloads(objects).items():
        commands = probe_commands(workload)
        assert "startupProbe" in commands, name
        for command in commands.values():
            assert command[:2] == ["python", "-c"]
            assert command[3:] == [name]
            assert command == commands["startupProbe"]
        c = container(workload)
        for kind in ("readinessProbe", "livenessProbe"):
            assert kind in c, f"{name}: no {kind}"


def test_the_gateway_http_probes_hit_its_health_route(objects: tuple[Obj, ...]) -> None:
    c = container(workloads(objects)["e2b-gateway"])
    app = (ROOT / "services" / "agentvm" / "e2b_gateway" / "app.py").read_text()
    assert 'Route("/health", self._health' in app
    for kind in ("readinessProbe", "livenessProbe"):
        get = c[kind]["httpGet"]
        assert get == {"path": "/health", "port": "https", "scheme": "HTTPS"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    tls.ensure(directory)
    return directory


StartServer = Callable[[str], tuple[str, health.HealthServicer]]


@pytest.fixture
def health_server(tls_dir: Path) -> Iterator[StartServer]:
    """Starts gRPC servers that serve only health, over mutual TLS with the certificate of
    the service named (the probe verifies the name of the service it checks)."""
    servers = []

    def start(who: str) -> tuple[str, health.HealthServicer]:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        address = f"127.0.0.1:{free_port()}"
        server.add_secure_port(address, tls.server_credentials(tls.files_in(tls_dir, who)))
        server.start()
        servers.append(server)
        return address, servicer

    yield start
    for server in servers:
        server.stop(None)


def run_probe(
    name: str, address: str, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> subprocess.CompletedProcess[str]:
    """The base's probe command for ``name`` in its container's environment, with the
    certificate files and its listen address moved here."""
    workload = workloads(render("base"))[name]
    env = env_of(container(workload))
    (spec,) = [s for s in service_specs(settings_under(env, monkeypatch)) if s.name == name]
    (listen_var,) = [v for v, value in env.items() if value == spec.address]
    files = tls.files_in(tls_dir, name)
    env |= {
        listen_var: address,
        "AGENTVM_TLS_CA": str(files.ca),
        "AGENTVM_TLS_CERT": str(files.cert),
        "AGENTVM_TLS_KEY": str(files.key),
        "PATH": os.environ.get("PATH", ""),
    }
    command = probe_commands(workload)["startupProbe"]
    assert command[0] == "python"
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tls_dir,
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_probe_passes_against_a_serving_service(
    name: str, health_server: StartServer, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = health_server(name)
    done = run_probe(name, address, tls_dir, monkeypatch)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_the_probe_fails_when_not_serving_unreachable_or_another_service(
    health_server: StartServer, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, servicer = health_server("executor")
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = run_probe("executor", address, tls_dir, monkeypatch)
    assert (done.returncode, done.stdout.strip()) == (1, "NOT_SERVING"), done.stderr
    done = run_probe("executor", f"127.0.0.1:{free_port()}", tls_dir, monkeypatch)
    assert (done.returncode, done.stdout.strip()) == (1, "UNREACHABLE"), done.stderr
    # A server with another service's certificate is not the executor.
    other, _ = health_server("pool-manager")
    done = run_probe("executor", other, tls_dir, monkeypatch)
    assert (done.returncode, done.stdout.strip()) == (1, "UNREACHABLE"), done.stderr
