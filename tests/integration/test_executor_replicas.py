"""Two executor replicas of one group serve the same sandboxes, on real VMs, across a
SIGKILL of one of them (issue 19's acceptance; docs/SCALE_OUT.md, "Executor
replicas"). tests/unit/test_executor_replicas.py covers the races and the sweeps."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

import agent_vm
from agentvm.v1 import vm_manager_pb2
from tests.vmharness import ExecutorProcess, VMManagerProcess, libvirt_domains, wait_for


def test_two_replicas_serve_the_same_sandboxes_across_a_restart_of_one(
    vmm: VMManagerProcess,
) -> None:
    group = {"AGENTVM_EXECUTOR_GROUP": f"{vmm.prefix}replicas"}
    a = ExecutorProcess(base=vmm.base, prefix=vmm.prefix, name="ex-ra", extra_env=group)
    b = ExecutorProcess(base=vmm.base, prefix=vmm.prefix, name="ex-rb", extra_env=group)
    a.start()
    b.start()
    blob = os.urandom(200_000)
    try:
        sb = agent_vm.Sandbox.create(
            address=a.address,
            network="isolated",
            workspace="api",
            lifetime=900,
            secret_envs={"SECRET_TOKEN": "s3cr3t-value"},
        )
        # The record rides with the VM, sealed: not even libvirt's XML shows the secret.
        vm = vmm.stub().GetVM(vm_manager_pb2.GetVMRequest(name=sb.vm_name), timeout=30).vm
        assert vm.record_generation >= 1
        assert b"s3cr3t-value" not in vm.record
        # B never saw it: it finds it, and what A wrote reads back through B.
        on_b = agent_vm.Sandbox.connect(sb.id, address=b.address)
        sb.files.write("blob.bin", blob)
        assert on_b.files.read("blob.bin") == blob
        assert on_b.run("echo $SECRET_TOKEN; hostname").stdout.split() == [
            "s3cr3t-value",
            sb.vm_name,
        ]
        assert sb.id in {s.id for s in agent_vm.Sandbox.list(address=b.address)}
        # A dies: B serves on, and pauses it.
        a.stop(signal.SIGKILL)
        assert on_b.run("wc -c < /workspace/blob.bin").stdout.strip() == str(len(blob))
        on_b.pause()
        # A comes back, takes it up paused, and resumes it.
        a.start()
        again = agent_vm.Sandbox.connect(sb.id, address=a.address)
        assert again.info().state == "paused"
        again.resume()
        assert again.run("cat /workspace/blob.bin | wc -c").stdout.strip() == str(len(blob))
        # B sees the resume (a new agent connection) and reads the same bytes.
        assert agent_vm.Sandbox.connect(sb.id, address=b.address).info().state == "running"
        assert on_b.files.read("blob.bin") == blob
        # Closed through A: B's next call meets a VM that is gone, and B says so;
        # from then on B knows the sandbox is no more.
        again.close()
        with pytest.raises(agent_vm.AgentVMError, match=f"VM of sandbox {sb.id} is gone"):
            on_b.run("true")
        with pytest.raises(agent_vm.NotFoundError, match=f"no sandbox '{sb.id}'"):
            on_b.run("true")
        assert wait_for(lambda: sb.vm_name not in libvirt_domains(vmm.prefix), 60)
    except BaseException:
        for ex in (a, b):
            print(f"--- {ex.name} log ---\n" + ex.log_path.read_text()[-6000:])
        raise
    finally:
        # Replicas of a group leave their sandboxes to each other when they stop.
        with contextlib.suppress(agent_vm.AgentVMError):
            agent_vm.Sandbox.connect(sb.id, address=b.address).close()
        a.stop()
        b.stop()
