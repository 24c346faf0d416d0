"""Benchmark: what the E2B-compatible gateway costs over agent-vm's own client.

Run: flock /tmp/vmtests.lock .venv/bin/python -m tests.performance.bench_e2b
(a vm-manager, an executor and an e2b-gateway of its own; the SDKs from
scripts/e2b-sdks.sh). Prints one JSON object. The baseline, from the same run
against the same executor, is the Python client `agent_vm` doing the same:
create a sandbox (API workspace, as the gateway asks), run `/bin/true` the
way the SDK's commands.run does (`/bin/bash -l -c`), write and read back
1 MiB. The ratios are gateway over client (no goal set by an issue: a figure
to watch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from typing import Any

import agent_vm
from tests.vmharness import REPO, ExecutorProcess, GatewayProcess, lone_vmm_process

SDK_PYTHON = REPO / ".tools" / "e2b-sdk-2.63.0" / "bin" / "python"


def p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def client(creates: int, commands: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create_s": [], "command_ms": [], "file_1mib_ms": []}
    payload = bytes(range(256)) * 4096
    argv = ["/bin/bash", "-l", "-c", "/bin/true"]
    for i in range(creates):
        t0 = time.perf_counter()
        sb = agent_vm.Sandbox.create(workspace="api", lifetime=600)
        out["create_s"].append(time.perf_counter() - t0)
        try:
            if i == 0:
                sb.run(argv).check()  # warm
                for _ in range(commands):
                    t0 = time.perf_counter()
                    sb.run(argv).check()
                    out["command_ms"].append((time.perf_counter() - t0) * 1000)
                for _ in range(5):
                    t0 = time.perf_counter()
                    sb.files.write("bench.bin", payload)
                    assert sb.files.read("bench.bin") == payload
                    out["file_1mib_ms"].append((time.perf_counter() - t0) * 1000)
        finally:
            sb.close()
    return out


def gateway(gw: GatewayProcess, creates: int, commands: int) -> dict[str, list[float]]:
    key = gw.cli("e2b", "key", "create", "bench")
    url = f"http://127.0.0.1:{gw.http_port}"
    env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key}
    proc = subprocess.run(
        [str(SDK_PYTHON), str(REPO / "tests/e2b/sdk_bench.py"), str(creates), str(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    figures: dict[str, list[float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures


def run(creates: int, commands: int) -> dict[str, Any]:
    subprocess.run(["bash", str(REPO / "scripts/e2b-sdks.sh")], check=True)
    with lone_vmm_process() as vmm:
        os.environ["AGENTVM_TOKEN_FILE"] = str(vmm.token_file)
        os.environ["AGENTVM_TLS_DIR"] = str(vmm.tls_dir)
        ex = ExecutorProcess(base=vmm.base, prefix=vmm.prefix)
        ex.start()
        gw = GatewayProcess(base=vmm.base, prefix=vmm.prefix)
        gw.start()
        try:
            os.environ["AGENTVM_EXECUTOR_ADDR"] = ex.address
            base = client(creates, commands)
            via = gateway(gw, creates, commands)
        finally:
            gw.stop()
            ex.stop()
    out: dict[str, Any] = {}
    for name in base:
        out[name] = {"client_p50": p50(base[name]), "gateway_p50": p50(via[name])}
        out[name]["gateway_over_client"] = round(
            out[name]["gateway_p50"] / out[name]["client_p50"], 2
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=3, help="sandboxes created per side")
    parser.add_argument("--commands", type=int, default=30, help="commands timed per side")
    args = parser.parse_args()
    print(json.dumps(run(args.creates, args.commands), indent=2))


if __name__ == "__main__":
    main()
