"""The benchmark's own arithmetic (agentvm.cli.bench), without VMs."""

from __future__ import annotations

import os
import sys

import pytest

from agentvm.cli.bench import rss_parts
from agentvm.cli.bench_latency import _cli_env, first_rpc_s
from agentvm.common.errors import FailedPrecondition

PYTHON_BYTECODE = "PYTHONDONTWRITEBYTECODE"

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


CONNECTS = (
    "import os, socket, time; s = socket.socket(socket.AF_UNIX); "
    "s.connect(os.environ['AGENTVM_EXECUTOR_ADDR'].removeprefix('unix:')); time.sleep(30)"
)


def test_first_rpc_is_when_the_command_connects_to_the_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PYTHON_BYTECODE, "1")
    assert PYTHON_BYTECODE not in _cli_env()  # the CLI is timed with its bytecode cached
    assert os.environ[PYTHON_BYTECODE] == "1"
    took = first_rpc_s([sys.executable, "-c", f"import time; time.sleep(0.3); {CONNECTS}"])
    assert 0.3 <= took < 10  # the sleep, then the connect; not the 30 s after it


def test_a_command_that_never_calls_the_executor_is_named() -> None:
    with pytest.raises(FailedPrecondition, match=r"did not call the executor within 0\.5 s"):
        first_rpc_s([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
