"""Bad input: a proper status code, a message with the problem and the fix, nothing half-made.

vm-manager (libvirt's test driver) and the executor are served in-process on
Unix sockets by one background event loop, so the services can be called
with blocking stubs and the `agent-vm` command line (click's CliRunner) from
the test's thread. The executor's sandboxes are put in by hand, with a real
guest agent serving a temporary workspace (no VMs anywhere). Every case
checks that the call left no domain, VM directory, sandbox or file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from click.testing import CliRunner, Result

import agent_vm
from agent_vm import _async
from agentvm.cli.main import cli
from agentvm.cli.run_cmd import MAX_INLINE_INPUT
from agentvm.common.config import Settings
from agentvm.common.grpc_util import (
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    aio_channel,
    guest_channel,
)
from agentvm.executor.executor import AgentExecutor, SandboxState
from agentvm.executor.servicer import ExecutorServicer
from agentvm.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    guest_agent_pb2_grpc,
    pool_manager_pb2,
    pool_manager_pb2_grpc,
    vm_manager_pb2,
    vm_manager_pb2_grpc,
)
from agentvm.vm_manager.accel import Accel, AccelInfo
from agentvm.vm_manager.image import ImageStore, inputs_id
from agentvm.vm_manager.libvirt_conn import LibvirtConnection
from agentvm.vm_manager.manager import VMManager
from agentvm.vm_manager.servicer import VMManagerServicer
from agentvm_guest import agent as agent_mod

PREFIX = "agent-vm-badin-"
LIBVIRT_DOWN = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
# Under sysfs nothing can be created, not even by root.
READ_ONLY_CACHE = Path("/sys/agentvm-unit-cache")
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# The sandboxes every stack starts with (put in by hand, see ``services``).
FIXED_SANDBOXES = ("sb-api", "sb-shr")


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads its addresses from the environment: nothing of the host's may leak in."""
    for name in list(os.environ):
        if name.startswith("AGENTVM_"):
            monkeypatch.delenv(name)
    # The in-process services here serve plaintext.
    monkeypatch.setenv("AGENTVM_TLS", "off")


# -- the services, in-process ---------------------------------------------------------
def make_cache(root: Path) -> Path:
    """A cache directory holding a guest image of this version (a tiny real qcow2)."""
    image = root / "images" / inputs_id()
    image.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image / "rootfs.qcow2"), "64M"],
        check=True,
    )
    (image / "vmlinuz").write_bytes(b"kernel")
    (image / "initrd.img").write_bytes(b"initrd")
    manifest = {
        "id": inputs_id(),
        "distribution": "debian-bookworm",
        "kernel_release": "6.1.0-test",
        "built_at": 0.0,
        "packages": [],
        "wheels": [],
        "agent_version": "0.1.0",
        "files": {},
    }
    (image / "manifest.json").write_text(json.dumps(manifest))
    return root


@dataclass
class Stack:
    """vm-manager and executor (served on a background loop); blocking stubs to call them."""

    settings: Settings
    manager: VMManager
    executor: AgentExecutor
    vmm: vm_manager_pb2_grpc.VMManagerServiceStub
    ex: executor_pb2_grpc.ExecutorServiceStub
    workspace: Path

    def env(self) -> dict[str, str]:
        return {
            "AGENTVM_VM_MANAGER_ADDR": self.settings.vm_manager_addr,
            "AGENTVM_EXECUTOR_ADDR": self.settings.executor_addr,
            "AGENTVM_RUN_DIR": str(self.settings.run_dir),
            "AGENTVM_MONITOR_ADDR": "",
        }

    def cli(self, *args: str) -> Result:
        return CliRunner(env=self.env()).invoke(cli, list(args))

    def domains(self) -> list[str]:
        """This test's libvirt domains (defined or running)."""
        if self.settings.libvirt_uri != "test:///default":
            return []  # libvirt is "down": nothing can have been defined
        doms = self.manager.conn.get().listAllDomains()
        return [n for n in (d.name() for d in doms) if n.startswith(PREFIX)]

    def leftovers(self) -> list[str]:
        """Anything a failed call may have left: domains, VM directories, sandboxes, files."""
        left = [f"domain {n}" for n in self.domains()]
        for d in (self.settings.vms_state_dir, self.settings.vms_run_dir):
            if d.exists():
                left += [f"directory {p}" for p in d.iterdir()]
        left += [f"sandbox {s}" for s in self.executor._sandboxes if s not in FIXED_SANDBOXES]
        taken = self.settings.max_sandboxes - self.executor._slots._value
        if taken:
            left.append(f"{taken} sandbox slot(s)")
        for area in ("api", "shared"):
            left += [
                f"workspace file {p}"
                for p in (self.workspace / area).rglob("*")
                if p.is_file() and p.name != "keep.txt"
            ]
        return left


