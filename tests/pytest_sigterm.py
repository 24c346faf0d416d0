"""pytest plugin: SIGTERM ends a test run like Ctrl-C, so fixtures are torn down.

Without it a run stopped with SIGTERM (`kill`, `timeout`, a CI runner giving
up) dies on the spot and leaves the session's services, VMs, networks and
namespaces behind. With it pytest stops at once but tears down every fixture
that was set up, as it does for KeyboardInterrupt.
"""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Once is enough: a second SIGTERM during teardown must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"stopped by signal {signum}: tearing down fixtures")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
