"""What a VM's console log says about why its guest went down.

A kernel panic with ``panic=-1`` resets the guest at once, and ``on_reboot``
destroy turns the reset into a plain shutdown: libvirt says SHUTOFF/SHUTDOWN,
as for a guest that powered off. Only the console tells them apart: the
kernel prints its panic there (an emergency message, shown even with
``quiet``). The log is written by the guest, so it is read as untrusted: its
last ``TAIL_BYTES`` only (libvirt truncates it at every start, so it holds the
current run), and the line quoted is printable ASCII, cut to ``QUOTE_CHARS``.
A guest that prints a panic line without panicking only gets its own VM
called failed instead of stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

PANIC = "Kernel panic - not syncing"
TAIL_BYTES = 64 * 1024
QUOTE_CHARS = 200


def panic_line(log: Path) -> str:
    """The kernel's panic line at the end of the console ``log`` ("" when none, or
    when the log cannot be read)."""
    try:
        with log.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError:
        return ""
    text = tail.decode("ascii", "replace")
    at = text.rfind(PANIC)
    if at < 0:
        return ""
    line = text[at:].splitlines()[0]
    return "".join(c for c in line if c.isprintable() and c.isascii())[:QUOTE_CHARS].strip()