def sandbox(sid: str, endpoint: str, mode: int, workspace: Path) -> SandboxState:
    now = time.time()
    return SandboxState(
        id=sid,
        spec=executor_pb2.SandboxSpec(),
        vm=common_pb2.VM(
            name=f"{PREFIX}{sid}",
            agent_endpoint=endpoint,
            workspace_path=str(workspace),
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
        ),
        workspace_mode=mode,  # type: ignore[arg-type]
        created_at=now,
        expires_at=now + 600,
        boot_duration=0.0,
        channel=guest_channel(endpoint),
    )


@contextlib.contextmanager
def services(tmp_path: Path, cache: Path, libvirt_uri: str = "test:///default") -> Iterator[Stack]:
    settings = Settings(
        libvirt_uri=libvirt_uri,
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=cache,
        vm_prefix=PREFIX,
        vm_manager_addr=f"unix:{tmp_path}/vmm.sock",
        executor_addr=f"unix:{tmp_path}/executor.sock",
        max_sandboxes=4,
        monitor_addr="",
    )
    # A real guest agent on a temporary workspace, for the executor's API-mode sandbox.
    workspace = tmp_path / "ws"
    for area in ("api", "shared"):
        for part in ("input", "output", "work"):
            (workspace / area / part).mkdir(parents=True)
        (workspace / area / "input" / "keep.txt").write_text("kept\n")
    guest = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    guest_agent_pb2_grpc.add_GuestAgentServiceServicer_to_server(
        agent_mod.GuestAgent(workspace=str(workspace / "api")), guest
    )
    guest_addr = f"unix:{tmp_path}/guest.sock"
    guest.add_insecure_port(guest_addr)
    guest.start()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    conn = LibvirtConnection(settings.libvirt_uri)
    images = ImageStore(cache)

    async def start() -> tuple[grpc.aio.Server, VMManager, AgentExecutor, grpc.aio.Channel]:
        manager = VMManager(
            settings, conn, images, AccelInfo(Accel.TCG, "test"), memory_limit=False
        )
        server = grpc.aio.server(options=SERVER_OPTIONS)
        vm_manager_pb2_grpc.add_VMManagerServiceServicer_to_server(
            VMManagerServicer(manager, images), server
        )
        server.add_insecure_port(settings.vm_manager_addr)
        channel = aio_channel(settings.vm_manager_addr, "vm-manager")
        executor = AgentExecutor(settings, vm_manager_pb2_grpc.VMManagerServiceStub(channel))
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(executor), server)
        server.add_insecure_port(settings.executor_addr)
        await server.start()
        for sb in (
            sandbox("sb-api", guest_addr, common_pb2.WORKSPACE_MODE_API, workspace / "api"),
            sandbox(
                "sb-shr",
                "unix:/nonexistent",
                common_pb2.WORKSPACE_MODE_SHARED,
                workspace / "shared",
            ),
        ):
            executor._sandboxes[sb.id] = sb
        return server, manager, executor, channel

    async def stop(
        server: grpc.aio.Server, manager: VMManager, executor: AgentExecutor, ch: grpc.aio.Channel
    ) -> None:
        for sid in ("sb-api", "sb-shr"):
            # ListSandboxes forgets them (they have no VM): their channels are closed.
            sb = executor._sandboxes.pop(sid, None)
            if sb is not None:
                await sb.channel.close(None)
        await executor.close()
        await server.stop(None)
        await ch.close(None)
        await manager.close()

    server, manager, executor, channel = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    vmm_channel = grpc.insecure_channel(settings.vm_manager_addr)
    ex_channel = grpc.insecure_channel(settings.executor_addr)
    try:
        yield Stack(
            settings=settings,
            manager=manager,
            executor=executor,
            vmm=vm_manager_pb2_grpc.VMManagerServiceStub(vmm_channel),
            ex=executor_pb2_grpc.ExecutorServiceStub(ex_channel),
            workspace=workspace,
        )
    finally:
        vmm_channel.close()
        ex_channel.close()
        asyncio.run_coroutine_threadsafe(stop(server, manager, executor, channel), loop).result(30)
        conn.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        guest.stop(None)


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def stack(tmp_path: Path, image_cache: Path) -> Iterator[Stack]:
    with services(tmp_path, image_cache) as s:
        yield s
        assert s.leftovers() == []


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The error ``call(*args)`` fails with (fails the test if it succeeds)."""

    def invoke() -> None:
        result = call(*args, timeout=20, **kwargs)
        if isinstance(result, Iterator):  # server streaming: the error comes while reading
            list(result)

    with pytest.raises(grpc.RpcError) as info:
        invoke()
    return info.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *words: str) -> str:
    assert err.code() == code, (err.code(), err.details())
    details: str = err.details() or ""
    for word in words:
        assert word in details, details
    return details


def assert_one_line_exit_2(result: Result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("agent-vm: error: "), err
    for word in words:
        assert word in err, err
    return err


def create_vm(**kw: Any) -> vm_manager_pb2.CreateVMRequest:
    kw.setdefault("network_mode", common_pb2.NETWORK_MODE_ISOLATED)
    return vm_manager_pb2.CreateVMRequest(**kw)


# -- invalid resource profile ----------------------------------------------------------
@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (create_vm(profile=99), ("unknown resource profile 99", "LIGHT, STANDARD or INTENSIVE")),
        (create_vm(resources=common_pb2.Resources(vcpus=UINT32_MAX)), ("vcpus=", "use 1 to 16")),
        (create_vm(resources=common_pb2.Resources(vcpus=17)), ("vcpus=17", "use 1 to 16")),
        (
            create_vm(resources=common_pb2.Resources(memory_mib=UINT64_MAX)),
            ("memory_mib=", "use 128 to"),
        ),
        (create_vm(resources=common_pb2.Resources(memory_mib=64)), ("memory_mib=64", "use 128")),
        (create_vm(resources=common_pb2.Resources(disk_mib=1 << 40)), ("disk_mib=", "use 2048")),
    ],
    ids=["profile-99", "vcpus-negative", "vcpus-17", "memory-huge", "memory-tiny", "disk-huge"],
)
def test_create_vm_with_bad_resources_is_invalid_argument(
    stack: Stack, request_: vm_manager_pb2.CreateVMRequest, words: tuple[str, ...]
) -> None:
    err = rpc_error(stack.vmm.CreateVM, request_)
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, *words)


def test_prepare_template_with_bad_profile_builds_nothing(stack: Stack) -> None:
    for req in (
        vm_manager_pb2.PrepareTemplateRequest(profile=42),  # type: ignore[arg-type]
        vm_manager_pb2.PrepareTemplateRequest(resources=common_pb2.Resources(vcpus=1000)),
    ):
        err = rpc_error(stack.vmm.PrepareTemplate, req)
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "use ")
    templates = stack.settings.state_dir / "templates"
    assert not templates.exists() or not any(templates.iterdir())


def test_sandbox_with_bad_resources_is_invalid_argument_and_frees_its_slot(stack: Stack) -> None:
    for spec in (
        executor_pb2.SandboxSpec(profile=7, workspace_mode=common_pb2.WORKSPACE_MODE_API),  # type: ignore[arg-type]
        executor_pb2.SandboxSpec(
            resources=common_pb2.Resources(memory_mib=10**9),
            workspace_mode=common_pb2.WORKSPACE_MODE_API,
        ),
    ):
        err = rpc_error(stack.ex.CreateSandbox, executor_pb2.CreateSandboxRequest(spec=spec))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "use ")
        assert "agent-vm up" not in (err.details() or "")


def test_cli_bad_profile_and_resources_give_one_line_and_exit_2(stack: Stack) -> None:
    assert_one_line_exit_2(stack.cli("vm", "create", "--profile", "huge"), "'huge'", "light")
    assert_one_line_exit_2(stack.cli("template", "prepare", "--profile", "x"), "intensive")
    assert_one_line_exit_2(stack.cli("run", "--cpus", "-1", "--cmd", "true"), "--cpus", "0<=x<=16")
    assert_one_line_exit_2(
        stack.cli("run", "--memory", str(2**70), "--cmd", "true"), "--memory", "0<=x<="
    )
    assert_one_line_exit_2(stack.cli("run", "--cpus", "lots", "--cmd", "true"), "--cpus")


# -- unknown network mode --------------------------------------------------------------
def test_unknown_network_mode_is_invalid_argument_everywhere(stack: Stack) -> None:
    words = ("unknown network mode 99", "NAT_FILTERED, ISOLATED or BRIDGE")
    err = rpc_error(stack.vmm.CreateVM, create_vm(network_mode=99))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, *words)
    err = rpc_error(
        stack.vmm.PrepareTemplate,
        vm_manager_pb2.PrepareTemplateRequest(network_mode=99),  # type: ignore[arg-type]
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, *words)
    spec = executor_pb2.SandboxSpec(network_mode=99, workspace_mode=common_pb2.WORKSPACE_MODE_API)  # type: ignore[arg-type]
    err = rpc_error(stack.ex.CreateSandbox, executor_pb2.CreateSandboxRequest(spec=spec))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, *words)
    run = executor_pb2.RunRequest(
        spec=spec, program=common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
    )
    err = rpc_error(stack.ex.Run, run)
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, *words)


def no_pool(key: object) -> None:
    raise AssertionError(f"a pool was looked up for {key}")


def test_pool_manager_refuses_an_unknown_network_mode() -> None:
    from agentvm.pool_manager.servicer import PoolManagerServicer

    async def main() -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        # The key is checked before the servicer looks its pool up.
        pool_manager_pb2_grpc.add_PoolManagerServiceServicer_to_server(
            PoolManagerServicer(cast(Any, SimpleNamespace(pool=no_pool))), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio_channel(f"127.0.0.1:{port}", "pool-manager") as channel:
                stub = pool_manager_pb2_grpc.PoolManagerServiceStub(channel)
                for key, words in (
                    (pool_manager_pb2.PoolKey(network_mode=99), ("unknown network mode 99",)),  # type: ignore[arg-type]
                    (pool_manager_pb2.PoolKey(profile=99), ("unknown resource profile 99",)),  # type: ignore[arg-type]
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.AcquireVM(pool_manager_pb2.AcquireVMRequest(key=key))
                    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, *words, "use ")
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- nonexistent files ---------------------------------------------------------------------
@pytest.mark.parametrize("sid", ["sb-api", "sb-shr"], ids=["api-workspace", "shared-workspace"])
def test_reading_or_listing_a_missing_path_is_not_found(stack: Stack, sid: str) -> None:
    err = rpc_error(
        stack.ex.ReadFile, executor_pb2.ReadFileRequest(sandbox_id=sid, path="input/nope.txt")
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "input/nope.txt", "files.list()")
    err = rpc_error(
        stack.ex.ListFiles, executor_pb2.ListFilesRequest(sandbox_id=sid, path="nowhere")
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "nowhere", "files.list()")
    err = rpc_error(
        stack.ex.RemoveFile, executor_pb2.RemoveFileRequest(sandbox_id=sid, path="input/gone")
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "input/gone", "files.list()")
    # The sandbox is fine: what exists is still there.
    listed = stack.ex.ListFiles(
        executor_pb2.ListFilesRequest(sandbox_id=sid, path="input"), timeout=10
    )
    assert [f.path for f in listed.files] == ["input/keep.txt"]


def test_file_calls_on_an_unknown_sandbox_are_not_found(stack: Stack) -> None:
    err = rpc_error(stack.ex.ReadFile, executor_pb2.ReadFileRequest(sandbox_id="sb-x", path="a"))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "sb-x", "closed")


def test_client_upload_of_a_missing_local_file_sends_nothing(stack: Stack, tmp_path: Path) -> None:
    async def main() -> None:
        async with _async._channel(stack.settings.executor_addr) as channel:
            sb = _async.AsyncSandbox(
                stack.settings.executor_addr,
                channel,
                executor_pb2.Sandbox(id="sb-api", vm_name=f"{PREFIX}sb-api"),
            )
            for mode in (None, 0o600):
                with pytest.raises(agent_vm.NotFoundError) as info:
                    await sb.files.upload(tmp_path / "missing.bin", "input/x.bin", mode=mode)
                assert "missing.bin" in info.value.message
                assert "existing" in info.value.message

    asyncio.run(main())
    with pytest.raises(agent_vm.NotFoundError, match=r"missing\.py"):
        agent_vm.run(
            "true", inputs={"x.py": tmp_path / "missing.py"}, address=stack.settings.executor_addr
        )


def test_cli_missing_local_files_give_one_line_and_exit_2(stack: Stack, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert_one_line_exit_2(stack.cli("run", "--input", missing, "--cmd", "true"), missing)
    assert_one_line_exit_2(stack.cli("run", f"{missing}.py"), f"{missing}.py", "--cmd")
    assert_one_line_exit_2(stack.cli("audit", "verify", missing), missing)


# -- negative or huge timeouts ---------------------------------------------------------
def duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@pytest.mark.parametrize("seconds", [-1.0, 10**7], ids=["negative", "huge"])
def test_bad_timeouts_are_invalid_argument_before_anything_is_made(
    stack: Stack, seconds: float
) -> None:
    vm = stack.vmm.CreateVM(create_vm(), timeout=20).vm
    try:
        wait = vm_manager_pb2.WaitVMRequest(
            name=vm.name, state=common_pb2.VM_STATE_READY, timeout=duration(seconds)
        )
        assert_status(
            rpc_error(stack.vmm.WaitVM, wait),
            grpc.StatusCode.INVALID_ARGUMENT,
            "timeout",
            "between",
        )
        stop = vm_manager_pb2.StopVMRequest(name=vm.name, grace_period=duration(seconds))
        assert_status(
            rpc_error(stack.vmm.StopVM, stop), grpc.StatusCode.INVALID_ARGUMENT, "grace_period"
        )
    finally:
        stack.vmm.DestroyVM(vm_manager_pb2.DestroyVMRequest(name=vm.name), timeout=20)
    program = common_pb2.Program(argv=common_pb2.Argv(args=["true"]))
    run = executor_pb2.RunRequest(program=program, timeout=duration(seconds))
    assert_status(
        rpc_error(stack.ex.Run, run), grpc.StatusCode.INVALID_ARGUMENT, "timeout", "between"
    )
    ex = executor_pb2.ExecRequest(sandbox_id="sb-api", program=program, timeout=duration(seconds))
    assert_status(rpc_error(stack.ex.Exec, ex), grpc.StatusCode.INVALID_ARGUMENT, "timeout")
    spec = executor_pb2.SandboxSpec(lifetime=duration(seconds))
    assert_status(
        rpc_error(stack.ex.CreateSandbox, executor_pb2.CreateSandboxRequest(spec=spec)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lifetime",
        "between",
    )
    stats = vm_manager_pb2.ListVMStatsRequest(guest_timeout=duration(seconds))
    assert_status(
        rpc_error(stack.vmm.ListVMStats, stats), grpc.StatusCode.INVALID_ARGUMENT, "guest_timeout"
    )


@pytest.mark.parametrize("value", ["-1", "0", "1e9", "nan", "inf"])
def test_cli_bad_timeouts_give_one_line_and_exit_2(stack: Stack, value: str) -> None:
    assert_one_line_exit_2(stack.cli("run", "--timeout", value, "--cmd", "true"), "--timeout")
    assert_one_line_exit_2(stack.cli("vm", "run", "--timeout", value, "--", "true"), "--timeout")
    assert_one_line_exit_2(
        stack.cli("vm", "exec", "--timeout", value, f"{PREFIX}nothing", "true"), "--timeout"
    )


# -- oversized requests --------------------------------------------------------------------
def test_requests_over_the_message_limit_are_resource_exhausted(stack: Stack) -> None:
    big = "x" * 200
    labels = {f"k{i}": big for i in range(MAX_MESSAGE_BYTES // 200 + 10)}
    # A caller without agent-vm's own send limit: the servers' receive limit answers.
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(stack.settings.vm_manager_addr, options=options) as channel:
        stub = vm_manager_pb2_grpc.VMManagerServiceStub(channel)
        err = rpc_error(stub.CreateVM, create_vm(labels=labels))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")
    content = b"\0" * (MAX_MESSAGE_BYTES + 1)
    run = executor_pb2.RunRequest(
        program=common_pb2.Program(argv=common_pb2.Argv(args=["true"])),
        inputs=[executor_pb2.InputFile(path="big", content=content)],
    )
    with grpc.insecure_channel(stack.settings.executor_addr, options=options) as channel:
        err = rpc_error(executor_pb2_grpc.ExecutorServiceStub(channel).Run, run)
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


def test_client_says_how_to_send_large_inputs(stack: Stack) -> None:
    content = b"\0" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(agent_vm.ResourceExhaustedError) as info:
        agent_vm.run("true", inputs={"big": content}, address=stack.settings.executor_addr)
    assert "larger than max" in info.value.message
    assert "files.upload" in info.value.message


def test_cli_inputs_over_the_limit_give_one_line_and_exit_2(stack: Stack, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(MAX_INLINE_INPUT + 1)  # sparse: nothing is written
    assert_one_line_exit_2(
        stack.cli("run", "--input", str(big), "--cmd", "true"), "--input", "files.upload"
    )


# -- unwritable cache directory --------------------------------------------------------
def test_build_image_into_an_unwritable_cache_is_failed_precondition(tmp_path: Path) -> None:
    cache = READ_ONLY_CACHE / "cache"
    with services(tmp_path, cache) as stack:
        err = rpc_error(stack.vmm.BuildImage, vm_manager_pb2.BuildImageRequest())
        assert_status(
            err, grpc.StatusCode.FAILED_PRECONDITION, str(cache), "AGENTVM_CACHE_DIR", "writable"
        )
        assert_one_line_exit_2(
            stack.cli("image", "build"), "FAILED_PRECONDITION", "AGENTVM_CACHE_DIR"
        )
        # No image there: creating a VM says how to get one, and makes nothing.
        err = rpc_error(stack.vmm.CreateVM, create_vm())
        assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "agent-vm image build")
        assert stack.leftovers() == []
    assert not READ_ONLY_CACHE.exists()


# -- missing image -------------------------------------------------------------------------
def test_missing_image_everywhere_is_failed_precondition(tmp_path: Path) -> None:
    with services(tmp_path, tmp_path / "empty-cache") as stack:
        fix = "agent-vm image build"
        err = rpc_error(stack.vmm.CreateVM, create_vm(start=True))
        assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "no guest image", fix)
        err = rpc_error(stack.vmm.PrepareTemplate, vm_manager_pb2.PrepareTemplateRequest())
        assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, fix)
        spec = executor_pb2.SandboxSpec(
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            workspace_mode=common_pb2.WORKSPACE_MODE_API,
        )
        err = rpc_error(stack.ex.CreateSandbox, executor_pb2.CreateSandboxRequest(spec=spec))
        assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, fix)
        assert_one_line_exit_2(
            stack.cli("vm", "create", "--network", "isolated"), "FAILED_PRECONDITION", fix
        )
        assert_one_line_exit_2(stack.cli("vm", "run", "--network", "isolated", "--", "true"), fix)
        assert_one_line_exit_2(stack.cli("run", "--network", "isolated", "--cmd", "true"), fix)
        assert stack.leftovers() == []
        assert not (tmp_path / "empty-cache").exists()


# -- libvirt down --------------------------------------------------------------------------
def test_libvirt_down_is_unavailable_with_the_fix(tmp_path: Path, image_cache: Path) -> None:
    with services(tmp_path, image_cache, LIBVIRT_DOWN) as stack:
        words = ("cannot connect to libvirt", "Start libvirtd", "AGENTVM_LIBVIRT_URI")
        err = rpc_error(stack.vmm.CreateVM, create_vm(start=True))
        assert_status(err, grpc.StatusCode.UNAVAILABLE, *words)
        err = rpc_error(stack.vmm.GetHostInfo, vm_manager_pb2.GetHostInfoRequest())
        assert_status(err, grpc.StatusCode.UNAVAILABLE, *words)
        spec = executor_pb2.SandboxSpec(
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            workspace_mode=common_pb2.WORKSPACE_MODE_API,
        )
        # API workspace (straight to CreateVM) and the default (GetHostInfo first).
        for mode in (common_pb2.WORKSPACE_MODE_API, common_pb2.WORKSPACE_MODE_UNSPECIFIED):
            spec.workspace_mode = mode
            err = rpc_error(stack.ex.CreateSandbox, executor_pb2.CreateSandboxRequest(spec=spec))
            details = assert_status(err, grpc.StatusCode.UNAVAILABLE, *words)
            # The services are up: telling the user to start them would mislead.
            assert "agent-vm up" not in details
        for args in (
            ("vm", "create", "--network", "isolated"),
            ("run", "--network", "isolated", "--cmd", "true"),
        ):
            err_line = assert_one_line_exit_2(stack.cli(*args), "UNAVAILABLE", *words)
            assert "agent-vm up" not in err_line
        with pytest.raises(agent_vm.UnavailableError) as info:
            agent_vm.run("true", network="isolated", address=stack.settings.executor_addr)
        assert "libvirt" in info.value.message
        assert "executor is not reachable" not in info.value.message
        assert stack.leftovers() == []


def test_services_down_still_says_agent_vm_up(tmp_path: Path) -> None:
    env = {
        "AGENTVM_VM_MANAGER_ADDR": f"unix:{tmp_path}/none.sock",
        "AGENTVM_EXECUTOR_ADDR": f"unix:{tmp_path}/none.sock",
    }
    for args in (("vm", "list"), ("run", "--network", "isolated", "--cmd", "true")):
        result = CliRunner(env=env).invoke(cli, list(args))
        assert_one_line_exit_2(result, "agent-vm up")


def test_up_refuses_one_processs_certificate_for_four_services(tmp_path: Path) -> None:
    env = {
        "AGENTVM_TLS": "mutual",
        "AGENTVM_TLS_CERT": str(tmp_path / "mine.pem"),
        "AGENTVM_RUN_DIR": str(tmp_path / "run"),
        "AGENTVM_LOG_DIR": str(tmp_path / "log"),
    }
    result = CliRunner(env=env).invoke(cli, ["up"])
    assert_one_line_exit_2(result, "AGENTVM_TLS_CERT", "five services", "deploy/systemd")
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "log").exists()


def test_cli_soak_names_a_bad_fault_kind_and_a_missing_supervisor(stack: Stack) -> None:
    assert_one_line_exit_2(
        stack.cli("soak", "--faults", "kill:libvirtd"), "unknown fault kind 'kill:libvirtd'",
        "libvirtd-restart",
    )  # fmt: skip
    assert_one_line_exit_2(stack.cli("soak", "--minutes", "0"), "--minutes", "1<=x<=1440")
    # Not every service of an installation runs here, and no supervisor: it says what to run.
    assert_one_line_exit_2(stack.cli("soak", "--faults", "kill"), "agent-vm up")
