"""The guest agent: GuestAgentService, running inside each VM.

Every Execute runs in its own cgroup (cgroup v2, ``cgroup.kill``) so that a
timeout, a cancel or the end of the main process kills the whole tree, even
processes that called setsid(). Where cgroup v2 is missing the process group
is killed instead. Output is streamed as it is read and capped per stream.
"""

from __future__ import annotations

import contextlib
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
from agentvm_guest import imageroot, spawner
from agentvm_guest.agent_files import WorkspaceFiles
from agentvm_guest.agent_host import HostService
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
    wait_main,
)
from agentvm_guest.proctree import KEEPER, ProcessTree
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


class GuestAgent(HostService, WorkspaceFiles, guest_agent_pb2_grpc.GuestAgentServiceServicer):
    """Implements GuestAgentService: commands and background processes here, the
    workspace's files in agent_files.py, what the host sets and asks in agent_host.py."""

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
        tree = KEEPER.take()
        running = _Running(tree)
        if exec_id:
            with self._lock:
                if exec_id in self._running or self.processes.get(exec_id) is not None:
                    KEEPER.retire(tree)
                    context.abort(
                        grpc.StatusCode.ALREADY_EXISTS, f"exec_id {exec_id!r} is already running"
                    )
                self._running[exec_id] = running
        context.add_callback(running.cancelled.set)
        start = time.monotonic()
        try:
            try:
                proc = spawner.popen(
                    argv,
                    preexec=tree.confiner(pivot),
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
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
            if request.stdin or request.keep_stdin_open:
                running.stdin = proc.stdin
                running.stdin_lock.acquire()
                threading.Thread(
                    target=_feed_stdin,
                    args=(running, proc.stdin, request.stdin, request.keep_stdin_open),
                    daemon=True,
                ).start()
            else:  # nothing to write: EOF now, without a thread for it
                proc.stdin.close()
            yield guest_agent_pb2.ExecuteResponse(started=common_pb2.ProcessStarted(pid=proc.pid))
            yield from self._pump(proc, running, start + timeout, cap, start)
        finally:
            tree.kill_all()
            KEEPER.retire(tree)
            if exec_id:
                with self._lock:
                    self._running.pop(exec_id, None)

    def _pump(
        self,
        proc: spawner.Proc,
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
        rc, late = wait_main(proc, tree, deadline, running.cancelled.is_set, killed=killed)
        timed_out = timed_out or late
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
