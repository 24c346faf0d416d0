"""Background processes: started, left running, reconnected to (docs/SANDBOXES.md, 3).

A process started by StartProcess outlives the call. Its output (pipes, or
a pseudo-terminal) goes to a bounded ring buffer with byte offsets counted
over the whole output, so a client can reconnect from where it left off and
is told, once, what it missed when the ring wrapped. The table keeps the
running processes (at most ``MAX_RUNNING``) and the last ``MAX_ENDED``
ended ones with their exit status.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import re
import selectors
import shlex
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from agentvm.v1 import common_pb2
from agentvm_guest import spawner
from agentvm_guest.proctree import KEEPER, ProcessTree

log = logging.getLogger("agentvm_guest.processes")

Stream: TypeAlias = common_pb2.OutputStream.ValueType

RING_BYTES = 256 * 1024
MAX_RUNNING = 64
MAX_ENDED = 1000
# Output the ended processes keep, all together (the newest keep theirs).
ENDED_OUTPUT_BYTES = 16 * 1024 * 1024
MAX_STREAMS = 16
READ_CHUNK = 32 * 1024
KILL_GRACE_S = 1.0
STDIN_WRITE_S = 10.0
EXEC_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
TERM_NAME = re.compile(r"[A-Za-z0-9._+-]{1,64}")
MAX_TAG = 128
MAX_COMMAND = 1024
MAX_PTY_CELLS = 1000
DEFAULT_TERM = "xterm-256color"


class ProcessError(Exception):
    """A refused request, with the status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def exit_status(
    rc: int, *, timed_out: bool, start: float, tree: ProcessTree
) -> common_pb2.ExitStatus:
    """The ExitStatus of a process tree whose main process returned ``rc``."""
    status = common_pb2.ExitStatus(timed_out=timed_out, usage=tree.usage())
    if rc < 0:
        status.signal = -rc
        status.exit_code = 128 - rc
    else:
        status.exit_code = rc
    if timed_out:
        status.exit_code = 124
    status.duration.FromNanoseconds(int((time.monotonic() - start) * 1e9))
    return status


def wait_main(
    proc: spawner.Proc,
    tree: ProcessTree,
    deadline: float,
    cancelled: Callable[[], bool] = lambda: False,
    *,
    killed: bool = False,
) -> tuple[int, bool]:
    """The main process's return code once its output has ended, and whether its
    time ran out. A program can close its stdout and stderr and run on: its
    deadline (0: none) and a cancel still hold, and then its tree is killed.

    A program can also stop the spawner (SIGSTOP) and exit: its status then
    never comes. Once it has been dead and unreaped for KILL_GRACE_S the
    spawner is replaced (spawner.unstick), which reports it killed.
    ``killed``: the caller has killed the tree already."""
    stop, timed_out = killed, False
    dead_since = 0.0
    while True:
        left = deadline - time.monotonic() if deadline and not (stop or timed_out) else 0.1
        try:
            return proc.wait(timeout=min(0.1, max(0.0, left))), timed_out
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if not spawner.unreaped(proc):
            dead_since = 0.0
        elif not dead_since:
            dead_since = now
        elif now - dead_since > KILL_GRACE_S:
            spawner.unstick(proc)
        if not (stop or timed_out):
            stop = cancelled()
            if stop or (deadline and now >= deadline):
                timed_out = not stop
                tree.kill_all()


