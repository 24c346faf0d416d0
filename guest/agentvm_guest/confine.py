"""Confinement of agent code inside the guest.

Defence in depth only: the VM is the security boundary and the host never
relies on anything here (a guest kernel exploit undoes all of it). What it
buys is a guest that survives ordinary hostile code, and an agent that keeps
answering the host:

- each Execute's process tree lives in its own cgroup with a process limit
  (``pids.max``: a fork bomb hits EAGAIN instead of taking the guest), a
  memory limit below the guest's RAM (``memory.max``: a memory hog is killed
  by the kernel inside its cgroup, never the agent) and ``memory.oom.group``
  (the whole tree goes at once);
- the tree gets its own cgroup namespace on a ``nsdelegate`` mount, so it
  cannot move itself out of that cgroup nor raise its limits;
- agent code runs as root (it may install packages, bind low ports, manage
  its files) but with a reduced capability bounding set: no module loading,
  raw I/O (/dev/mem, ioperm), mounts or other CAP_SYS_ADMIN operations,
  ptrace of the agent, clock or reboot changes, device nodes, BPF;
- ``no_new_privs``: nothing it executes (setuid or file-capability binaries)
  regains what was dropped.

The confinement runs in the child between fork and exec
(``subprocess.Popen(preexec_fn=...)``). Everything it needs is prepared in
the parent; the child only makes system calls (no imports, no locks, no
logging), which is what keeps ``preexec_fn`` safe in a threaded server.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import TYPE_CHECKING

from agentvm_guest import libc

if TYPE_CHECKING:
    from agentvm_guest.pivot import Pivot

# <linux/prctl.h>, <linux/sched.h>
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWNS = 0x00020000

# Directories agent code must not see: the agent's own socket (the agent
# would run its requests confined anyway, but it also answers Reidentify and
# ConfigureNetwork, which are the host's to call).
HIDDEN_DIRS = ("/run/agentvm",)

# <linux/capability.h>: what agent code keeps. Everything else is dropped.
KEEP_CAPS: dict[str, int] = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "net_bind_service": 10,
    "net_broadcast": 11,
    # Agent code may reconfigure the guest's own network: the host filters
    # every frame by the MAC and address it assigned, so this only lets it
    # cut itself off (the network tests prove exactly that).
    "net_admin": 12,
    "net_raw": 13,
    "sys_chroot": 18,
    "audit_write": 29,
    "setfcap": 31,
}
# The largest capability number the kernel may know (CAP_LAST_CAP is 40 on
# 6.1); /proc/sys/kernel/cap_last_cap narrows it at run time.
_MAX_CAP = 63

# The agent's own OOM score: the last process the guest kernel picks.
AGENT_OOM_SCORE_ADJ = -900

# Per-Execute limits.
PIDS_MAX = 1024
# Memory the agent and the guest's own processes keep out of reach of agent
# code: at least this much, or an eighth of the guest's RAM if that is more.
MEMORY_RESERVE_BYTES = 64 * 1024 * 1024


def shield_agent() -> None:
    """Make the agent process the OOM killer's last choice (best effort)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as fh:
        fh.write(str(AGENT_OOM_SCORE_ADJ))


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            return min(int(fh.read().strip()), _MAX_CAP)
    except (OSError, ValueError):
        return _MAX_CAP


@functools.cache
def _dropped() -> tuple[int, ...]:
    keep = set(KEEP_CAPS.values())
    return tuple(cap for cap in range(last_cap() + 1) if cap not in keep)


def dropped_caps() -> list[int]:
    """The capabilities agent code loses (the kernel's number of them is fixed)."""
    return list(_dropped())


def memory_limit(total_bytes: int) -> int:
    """memory.max for one Execute in a guest with ``total_bytes`` of RAM (0: unknown)."""
    if total_bytes <= 0:
        return 0
    reserve = max(MEMORY_RESERVE_BYTES, total_bytes // 8)
    return max(total_bytes - reserve, total_bytes // 2)


def _write(path: bytes, data: bytes) -> None:
    """Write ``data`` to an existing file with bare system calls (safe after fork)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class ConfinementError(OSError):
    """Agent code could not be confined; it is not started."""


class Confiner:
    """The ``preexec_fn`` that confines one Execute's main process.

    ``cgroup`` is the Execute's cgroup directory (None where the guest has
    no cgroup v2: then only the capabilities and no_new_privs apply).
    """

    def __init__(
        self,
        cgroup: str | None,
        *,
        drop_caps: bool | None = None,
        hide: tuple[str, ...] | None = None,
        pivot: Pivot | None = None,
    ) -> None:
        self._procs = os.path.join(cgroup, "cgroup.procs").encode() if cgroup else None
        self._hide = [d.encode() for d in (hide if hide is not None else HIDDEN_DIRS)]
        self._hide = [d for d in self._hide if os.path.isdir(d)]
        # Dropping from the bounding set needs CAP_SETPCAP: root only.
        if drop_caps is None:
            drop_caps = os.geteuid() == 0
        self._drop = dropped_caps() if drop_caps else []
        # Into an image's root (:mod:`.pivot`): the agent's directories are then
        # not hidden but gone from the program's view with the whole old root.
        self._pivot = pivot

    def __call__(self) -> None:
        # In the child, after fork: system calls only.
        # The agent shields itself from the OOM killer (agent.py); its
        # programs must not inherit that.
        with contextlib.suppress(OSError):
            _write(b"/proc/self/oom_score_adj", b"0")
        if self._procs is not None:
            _write(self._procs, b"0")
            if libc.unshare(CLONE_NEWCGROUP) != 0:
                raise ConfinementError(ctypes.get_errno(), "unshare(CLONE_NEWCGROUP)")
        if self._hide or self._pivot is not None:
            # A mount namespace of its own, where the hidden directories are
            # covered by an empty read-only tmpfs (it cannot unmount it
            # without CAP_SYS_ADMIN, nor reach them through /proc/<agent>/root
            # without CAP_SYS_PTRACE), or whose root is the image's.
            if libc.unshare(CLONE_NEWNS) != 0:
                raise ConfinementError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            if libc.mount(b"none", b"/", None, libc.MS_REC | libc.MS_PRIVATE, None) != 0:
                raise ConfinementError(ctypes.get_errno(), "mount(/, MS_PRIVATE)")
        if self._pivot is not None:
            self._pivot.enter()
        elif self._hide:
            flags = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
            for path in self._hide:
                if libc.mount(b"tmpfs", path, b"tmpfs", flags, b"size=4k,mode=0555") != 0:
                    raise ConfinementError(ctypes.get_errno(), "mount(tmpfs)")
        for cap in self._drop:
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 22:  # EINVAL: a capability this kernel does not have
                    raise ConfinementError(err, f"prctl(PR_CAPBSET_DROP, {cap})")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise ConfinementError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if self._pivot is not None:
            self._pivot.become_user()  # last: the steps above need root
