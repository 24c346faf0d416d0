"""A small process that starts the agent's programs, so the agent never forks.

Each Execute's program is started with a ``preexec_fn`` (:mod:`.confine`),
so Python must fork: it cannot use vfork or posix_spawn then. Forking the
agent (gRPC imported, its threads running, tens of MiB mapped) costs about
19 ms more per program under TCG than forking a small single-threaded
Python process (docs/BENCHMARKS.md). So the agent forks this spawner first
thing, before it imports gRPC, and asks it to start each program.

Protocol, over a Unix stream socketpair that only the two processes hold:
frames of ``length (4 bytes, big endian) + pickle``.

* agent -> spawner: ``("spawn", id, Request)`` with the program's stdin,
  stdout and stderr as SCM_RIGHTS on the frame's first byte.
* spawner -> agent: ``("started", id, pid)`` or ``("failed", id, Failure)``,
  then ``("exited", pid, returncode)`` when the spawner reaps it (pidfds, no
  SIGCHLD handler).

Both ends are the agent's own code (pickle is safe here); programs never
hold the socket (close-on-exec, and subprocess closes every other fd).
When the agent goes, the spawner reads EOF and exits. When the spawner goes
(agent code can kill it: programs keep CAP_KILL), the programs it had
started are reported killed, the agent starts programs itself meanwhile,
and a new spawner is started with ``python3 -m agentvm_guest.spawner`` (an
exec: the agent must not fork itself), at most one a second. Standard
library only: it must not import gRPC.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

log = logging.getLogger("agentvm_guest.spawner")

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # argv + environment: the agent's own message limit
RESTART_AFTER_S = 1.0  # a new spawner at most this often
# A spawner that has not answered a request in this long is stopped or stuck
# (agent code can SIGSTOP it): it is killed, which starts a new one.
SPAWN_TIMEOUT_S = 30.0
_FDS = 3


class Proc(Protocol):
    """What the agent uses of a started program (a subprocess.Popen has it too)."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(frozen=True)
class Request:
    argv: tuple[str, ...]
    cwd: str | None
    env: dict[str, str]
    preexec: Callable[[], None]  # picklable: a confine.Confiner
    tty: bool  # make stdin the controlling terminal (after preexec)


@dataclass(frozen=True)
class Failure:
    """Why a program did not start, raised again in the agent as what Popen raised."""

    kind: str  # "os" | "value" | "subprocess"
    message: str
    errno: int = 0
    filename: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, OSError):
            filename = exc.filename if isinstance(exc.filename, str) else None
            return cls("os", exc.strerror or str(exc), exc.errno or 0, filename)
        if isinstance(exc, ValueError):
            return cls("value", str(exc))
        return cls("subprocess", str(exc))

    def exception(self) -> Exception:
        if self.kind == "os":
            return OSError(self.errno, self.message, self.filename)
        if self.kind == "value":
            return ValueError(self.message)
        return subprocess.SubprocessError(self.message)


class _TtyPreexec:
    """Confine, then make the terminal on stdin the controlling one (after setsid)."""

    def __init__(self, preexec: Callable[[], None]) -> None:
        self.preexec = preexec

    def __call__(self) -> None:
        self.preexec()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# -- framing -----------------------------------------------------------------------------