def check_pty_size(size: common_pb2.PtySize) -> tuple[int, int]:
    """(rows, cols) of ``size``, each 1 to MAX_PTY_CELLS."""
    if not (1 <= size.rows <= MAX_PTY_CELLS and 1 <= size.cols <= MAX_PTY_CELLS):
        raise ProcessError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"pty size must be 1-{MAX_PTY_CELLS} rows and columns, got {size.rows}x{size.cols}",
        )
    return size.rows, size.cols


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class OutputRing:
    """The last ``capacity`` bytes of a process's output, by offset."""

    def __init__(self, capacity: int = RING_BYTES) -> None:
        self.capacity = capacity
        self._chunks: collections.deque[tuple[int, Stream, bytes]] = collections.deque()
        self.start = 0  # the first offset held
        self.end = 0  # the offset the next byte gets
        self._held = 0

    def append(self, stream: Stream, data: bytes) -> None:
        self._chunks.append((self.end, stream, data))
        self.end += len(data)
        self._held += len(data)
        while self._held > self.capacity and self._chunks:
            offset, _, old = self._chunks.popleft()
            self._held -= len(old)
            self.start = offset + len(old)

    def drop_all(self) -> None:
        """Forget the bytes held (the offsets stay: a reader is told they were dropped)."""
        self._chunks.clear()
        self._held = 0
        self.start = self.end

    @property
    def held(self) -> int:
        return self._held

    def since(self, offset: int) -> tuple[int, list[tuple[int, Stream, bytes]]]:
        """(first offset returned, chunks from ``offset`` on, cut to start there)."""
        first = max(offset, self.start)
        out: list[tuple[int, Stream, bytes]] = []
        for off, stream, data in self._chunks:
            if off + len(data) <= first:
                continue
            cut = max(0, first - off)
            out.append((off + cut, stream, data[cut:]))
        return first, out


@dataclass
class Launch:
    """What StartProcess asked for, checked."""

    exec_id: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    tag: str
    pty: tuple[int, int, str] | None  # rows, cols, TERM
    timeout: float  # 0: none
    keep_stdin_open: bool


