"""The executor and the Python client on real VMs: runs, sandboxes, files, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import agent_vm
from agent_vm import _async
from agentvm.cli import soak_ops
from agentvm.common import tls
from agentvm.common.auth import aio_token_interceptors
from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from tests.vmharness import REPO, ExecutorProcess, VMManagerProcess, libvirt_domains, wait_for

pytestmark = pytest.mark.vm

MODES = ["shared", "api"]


@pytest.fixture(scope="module", params=MODES)
def sandbox(
    request: pytest.FixtureRequest, executor: ExecutorProcess
) -> Iterator[agent_vm.Sandbox]:
    """One sandbox per workspace mode, shared by the tests of this module."""
    sb = agent_vm.Sandbox.create(workspace=request.param, lifetime=1800)
    try:
        assert sb.workspace_mode == request.param
        yield sb
    finally:
        sb.close()


def vm_gone(vmm: VMManagerProcess, name: str) -> bool:
    return name not in libvirt_domains(vmm.prefix) and not (vmm.state_dir / "vms" / name).exists()


def test_one_shot_run_returns_output_and_files_and_destroys_the_vm(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    chunks: list[str] = []
    result = agent_vm.run(
        code=(
            "import os, sys\n"
            "data = open('/workspace/input/in/data.txt').read()\n"
            "open('/workspace/output/upper.txt', 'w').write(data.upper())\n"
            "print('kernel', os.uname().release, sys.argv[1:])\n"
            "print('warn', file=sys.stderr)\n"
        ),
        args=["x"],
        inputs={"in/data.txt": "hello"},
        download_outputs=True,
        on_stdout=chunks.append,
    )
    assert result.exit_code == 0, result.stderr
    assert "cloud-amd64" in result.stdout
    assert result.stdout.strip() != os.uname().release
    assert "['x']" in result.stdout
    assert result.stderr == "warn\n"
    assert "".join(chunks) == result.stdout
    assert result.boot_s > 0
    [out] = result.output_files
    assert (out.path, out.size_bytes) == ("upper.txt", 5)
    assert out.sha256 == hashlib.sha256(b"HELLO").hexdigest()
    assert result.output_contents == {"upper.txt": b"HELLO"}
    # The result came first; the VM goes right after it.
    assert wait_for(lambda: vm_gone(vmm, result.vm_name), 30)


def test_run_timeout_and_errors(executor: ExecutorProcess, vmm: VMManagerProcess) -> None:
    result = agent_vm.run("echo partial; sleep 60", timeout=2)
    assert result.timed_out
    assert result.exit_code == 124
    assert result.stdout == "partial\n"
    assert wait_for(lambda: vm_gone(vmm, result.vm_name), 30)
    with pytest.raises(agent_vm.InvalidArgumentError, match="path"):
        agent_vm.run("true", inputs={"../escape": b"x"})
    with pytest.raises(agent_vm.InvalidArgumentError, match="timeout"):
        agent_vm.run("true", timeout=10**9)
    with pytest.raises(agent_vm.UnavailableError, match="agent-vm up"):
        agent_vm.run("true", address="unix:/nonexistent/executor.sock")


def test_a_running_sandboxs_network_policy_is_changed_live(sandbox: agent_vm.Sandbox) -> None:
    """The module's sandboxes are nat-filtered with the installation's default
    policy (allowed.test, in the tests' internet: tests/networld.py)."""

    def reach(*targets: str) -> dict[str, str]:
        res = sandbox.run(["python3", "-c", soak_ops.NET_PROBE, "1", *targets], timeout=120)
        assert res.exit_code == 0, res.stderr
        return dict(line.split(" ", 1) for line in res.stdout.splitlines())

    default = sandbox.info().network_policy
    assert default is not None
    assert default.allow_domains == ("allowed.test",)
    seen = reach("allowed.test:80", "other.test:80")
    assert seen["allowed.test:80"] == "open"
    assert seen["other.test:80"].startswith("blocked:")
    try:
        got = sandbox.set_network_policy(agent_vm.NetworkPolicy(allow_domains=["other.test"]))
        # The policy in effect, the default ports filled in (sorted); the next
        # command sees it.
        assert got == agent_vm.NetworkPolicy(allow_domains=["other.test"], ports=[22, 80, 443])
        assert sandbox.info().network_policy == got
        seen = reach("other.test:80", "allowed.test:80")
        assert seen["other.test:80"] == "open"
        assert seen["allowed.test:80"].startswith("blocked:")
        with pytest.raises(agent_vm.InvalidArgumentError, match="allow_domains"):
            sandbox.set_network_policy(agent_vm.NetworkPolicy(allow_domains=["bad name; drop"]))
        with pytest.raises(agent_vm.ArgumentTypeError, match="policy must be"):
            sandbox.set_network_policy({"allow_domains": []})  # type: ignore[arg-type]
        assert sandbox.info().network_policy == got  # a refused change changes nothing
    finally:
        assert sandbox.set_network_policy(agent_vm.NetworkPolicy()) == default


def test_large_binary_file_round_trip(sandbox: agent_vm.Sandbox, tmp_path: Path) -> None:
    """50 MB of random bytes in and out, byte for byte (shared and API workspaces)."""
    src = tmp_path / "in.bin"
    data = os.urandom(50 * 1024 * 1024)
    src.write_bytes(data)
    assert sandbox.files.upload(src, "input/in.bin") == len(data)
    res = sandbox.run("sha256sum /workspace/input/in.bin", timeout=120).check()
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    res = sandbox.run(
        "head -c 52428800 /dev/urandom > /workspace/output/out.bin && "
        "sha256sum /workspace/output/out.bin",
        timeout=180,
    ).check()
    guest_sha = res.stdout.split()[0]
    dst = tmp_path / "out.bin"
    assert sandbox.files.download("output/out.bin", dst) == 50 * 1024 * 1024
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == guest_sha
    sandbox.files.remove("input/in.bin")
    sandbox.files.remove("output/out.bin")


def test_path_traversal_and_symlink_escapes_are_refused(sandbox: agent_vm.Sandbox) -> None:
    for bad in ("../etc/passwd", "/etc/passwd", "input/../../x", "a\0b"):
        with pytest.raises(agent_vm.InvalidArgumentError):
            sandbox.files.write(bad, b"x")
        with pytest.raises(agent_vm.InvalidArgumentError):
            sandbox.files.read(bad)
    # The guest plants symlinks pointing out of the workspace (to the guest's
    # root, which in a shared workspace the host would resolve on the host).
    sandbox.run("ln -sfn / /workspace/work/root && ln -sfn /etc/passwd /workspace/work/pw").check()
    for bad in ("work/root/etc/passwd", "work/pw"):
        with pytest.raises(agent_vm.InvalidArgumentError, match=r"symbolic link|not a"):
            sandbox.files.read(bad)
    with pytest.raises(agent_vm.InvalidArgumentError):
        sandbox.files.write("work/root/tmp/planted", b"x")
    assert not Path("/tmp/planted").exists()
    # Writing to a link's name replaces the link; it never writes through it.
    sandbox.files.write("work/pw", b"x")
    check = sandbox.run("test ! -L /workspace/work/pw && head -c 5 /etc/passwd").check()
    assert check.stdout == "root:"
    assert sandbox.files.read("work/pw") == b"x"
    listed = {f.path for f in sandbox.files.list("work")}
    assert {"work/root", "work/pw"} <= listed
    sandbox.files.remove("work/root")
    sandbox.files.remove("work/pw")


def test_shared_workspace_is_closed_to_other_host_users(
    sandbox: agent_vm.Sandbox, vmm: VMManagerProcess
) -> None:
    workspace = vmm.state_dir / "vms" / sandbox.vm_name / "workspace"
    if sandbox.workspace_mode == "shared":
        assert workspace.stat().st_mode & 0o777 == 0o700
        sandbox.run("echo hi > /workspace/output/x").check()
        assert (workspace / "output" / "x").read_text() == "hi\n"
    else:
        assert not workspace.exists()


def test_files_api(sandbox: agent_vm.Sandbox) -> None:
    sandbox.files.write("work/dir/a.txt", "alpha")
    sandbox.files.write("work/dir/b.bin", bytes(range(256)), mode=0o600)
    assert sandbox.files.read("work/dir/b.bin") == bytes(range(256))
    assert sandbox.run("stat -c %a /workspace/work/dir/b.bin").stdout.strip() == "600"
    names = [f.path for f in sandbox.files.list("work", recursive=True)]
    assert names == ["work/dir", "work/dir/a.txt", "work/dir/b.bin"]
    with pytest.raises(agent_vm.NotFoundError):
        sandbox.files.read("work/nope")
    sandbox.files.remove("work/dir", recursive=True)
    assert sandbox.files.list("work") == []


def test_files_exists_and_mkdir(sandbox: agent_vm.Sandbox) -> None:
    files = sandbox.files
    assert not files.exists("work/made")
    files.mkdir("work/made/deeper")  # parents too
    assert files.exists("work/made")
    assert files.exists("work/made/deeper")
    assert sandbox.run("test -d /workspace/work/made/deeper").exit_code == 0
    files.mkdir("work/made/deeper")  # there already: nothing to do
    files.write("work/made/f.txt", "x")
    assert files.exists("work/made/f.txt")
    assert not files.exists("work/made/f.txt/below")  # a file is no directory
    assert not files.exists("nowhere/at/all")
    sandbox.run("ln -s /etc /workspace/work/made/link")
    assert files.exists("work/made/link")  # the link itself, not followed
    with pytest.raises(agent_vm.FailedPreconditionError, match=r"f\.txt"):
        files.mkdir("work/made/f.txt")
    with pytest.raises(agent_vm.InvalidArgumentError):
        files.exists("../etc/passwd")
    with pytest.raises(agent_vm.InvalidArgumentError):
        files.mkdir("work/made/link/x")  # through a symlink
    files.remove("work/made", recursive=True)
    assert not files.exists("work/made")


def test_output_is_capped_and_host_memory_stays_bounded(
    sandbox: agent_vm.Sandbox, executor: ExecutorProcess
) -> None:
    assert executor.proc is not None
    before = rss_kib(executor.proc.pid)
    res = sandbox.run("head -c 104857600 /dev/zero; echo done >&2", timeout=300)
    after = rss_kib(executor.proc.pid)
    assert res.exit_code == 0
    assert len(res.stdout_bytes) == 16 * 1024 * 1024
    assert res.stdout_truncated
    assert res.stderr == "done\n"
    assert after - before < 64 * 1024, f"executor RSS grew by {after - before} KiB"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_sequential_and_concurrent_commands(sandbox: agent_vm.Sandbox) -> None:
    for i in range(20):
        assert sandbox.run(["echo", str(i)]).stdout == f"{i}\n"
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda i: sandbox.run(f"sleep 1; echo {i}"), range(5)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]


