"""The processes of one Execute: a cgroup (v2) when the guest has one, else a process group.

The cgroup carries the Execute's limits (:mod:`.confine`), is killed as a
whole (``cgroup.kill``: also what called setsid()), and is where its CPU
time, peak memory and process count are read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

from agentvm.v1 import common_pb2
from agentvm_guest import confine

if TYPE_CHECKING:
    from agentvm_guest.pivot import Pivot

log = logging.getLogger("agentvm_guest.agent")

CGROUP_ROOT = "/sys/fs/cgroup/agentvm"


def read_first_line(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip()
    except OSError:
        return default


def meminfo() -> dict[str, int]:
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
        limit = confine.memory_limit(meminfo().get("MemTotal", 0))
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

    def confiner(self, pivot: Pivot | None = None) -> confine.Confiner:
        """The preexec_fn that moves the main process into the cgroup and confines it.

        It joins before exec, so no fork of the program escapes the cgroup.
        With ``pivot`` the program runs in an image's root (:mod:`.imageroot`).
        """
        return confine.Confiner(self.cgroup, pivot=pivot)

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


class Keeper:
    """Takes the cgroup work off a command's path: the next tree (its cgroup and
    limits) is made ahead, and finished trees are removed, once the agent has
    been quiet for IDLE_S (at the latest MAX_DELAY_S after a tree finished).
    Under TCG that work beside a command's start or its answer competes with
    them for the CPU and the GIL: measured, it then gained nothing."""

    IDLE_S = 0.02
    MAX_DELAY_S = 1.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spare: ProcessTree | None = None
        self._want = False  # a spare was taken: make the next one
        self._finished: list[ProcessTree] = []
        self._busy_at = 0.0  # the last take() or retire()
        self._thread: threading.Thread | None = None

    def take(self) -> ProcessTree:
        """A new tree for one Execute (or background process)."""
        with self._cond:
            tree, self._spare = self._spare, None
            self._want = True
            self._busy_at = time.monotonic()
        if tree is not None and tree.cgroup is not None:
            if os.path.dirname(tree.cgroup) == CGROUP_ROOT:
                return tree
            self.retire(tree)  # made for another root (tests change it)
        return ProcessTree()

    def retire(self, tree: ProcessTree) -> None:
        """Remove ``tree``'s cgroup soon (the caller has killed what was in it)."""
        with self._cond:
            self._finished.append(tree)
            self._busy_at = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cgroups", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._finished:
                    self._cond.wait()
                latest = time.monotonic() + self.MAX_DELAY_S
                while (now := time.monotonic()) < latest:
                    quiet = now - self._busy_at
                    if quiet >= self.IDLE_S:
                        break
                    self._cond.wait(self.IDLE_S - quiet)
                make, self._want = self._want and self._spare is None, False
                finished, self._finished = self._finished, []
            if make:  # first: the next command may come at once
                tree = ProcessTree()
                with self._cond:
                    kept = self._spare is None
                    if kept:
                        self._spare = tree
                if not kept:
                    tree.remove()
            for old in finished:
                old.remove()


KEEPER = Keeper()
