"""The guest agent: GuestAgentService, running inside each VM.

Every Execute runs in its own cgroup (cgroup v2, ``cgroup.kill``) so that a
timeout, a cancel or the end of the main process kills the whole tree, even
processes that called setsid(). Where cgroup v2 is missing the process group
is killed instead. Output is streamed as it is read and capped per stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import grpc

from agentvm.v1 import common_pb2, guest_agent_pb2, guest_agent_pb2_grpc
from agentvm_guest import __version__, confine, paths
from agentvm_guest.wire import RejectMalformed

log = logging.getLogger("agentvm_guest.agent")

DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
READ_CHUNK = 32 * 1024
# How long output is still read after the tree was killed.
KILL_GRACE_S = 1.0
CGROUP_ROOT = "/sys/fs/cgroup/agentvm"
WORKSPACE = "/workspace"
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONUNBUFFERED": "1",
}


def _read_first_line(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip()
    except OSError:
        return default


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def guest_info() -> common_pb2.GuestInfo:
    """What the agent reports about its VM."""
    info = common_pb2.GuestInfo(agent_version=__version__)
    uname = os.uname()
    info.kernel_release = uname.release
    info.hostname = uname.nodename
    uptime = _read_first_line("/proc/uptime", "0 0").split()[0]
    info.uptime.FromNanoseconds(int(float(uptime) * 1e9))
    info.load1, info.load5, info.load15 = os.getloadavg()
    mem = _meminfo()
    info.memory_total_bytes = mem.get("MemTotal", 0)
    info.memory_available_bytes = mem.get("MemAvailable", 0)
    st = os.statvfs("/")
    info.disk_total_bytes = st.f_blocks * st.f_frsize
    info.disk_free_bytes = st.f_bavail * st.f_frsize
    info.process_count = sum(1 for d in os.listdir("/proc") if d.isdigit())
    info.boot_id = _read_first_line("/proc/sys/kernel/random/boot_id")
    info.machine_id = _read_first_line("/etc/machine-id")
    return info


# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAC_RE = re.compile(r"^[0-9a-f][02468ace](?::[0-9a-f]{2}){5}$")


def reidentify(hostname: str, machine_id: str, seed: bytes, wall_clock_ns: int) -> None:
    """Make a VM restored from a memory template its own (raises ValueError on bad input).

    Every clone of a template wakes up with the template's hostname, machine
    id, clock and, worst, CRNG state: two clones would draw the same "random"
    numbers. The seed is credited to the input pool and the CRNG reseeded at
    once, so nothing drawn afterwards is shared with a sibling.
    """
    if not HOSTNAME_RE.match(hostname):
        raise ValueError(f"hostname {hostname!r} is not a valid host name")
    if not MACHINE_ID_RE.match(machine_id):
        raise ValueError("machine_id must be 32 lowercase hexadecimal digits")
    if len(seed) < 32:
        raise ValueError("seed must be at least 32 bytes")
    seed = seed[:512]
    with open("/dev/random", "wb", buffering=0) as fh:
        fcntl.ioctl(fh, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fh, RNDRESEEDCRNG)
    if wall_clock_ns > 0:
        time.clock_settime_ns(time.CLOCK_REALTIME, wall_clock_ns)
    socket.sethostname(hostname)
    for path, text in (("/etc/hostname", hostname), ("/etc/machine-id", machine_id)):
        tmp = f"{path}.agentvm-tmp"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)


def _run_ip(*args: str) -> None:
    done = subprocess.run(["busybox", "ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _eth0_address() -> str:
    out = subprocess.run(
        ["busybox", "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    return out[out.index("inet") + 1] if "inet" in out else ""


def _prepare_eth0(mac: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists("/sys/class/net/eth0"):
        if time.monotonic() > deadline:
            raise OSError("this VM has no eth0 (no virtio NIC, or virtio_net not loaded)")
        time.sleep(0.05)
    with (
        contextlib.suppress(OSError),
        open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as fh,
    ):
        fh.write("1")
    _run_ip("link", "set", "eth0", "down")
    _run_ip("link", "set", "eth0", "address", mac)
    _run_ip("addr", "flush", "dev", "eth0")


def configure_dhcp(mac: str) -> str:
    """Give eth0 its MAC and take an address by DHCP (user bridges); the address got.

    udhcpc returns once it has a lease and stays in the background to renew
    it (so the LAN never hands the address to someone else while we use it).
    """
    if not MAC_RE.match(mac):
        raise ValueError(f"mac {mac!r} is not a lowercase unicast MAC address")
    _prepare_eth0(mac)
    _run_ip("link", "set", "eth0", "up")
    # A second ConfigureNetwork replaces the client of the first.
    subprocess.run(["busybox", "pkill", "-f", "udhcpc -i eth0"], capture_output=True, check=False)
    # The daemon keeps the inherited descriptors: a file, not a pipe we would wait on.
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(
            ["busybox", "udhcpc", "-i", "eth0", "-n", "-t", "10", "-T", "2",
             "-s", "/usr/local/sbin/agentvm-dhcp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            check=False, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise OSError(f"no DHCP lease on eth0: {text[-300:]}")
    return _eth0_address()


def configure_network(mac: str, address: str, gateway: str, nameservers: list[str]) -> None:
    """Give eth0 its MAC, static address, default route and resolvers.

    Raises ValueError on bad input and OSError when the interface cannot be
    set up. vm-manager hands out addresses itself (there is no DHCP on its
    networks), and the host drops every frame whose MAC and address do not
    match what it assigned, so a guest that ignores this only cuts itself off.
    IPv6 is switched off on eth0: the host filters it anyway.
    """
    if not MAC_RE.match(mac):
        raise ValueError(f"mac {mac!r} is not a lowercase unicast MAC address")
    try:
        iface = ipaddress.IPv4Interface(address)
        gw = ipaddress.IPv4Address(gateway)
        resolvers = [ipaddress.IPv4Address(n) for n in nameservers]
    except ValueError as exc:
        raise ValueError(f"network configuration: {exc}") from None
    if iface.network.prefixlen in (0, 32) or gw not in iface.network:
        raise ValueError(f"gateway {gw} is not on {iface.network}")
    if len(resolvers) > 3:
        raise ValueError("at most 3 nameservers")
    _prepare_eth0(mac)
    _run_ip("addr", "add", str(iface), "dev", "eth0")
    _run_ip("link", "set", "eth0", "up")
    _run_ip("route", "replace", "default", "via", str(gw), "dev", "eth0")
    tmp = "/etc/resolv.conf.agentvm-tmp"
    with open(tmp, "w") as fh:
        fh.write("".join(f"nameserver {n}\n" for n in resolvers) + "options timeout:2 attempts:2\n")
    os.replace(tmp, "/etc/resolv.conf")


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


class ProcessTree:
    """The processes of one Execute: a cgroup when available, else a process group."""

    _seq = 0
    _seq_lock = threading.Lock()

    def __init__(self) -> None:
        with ProcessTree._seq_lock:
            ProcessTree._seq += 1
            seq = ProcessTree._seq
        self.cgroup: str | None = os.path.join(CGROUP_ROOT, f"exec-{os.getpid()}-{seq}")
        try:
            os.makedirs(self.cgroup)
        except OSError:
            self.cgroup = None
        self.pgid: int | None = None
        self.pids_max = 0
        self._sampled = 0.0
        self.pids_limit = 0
        self.memory_limit = 0
        if self.cgroup is not None:
            self._set_limits()

    def _set_limits(self) -> None:
        """The Execute's process and memory limits (see confine.py); best effort."""
        if self._write("pids.max", str(confine.PIDS_MAX)):
            self.pids_limit = confine.PIDS_MAX
        limit = confine.memory_limit(_meminfo().get("MemTotal", 0))
        if limit and self._write("memory.max", str(limit)):
            self.memory_limit = limit
            self._write("memory.swap.max", "0")
            self._write("memory.oom.group", "1")

    def _write(self, name: str, value: str) -> bool:
        if self.cgroup is None:
            return False
        try:
            with open(os.path.join(self.cgroup, name), "w", encoding="ascii") as fh:
                fh.write(value)
        except OSError as exc:
            log.warning("cannot set %s of %s: %s", name, self.cgroup, exc)
            return False
        return True

    def confiner(self) -> confine.Confiner:
        """The preexec_fn that moves the main process into the cgroup and confines it.

        It joins before exec, so no fork of the program escapes the cgroup.
        """
        return confine.Confiner(self.cgroup)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the main process group."""
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signum)

    def kill_all(self) -> None:
        """SIGKILL everything the Execute started."""
        if self.cgroup is not None:
            try:
                with open(os.path.join(self.cgroup, "cgroup.kill"), "w", encoding="ascii") as fh:
                    fh.write("1")
            except OSError:
                log.warning("cgroup.kill failed for %s", self.cgroup)
        self.signal(signal.SIGKILL)

    def _read(self, name: str) -> str:
        if self.cgroup is None:
            return ""
        try:
            with open(os.path.join(self.cgroup, name), encoding="ascii") as fh:
                return fh.read()
        except (OSError, ValueError):
            return ""

    def sample(self) -> None:
        """Note the current process count (kernels without pids.peak), every 0.1 s."""
        now = time.monotonic()
        if now - self._sampled < 0.1:
            return
        self._sampled = now
        value = self._read("pids.current").strip()
        if value.isdigit():
            self.pids_max = max(self.pids_max, int(value))

    def usage(self) -> common_pb2.ResourceUsage:
        """What the tree used, from its cgroup (zeros without cgroups)."""
        out = common_pb2.ResourceUsage()
        for line in self._read("cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec" and value.strip().isdigit():
                out.cpu_time.FromMicroseconds(int(value))
        peak = self._read("memory.peak").strip()
        if peak.isdigit():
            out.memory_peak_bytes = int(peak)
        pids = self._read("pids.peak").strip()
        out.pids_peak = max(int(pids) if pids.isdigit() else 0, self.pids_max)
        out.pids_limit = self.pids_limit
        out.memory_limit_bytes = self.memory_limit
        out.pids_limit_hits = self._event("pids.events", "max")
        out.oom_kills = self._event("memory.events", "oom_kill")
        return out

    def _event(self, name: str, key: str) -> int:
        for line in self._read(name).splitlines():
            k, _, value = line.partition(" ")
            if k == key and value.strip().isdigit():
                return min(int(value), 2**32 - 1)
        return 0

    def remove(self) -> None:
        """Remove the cgroup once it is empty (waits briefly for the kernel)."""
        if self.cgroup is None:
            return
        if self._rmdir(100):
            return
        # A large tree (a fork bomb) takes the kernel a while to reap: finish
        # in the background rather than hold up the caller's answer.
        threading.Thread(target=self._rmdir, args=(6000,), daemon=True).start()

    def _rmdir(self, attempts: int) -> bool:
        if self.cgroup is None:
            return True
        for _ in range(attempts):
            try:
                os.rmdir(self.cgroup)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.01)
        if attempts > 100:
            log.warning("cgroup %s still busy", self.cgroup)
        return False


@dataclass
class _Running:
    tree: ProcessTree
    cancelled: threading.Event = field(default_factory=threading.Event)
    stdin: IO[bytes] | None = None
    stdin_lock: threading.Lock = field(default_factory=threading.Lock)


class GuestAgent(guest_agent_pb2_grpc.GuestAgentServiceServicer):
    """Implements GuestAgentService."""

    def __init__(self, workspace: str = WORKSPACE) -> None:
        self.workspace = workspace
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

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
        cwd = request.cwd or "/root"
        if not os.path.isdir(cwd):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cwd {cwd!r} is not a directory")
        env = dict(DEFAULT_ENV)
        traceparent = _traceparent(context)
        if traceparent:
            # The caller's trace continues in instrumented agent code.
            env["TRACEPARENT"] = traceparent
        env.update(request.env)
        exec_id = request.exec_id
        if request.keep_stdin_open and not exec_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "keep_stdin_open needs an exec_id")
        tree = ProcessTree()
        running = _Running(tree)
        if exec_id:
            with self._lock:
                if exec_id in self._running:
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
                    preexec_fn=tree.confiner(),  # noqa: PLW1509 (system calls only, see confine.py)
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
        status = common_pb2.ExitStatus(
            timed_out=timed_out,
            stdout_truncated=truncated[common_pb2.OUTPUT_STREAM_STDOUT],
            stderr_truncated=truncated[common_pb2.OUTPUT_STREAM_STDERR],
            usage=tree.usage(),
        )
        if rc < 0:
            status.signal = -rc
            status.exit_code = 128 - rc
        else:
            status.exit_code = rc
        if timed_out:
            status.exit_code = 124
        status.duration.FromNanoseconds(int((time.monotonic() - start) * 1e9))
        yield guest_agent_pb2.ExecuteResponse(exited=status)

    def SignalProcess(
        self, request: guest_agent_pb2.SignalProcessRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.SignalProcessResponse:
        with self._lock:
            running = self._running.get(request.exec_id)
        if running is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no running execution {request.exec_id!r}")
        try:
            signum = signal.Signals(request.signal)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown signal {request.signal}")
        if signum == signal.SIGKILL:
            running.tree.kill_all()
        else:
            running.tree.signal(signum)
        return guest_agent_pb2.SignalProcessResponse()

    def WriteStdin(
        self, request: guest_agent_pb2.WriteStdinRequest, context: grpc.ServicerContext
    ) -> guest_agent_pb2.WriteStdinResponse:
        with self._lock:
            running = self._running.get(request.exec_id)
        if running is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no running execution {request.exec_id!r}")
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


def serve(address: str, max_workers: int = 32) -> grpc.Server:
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
