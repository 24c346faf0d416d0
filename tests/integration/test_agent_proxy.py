"""vm-manager forwards GuestAgentService calls to its VMs' agents (agent_proxy.py, issue 19).

A service on another host reaches a VM's agent through the VM's node: the
call goes to vm-manager with the VM named in the metadata ``agentvm-vm``.
Here, on a real VM: all four kinds of call arrive and come back byte for
byte; the caller's deadline and cancel reach the guest (its program is
killed); the agent's errors keep their codes; and vm-manager refuses callers,
VMs and names it must, before a byte reaches a guest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator

import grpc
import pytest

from agentvm.common import tls
from agentvm.common.grpc_util import sync_channel
from agentvm.v1 import (
    common_pb2,
    guest_agent_pb2,
    guest_agent_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from tests.vmharness import VMManagerProcess, execute, program

pytestmark = pytest.mark.vm

HEADER = "agentvm-vm"


def via(vmm: VMManagerProcess, who: str = "executor") -> guest_agent_pb2_grpc.GuestAgentServiceStub:
    return guest_agent_pb2_grpc.GuestAgentServiceStub(vmm.channel(who))


Meta = tuple[tuple[str, str | bytes], ...]


def md(vm: common_pb2.VM) -> Meta:
    return ((HEADER, vm.name),)


def run(
    stub: guest_agent_pb2_grpc.GuestAgentServiceStub, vm: common_pb2.VM, cmd: str
) -> tuple[bytes, int]:
    req = guest_agent_pb2.ExecuteRequest(program=program(cmd))
    req.timeout.FromSeconds(60)
    out, code = bytearray(), -1
    for ev in stub.Execute(req, metadata=md(vm), timeout=90):
        if ev.HasField("output"):
            out += ev.output.data
        elif ev.HasField("exited"):
            code = ev.exited.exit_code
    return bytes(out), code


def count(vm: common_pb2.VM, comm: str) -> int:
    """How many processes named ``comm`` run in the guest (asked over the local socket)."""
    res = execute(vm.agent_endpoint, f"cat /proc/[0-9]*/comm 2>/dev/null | grep -cx {comm} || true")
    return int(res.stdout.strip() or b"0")


def test_every_kind_of_call_reaches_the_guest_and_comes_back_whole(
    vmm: VMManagerProcess, shared_vm: common_pb2.VM
) -> None:
    stub = via(vmm)
    # Unary: the same guest as over its local socket.
    far = stub.GetStatus(guest_agent_pb2.GetStatusRequest(), metadata=md(shared_vm), timeout=30)
    with sync_channel(shared_vm.agent_endpoint) as ch:
        near = guest_agent_pb2_grpc.GuestAgentServiceStub(ch).GetStatus(
            guest_agent_pb2.GetStatusRequest(), timeout=30
        )
    assert far.info.boot_id == near.info.boot_id != ""
    # Server stream: a program's output, and its exit code.
    out, code = run(stub, shared_vm, "cat /proc/sys/kernel/random/boot_id; exit 7")
    assert (out.decode().strip(), code) == (near.info.boot_id, 7)
    # Client stream then server stream: 3 MiB in and out, byte for byte.
    data = os.urandom(3 * 2**20 + 17)
    digest = hashlib.sha256(data).hexdigest()

    def chunks() -> Iterator[guest_agent_pb2.GuestAgentServiceWriteFileRequest]:
        yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(path="work/proxied.bin")
        for i in range(0, len(data), 60_000):
            yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(chunk=data[i : i + 60_000])
        yield guest_agent_pb2.GuestAgentServiceWriteFileRequest(sha256=digest)

    wrote = stub.WriteFile(chunks(), metadata=md(shared_vm), timeout=120)
    assert (wrote.size_bytes, wrote.sha256) == (len(data), digest)
    out, code = run(stub, shared_vm, "sha256sum /workspace/work/proxied.bin")
    assert out.split()[0].decode() == digest, "the guest kernel holds the same bytes"
    read = stub.ReadFile(
        guest_agent_pb2.GuestAgentServiceReadFileRequest(path="work/proxied.bin"),
        metadata=md(shared_vm),
        timeout=120,
    )
    assert b"".join(r.chunk for r in read) == data
    # Both ways at once: a TCP connection to an echo server in the guest.
    server = (
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        "s.bind(('127.0.0.1',7711));s.listen();c,_=s.accept();"
        "[c.sendall(b.upper()) for b in iter(lambda:c.recv(65536),b'')];c.close()"
    )
    start = guest_agent_pb2.GuestAgentServiceStartProcessRequest(
        exec_id="proxy-echo", program=program(["python3", "-c", server])
    )
    start.timeout.FromSeconds(60)
    assert stub.StartProcess(start, metadata=md(shared_vm), timeout=30).pid > 0
    got = bytearray()
    for _ in range(100):  # until the server listens
        reqs = [
            guest_agent_pb2.GuestAgentServiceOpenPortRequest(port=7711, data=b"ping through "),
            guest_agent_pb2.GuestAgentServiceOpenPortRequest(data=b"the node", eof=True),
        ]
        try:
            for resp in stub.OpenPort(iter(reqs), metadata=md(shared_vm), timeout=30):
                got += resp.data
            break
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            time.sleep(0.2)
    assert bytes(got) == b"PING THROUGH THE NODE"
    run(stub, shared_vm, "rm -f /workspace/work/proxied.bin")


def test_the_callers_deadline_and_cancel_reach_the_guest(
    vmm: VMManagerProcess, shared_vm: common_pb2.VM
) -> None:
    stub = via(vmm)
    req = guest_agent_pb2.ExecuteRequest(program=program("exec sleep 1000"))
    req.timeout.FromSeconds(600)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Execute(req, metadata=md(shared_vm), timeout=3):
            pass
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    flood = guest_agent_pb2.ExecuteRequest(program=program("exec yes proxied"))
    flood.timeout.FromSeconds(600)
    call = stub.Execute(flood, metadata=md(shared_vm), timeout=60)
    next(iter(call))  # flowing
    call.cancel()  # type: ignore[no-untyped-call]
    # Neither program outlives its call: vm-manager cancelled the forwarded calls.
    for _ in range(50):
        if count(shared_vm, "sleep") == 0 and count(shared_vm, "yes") == 0:
            break
        time.sleep(0.2)
    assert (count(shared_vm, "sleep"), count(shared_vm, "yes")) == (0, 0)
    # The agent's own errors keep their codes.
    missing = guest_agent_pb2.GuestAgentServiceReadFileRequest(path="work/no-such-file")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ReadFile(missing, metadata=md(shared_vm), timeout=30))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_the_node_refuses_callers_vms_and_names_it_must(
    vmm: VMManagerProcess, shared_vm: common_pb2.VM
) -> None:
    status = guest_agent_pb2.GetStatusRequest()

    def code_of(stub: guest_agent_pb2_grpc.GuestAgentServiceStub, meta: Meta) -> str:
        try:
            stub.GetStatus(status, metadata=meta, timeout=30)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "OK"

    executor = via(vmm)
    # A client is not a service: only the executor and pool-manager reach agents.
    assert code_of(via(vmm, tls.CLIENT), md(shared_vm)).startswith(
        "PERMISSION_DENIED: only executor and pool-manager"
    )
    assert code_of(executor, ()).startswith("INVALID_ARGUMENT: name the VM in the metadata")
    twice: Meta = ((HEADER, shared_vm.name), (HEADER, shared_vm.name))
    assert code_of(executor, twice).startswith("INVALID_ARGUMENT")
    assert code_of(executor, ((HEADER, "../../run/x"),)).startswith("INVALID_ARGUMENT")
    assert code_of(executor, ((HEADER, vmm.prefix + "nope"),)).startswith("NOT_FOUND")
    assert code_of(executor, md(shared_vm)) == "OK"
    # A warm pool VM is the pool's alone; and a VM that is not running has no agent.
    as_pool = vm_manager_pb2_grpc.VMManagerServiceStub(vmm.channel("pool-manager"))
    warm = as_pool.CreateVM(
        vm_manager_pb2.CreateVMRequest(
            start=False,
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            labels={"test": "1", "agent-vm/owner": "pool-manager", "agent-vm/pool": "proxy"},
        ),
        timeout=120,
    ).vm
    try:
        refused = code_of(executor, md(warm))
        assert refused.startswith("FAILED_PRECONDITION: cannot reach its guest agent"), refused
        assert "warm pool VM" in refused
        stopped = code_of(via(vmm, "pool-manager"), md(warm))
        assert stopped.startswith("FAILED_PRECONDITION"), stopped
        assert "only while it runs" in stopped
    finally:
        with contextlib.suppress(grpc.RpcError):
            as_pool.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=warm.name), timeout=120)
