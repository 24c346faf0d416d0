"""Kubernetes discovery (agentvm.common.nodes_kubernetes) against a mock API server over HTTPS.

The official client's in-cluster loader reads a service-account directory made
here (token, CA of the mock's certificate, namespace) and the API server's
address from the environment, as in a pod; the mock serves list and watch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agentvm.common import nodes
from agentvm.common.config import Settings
from agentvm.common.errors import InvalidArgument, Unavailable
from agentvm.common.nodes import NodeAddress
from agentvm.common.nodes_kubernetes import Kubernetes, Target
from agentvm.common.tls import http_server_files
from tests.unit.k8s_mock import MockAPIServer, endpoint_slice

NS, TOKEN = "agent-vm", "sa-token-1"


def ep(ip: str, node: str = "", ready: bool | None = True, **more: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": [ip], **more}
    if ready is not None:
        e["conditions"] = {"ready": ready}
    if node:
        e["nodeName"] = node
    return e


@dataclasses.dataclass
class Cluster:
    api: MockAPIServer
    sa_dir: Path
    env: dict[str, str]

    def discovery(self, target: str = "vm-manager", **kw: Any) -> Kubernetes:
        d = Kubernetes(Target.parse(target, self.sa_dir), sa_dir=self.sa_dir, environ=self.env)
        for k, v in kw.items():
            setattr(d, k, v)
        return d


async def _cluster(tmp: Path) -> AsyncIterator[Cluster]:
    files = http_server_files(tmp / "tls", "kube-apiserver", ["127.0.0.1"])
    sa = tmp / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(files.ca.read_bytes())
    (sa / "namespace").write_text(NS + "\n")
    api = MockAPIServer(NS, TOKEN)
    port = await api.start(str(files.cert), str(files.key))
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    try:
        yield Cluster(api, sa, env)
    finally:
        await api.stop()


def run(tmp: Path, body: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        async for c in _cluster(tmp):
            await body(c)

    asyncio.run(asyncio.wait_for(main(), 60))


async def until(d: Kubernetes, want: list[NodeAddress], what: str) -> None:
    got: list[NodeAddress] = []
    for _ in range(200):
        got = await d.current()
        if got == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: {got} != {want}")


def test_nodes_are_the_ready_endpoints_and_follow_the_watch(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.api.put(
            endpoint_slice(
                "vm-manager-abc",
                "vm-manager",
                [
                    ep("10.0.0.1", "kvm-1.example.internal"),
                    ep("10.0.0.2", "KVM-2.Example", ready=None),  # unset: ready, as the API defines
                    ep("10.0.0.3", "kvm-3", ready=False, conditions={"terminating": True}),
                ],
            )
        )
        await c.api.put(endpoint_slice("other-xyz", "other", [ep("10.9.9.9", "kvm-9")]))
        d = c.discovery()
        try:
            assert await d.current() == [
                NodeAddress("10.0.0.1:7001", "kvm-1"),
                NodeAddress("10.0.0.2:7001", "kvm-2"),
            ]
            # A node joins (a new slice) and one becomes ready: the watch brings both.
            await c.api.put(endpoint_slice("vm-manager-def", "vm-manager", [ep("10.0.1.1")]))
            await c.api.put(
                endpoint_slice(
                    "vm-manager-abc",
                    "vm-manager",
                    [ep("10.0.0.1", "kvm-1"), ep("10.0.0.3", "kvm-3")],
                )
            )
            await until(
                d,
                [
                    NodeAddress("10.0.0.1:7001", "kvm-1"),
                    NodeAddress("10.0.0.3:7001", "kvm-3"),
                    NodeAddress("10.0.1.1:7001"),
                ],
                "after the watch",
            )
            await c.api.delete("vm-manager-abc")
            await until(d, [NodeAddress("10.0.1.1:7001")], "after a delete")
            assert c.api.lists == 1, "one list, the rest came by the watch"
        finally:
            await d.close()
        # As a pod would ask: its token, the Service's label, bookmarks, a bounded watch.
        watch = [r for r in c.api.requests if r.get("watch") == "true"]
        assert watch, c.api.requests
        assert {r["authorization"].lower() for r in c.api.requests} == {f"bearer {TOKEN}"}
        assert {r["labelSelector"] for r in c.api.requests} == {
            "kubernetes.io/service-name=vm-manager"
        }
        assert watch[0]["allowWatchBookmarks"] == "true"
        assert 0 < int(watch[0]["timeoutSeconds"]) <= 300
        assert watch[0]["resourceVersion"] == "102"

    run(tmp_path, body)


def test_an_expired_or_cut_watch_lists_again_and_misses_nothing(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.api.put(endpoint_slice("vm-manager-a", "vm-manager", [ep("10.0.0.1", "n1")]))
        d = c.discovery()
        try:
            assert await d.current() == [NodeAddress("10.0.0.1:7001", "n1")]
            # A change the watch never saw (compacted away), then 410 Gone on the watch.
            await c.api.put(
                endpoint_slice("vm-manager-a", "vm-manager", [ep("10.0.0.2", "n2")]),
                announce=False,
            )
            await c.api.expire()
            await until(d, [NodeAddress("10.0.0.2:7001", "n2")], "after 410 Gone")
            assert c.api.lists == 2
            # The connection drops mid-watch: the nodes seen stay, then a new list.
            await c.api.put(
                endpoint_slice("vm-manager-a", "vm-manager", [ep("10.0.0.3", "n3")]),
                announce=False,
            )
            await c.api.cut()
            await until(d, [NodeAddress("10.0.0.3:7001", "n3")], "after a cut")
            assert c.api.lists >= 3
        finally:
            await d.close()

    run(tmp_path, body)


def test_an_api_server_gone_away_keeps_the_last_nodes(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.api.put(endpoint_slice("vm-manager-a", "vm-manager", [ep("10.0.0.1", "n1")]))
        d = c.discovery()
        try:
            assert await d.current() == [NodeAddress("10.0.0.1:7001", "n1")]
            c.api.refuse = (503, "the API server is restarting")
            await c.api.cut()
            for _ in range(100):
                if d.error:
                    break
                await asyncio.sleep(0.05)
            assert "503" in d.error
            assert await d.current() == [NodeAddress("10.0.0.1:7001", "n1")]
            c.api.refuse = None
            await c.api.put(endpoint_slice("vm-manager-a", "vm-manager", [ep("10.0.0.4", "n4")]))
            await until(d, [NodeAddress("10.0.0.4:7001", "n4")], "after the API server returns")
        finally:
            await d.close()

    run(tmp_path, body)


def test_a_refused_first_list_says_what_to_check(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        c.api.refuse = (403, "endpointslices is forbidden")
        d = c.discovery(first_list_s=1.0)
        try:
            with pytest.raises(Unavailable) as err:
                await d.current()
        finally:
            await d.close()
        message = str(err.value)
        assert "agent-vm/vm-manager" in message
        assert "403" in message
        assert "list/watch on endpointslices" in message

    run(tmp_path, body)


def test_malformed_endpoints_are_skipped_never_dialled(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        good = ep("10.0.0.1", "n1")
        await c.api.put(
            endpoint_slice(
                "vm-manager-a",
                "vm-manager",
                [
                    good,
                    ep("10.0.0.300", "n2"),
                    ep("fd00::1", "n3"),  # IPv6 in an IPv4 slice
                    ep("10.0.0.4", "../../etc"),  # a node name that is not one
                    {"addresses": []},
                ],
            )
        )
        await c.api.put(
            endpoint_slice("vm-manager-f", "vm-manager", [ep("evil.example")], address_type="FQDN")
        )
        await c.api.put(
            endpoint_slice("vm-manager-p", "vm-manager", [ep("10.0.0.5")], ports=[{"name": "http"}])
        )
        await c.api.put(
            endpoint_slice("vm-manager-6", "vm-manager", [ep("fd00::6", "n6")], address_type="IPv6")
        )
        d = c.discovery()
        by_number = c.discovery("agent-vm/vm-manager:9000")
        try:
            assert await d.current() == [
                NodeAddress("10.0.0.1:7001", "n1"),
                NodeAddress("10.0.0.4:7001"),
                NodeAddress("[fd00::6]:7001", "n6"),
            ]
            # A port by number is that port on every ready address of any slice.
            assert [a.address for a in await by_number.current()] == [
                "10.0.0.1:9000",
                "10.0.0.4:9000",
                "10.0.0.5:9000",
                "[fd00::6]:9000",
            ]
        finally:
            await d.close()
            await by_number.close()

    run(tmp_path, body)


def test_settings_name_the_variable_and_the_fix(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    assert Target.parse("ns1/svc:grpc", sa) == Target("ns1", "svc", "grpc")
    assert Target.parse("ns1/svc:7001", sa) == Target("ns1", "svc", "7001")
    with pytest.raises(InvalidArgument, match="no namespace given"):
        Target.parse("svc", sa)
    (sa / "namespace").write_text("mine\n")
    assert Target.parse("svc", sa) == Target("mine", "svc", "grpc")
    for bad in ("NS/svc", "ns/svc:0", "ns/svc:99999", "ns/svc_x", "ns/svc:Grpc!", "a/b/c"):
        with pytest.raises(InvalidArgument, match="AGENTVM_NODES_KUBERNETES"):
            Target.parse(bad, sa)
    # Not in a pod: the in-cluster loader's complaint, and what to use instead.
    d = Kubernetes(Target("ns", "svc"), sa_dir=sa, environ={})
    with pytest.raises(InvalidArgument, match=r"not in a Kubernetes pod.*AGENTVM_NODES_DNS"):
        asyncio.run(d.current())
    s = dataclasses.replace(Settings(), nodes="a:1", nodes_kubernetes="ns/svc")
    with pytest.raises(InvalidArgument, match="set together"):
        nodes.from_settings(s)
    s = dataclasses.replace(Settings(), nodes_kubernetes="ns/vm-manager:grpc")
    got = nodes.from_settings(s)
    assert isinstance(got, Kubernetes)
    assert got.target == Target("ns", "vm-manager", "grpc")
