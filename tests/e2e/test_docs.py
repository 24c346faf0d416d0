"""The Python examples of the user guide run as written, against real VMs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.vmharness import REPO, ExecutorProcess, VMManagerProcess, libvirt_domains

pytestmark = pytest.mark.vm

GUIDE = REPO / "docs" / "USER_GUIDE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
EXPECTED = [
    "hello from linux",
    "/workspace/work",
    "['output/copy.bin']",
    "b'desserts'",
    "['0', '1', '2']",
    "is closed: create a new one",
    "dns example.com denied name not in allow_domains",
]


def test_the_guide_has_the_examples_we_check() -> None:
    assert len(BLOCKS) == len(EXPECTED)


@pytest.mark.parametrize(("index", "expected"), list(enumerate(EXPECTED)))
def test_user_guide_example_runs(
    index: int, expected: str, executor: ExecutorProcess, vmm: VMManagerProcess
) -> None:
    before = set(libvirt_domains(vmm.prefix))
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        env=dict(os.environ, AGENTVM_EXECUTOR_ADDR=executor.address),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout
    assert set(libvirt_domains(vmm.prefix)) <= before, "the example left a VM behind"
