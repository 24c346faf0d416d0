"""The Python examples of the user guide run as written, against real VMs."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest

from tests.vmharness import (
    REPO,
    ExecutorProcess,
    VMManagerProcess,
    libvirt_domains,
    wait_for,
)

pytestmark = pytest.mark.vm

GUIDE = REPO / "docs" / "USER_GUIDE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
EXPECTED = [
    "hello from linux",
    "/workspace/work",
    "['output/copy.bin']",
    "b'desserts'",
    "['0', '1', '2']",
    "test 9\nTrue",
    "0 ['web']\n200\n15",
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
    # Closing returns before the VM is destroyed; it is gone right after.
    assert wait_for(lambda: set(libvirt_domains(vmm.prefix)) <= before, 60), (
        "the example left a VM behind"
    )


SH_BLOCKS = {
    doc: re.findall(r"```sh\n(.*?)```", (REPO / doc).read_text(), flags=re.S)
    for doc in ("README.md", "docs/USER_GUIDE.md")
}


@pytest.mark.parametrize("doc", sorted(SH_BLOCKS))
def test_the_buf_curl_example_runs_as_written(doc: str, executor: ExecutorProcess) -> None:
    """The `buf curl` line from the repository root, with no PATH of ours (issue 23 item 8).

    Only the installation's paths are swapped for the test executor's.
    """
    (block,) = [b for b in SH_BLOCKS[doc] if "buf curl" in b]
    script = (
        block.replace("/run/agent-vm/executor.sock", executor.address.removeprefix("unix:"))
        .replace("/etc/agent-vm/tls", str(executor.tls_dir))
        .replace("/etc/agent-vm/token", str(executor.token_file))
    )
    proc = subprocess.run(
        ["bash", "-euc", script],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    decoder, events, text = json.JSONDecoder(), [], proc.stdout.strip()
    while text:
        obj, end = decoder.raw_decode(text)
        events.append(obj)
        text = text[end:].strip()
    out = b"".join(base64.b64decode(e["output"]["data"]) for e in events if "output" in e)
    assert out.decode().strip().endswith("cloud-amd64")
    assert events[-1]["result"]["status"].get("exitCode", 0) == 0