def test_stdin_env_cwd_and_streaming(sandbox: agent_vm.Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    res = sandbox.run(
        'pwd; echo "$WHO"; cat; sleep 1.5; echo late',
        env={"WHO": "agent"},
        stdin="from stdin\n",
        on_stdout=lambda s: seen.append((time.monotonic(), s)),
    )
    assert res.stdout == "/workspace/work\nagent\nfrom stdin\nlate\n"
    assert seen[-1][0] - seen[0][0] > 1.0, "output was not streamed"
    res = sandbox.run("pwd", cwd="/tmp")
    assert res.stdout == "/tmp\n"


def test_background_process_stdin_and_kill(sandbox: agent_vm.Sandbox) -> None:
    cat = sandbox.start("cat")
    cat.send_stdin("line one\n")
    cat.send_stdin("line two\n", eof=True)
    assert cat.wait().stdout == "line one\nline two\n"
    sleeper = sandbox.start("sleep 300; echo never")
    sleeper.kill()
    res = sleeper.wait()
    assert res.signal == signal.SIGKILL or res.exit_code == 128 + signal.SIGKILL
    assert "never" not in res.stdout
    assert "sleep 300" not in sandbox.run("busybox ps -o args").stdout


def test_async_sandbox_and_close_leaves_nothing(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    async def main() -> str:
        async with await agent_vm.AsyncSandbox.create() as sb:
            res = await sb.run(code="print(sum(range(10)))")
            assert res.stdout == "45\n"
            await sb.files.write("output/x", b"1")
            assert await sb.files.read("output/x") == b"1"
            # Closed at once (no call reaches it), destroyed right after.
            await sb.close()
            with pytest.raises(agent_vm.SandboxClosedError):
                await sb.run("true")
            return sb.vm_name

    name = asyncio.run(main())
    assert wait_for(lambda: vm_gone(vmm, name), 30)
    assert not list((vmm.state_dir / "vms").glob(f"{name}*"))

    async def waiting() -> str:
        sb = await agent_vm.AsyncSandbox.create()
        await sb.close(wait=True)
        return sb.vm_name

    name = asyncio.run(waiting())  # wait=True: the VM is gone when close returns
    assert vm_gone(vmm, name)
    assert not list((vmm.state_dir / "vms").glob(f"{name}*"))


def test_lifetime_destroys_an_abandoned_sandbox(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    sb = agent_vm.Sandbox.create(lifetime=2)
    name = sb.vm_name
    assert wait_for(lambda: vm_gone(vmm, name), 30)
    with pytest.raises(agent_vm.SandboxExpiredError, match="lifetime"):
        sb.run("true")
    sb.close()  # idempotent, also after expiry
    with pytest.raises(agent_vm.SandboxClosedError, match="is closed"):
        sb.files.list()


def test_the_end_of_a_lifetime_ends_a_running_command_at_once(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    """It used to hang until the call's deadline (timeout + 60 s), then DeadlineExceeded."""
    sb = agent_vm.Sandbox.create(lifetime=5)
    started = time.monotonic()
    handle = sb.start("sleep 30", timeout=25)
    with pytest.raises(agent_vm.SandboxExpiredError) as info:
        sb.run("sleep 20", timeout=10)
    took = time.monotonic() - started
    assert took < 9, took  # the lifetime, plus the reaper's one-second beat
    assert f"sandbox {sb.id} reached the end of its lifetime (5 s)" in info.value.message
    assert "set_timeout(SECONDS)" in info.value.message  # how to get a longer one
    assert "create it with a longer one" in info.value.message
    with pytest.raises(agent_vm.SandboxExpiredError):
        handle.wait()  # the background command ends the same way
    with pytest.raises(agent_vm.SandboxExpiredError):
        sb.files.read("work/x")  # and every later call
    assert wait_for(lambda: vm_gone(vmm, sb.vm_name), 30)
    sb.close()


def test_bridge_mode_sandbox_on_a_named_bridge(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    from tests.networld import bridge_world

    with pytest.raises(agent_vm.FailedPreconditionError, match="no bridge named avmb-nosuch"):
        agent_vm.Sandbox.create(network="bridge", bridge="avmb-nosuch")

    async def raw_calls() -> None:
        """The executor's own checks, for callers that are not this client."""
        async with _async._channel(executor.address) as ch:
            stub = executor_pb2_grpc.ExecutorServiceStub(ch)
            for mode, bridge, words in (
                (common_pb2.NETWORK_MODE_NAT_FILTERED, "br0", "not bridge"),
                (common_pb2.NETWORK_MODE_BRIDGE, "", "needs the name of an existing host bridge"),
            ):
                spec = executor_pb2.SandboxSpec(network_mode=mode, bridge=bridge)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateSandbox(executor_pb2.CreateSandboxRequest(spec=spec))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert words in (err.value.details() or "")

    asyncio.run(raw_calls())
    with (
        bridge_world() as lan,
        agent_vm.Sandbox.create(network="bridge", bridge=lan.bridge, lifetime=300) as sb,
    ):
        out = sb.run("busybox ip -4 addr show eth0").check().stdout
        assert "198.19.0.1" in out, out  # a DHCP lease of the bridge's LAN (.100-.120)
        name = sb.vm_name
    assert wait_for(lambda: vm_gone(vmm, name), 30)


def _running_vms(vmm: VMManagerProcess) -> set[str]:
    return set(libvirt_domains(vmm.prefix))


def test_client_cancel_destroys_the_vm(executor: ExecutorProcess, vmm: VMManagerProcess) -> None:
    before = _running_vms(vmm)

    async def main() -> None:
        token = aio_token_interceptors(executor.token)
        credentials = executor.caller().credentials
        assert credentials is not None
        async with grpc.aio.secure_channel(
            executor.address,
            credentials,
            options=tls.target_options("executor"),
            interceptors=token,
        ) as ch:
            stub = executor_pb2_grpc.ExecutorServiceStub(ch)
            req = executor_pb2.RunRequest(
                spec=executor_pb2.SandboxSpec(
                    profile=common_pb2.RESOURCE_PROFILE_STANDARD,
                    network_mode=common_pb2.NETWORK_MODE_ISOLATED,
                ),
                program=common_pb2.Program(
                    code=common_pb2.Code(
                        language=common_pb2.CODE_LANGUAGE_SHELL, source="echo up; sleep 300"
                    )
                ),
            )
            call = stub.Run(req)
            async for ev in call:
                if ev.HasField("output"):
                    break
            assert _running_vms(vmm) - before, "the run's VM should be running now"
            call.cancel()

    asyncio.run(main())
    assert wait_for(lambda: not (_running_vms(vmm) - before), 60), "VM left after cancel"


def test_client_disconnect_destroys_the_vm(
    executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    before = _running_vms(vmm)
    script = (
        "import agent_vm, sys\n"
        "agent_vm.run('echo up; sleep 300',\n"
        "             on_stdout=lambda s: (print(s, end=''), sys.stdout.flush()))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=os.environ.copy(), cwd=REPO
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    proc.kill()  # no goodbye: the connection just drops
    proc.wait()
    assert wait_for(lambda: not (_running_vms(vmm) - before), 60), "VM left after disconnect"


def test_buf_curl_calls_run_from_outside_python(executor: ExecutorProcess) -> None:
    """Another gRPC client (buf curl, via server reflection) drives Run."""
    buf = REPO / ".tools" / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is installed by setup.sh"
    body = (
        '{"spec": {"profile": "RESOURCE_PROFILE_STANDARD", "networkMode": "NETWORK_MODE_ISOLATED"},'
        ' "program": {"argv": {"args": ["uname", "-r"]}}}'
    )
    sock = executor.address.removeprefix("unix:")
    proc = subprocess.run(
        [
            str(buf),
            "curl",
            "--protocol",
            "grpc",
            "--unix-socket",
            sock,
            # Mutual TLS with the installation's client certificate; the URL's host
            # is the name in the executor's certificate.
            "--cacert",
            str(executor.tls_dir / "ca.pem"),
            "--cert",
            str(executor.tls_dir / "client.pem"),
            "--key",
            str(executor.tls_dir / "client.key"),
            "-H",
            f"Authorization: Bearer {executor.token}",
            "-d",
            body,
            "https://executor.agent-vm/agentvm.v1.ExecutorService/Run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    import base64
    import json

    decoder = json.JSONDecoder()
    events, text = [], proc.stdout.strip()
    while text:
        obj, end = decoder.raw_decode(text)
        events.append(obj)
        text = text[end:].strip()
    out = b"".join(base64.b64decode(e["output"]["data"]) for e in events if "output" in e)
    assert out.decode().strip().endswith("cloud-amd64")
    result = events[-1]["result"]
    assert result["status"].get("exitCode", 0) == 0
    assert result["vmName"].startswith("agent-vm-")
