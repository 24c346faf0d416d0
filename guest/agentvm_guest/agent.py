"""The guest agent: GuestAgentService, running inside each VM.

Every Execute runs in its own cgroup (cgroup v2, ``cgroup.kill``) so that a
timeout, a cancel or the end of the main process kills the whole tree, even
processes that called setsid(). Where cgroup v2 is missing the process group
is killed instead. Output is streamed as it is read and capped per stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO

import grpc

from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm_guest import __version__, imageroot, memory, paths
from agentvm_guest.hostconf import configure_dhcp, configure_network, reidentify
from agentvm_guest.pivot import Pivot
from agentvm_guest.ports import PortError, Ports
from agentvm_guest.processes import (
    DEFAULT_TERM,
    EXEC_ID,
    MAX_TAG,
    TERM_NAME,
    BackgroundProcess,
    Launch,
    ProcessError,
    ProcessTable,
    check_pty_size,
    exit_status,
)
from agentvm_guest.proctree import ProcessTree, meminfo, read_first_line
from agentvm_guest.wire import RejectMalformed

log = logging.getLogger("agentvm_guest.agent")

DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
READ_CHUNK = 32 * 1024
# How long output is still read after the tree was killed.
KILL_GRACE_S = 1.0
WORKSPACE = "/workspace"
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONUNBUFFERED": "1",
}


def guest_info() -> common_pb2.GuestInfo:
    """What the agent reports about its VM."""
    info = common_pb2.GuestInfo(agent_version=__version__)
    uname = os.uname()
    info.kernel_release = uname.release
    info.hostname = uname.nodename
    uptime = read_first_line("/proc/uptime", "0 0").split()[0]
    info.uptime.FromNanoseconds(int(float(uptime) * 1e9))
    info.load1, info.load5, info.load15 = os.getloadavg()
    mem = meminfo()
    info.memory_total_bytes = mem.get("MemTotal", 0)
    info.memory_available_bytes = mem.get("MemAvailable", 0)
    st = os.statvfs("/")
    info.disk_total_bytes = st.f_blocks * st.f_frsize
    info.disk_free_bytes = st.f_bavail * st.f_frsize
    info.process_count = sum(1 for d in os.listdir("/proc") if d.isdigit())
    info.boot_id = read_first_line("/proc/sys/kernel/random/boot_id")
    info.machine_id = read_first_line("/etc/machine-id")
    return info


_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _traceparent(context: grpc.ServicerContext) -> str:
    """The caller's W3C traceparent header, if well formed."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str) and _TRACEPARENT.match(value):
            return value
    return ""


def build_argv(program: common_pb2.Program) -> list[str]:
    """argv for a Program; raises ValueError naming what is wrong."""
    kind = program.WhichOneof("kind")
    if kind == "argv":
        args = list(program.argv.args)
        if not args or not args[0]:
            raise ValueError("program.argv.args is empty: give at least the command to run")
        return args
    if kind == "code":
        code = program.code
        if code.language == common_pb2.CODE_LANGUAGE_PYTHON:
            return ["python3", "-c", code.source, *code.args]
        if code.language == common_pb2.CODE_LANGUAGE_SHELL:
            return ["/bin/sh", "-c", code.source, "sh", *code.args]
        raise ValueError(
            "program.code.language must be CODE_LANGUAGE_PYTHON or CODE_LANGUAGE_SHELL"
        )
    raise ValueError("program is empty: set program.argv or program.code")


@dataclass
class _Running:
    tree: ProcessTree
    cancelled: threading.Event = field(default_factory=threading.Event)
    stdin: IO[bytes] | None = None
    stdin_lock: threading.Lock = field(default_factory=threading.Lock)