class BackgroundProcess:
    """One started process: its tree, its output ring, and how it ended."""

    def __init__(self, launch: Launch, tree: ProcessTree) -> None:
        self.exec_id = launch.exec_id
        self.tag = launch.tag
        self.command = shlex.join(launch.argv)[:MAX_COMMAND]
        self.pty = launch.pty is not None
        self.tree = tree
        self.cond = threading.Condition()
        self.ring = OutputRing()
        self.status: common_pb2.ExitStatus | None = None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.pid = 0
        self._stdin: int | None = None  # the pty's master, or the stdin pipe
        self._stdin_lock = threading.Lock()
        self._master: int | None = None
        self._deadline = self.started + launch.timeout if launch.timeout else 0.0

    # -- start and pump ---------------------------------------------------

    def spawn(self, launch: Launch, preexec: Callable[[], None]) -> None:
        """Start it; raises ProcessError when the program cannot start."""
        if launch.pty is not None:
            rows, cols, term = launch.pty
            master, slave = os.openpty()
            try:
                _set_winsize(master, rows, cols)
                env = {**launch.env, "TERM": term}

                proc = self._popen(
                    launch, preexec, env, stdin=slave, stdout=slave, stderr=slave, tty=True
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._master = self._stdin = master
            os.set_blocking(master, False)
            fds = {master: common_pb2.OUTPUT_STREAM_PTY}
        else:
            stdin = subprocess.PIPE if launch.keep_stdin_open else subprocess.DEVNULL
            proc = self._popen(
                launch,
                preexec,
                launch.env,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            if proc.stdout is None or proc.stderr is None:
                raise RuntimeError("subprocess pipes missing")
            if proc.stdin is not None:
                self._stdin = os.dup(proc.stdin.fileno())
                proc.stdin.close()
                os.set_blocking(self._stdin, False)
            fds = {
                os.dup(proc.stdout.fileno()): common_pb2.OUTPUT_STREAM_STDOUT,
                os.dup(proc.stderr.fileno()): common_pb2.OUTPUT_STREAM_STDERR,
            }
            proc.stdout.close()
            proc.stderr.close()
        self.pid = proc.pid
        self.tree.pgid = proc.pid
        threading.Thread(
            target=self._pump, args=(proc, fds), name=f"proc-{self.exec_id}", daemon=True
        ).start()

    def _popen(
        self,
        launch: Launch,
        preexec: Callable[[], None],
        env: dict[str, str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        tty: bool = False,
    ) -> spawner.Proc:
        try:
            return spawner.popen(
                launch.argv,
                preexec=preexec,
                cwd=launch.cwd,
                env=env,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                tty=tty,
            )
        except OSError as exc:
            raise ProcessError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot start {launch.argv[0]!r}: {exc}"
            ) from exc
        except ValueError as exc:  # a NUL byte in an argument or a variable
            raise ProcessError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot start {launch.argv[0][:80]!r}: {exc} (arguments and environment "
                "variables cannot hold NUL bytes)",
            ) from exc
        except subprocess.SubprocessError as exc:
            raise ProcessError(
                grpc.StatusCode.INTERNAL,
                f"cannot confine {launch.argv[0]!r} ({exc}): the guest kernel refused its "
                "cgroup, capability or terminal set-up; see the VM's console log",
            ) from exc

    def _pump(self, proc: spawner.Proc, fds: dict[int, Stream]) -> None:
        sel = selectors.DefaultSelector()
        for fd in fds:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        timed_out = killed = False
        drain_until = 0.0
        open_fds = set(fds)
        try:
            while open_fds:
                now = time.monotonic()
                if killed and now >= drain_until:
                    break
                if not killed and self._deadline and now >= self._deadline:
                    timed_out = True
                if not killed and (timed_out or proc.poll() is not None):
                    # The main process ended (or its time did): the rest of its
                    # tree goes with it, so the output reaches its end.
                    self.tree.kill_all()
                    killed = True
                    drain_until = now + KILL_GRACE_S
                if not killed:
                    self.tree.sample()
                for key, _ in sel.select(0.1 if killed else 0.2):
                    fd = int(key.fd)
                    try:
                        data = os.read(fd, READ_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EIO:  # EIO: the terminal's last user left
                            log.warning("reading %s: %s", self.exec_id, exc)
                        data = b""
                    if not data:
                        sel.unregister(fd)
                        open_fds.discard(fd)
                        continue
                    with self.cond:
                        self.ring.append(fds[fd], data)
                        self.cond.notify_all()
            rc, late = wait_main(proc, self.tree, self._deadline, killed=killed)
            timed_out = timed_out or late
        finally:
            sel.close()
            for fd in fds:
                if fd != self._master:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.tree.kill_all()
        status = exit_status(rc, timed_out=timed_out, start=self.started, tree=self.tree)
        KEEPER.retire(self.tree)
        with self._stdin_lock:
            if self._stdin is not None:
                with contextlib.suppress(OSError):
                    os.close(self._stdin)
            self._stdin = None
            self._master = None
        with self.cond:
            self.status = status
            self.cond.notify_all()

    # -- calls by id ------------------------------------------------------

    def _ended(self) -> ProcessError:
        st = self.status
        code = st.exit_code if st is not None else 0
        return ProcessError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"process {self.exec_id!r} has ended (exit code {code})",
        )

    def write_stdin(self, data: bytes, eof: bool) -> None:
        with self._stdin_lock:
            if self.status is not None:
                raise self._ended()
            fd = self._stdin
            if fd is None:
                raise ProcessError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"stdin of {self.exec_id!r} is closed (start it with keep_stdin_open or a pty)",
                )
            if eof and self.pty:
                data += b"\x04"  # Ctrl-D: end of input on the terminal
            deadline = time.monotonic() + STDIN_WRITE_S
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ProcessError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"process {self.exec_id!r} has not read its input for "
                            f"{STDIN_WRITE_S:.0f} s; try again later",
                        ) from None
                    time.sleep(0.01)
                    continue
                except OSError as exc:
                    raise ProcessError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"stdin write failed: {exc}"
                    ) from exc
                view = view[n:]
            if eof and not self.pty:
                os.close(fd)
                self._stdin = None

    def signal(self, signum: int) -> None:
        if self.status is not None:
            raise self._ended()
        if signum == signal.SIGKILL:
            self.tree.kill_all()
            return
        with self._stdin_lock:
            master = self._master
            if master is not None:
                # A terminal: to its foreground job, as the keyboard would.
                with contextlib.suppress(OSError):
                    os.killpg(os.tcgetpgrp(master), signum)
                    return
        self.tree.signal(signum)

    def resize(self, rows: int, cols: int) -> None:
        if not self.pty:
            raise ProcessError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"process {self.exec_id!r} has no pty to resize (start it with a pty)",
            )
        with self._stdin_lock:
            if self._master is None:
                raise self._ended()
            _set_winsize(self._master, rows, cols)

    def info(self) -> common_pb2.ProcessInfo:
        with self.cond:
            out = common_pb2.ProcessInfo(
                exec_id=self.exec_id,
                tag=self.tag,
                pid=self.pid,
                command=self.command,
                pty=self.pty,
                running=self.status is None,
                output_bytes=self.ring.end,
            )
            if self.status is not None:
                out.exit_status.CopyFrom(self.status)
        out.started_at.FromNanoseconds(int(self.started_wall * 1e9))
        return out

    def events(self, offset: int, cancelled: threading.Event) -> Iterator[common_pb2.ProcessEvent]:
        """Output from ``offset`` on, then the exit status; ends early when cancelled."""
        with self.cond:
            if offset > self.ring.end:
                raise ProcessError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"offset {offset} is past the end of {self.exec_id!r}'s output "
                    f"({self.ring.end} bytes so far)",
                )
        pos = offset
        while not cancelled.is_set():
            with self.cond:
                if self.ring.end <= pos and self.status is None:
                    self.cond.wait(0.5)
                first, chunks = self.ring.since(pos)
                status = self.status
                end = self.ring.end
            if first > pos:
                yield common_pb2.ProcessEvent(
                    dropped=common_pb2.OutputDropped(from_offset=pos, to_offset=first)
                )
                pos = first
            for off, stream, data in chunks:
                yield common_pb2.ProcessEvent(
                    output=common_pb2.ProcessOutput(stream=stream, data=data, offset=off)
                )
                pos = off + len(data)
            if status is not None and pos >= end:
                yield common_pb2.ProcessEvent(exited=status)
                return


class ProcessTable:
    """The agent's background processes, by exec id."""

    def __init__(self) -> None:
        self._procs: collections.OrderedDict[str, BackgroundProcess] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._streams = 0

    def get(self, exec_id: str) -> BackgroundProcess | None:
        with self._lock:
            return self._procs.get(exec_id)

    def lookup(self, exec_id: str) -> BackgroundProcess:
        proc = self.get(exec_id)
        if proc is None:
            raise ProcessError(
                grpc.StatusCode.NOT_FOUND,
                f"no background process {exec_id!r} (ListProcesses shows the known ones)",
            )
        return proc

    def start(
        self, launch: Launch, preexec_of: Callable[[ProcessTree], Callable[[], None]]
    ) -> BackgroundProcess:
        with self._lock:
            if launch.exec_id in self._procs:
                raise ProcessError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"exec_id {launch.exec_id!r} is already in use; choose another",
                )
            running = sum(1 for p in self._procs.values() if p.status is None)
            if running >= MAX_RUNNING:
                raise ProcessError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_RUNNING} background processes are running; stop one first",
                )
            tree = KEEPER.take()
            proc = BackgroundProcess(launch, tree)
            self._procs[launch.exec_id] = proc
        try:
            proc.spawn(launch, preexec_of(tree))
        except BaseException:
            with self._lock:
                self._procs.pop(launch.exec_id, None)
            tree.kill_all()
            KEEPER.retire(tree)
            raise
        self._forget_ended()
        return proc

    def _forget_ended(self) -> None:
        with self._lock:
            ended = [k for k, p in self._procs.items() if p.status is not None]
            for key in ended[: max(0, len(ended) - MAX_ENDED)]:
                del self._procs[key]
            kept = [self._procs[k] for k in ended[-MAX_ENDED:]]
        budget = ENDED_OUTPUT_BYTES
        for proc in reversed(kept):
            with proc.cond:
                budget -= proc.ring.held
                if budget < 0:
                    proc.ring.drop_all()

    def list(self) -> list[common_pb2.ProcessInfo]:
        self._forget_ended()
        with self._lock:
            procs = list(self._procs.values())
        return [p.info() for p in procs]

    @contextlib.contextmanager
    def stream_slot(self) -> Iterator[None]:
        """One of MAX_STREAMS concurrent ConnectProcess streams (each holds a thread)."""
        with self._lock:
            if self._streams >= MAX_STREAMS:
                raise ProcessError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{MAX_STREAMS} process streams are open in this VM; close one first",
                )
            self._streams += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1
