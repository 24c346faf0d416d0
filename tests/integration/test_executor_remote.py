"""An executor whose vm-manager is on another host reaches the VMs through it (issue 19).

The executor knows vm-manager by a TCP address here: a plain byte pipe from
127.0.0.1 to the session vm-manager's socket, as a network between two hosts
would be (mutual TLS runs end to end through it). Such an executor cannot
dial the VMs' relay sockets, which are on vm-manager's host: it reaches each
agent through vm-manager's GuestAgentService proxy, and vm-manager's own
metrics show the calls arriving there. Shared (virtiofs) workspaces are
directories on the VM's host, so it offers the API workspace only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import socketserver
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent_vm
from tests.vmharness import ExecutorProcess, VMManagerProcess

pytestmark = pytest.mark.vm


class _Pipe(socketserver.BaseRequestHandler):
    """One TCP connection, carried byte for byte to the Unix socket in ``server.target``."""

    def handle(self) -> None:
        far = socket.socket(socket.AF_UNIX)
        far.connect(str(self.server.target))  # type: ignore[attr-defined]
        self.server.connections += 1  # type: ignore[attr-defined]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(far, self.request), daemon=True)
        back.start()
        pump(self.request, far)
        back.join()
        far.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def remote_executor(vmm: VMManagerProcess) -> Iterator[ExecutorProcess]:
    target = Path(vmm.address.removeprefix("unix:"))
    server = _Server(("127.0.0.1", 0), _Pipe)
    server.target = target  # type: ignore[attr-defined]
    server.connections = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    proc = ExecutorProcess(
        base=vmm.base,
        prefix=vmm.prefix,
        name="executor-remote",
        extra_env={"AGENTVM_VM_MANAGER_ADDR": f"127.0.0.1:{port}"},
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()
        server.shutdown()
        server.server_close()


def _proxied(vmm: VMManagerProcess, method: str) -> float:
    """How many GuestAgentService calls of ``method`` vm-manager forwarded (its /metrics)."""
    text = urllib.request.urlopen(vmm.metrics_url, timeout=10).read().decode()  # noqa: S310
    pattern = (
        r'^agentvm_grpc_server_handled_total\{code="OK",'
        rf'method="agentvm\.v1\.GuestAgentService/{method}"\}} (\S+)$'
    )
    return sum(float(m) for m in re.findall(pattern, text, re.M))


def test_a_remote_executor_runs_sandboxes_through_the_node(
    vmm: VMManagerProcess, remote_executor: ExecutorProcess
) -> None:
    before = _proxied(vmm, "Execute")
    sb = agent_vm.Sandbox.create(network="isolated", address=remote_executor.address)
    try:
        assert sb.workspace_mode == "api", "no shared workspace across hosts"
        res = sb.run("uname -r; cat /proc/sys/kernel/random/boot_id; exit 3", timeout=60)
        assert res.exit_code == 3, res.stderr
        kernel, boot_id = res.stdout.split()
        assert kernel != os.uname().release, "it ran under the guest's kernel"
        assert len(boot_id) == 36
        data = os.urandom(2 * 2**20 + 5)
        sb.files.write("work/through-the-node.bin", data)
        assert sb.files.read("work/through-the-node.bin") == data
        sha = sb.run("sha256sum /workspace/work/through-the-node.bin", timeout=60).stdout
        assert sha.split()[0] == hashlib.sha256(data).hexdigest()
        # Every call reached the guest by way of vm-manager.
        assert _proxied(vmm, "Execute") >= before + 2
        assert _proxied(vmm, "WriteFile") >= 1
        assert _proxied(vmm, "ReadFile") >= 1
    finally:
        sb.close()
    refusal = "another host.: ask for workspace mode API"
    with pytest.raises(agent_vm.FailedPreconditionError, match=refusal):
        agent_vm.Sandbox.create(
            network="isolated", workspace="shared", address=remote_executor.address
        )
