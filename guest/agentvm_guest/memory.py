"""Giving memory back to the host (GuestAgentService.ReclaimMemory).

The VM's virtio balloon reports free pages to the host (free page
reporting, in blocks of 2 MiB or more, a couple of seconds after they are
freed), and QEMU discards them. What is free is therefore already given
back; what this adds is making more of the guest free: the clean page cache
(files read at boot that nothing maps any more) and, by compaction, whole
free blocks out of scattered free pages, which is what reporting needs.
"""

from __future__ import annotations

import contextlib
import os

from agentvm_guest.proctree import meminfo

DROP_CACHES = "/proc/sys/vm/drop_caches"
COMPACT_MEMORY = "/proc/sys/vm/compact_memory"


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def reclaim() -> tuple[int, int]:
    """Flush, drop clean caches, compact; (MemFree, MemTotal) in bytes after.

    OSError when the page cache cannot be dropped (the agent is not root, or
    /proc/sys is read-only); a kernel without compaction is not an error.
    """
    os.sync()  # dirty pages cannot be dropped; written back first
    _write(DROP_CACHES, "3")  # page cache, dentries and inodes
    with contextlib.suppress(FileNotFoundError):  # CONFIG_COMPACTION=n
        _write(COMPACT_MEMORY, "1")
    mem = meminfo()
    return mem.get("MemFree", 0), mem.get("MemTotal", 0)
