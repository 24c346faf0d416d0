"""Host capability probes, declared once (used by vm-manager and `agent-vm doctor`)."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def can_raise_memlock() -> bool:
    """Whether this process may raise RLIMIT_MEMLOCK (needed by libvirt's memory hard limit).

    libvirt sets the QEMU process's locked-memory limit to the memtune hard
    limit; without CAP_SYS_RESOURCE (e.g. inside some containers) the domain
    then fails to start.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard == resource.RLIM_INFINITY:
        return True
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard + 4096))
        except (ValueError, OSError):
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/bin/virtiofsd")


def find_virtiofsd() -> str | None:
    """Path of a virtiofsd binary (QEMU's C one or the Rust one), if installed."""
    for path in VIRTIOFSD_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def io_weight_supported(cgroup_root: Path = Path("/sys/fs/cgroup")) -> bool:
    """Whether libvirt can give a VM a block I/O weight (``<blkiotune><weight>``).

    The kernel offers a weight only with the bfq scheduler (or cfq on old
    kernels) under cgroup v1's blkio controller, or with the io controller of
    cgroup v2. Elsewhere (mq-deadline or none under cgroup v1) libvirt refuses
    to start the domain: "blkio device weight is valid only for bfq or cfq
    scheduler".
    """
    v1 = cgroup_root / "blkio"
    if v1.is_dir():
        return (v1 / "blkio.weight").exists() or (v1 / "blkio.bfq.weight").exists()
    try:
        controllers = (cgroup_root / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return "io" in controllers
