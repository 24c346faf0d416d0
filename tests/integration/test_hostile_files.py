"""Hostile workspace trees and output files on real VMs (issue 22, items 3, 4 and 7).

The guest builds what the adversarial review built: 700 nested directories
with 255-byte names over 1,500 files (one recursive ListFiles took the
executor from 68 MiB to 1.5 GiB), 1,200 nested levels (RecursionError ->
INTERNAL), and a tree of long paths; and a program that leaves a 15 TiB
sparse file under output/ (streamed as zeros until the caller's deadline).
Each runs against a shared workspace (the host walks the directory itself)
and an API workspace (the guest agent does), and the executor must answer
with the clear error or refusal, stay within a memory bound, and go on
serving.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

import agent_vm
from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from tests.vmharness import ExecutorProcess, wait_for

pytestmark = pytest.mark.vm

MODES = ["shared", "api"]
MiB = 1024 * 1024
# How much the executor's peak RSS (VmHWM) may grow while it answers the
# hostile listings and runs of one test.
RSS_BOUND_KIB = 200 * 1024

BUILD_TREES = r"""
import os

def nest(top, name, levels, files=0, fname="f"):
    os.makedirs(top, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    for i in range(files):
        os.close(os.open(f"{i:05d}{fname}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)

W = "/workspace/work"
# The reported attack: 700 levels of 255-byte names over 1,500 files.
nest(W + "/long", "L" * 255, 700, 1500)
# Deeper than Python's recursion limit, short names (under PATH_MAX at every level).
nest(W + "/deep", "d", 1200)
# Paths near PATH_MAX, 2,100 of them: more than 8 MiB of path names.
nest(W + "/wide", "W" * 255, 15, 2100, "w" * 190)
# Planted in a tree the caller will remove: a link to a host directory, a FIFO.
os.symlink(HOST_DIR, W + "/long/" + "L" * 255 + "/host")
os.mkfifo(W + "/long/" + "L" * 255 + "/fifo")
print("built")
"""


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def hwm_kib(executor: ExecutorProcess) -> int:
    """The executor's peak resident memory so far (KiB)."""
    assert executor.proc is not None
    return status_kib(executor.proc.pid, "VmHWM")


@pytest.fixture(scope="module", params=MODES)
def sandbox(
    request: pytest.FixtureRequest, executor: ExecutorProcess
) -> Iterator[agent_vm.Sandbox]:
    sb = agent_vm.Sandbox.create(workspace=request.param, lifetime=1800, network="isolated")
    try:
        assert sb.workspace_mode == request.param
        yield sb
    finally:
        sb.close()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory a guest symlink points at (it must be left alone)."""
    d = Path("/tmp") / f"agentvm-host-{secrets.token_hex(4)}"
    d.mkdir()
    (d / "precious").write_text("keep")
    yield d
    (d / "precious").unlink()
    d.rmdir()


def test_hostile_trees_are_refused_with_the_limit_named_in_bounded_memory(
    sandbox: agent_vm.Sandbox, executor: ExecutorProcess, host_dir: Path
) -> None:
    built = sandbox.run(
        ["python3", "-c", f"HOST_DIR = {str(host_dir)!r}\n" + BUILD_TREES], timeout=600
    ).check()
    assert built.stdout == "built\n"
    before = hwm_kib(executor)
    errors: dict[str, agent_vm.AgentVMError | None] = {}
    for path in ("work/long", "", "work/wide"):
        try:
            sandbox.files.list(path, recursive=True)
            errors[path] = None
        except agent_vm.AgentVMError as exc:
            errors[path] = exc
    grown = hwm_kib(executor) - before
    print(f"[{sandbox.workspace_mode}] listings: {errors}; executor peak RSS +{grown} KiB")
    # The reported attack: refused where a path would pass PATH_MAX.
    assert isinstance(errors["work/long"], agent_vm.ResourceExhaustedError), errors
    assert re.search(r"longer than 4096 bytes \(PATH_MAX\)", errors["work/long"].message)
    # The whole workspace: "deep" comes first (sorted), past the depth limit.
    assert isinstance(errors[""], agent_vm.ResourceExhaustedError), errors
    assert "more than 256 levels deep" in errors[""].message
    assert isinstance(errors["work/wide"], agent_vm.ResourceExhaustedError), errors
    assert "passes 8388608 bytes of path names" in errors["work/wide"].message
    assert grown < RSS_BOUND_KIB, f"the executor's peak RSS grew by {grown} KiB"
    # Narrower listings work, and the executor serves.
    assert [f.path for f in sandbox.files.list("work")] == ["work/deep", "work/long", "work/wide"]
    assert sandbox.run("echo alive").stdout == "alive\n"
    # The trees go with a recursive remove (shutil.rmtree: RecursionError at
    # 1,000 levels); the link to the host directory is removed, not followed.
    for tree in ("work/long", "work/deep", "work/wide"):
        sandbox.files.remove(tree, recursive=True)
    assert sandbox.files.list("work") == []
    assert (host_dir / "precious").read_text() == "keep"
    grown = hwm_kib(executor) - before
    assert grown < RSS_BOUND_KIB, f"the executor's peak RSS grew by {grown} KiB"


RACE = r"""
import os, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
base = "/workspace/work/race"
end = time.time() + seconds
n = 0
# Until the caller's removals are over (it writes the stop file), at most `seconds`.
while time.time() < end and not os.path.exists("/workspace/work/race-stop"):
    v = base + "/v"
    try:
        os.makedirs(v + "/x/y", exist_ok=True)
        open(v + "/x/y/f", "w").close()
        os.rename(v, base + "/old%d" % n)  # the directory goes away...
        os.symlink(host, v)  # ...a link to a host directory takes its place
        os.unlink(v)
        os.mkfifo(v)  # ...then a FIFO
        os.unlink(v)
    except OSError:
        pass
    n += 1
print(n)
"""


def test_recursive_remove_racing_a_guest_that_swaps_dirs_for_links_and_fifos(
    sandbox: agent_vm.Sandbox, executor: ExecutorProcess, host_dir: Path
) -> None:
    """A guest flips a directory into a symlink to a host directory and a FIFO while
    the caller removes the tree: every RemoveFile ends (no worker blocked on a
    FIFO), with success or a clear error, and the host directory is untouched."""
    stub = executor_pb2_grpc.ExecutorServiceStub(executor.channel())
    handle = sandbox.start(["python3", "-c", RACE, str(host_dir), "100"], timeout=120)
    assert wait_for(lambda: "work/race" in {f.path for f in sandbox.files.list("work")}, 60)
    codes: dict[str, int] = {}
    for _ in range(200):
        try:
            stub.RemoveFile(
                executor_pb2.RemoveFileRequest(
                    sandbox_id=sandbox.id, path="work/race", recursive=True
                ),
                timeout=60,
            )
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1
    # Every removal above raced the flipping guest: it flips until told to stop.
    sandbox.files.write("work/race-stop", b"")
    flips = handle.wait()
    print(f"[{sandbox.workspace_mode}] removals racing {flips.stdout.strip()} flips: {codes}")
    assert flips.exit_code == 0, flips.stderr
    assert set(codes) <= {"OK", "NOT_FOUND", "INVALID_ARGUMENT"}, codes
    assert codes.get("OK", 0) > 0, codes
    assert sorted(os.listdir(host_dir)) == ["precious"]
    assert (host_dir / "precious").read_text() == "keep"
    with contextlib.suppress(agent_vm.NotFoundError):
        sandbox.files.remove("work/race", recursive=True)
    sandbox.files.remove("work/race-stop")
    assert sandbox.run("echo alive").stdout == "alive\n"


def test_output_listing_past_the_limits_is_reported_not_collected(
    executor: ExecutorProcess,
) -> None:
    result = agent_vm.run(
        # 10,001 empty regular files (0644), made by mknod relative to the directory:
        # one virtiofs request each instead of open's several (33 s -> 14 s under TCG).
        code=(
            "import os, stat\n"
            "os.makedirs('/workspace/output/many')\n"
            "fd = os.open('/workspace/output/many', os.O_RDONLY | os.O_DIRECTORY)\n"
            "for i in range(10001):\n"
            "    os.mknod(str(i), stat.S_IFREG | 0o644, dir_fd=fd)\n"
        ),
        download_outputs=True,
        network="isolated",
        timeout=600,
    )
    assert result.exit_code == 0, result.stderr
    assert "more than 10000 entries" in result.output_files_error
    assert result.output_files == ()


def run_request(mode: str, code: str) -> executor_pb2.RunRequest:
    req = executor_pb2.RunRequest(
        spec=executor_pb2.SandboxSpec(
            network_mode=common_pb2.NETWORK_MODE_ISOLATED,
            workspace_mode=(
                common_pb2.WORKSPACE_MODE_SHARED
                if mode == "shared"
                else common_pb2.WORKSPACE_MODE_API
            ),
        ),
        program=common_pb2.Program(
            code=common_pb2.Code(language=common_pb2.CODE_LANGUAGE_SHELL, source=code)
        ),
        return_output_files=True,
    )
    req.timeout.FromSeconds(300)
    return req


SPARSE_PROGRAM = (
    "truncate -s 15T /workspace/output/result.bin && "
    "truncate -s 900M /workspace/output/holes.bin && "
    "echo fine > /workspace/output/small.txt"
)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_15t_output_file_is_refused_not_streamed(
    executor: ExecutorProcess, mode: str
) -> None:
    """`truncate -s 15T output/result.bin` with return_output_files: refused, not 15 TiB."""
    before = hwm_kib(executor)
    stub = executor_pb2_grpc.ExecutorServiceStub(executor.channel())
    chunks: dict[str, int] = {}
    result = None
    # Without the caps this stream lasts until the deadline (15 TiB at ~121 MiB/s).
    for ev in stub.Run(run_request(mode, SPARSE_PROGRAM), timeout=900):
        if ev.HasField("file"):
            chunks[ev.file.path] = chunks.get(ev.file.path, 0) + len(ev.file.data)
        elif ev.HasField("result"):
            result = ev.result
    assert result is not None
    assert result.status.exit_code == 0
    assert chunks == {"small.txt": 5}
    assert [(f.path, f.size_bytes) for f in result.output_files] == [("small.txt", 5)]
    reasons = {s.path: s.reason for s in result.skipped_output_files}
    assert reasons == {
        "result.bin": executor_pb2.OUTPUT_FILE_SKIP_REASON_TOO_LARGE,
        "holes.bin": executor_pb2.OUTPUT_FILE_SKIP_REASON_SPARSE,
    }
    details = {s.path: s.detail for s in result.skipped_output_files}
    assert "max_output_file_bytes" in details["result.bin"]
    assert "sparse" in details["holes.bin"]
    grown = hwm_kib(executor) - before
    print(f"[{mode}] Run with a 15 TiB output file: executor peak RSS +{grown} KiB")
    assert grown < RSS_BOUND_KIB, f"the executor's peak RSS grew by {grown} KiB"
    assert executor.health() == health_pb2.HealthCheckResponse.SERVING


def test_client_streams_outputs_to_disk_and_reports_refused_ones(
    executor: ExecutorProcess, tmp_path: Path
) -> None:
    result = agent_vm.run(
        SPARSE_PROGRAM + " && head -c 3000000 /dev/urandom > /workspace/output/data.bin",
        outputs_dir=tmp_path / "out",
        network="isolated",
        max_output_file_bytes=100 * MiB,
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["data.bin", "small.txt"]
    assert (tmp_path / "out" / "small.txt").read_text() == "fine\n"
    assert (tmp_path / "out" / "data.bin").stat().st_size == 3_000_000
    assert result.output_contents == {}
    assert {s.path: s.reason for s in result.skipped_output_files} == {
        "result.bin": "too_large",
        "holes.bin": "too_large",
    }


def test_read_file_refuses_sparse_and_oversized_files(sandbox: agent_vm.Sandbox) -> None:
    sandbox.run(
        "truncate -s 15T /workspace/work/huge && truncate -s 900M /workspace/work/holes"
    ).check()
    with pytest.raises(agent_vm.ResourceExhaustedError, match="over the limit"):
        sandbox.files.read("work/huge")
    with pytest.raises(agent_vm.FailedPreconditionError, match="is sparse"):
        sandbox.files.read("work/holes")
    sandbox.files.write("work/ten", b"0123456789")
    with pytest.raises(agent_vm.ResourceExhaustedError, match="over the limit of 5 bytes"):
        sandbox.files.read("work/ten", max_bytes=5)
    assert sandbox.files.read("work/ten", max_bytes=10) == b"0123456789"
    for name in ("huge", "holes", "ten"):
        sandbox.files.remove(f"work/{name}")


def test_read_file_over_the_server_cap_is_invalid(sandbox: agent_vm.Sandbox) -> None:
    sandbox.files.write("work/x", b"x")
    with pytest.raises(agent_vm.InvalidArgumentError, match="AGENTVM_MAX_OUTPUT_FILE_BYTES"):
        sandbox.files.read("work/x", max_bytes=2**62)
    sandbox.files.remove("work/x")


def test_the_executor_is_alive_after_the_hostile_files(executor: ExecutorProcess) -> None:
    """The executor is still healthy at the end of the module (nothing above crashed it)."""
    assert executor.health() == health_pb2.HealthCheckResponse.SERVING
    assert executor.proc is not None
    assert executor.proc.poll() is None
    with pytest.raises(grpc.RpcError):
        executor_pb2_grpc.ExecutorServiceStub(executor.channel()).GetSandbox(
            executor_pb2.GetSandboxRequest(sandbox_id="sb-none"), timeout=10
        )
