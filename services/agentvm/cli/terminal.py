"""An interactive terminal on a sandbox process (`agent-vm sandbox shell`, `agent-vm shell`).

Like `ssh -t` or `kubectl exec -it`: the local terminal goes to raw mode,
every key goes to the guest process's pseudo-terminal as it is typed (so
Ctrl-C, Ctrl-Z and Ctrl-D mean what they mean there), window-size changes
are forwarded, and the local terminal is restored on every way out (the
shell's exit, a lost connection, a signal to this CLI). The exit status is
the remote program's; 255 when the connection was lost (as ssh does).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

import grpc

from agentvm.v1 import common_pb2, executor_pb2, executor_pb2_grpc

# The login shell of the guest: bash where the image has it, else sh.
SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -i; fi; exec sh -i"]
EXIT_CONNECTION_LOST = 255
INPUT_CHUNK = 4096


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal at ``fd`` in raw mode for the block; restored however it ends."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def local_size() -> tuple[int, int]:
    """(rows, cols) of this terminal (80x24 when there is none)."""
    size = shutil.get_terminal_size((80, 24))
    return max(1, min(size.lines, 1000)), max(1, min(size.columns, 1000))


class Terminal:
    """One interactive session on a new pty process in a sandbox."""

    def __init__(
        self,
        stub: executor_pb2_grpc.ExecutorServiceStub,
        sandbox_id: str,
        argv: list[str],
        *,
        cwd: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.stub = stub
        self.sandbox_id = sandbox_id
        self.argv = argv
        self.cwd = cwd
        self.env = env or {}
        self.exec_id = ""
        self._done = threading.Event()
        self._resized = threading.Event()

    def run(self) -> int:
        """Run the session to its end; the exit status for this CLI."""
        rows, cols = local_size()
        req = executor_pb2.StartProcessRequest(
            sandbox_id=self.sandbox_id,
            program=common_pb2.Program(argv=common_pb2.Argv(args=self.argv)),
            cwd=self.cwd,
            env=self.env,
            pty=common_pb2.Pty(
                size=common_pb2.PtySize(rows=rows, cols=cols),
                term=os.environ.get("TERM", "") or "xterm-256color",
            ),
        )
        call = self.stub.StartProcess(req)
        events = iter(call)
        first = next(events)  # errors (a bad id, a closed sandbox) come before raw mode
        self.exec_id = first.exec_id
        previous = signal.getsignal(signal.SIGWINCH)
        signal.signal(signal.SIGWINCH, self._on_winch)
        feeder = threading.Thread(target=self._feed, name="stdin", daemon=True)
        ended = False
        try:
            with raw_terminal(sys.stdin.fileno()):
                feeder.start()
                for resp in events:
                    ev = resp.event
                    kind = ev.WhichOneof("event")
                    if kind == "output":
                        os.write(sys.stdout.fileno(), ev.output.data)
                    elif kind == "exited":
                        ended = True
                        return ev.exited.exit_code
            return EXIT_CONNECTION_LOST
        except grpc.RpcError as exc:
            lost = f"\r\nagent-vm: connection to the sandbox lost: {exc.details()}\r\n"
            sys.stderr.write(lost)
            return EXIT_CONNECTION_LOST
        finally:
            self._done.set()
            signal.signal(signal.SIGWINCH, previous)
            call.cancel()  # type: ignore[no-untyped-call]
            if not ended:
                self._hang_up()

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        self._resized.set()

    def _hang_up(self) -> None:
        """The session ends without the program: hang it up, as a closed ssh does."""
        with contextlib.suppress(grpc.RpcError):
            self.stub.SignalExec(
                executor_pb2.SignalExecRequest(
                    sandbox_id=self.sandbox_id, exec_id=self.exec_id, signal=signal.SIGHUP
                ),
                timeout=10,
            )

    def _feed(self) -> None:
        """Keys to the process; window sizes as they change."""
        fd = sys.stdin.fileno()
        stdin_open = True
        with contextlib.suppress(grpc.RpcError):
            while not self._done.is_set():
                if self._resized.is_set():
                    self._resized.clear()
                    rows, cols = local_size()
                    self.stub.ResizePty(
                        executor_pb2.ResizePtyRequest(
                            sandbox_id=self.sandbox_id,
                            exec_id=self.exec_id,
                            size=common_pb2.PtySize(rows=rows, cols=cols),
                        ),
                        timeout=30,
                    )
                if not stdin_open:
                    self._done.wait(0.2)
                    continue
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(fd, INPUT_CHUNK)
                if not data:
                    # Local input ended (a pipe): Ctrl-D to the program, once.
                    stdin_open = False
                self.stub.WriteStdin(
                    executor_pb2.ExecutorServiceWriteStdinRequest(
                        sandbox_id=self.sandbox_id, exec_id=self.exec_id, data=data, eof=not data
                    ),
                    timeout=60,
                )
