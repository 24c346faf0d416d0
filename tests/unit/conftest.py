"""Shared fixtures of the unit tests (no VMs, no system libvirtd, no network)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from agentvm.common import grpc_util
from agentvm_guest import paths, proctree

from .helpers import EchoServer, GuestSide

# Deterministic and quick, with no example database; Hypothesis' other caches go to the
# temp dir instead of .hypothesis/ in the work tree.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "agentvm-unit-hypothesis")
settings.register_profile(
    "unit",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("unit")

NO_CGROUP_ROOT = "/proc/nonexistent/agentvm"


@pytest.fixture(autouse=True)
def no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never create cgroups on the host: ProcessTree falls back to process groups."""
    monkeypatch.setattr(proctree, "CGROUP_ROOT", NO_CGROUP_ROOT)


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[EchoServer]:
    server = EchoServer(tmp_path / "echo.sock")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def guest(echo_server: EchoServer) -> Iterator[GuestSide]:
    """A GuestRelay serving one end of a socketpair, connecting to the echo server."""
    side = GuestSide(echo_server.connect)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture(autouse=True)
def plaintext_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process servers of the unit tests serve plaintext: callers built from the
    environment (Settings, the Python client) never look for the installation's
    certificates. tls.py and test_tls.py cover mutual TLS."""
    monkeypatch.setenv("AGENTVM_TLS", "off")
    grpc_util.use_plaintext()


@pytest.fixture(autouse=True)
def private_record_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Executors of the unit tests seal their sandbox records with a key of their
    own, never one under the host's state directory."""
    monkeypatch.setenv("AGENTVM_EXECUTOR_RECORD_KEY", str(tmp_path / "record.key"))


@pytest.fixture(autouse=True)
def private_image_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vm-managers of the unit tests keep named images in a store of their own.

    ``Settings(cache_dir=...)`` does not move the image store (its default comes
    from the environment), so a unit test once added its fake images to the
    host's /var/cache/agent-vm/named-images, and failed when that store held a
    real image.
    """
    monkeypatch.setenv("AGENTVM_IMAGES_DIR", str(tmp_path / "named-images"))


@pytest.fixture
def deep_tmp() -> Iterator[Path]:
    """A directory outside pytest's temporary tree, removed at the end with the
    iterative remover, also when the test fails: pytest's own cleanup
    (shutil.rmtree) dies of RecursionError on the deep trees these tests build,
    and a tree left in its temporary tree would break every later run."""
    path = Path(tempfile.mkdtemp(prefix="agentvm-deep-"))
    try:
        yield path
    finally:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            paths.remove_tree(fd, path.name)
        finally:
            os.close(fd)
