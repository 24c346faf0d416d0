"""The soak's network operation: its guest probe and its verdicts (issue 20).

The probe is the script the operation runs in the guest; here it runs on the
host against listeners on loopback (nothing else is ever a target), and the
operation is driven with a sandbox double whose ``run`` runs it so.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import agent_vm
from agentvm.cli import soak_ops


@pytest.fixture
def answering() -> Iterator[str]:
    """127.0.0.1:PORT of a listener that answers whatever it is sent."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(256)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhi")

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


@pytest.fixture
def closed() -> str:
    """127.0.0.1:PORT where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def probe(*specs: str) -> str:
    """The probe's output for ``specs``, the first tried once."""
    out = subprocess.run(
        [sys.executable, "-c", soak_ops.NET_PROBE, "1", *specs],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout


def test_the_probe_reports_each_target_open_or_blocked(answering: str, closed: str) -> None:
    assert (
        probe(answering, closed) == f"{answering} open\n{closed} blocked:ConnectionRefusedError\n"
    )
    assert probe(closed, answering).splitlines()[1] == f"{answering} open"


class _Sandbox:
    """Enough of AsyncSandbox for the operation, with a filter of its own: a target
    answers when it is one of ``up`` and the policy in effect allows its name and
    port (``leaky``: whatever the policy)."""

    id = "sb-double"

    def __init__(self, policy: agent_vm.NetworkPolicy | None, up: set[str], leaky: bool) -> None:
        self.policies = [policy]
        self.up, self.leaky = up, leaky
        self.probes: list[list[str]] = []
        self.closed = False

    def _allows(self, target: str) -> bool:
        host, _, port = target.rpartition(":")
        policy = self.policies[-1]
        assert policy is not None
        return host in policy.allow_domains and int(port) in policy.ports

    async def run(self, argv: list[str], timeout: float) -> Any:
        assert argv[:4] == ["python3", "-c", soak_ops.NET_PROBE, str(soak_ops.NET_TRIES)]
        self.probes.append(argv[4:])
        out = "".join(
            f"{t} open\n"
            if t in self.up and (self.leaky or self._allows(t))
            else f"{t} blocked:gaierror\n"
            for t in argv[4:]
        )
        return agent_vm.CommandResult(0, out.encode(), b"", False, 0.1)

    async def set_network_policy(self, policy: agent_vm.NetworkPolicy) -> agent_vm.NetworkPolicy:
        self.policies.append(policy)
        return policy

    async def close(self) -> None:
        self.closed = True


class _Context(soak_ops.Context):
    def __init__(self, targets: tuple[str, ...], up: set[str], leaky: bool = False) -> None:
        super().__init__("run", net_targets=targets)
        self.up, self.leaky = up, leaky
        self.made: list[_Sandbox] = []

    async def sandbox(
        self, *args: Any, policy: agent_vm.NetworkPolicy | None = None, **kw: Any
    ) -> Any:
        self.made.append(_Sandbox(policy, self.up, self.leaky))
        return self.made[-1]


TARGETS = ("a.test:80", "b.test:8080", "c.test:80")


def _run(ctx: _Context, seed: int = 1) -> _Sandbox:
    asyncio.run(soak_ops.network(ctx, random.Random(seed)))
    return ctx.made[-1]


def test_the_policy_is_changed_while_the_sandbox_runs_and_each_is_checked() -> None:
    ctx = _Context(TARGETS, up=set(TARGETS))
    firsts = set()
    for seed in range(20):
        sb = _run(ctx, seed)
        first, then = sb.policies
        assert first != then
        for policy, probed in zip(sb.policies, sb.probes, strict=True):
            assert policy is not None
            target = f"{policy.allow_domains[0]}:{policy.ports[0]}"
            assert probed[0] == target  # the allowed one first (it is retried)
            assert sorted(probed) == sorted(TARGETS)  # and every other one
        assert sb.closed
        assert first is not None
        firsts.add(first.allow_domains[0])
    assert len(firsts) == 3  # drawn anew for each sandbox


def test_a_blocked_target_that_answers_is_a_wrong_result() -> None:
    ctx = _Context(TARGETS, up=set(TARGETS), leaky=True)
    with pytest.raises(soak_ops.WrongResult, match="answered a sandbox whose policy allows only"):
        _run(ctx)
    assert ctx.made[-1].closed


def test_an_allowed_target_that_does_not_answer_is_unreachable() -> None:
    ctx = _Context(TARGETS, up=set())
    with pytest.raises(
        soak_ops.Unreachable, match=r"\(allowed by the policy\) not reached: blocked:gaierror"
    ):
        _run(ctx)


def test_a_network_operation_needs_two_targets() -> None:
    with pytest.raises(soak_ops.WrongResult, match="two --network-targets"):
        _run(_Context(("a.test:80",), up=set()))