class GuestAgent(guest_agent_pb2_grpc.GuestAgentServiceServicer):
    """Implements GuestAgentService."""

    def __init__(
        self, workspace: str = WORKSPACE, image: imageroot.ImageRoot | None = None
    ) -> None:
        self.workspace = workspace
        self.image = image or imageroot.ImageRoot()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self.processes = ProcessTable()
        self.ports = Ports()

    def _placement(
        self, cwd: str, extra: Mapping[str, str], context: grpc.ServicerContext
    ) -> tuple[Pivot | None, str | None, dict[str, str]]:
        """Where a program runs (an image's root or the agent's) and its environment."""
        env = dict(DEFAULT_ENV)
        try:
            # A named image: its defaults in env, and the program pivoted into its root.
            pivot = self.image.plan(cwd, env, self.workspace)
        except imageroot.RootError as exc:
            context.abort(exc.code, str(exc))
        where = None if pivot is not None else cwd or "/root"  # else: in the image, pivot.py
        if where is not None and not os.path.isdir(where):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cwd {where!r} is not a directory")
        traceparent = _traceparent(context)
        if traceparent:
            # The caller's trace continues in instrumented agent code.
            env["TRACEPARENT"] = traceparent
        env.update(extra)
        return pivot, where, env

    def GetStatus(
        self, request: guest_agent_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.GetStatusResponse:
        return guest_agent_pb2.GetStatusResponse(info=guest_info())

    def Execute(
        self, request: guest_agent_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> Iterator[guest_agent_pb2.ExecuteResponse]:
        try:
            argv = build_argv(request.program)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 0.0
        if timeout < 0 or timeout > MAX_TIMEOUT_S:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout must be between 0 and {MAX_TIMEOUT_S:.0f} seconds, got {timeout}",
            )
        timeout = timeout or DEFAULT_TIMEOUT_S
        cap = request.max_output_bytes or DEFAULT_MAX_OUTPUT
        pivot, cwd, env = self._placement(request.cwd, request.env, context)
        exec_id = request.exec_id
        if request.keep_stdin_open and not exec_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "keep_stdin_open needs an exec_id")
        tree = ProcessTree()
        running = _Running(tree)
        if exec_id:
            with self._lock:
                if exec_id in self._running or self.processes.get(exec_id) is not None:
                    tree.remove()
                    context.abort(
                        grpc.StatusCode.ALREADY_EXISTS, f"exec_id {exec_id!r} is already running"
                    )
                self._running[exec_id] = running
        context.add_callback(running.cancelled.set)
        start = time.monotonic()
        try:
            try:
                proc = subprocess.Popen(
                    argv,
                    preexec_fn=tree.confiner(pivot),  # noqa: PLW1509 (system calls only, see confine.py)
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"cannot start {argv[0]!r}: {exc}"
                )
            except subprocess.SubprocessError as exc:
                # preexec_fn failed: never run agent code unconfined.
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"cannot confine {argv[0]!r} ({exc}): the guest kernel refused its cgroup "
                    "or capability limits; see the VM's console log",
                )
            tree.pgid = proc.pid
            if proc.stdin is None:
                raise RuntimeError("subprocess stdin pipe missing")
            # stdin is ready for WriteStdin before the caller hears "started",
            # and the initial bytes go first: the feeder holds the lock until
            # it has written them.
            running.stdin = proc.stdin
            running.stdin_lock.acquire()
            threading.Thread(
                target=_feed_stdin,
                args=(running, proc.stdin, request.stdin, request.keep_stdin_open),
                daemon=True,
            ).start()
            yield guest_agent_pb2.ExecuteResponse(started=common_pb2.ProcessStarted(pid=proc.pid))
            yield from self._pump(proc, running, start + timeout, cap, start)
        finally:
            tree.kill_all()
            tree.remove()
            if exec_id:
                with self._lock:
                    self._running.pop(exec_id, None)

    def _pump(
        self,
        proc: subprocess.Popen[bytes],
        running: _Running,
        deadline: float,
        cap: int,
        start: float,
    ) -> Iterator[guest_agent_pb2.ExecuteResponse]:
        if proc.stdout is None or proc.stderr is None:
            raise RuntimeError("subprocess pipes missing")
        tree = running.tree
        sel = selectors.DefaultSelector()
        streams = {
            proc.stdout.fileno(): common_pb2.OUTPUT_STREAM_STDOUT,
            proc.stderr.fileno(): common_pb2.OUTPUT_STREAM_STDERR,
        }
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sent = {common_pb2.OUTPUT_STREAM_STDOUT: 0, common_pb2.OUTPUT_STREAM_STDERR: 0}
        truncated = dict.fromkeys(sent, False)
        timed_out = False
        killed = False
        drain_until = 0.0
        open_fds = set(streams)
        while open_fds:
            now = time.monotonic()
            if killed and now >= drain_until:
                # Something outside the tree (no cgroups here) still holds the
                # pipes: stop waiting for EOF rather than overrun the timeout.
                log.warning("output pipes still open %.1f s after the kill; closing", KILL_GRACE_S)
                break
            if not killed and (now >= deadline or running.cancelled.is_set()):
                timed_out = not running.cancelled.is_set()
                tree.kill_all()
                killed = True
                drain_until = now + KILL_GRACE_S
            if not killed and proc.poll() is not None:
                # The main process ended: whatever it left behind dies with it,
                # so the pipes reach EOF.
                tree.kill_all()
                killed = True
                drain_until = now + KILL_GRACE_S
            if not killed:
                tree.sample()
            wait = 0.1 if killed else min(0.1, max(0.0, deadline - now))
            for key, _ in sel.select(wait):
                fd = int(key.fd)
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                stream = streams[fd]
                room = cap - sent[stream]
                if room <= 0:
                    truncated[stream] = True
                    continue
                if len(data) > room:
                    data = data[:room]
                    truncated[stream] = True
                sent[stream] += len(data)
                yield guest_agent_pb2.ExecuteResponse(
                    output=common_pb2.OutputChunk(stream=stream, data=data)
                )
        sel.close()
        rc = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        status = exit_status(rc, timed_out=timed_out, start=start, tree=tree)
        status.stdout_truncated = truncated[common_pb2.OUTPUT_STREAM_STDOUT]
        status.stderr_truncated = truncated[common_pb2.OUTPUT_STREAM_STDERR]
        yield guest_agent_pb2.ExecuteResponse(exited=status)

    def _execution(
        self,
        exec_id: str,
        context: grpc.ServicerContext,
        on_background: Callable[[BackgroundProcess], None],
    ) -> _Running | None:
        """The running Execute named ``exec_id``; or, for a background process,
        ``on_background`` done to it and None. NOT_FOUND when neither exists."""
        with self._lock:
            running = self._running.get(exec_id)
        if running is not None:
            return running
        background = self.processes.get(exec_id)
        if background is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no running execution {exec_id!r}")
        try:
            on_background(background)
        except ProcessError as exc:
            context.abort(exc.code, str(exc))
        return None

    def SignalProcess(
        self, request: guest_agent_pb2.SignalProcessRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.SignalProcessResponse:
        try:
            signum = signal.Signals(request.signal)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown signal {request.signal}")
        running = self._execution(request.exec_id, context, lambda bg: bg.signal(signum))
        if running is None:
            return guest_agent_pb2.SignalProcessResponse()
        if signum == signal.SIGKILL:
            running.tree.kill_all()
        else:
            running.tree.signal(signum)
        return guest_agent_pb2.SignalProcessResponse()

    def WriteStdin(
        self, request: guest_agent_pb2.WriteStdinRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.WriteStdinResponse:
        running = self._execution(
            request.exec_id, context, lambda bg: bg.write_stdin(request.data, request.eof)
        )
        if running is None:
            return guest_agent_pb2.WriteStdinResponse()
        with running.stdin_lock:
            pipe = running.stdin
            if pipe is None:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"stdin of {request.exec_id!r} is closed (start it with keep_stdin_open)",
                )
            try:
                if request.data:
                    pipe.write(request.data)
                    pipe.flush()
            except (OSError, ValueError) as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"stdin write failed: {exc}")
            finally:
                if request.eof:
                    running.stdin = None
                    with contextlib.suppress(OSError):
                        pipe.close()
        return guest_agent_pb2.WriteStdinResponse()

    # -- background processes (processes.py) -----------------------------

    def StartProcess(
        self,
        request: guest_agent_pb2.GuestAgentServiceStartProcessRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceStartProcessResponse:
        try:
            launch = self._launch(request, context)
            with self._lock:
                if launch.exec_id in self._running:
                    raise ProcessError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"exec_id {launch.exec_id!r} is already running; choose another",
                    )
            pivot = self._placement(request.cwd, {}, context)[0]
            proc = self.processes.start(launch, lambda tree: tree.confiner(pivot))
        except ProcessError as exc:
            context.abort(exc.code, str(exc))
        out = guest_agent_pb2.GuestAgentServiceStartProcessResponse(pid=proc.pid)
        out.started_at.FromNanoseconds(int(proc.started_wall * 1e9))
        return out

    def _launch(
        self,
        request: guest_agent_pb2.GuestAgentServiceStartProcessRequest,
        context: grpc.ServicerContext,
    ) -> Launch:
        if not EXEC_ID.fullmatch(request.exec_id):
            raise ProcessError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"exec_id must be 1-64 of [A-Za-z0-9._-], got {request.exec_id[:80]!r}",
            )
        if len(request.tag.encode()) > MAX_TAG:
            raise ProcessError(
                grpc.StatusCode.INVALID_ARGUMENT, f"tag is longer than {MAX_TAG} bytes"
            )
        try:
            argv = build_argv(request.program)
        except ValueError as exc:
            raise ProcessError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 0.0
        if timeout < 0 or timeout > MAX_TIMEOUT_S:
            raise ProcessError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout must be between 0 and {MAX_TIMEOUT_S:.0f} seconds, got {timeout}",
            )
        pty: tuple[int, int, str] | None = None
        if request.HasField("pty"):
            rows, cols = check_pty_size(request.pty.size)
            term = request.pty.term or DEFAULT_TERM
            if not TERM_NAME.fullmatch(term):
                raise ProcessError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"pty.term must be 1-64 of [A-Za-z0-9._+-], got {term[:80]!r}",
                )
            pty = (rows, cols, term)
        _, cwd, env = self._placement(request.cwd, request.env, context)
        return Launch(
            exec_id=request.exec_id,
            argv=argv,
            cwd=cwd,
            env=env,
            tag=request.tag,
            pty=pty,
            timeout=timeout,
            keep_stdin_open=request.keep_stdin_open,
        )

    def ConnectProcess(
        self,
        request: guest_agent_pb2.GuestAgentServiceConnectProcessRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[guest_agent_pb2.GuestAgentServiceConnectProcessResponse]:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        try:
            proc = self.processes.lookup(request.exec_id)
            with self.processes.stream_slot():
                for event in proc.events(request.offset, cancelled):
                    yield guest_agent_pb2.GuestAgentServiceConnectProcessResponse(event=event)
        except ProcessError as exc:
            context.abort(exc.code, str(exc))

    def ListProcesses(
        self,
        request: guest_agent_pb2.GuestAgentServiceListProcessesRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceListProcessesResponse:
        return guest_agent_pb2.GuestAgentServiceListProcessesResponse(
            processes=self.processes.list()
        )

    def ResizePty(
        self,
        request: guest_agent_pb2.GuestAgentServiceResizePtyRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceResizePtyResponse:
        try:
            rows, cols = check_pty_size(request.size)
            self.processes.lookup(request.exec_id).resize(rows, cols)
        except ProcessError as exc:
            context.abort(exc.code, str(exc))
        return guest_agent_pb2.GuestAgentServiceResizePtyResponse()

    def OpenPort(
        self,
        request_iterator: Iterator[guest_agent_pb2.GuestAgentServiceOpenPortRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[guest_agent_pb2.GuestAgentServiceOpenPortResponse]:
        try:
            yield from self.ports.open(request_iterator, context)
        except PortError as exc:
            context.abort(exc.code, str(exc))

    # -- files under /workspace -------------------------------------------
    def WriteFile(
        self,
        request_iterator: Iterator[guest_agent_pb2.GuestAgentServiceWriteFileRequest],
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceWriteFileResponse:
        writer: paths.AtomicWriter | None = None
        expected = ""
        try:
            for msg in request_iterator:
                if writer is None:
                    writer = paths.AtomicWriter(self.workspace, msg.path, msg.mode or 0o644)
                if msg.chunk:
                    writer.write(msg.chunk)
                if msg.sha256:
                    expected = msg.sha256
            if writer is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WriteFile got no message")
            writer.commit(expected)
            return guest_agent_pb2.GuestAgentServiceWriteFileResponse(
                size_bytes=writer.size, sha256=writer.sha256
            )
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot write: {exc}")
        finally:
            if writer is not None:
                writer.abort()  # no-op once committed

    def ReadFile(
        self,
        request: guest_agent_pb2.GuestAgentServiceReadFileRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[guest_agent_pb2.GuestAgentServiceReadFileResponse]:
        h = hashlib.sha256()
        first = True
        try:
            for data, size in paths.read_chunks(
                self.workspace,
                request.path,
                max_bytes=request.max_bytes,
                refuse_sparse=request.refuse_sparse,
            ):
                h.update(data)
                msg = guest_agent_pb2.GuestAgentServiceReadFileResponse(chunk=data)
                if first:
                    msg.size_bytes = size
                    first = False
                yield msg
        except paths.SparseError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except paths.LimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path!r} in the workspace")
        yield guest_agent_pb2.GuestAgentServiceReadFileResponse(sha256=h.hexdigest())

    def ListFiles(
        self,
        request: guest_agent_pb2.GuestAgentServiceListFilesRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceListFilesResponse:
        try:
            entries = paths.list_dir(
                self.workspace,
                request.path,
                recursive=request.recursive,
                limit=min(request.max_entries or paths.MAX_LIST_ENTRIES, paths.MAX_LIST_ENTRIES),
                max_bytes=min(request.max_bytes or paths.MAX_LIST_BYTES, paths.MAX_LIST_BYTES),
            )
        except paths.LimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"no directory {request.path!r} in the workspace"
            )
        resp = guest_agent_pb2.GuestAgentServiceListFilesResponse()
        for e in entries:
            info = resp.files.add(path=e.path, size_bytes=e.size, mode=e.mode, is_dir=e.is_dir)
            info.modified_at.FromNanoseconds(int(e.mtime * 1e9))
        return resp

    def RemoveFile(
        self,
        request: guest_agent_pb2.GuestAgentServiceRemoveFileRequest,
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.GuestAgentServiceRemoveFileResponse:
        try:
            paths.remove(self.workspace, request.path, recursive=request.recursive)
        except paths.PathError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path!r} in the workspace")
        return guest_agent_pb2.GuestAgentServiceRemoveFileResponse()

    def Shutdown(
        self, request: guest_agent_pb2.ShutdownRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ShutdownResponse:
        threading.Thread(target=_power_off, daemon=True).start()
        return guest_agent_pb2.ShutdownResponse()

    def ReseedRandom(
        self, request: guest_agent_pb2.ReseedRandomRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReseedRandomResponse:
        if len(request.seed) < 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "seed must be at least 32 bytes")
        with open("/dev/urandom", "wb") as fh:
            fh.write(request.seed[:4096])
        return guest_agent_pb2.ReseedRandomResponse()

    def ReclaimMemory(
        self, request: guest_agent_pb2.ReclaimMemoryRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReclaimMemoryResponse:
        try:
            free, total = memory.reclaim()
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"cannot reclaim memory: {exc}")
        log.info("memory reclaimed: %d of %d MiB free", free >> 20, total >> 20)
        return guest_agent_pb2.ReclaimMemoryResponse(free_bytes=free, total_bytes=total)

    def Reidentify(
        self, request: guest_agent_pb2.ReidentifyRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ReidentifyResponse:
        wall = request.wall_clock.ToNanoseconds() if request.HasField("wall_clock") else 0
        try:
            reidentify(request.hostname, request.machine_id, request.seed, wall)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"reidentify failed: {exc}")
        log.info("reidentified as %s", request.hostname)
        return guest_agent_pb2.ReidentifyResponse(info=guest_info())

    def ConfigureNetwork(
        self, request: guest_agent_pb2.ConfigureNetworkRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ConfigureNetworkResponse:
        try:
            if request.dhcp:
                if request.address or request.gateway or request.nameservers:
                    raise ValueError("dhcp excludes address, gateway and nameservers")
                address = configure_dhcp(request.mac)
            else:
                configure_network(
                    request.mac, request.address, request.gateway, list(request.nameservers)
                )
                address = request.address
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"network setup failed: {exc}")
        log.info("eth0 configured: %s", address)
        return guest_agent_pb2.ConfigureNetworkResponse(address=address)

    def ConfigureRoot(
        self, request: guest_agent_pb2.ConfigureRootRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.ConfigureRootResponse:
        try:
            mount_point = self.image.configure(request)
        except imageroot.RootError as exc:
            context.abort(exc.code, str(exc))
        log.info("image root (disk %s) at %s", request.serial, mount_point)
        return guest_agent_pb2.ConfigureRootResponse(mount_point=mount_point)

    def ApplyLayer(
        self,
        request_iterator: Iterator[guest_agent_pb2.ApplyLayerRequest],
        context: grpc.ServicerContext,
    ) -> guest_agent_pb2.ApplyLayerResponse:
        try:
            result = self.image.apply_layer(request_iterator)
        except imageroot.RootError as exc:
            context.abort(exc.code, str(exc))
        return guest_agent_pb2.ApplyLayerResponse(
            entries=result.entries, whiteouts=result.whiteouts
        )


def _feed_stdin(running: _Running, pipe: IO[bytes], data: bytes, keep_open: bool) -> None:
    """Write the initial stdin; the caller acquired ``running.stdin_lock`` for us."""
    try:
        if data:
            pipe.write(data)
            pipe.flush()
    except (OSError, ValueError):
        keep_open = False
    finally:
        if not keep_open:
            running.stdin = None
            with contextlib.suppress(OSError):
                pipe.close()
        running.stdin_lock.release()


def _power_off() -> None:
    """Flush and power off; busybox init powers off on SIGUSR2."""
    time.sleep(0.2)
    os.sync()
    if os.getpid() != 1:
        with contextlib.suppress(OSError):
            os.kill(1, signal.SIGUSR2)


def serve(address: str, max_workers: int = 96) -> grpc.Server:
    """Start the agent's gRPC server on ``address`` (e.g. ``unix:/run/agentvm/agent.sock``)."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
        interceptors=[RejectMalformed()],
    )
    guest_agent_pb2_grpc.add_GuestAgentServiceServicer_to_server(GuestAgent(), server)
    server.add_insecure_port(address)
    server.start()
    return server


def connect_unix(path: str) -> socket.socket:
    """A connected Unix socket to ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock
