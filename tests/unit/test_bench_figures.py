"""The benchmark's own arithmetic (agentvm.cli.bench), without VMs."""

from __future__ import annotations

from agentvm.cli.bench import rss_parts

# Three mappings as QEMU under TCG has them: guest RAM (512 MiB), the TCG code
# buffer (1 GiB less a guard page) and the binary.
SMAPS = """\
7f5047e00000-7f5067e00000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              159744 kB
7f5070000000-7f50affff000 rwxp 00000000 00:00 0
Size:            1048572 kB
Rss:               63488 kB
557ac2f1b000-557ac3322000 r--p 00000000 08:01 123   /usr/bin/qemu-system-x86_64
Size:               4124 kB
KernelPageSize:        4 kB
Rss:                4124 kB
"""


def test_rss_parts_tells_guest_ram_tcg_cache_and_qemu_apart() -> None:
    assert rss_parts(SMAPS, 512) == {"guest_ram": 156.0, "tcg_code_cache": 62.0, "qemu_own": 4.0}


def test_rss_parts_of_another_memory_size_counts_no_guest_ram() -> None:
    # A 1 GiB guest: its RAM is not the 512 MiB mapping (then QEMU's own).
    parts = rss_parts(SMAPS, 1024)
    assert parts["guest_ram"] == 0
    assert parts["qemu_own"] == 160.0