def _send(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frame = _LEN.pack(len(data)) + data
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = sock.sendmsg([frame], anc)
        frame = frame[sent:]
    sock.sendall(frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[object, list[int]]:
    """One frame and the descriptors that came with it. EOFError at the peer's close."""
    fds: list[int] = []
    head = b""
    if max_fds:
        size = socket.CMSG_SPACE(max_fds * 4)
        head, anc, _, _ = sock.recvmsg(_LEN.size, size, socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds += struct.unpack(f"{usable // 4}i", data[:usable])
        if not head:
            for fd in fds:
                os.close(fd)
            raise EOFError("peer closed")
    try:
        head += _recv_exact(sock, _LEN.size - len(head))
        (length,) = _LEN.unpack(head)
        if length > MAX_FRAME:
            raise EOFError(f"frame of {length} bytes")
        # Both ends are the agent's own processes (see the module's docstring).
        return pickle.loads(_recv_exact(sock, length)), fds  # noqa: S301
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- the spawner process -----------------------------------------------------------------
class _Spawner:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, tuple[subprocess.Popen[bytes], int]] = {}  # pidfd -> proc

    def serve(self) -> None:
        self.sel.register(self.sock, selectors.EVENT_READ)
        while True:
            for key, _ in self.sel.select():
                if key.fileobj is self.sock:
                    try:
                        msg, fds = _recv(self.sock, _FDS)
                    except (EOFError, OSError):
                        return  # the agent is gone
                    self._spawn(msg, fds)
                else:
                    self._reap(int(key.fd))

    def _spawn(self, msg: object, fds: list[int]) -> None:
        try:
            if not (isinstance(msg, tuple) and len(msg) == 3 and msg[0] == "spawn"):
                raise ValueError(f"unexpected message {type(msg).__name__}")
            _, rid, req = msg
            if not isinstance(req, Request) or len(fds) != _FDS:
                raise ValueError("a spawn request needs a Request and three descriptors")
            try:
                proc = _popen(
                    req.argv, req.preexec, req.cwd, req.env, (fds[0], fds[1], fds[2]), req.tty
                )
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                _send(self.sock, ("failed", rid, Failure.of(exc)))
                return
        finally:
            for fd in fds:
                os.close(fd)
        pidfd = os.pidfd_open(proc.pid)
        self.children[pidfd] = (proc, proc.pid)
        self.sel.register(pidfd, selectors.EVENT_READ)
        _send(self.sock, ("started", rid, proc.pid))

    def _reap(self, pidfd: int) -> None:
        proc, pid = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _send(self.sock, ("exited", pid, proc.wait()))


def serve(fd: int) -> None:
    """Run the spawner on the socket ``fd`` until the agent closes its end."""
    sock = socket.socket(fileno=fd)
    try:
        _Spawner(sock).serve()
    finally:
        sock.close()


# -- the agent's side --------------------------------------------------------------------
class SpawnedProcess:
    """A program the spawner started: what the agent uses of a Popen."""

    def __init__(self) -> None:
        self.pid = 0
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, returncode: int) -> None:
        self.returncode = returncode
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        if self.returncode is None:  # set before the event, never unset
            raise RuntimeError("exit status missing")
        return self.returncode


class _Pending:
    def __init__(self, proc: SpawnedProcess) -> None:
        self.proc = proc
        self.done = threading.Event()
        self.failure: Failure | None = None


class SpawnerClient:
    """The agent's connection to its spawner; thread-safe."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        pid: int = 0,
        process: subprocess.Popen[bytes] | None = None,
        restart: bool = False,
    ) -> None:
        self.sock = sock
        self.pid = process.pid if process is not None else pid  # 0: not ours to reap
        self._process = process
        self._restart = restart
        self._born = time.monotonic()
        self._lock = threading.Lock()  # the tables below
        self._send_lock = threading.Lock()  # one request written at a time
        self._next = 0
        self._pending: dict[int, _Pending] = {}
        self._running: dict[int, SpawnedProcess] = {}
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="spawner", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                msg, _ = _recv(self.sock)
                self._dispatch(msg)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
            log.warning("the spawner is gone (%s): programs start from the agent", exc)
        finally:
            with self._lock:
                self.alive = False
                pending, self._pending = self._pending, {}
                running, self._running = self._running, {}
            for p in pending.values():
                p.failure = Failure("subprocess", "the spawner exited")
                p.done.set()
            for proc in running.values():
                # Its exit status went with the spawner: killed is what is known.
                proc._set_exit(-signal.SIGKILL)
            if self._process is not None:
                self._process.wait()
            elif self.pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
            if self._restart and _Current.client is self:
                time.sleep(max(0.0, self._born + RESTART_AFTER_S - time.monotonic()))
                if _Current.client is self:  # not stopped meanwhile
                    try:
                        start_exec()
                    except OSError as exc:
                        log.warning("cannot start a new spawner: %s", exc)

    def _dispatch(self, msg: object) -> None:
        if not isinstance(msg, tuple) or len(msg) != 3:
            raise ValueError(f"unexpected message from the spawner: {msg!r:.80}")
        kind, key, value = msg
        with self._lock:
            if kind == "exited":
                proc = self._running.pop(key, None)
                if proc is not None:
                    proc._set_exit(value)
                return
            pending = self._pending.pop(key, None)
            if pending is None:
                return
            if kind == "started":
                pending.proc.pid = value
                self._running[value] = pending.proc  # before its "exited" is read
            else:
                pending.failure = value
        pending.done.set()

    def spawn(self, req: Request, fds: Sequence[int], proc: SpawnedProcess) -> None:
        """Start ``req`` with ``fds`` as its stdin, stdout, stderr; fills ``proc.pid``.

        Raises what subprocess.Popen would have raised, or _Unavailable.
        """
        with self._lock:
            if not self.alive:
                raise _Unavailable
            self._next += 1
            rid = self._next
            pending = _Pending(proc)
            self._pending[rid] = pending
        try:
            # Not under _lock: a long write must not keep the reader from its table.
            with self._send_lock:
                _send(self.sock, ("spawn", rid, req), fds)
        except OSError:
            with self._lock:
                self._pending.pop(rid, None)
            raise _Unavailable from None
        if not pending.done.wait(SPAWN_TIMEOUT_S):
            log.warning("the spawner has not answered in %.0f s: replacing it", SPAWN_TIMEOUT_S)
            self._abandon()
            pending.done.wait()  # the reader fails every pending request at EOF
        if pending.failure is not None:
            if pending.failure.message == "the spawner exited" and not self.alive:
                raise _Unavailable
            raise pending.failure.exception()

    def owns(self, proc: SpawnedProcess) -> bool:
        with self._lock:
            return self._running.get(proc.pid) is proc

    def _abandon(self) -> None:
        """Kill a spawner that stopped answering; the reader then sees EOF."""
        if self._process is not None:
            self._process.kill()
        elif self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def unreaped(proc: Proc) -> bool:
    """Whether ``proc``, started by the spawner, has exited but no status came:
    the spawner has not reaped it (yet: it takes it a moment)."""
    if not isinstance(proc, SpawnedProcess) or proc.returncode is not None:
        return False
    try:
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def unstick(proc: Proc) -> None:
    """Replace a spawner that has left ``proc`` unreaped for long (agent code
    stopped it): the programs it had started are then reported killed."""
    client = _Current.client
    if isinstance(proc, SpawnedProcess) and client is not None and client.owns(proc):
        log.warning("the spawner has not reaped process %d: replacing it", proc.pid)
        client._abandon()


class _Unavailable(Exception):
    """The spawner is gone: start the program from the agent."""


class _Current:
    client: SpawnerClient | None = None


def start() -> SpawnerClient:
    """Fork the spawner (call before gRPC is imported, from a single thread)."""
    agent_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the spawner
        code = 0
        try:
            agent_end.close()
            threading.current_thread().name = "spawner"
            serve(spawner_end.detach())
        except BaseException:
            log.exception("the spawner failed")
            code = 1
        finally:
            os._exit(code)
    spawner_end.close()
    _Current.client = SpawnerClient(agent_end, pid=pid, restart=True)
    return _Current.client


def start_exec() -> SpawnerClient:
    """Start a spawner as a new program (``python3 -m agentvm_guest.spawner FD``): how
    a threaded agent replaces one that died, and how the tests start one."""
    agent_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = spawner_end.fileno()
        process = subprocess.Popen(
            [sys.executable, "-m", "agentvm_guest.spawner", str(fd)], pass_fds=[fd]
        )
    except BaseException:
        agent_end.close()
        raise
    finally:
        spawner_end.close()
    _Current.client = SpawnerClient(agent_end, process=process, restart=True)
    log.info("spawner started (pid %d)", process.pid)
    return _Current.client


def current() -> SpawnerClient | None:
    """The spawner programs are started through now (None: the agent starts them)."""
    return _Current.client


def connect(sock: socket.socket) -> SpawnerClient:
    """Use a spawner started some other way (tests: ``python -m agentvm_guest.spawner``)."""
    _Current.client = SpawnerClient(sock)
    return _Current.client


def stop() -> None:
    """Stop using the spawner (the agent starts programs itself); it exits at EOF."""
    client, _Current.client = _Current.client, None
    if client is not None:
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        client._reader.join(5)
        client.sock.close()


def _parent_end(mode: str, fd: int) -> IO[bytes]:
    return open(fd, mode, -1)  # what Popen makes of its pipes (bufsize=-1)


def popen(
    argv: Sequence[str],
    *,
    preexec: Callable[[], None],
    cwd: str | None,
    env: dict[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    tty: bool = False,
) -> Proc:
    """Start a confined program, like ``subprocess.Popen(argv, preexec_fn=preexec,
    start_new_session=True, close_fds=True, ...)``; through the spawner when there is one.

    ``stdin``/``stdout``/``stderr``: subprocess.PIPE, subprocess.DEVNULL or a descriptor.
    """
    client = _Current.client
    if client is not None and client.alive:
        try:
            return _through(client, argv, preexec, cwd, env, (stdin, stdout, stderr), tty)
        except _Unavailable:
            pass
    return _popen(argv, preexec, cwd, env, (stdin, stdout, stderr), tty)


def _popen(
    argv: Sequence[str],
    preexec: Callable[[], None],
    cwd: str | None,
    env: dict[str, str],
    fds: tuple[int, int, int],
    tty: bool,
) -> subprocess.Popen[bytes]:
    """The one way a program is started, in the spawner or (without one) in the agent."""
    stdin, stdout, stderr = fds
    return subprocess.Popen(
        argv,
        preexec_fn=_TtyPreexec(preexec) if tty else preexec,  # noqa: PLW1509 (system calls only, see confine.py)
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


def _through(
    client: SpawnerClient,
    argv: Sequence[str],
    preexec: Callable[[], None],
    cwd: str | None,
    env: dict[str, str],
    modes: tuple[int, int, int],
    tty: bool,
) -> SpawnedProcess:
    child: list[int] = []  # the program's ends, closed here once it has them
    ours: list[int | None] = []  # the agent's ends of pipes
    try:
        for i, mode in enumerate(modes):
            if mode == subprocess.PIPE:
                r, w = os.pipe()
                child.append(r if i == 0 else w)
                ours.append(w if i == 0 else r)
            elif mode == subprocess.DEVNULL:
                child.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                ours.append(None)
            elif mode >= 0:
                child.append(os.dup(mode))
                ours.append(None)
            else:
                raise ValueError(f"unsupported descriptor mode {mode}")
        proc = SpawnedProcess()
        req = Request(tuple(argv), cwd, dict(env), preexec, tty)
        client.spawn(req, child, proc)
    except BaseException:
        for fd in ours:
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in child:
            os.close(fd)
    fin, fout, ferr = ours
    proc.stdin = _parent_end("wb", fin) if fin is not None else None
    proc.stdout = _parent_end("rb", fout) if fout is not None else None
    proc.stderr = _parent_end("rb", ferr) if ferr is not None else None
    return proc


def main() -> int:
    """``python -m agentvm_guest.spawner FD``: serve on an inherited socket (tests)."""
    # This file runs as __main__: unpickled requests are agentvm_guest.spawner's classes.
    from agentvm_guest import spawner  # noqa: PLW0406 (see above)

    spawner.serve(int(sys.argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
