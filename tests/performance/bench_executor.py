"""Benchmark: command round trip in a warm sandbox, and file transfer throughput.

Run: .venv/bin/python -m tests.performance.bench_executor [--calls 200] [--mib 50]
(against the services started by `agent-vm up`, or AGENTVM_EXECUTOR_ADDR).
Prints one JSON object; each figure has a baseline from the same run on the
same machine: a host `subprocess.run(['true'])` for round trips and a
host-local file copy for throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import agent_vm
from tests.performance.bench_boot import host_true, pct


def round_trips(sb: agent_vm.Sandbox, calls: int) -> list[float]:
    sb.run(["true"])  # warm up
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        sb.run(["true"]).check()
        out.append(time.perf_counter() - t)
    return out


def transfer(sb: agent_vm.Sandbox, src: Path, dst: Path) -> tuple[float, float]:
    """(upload MB/s, download MB/s) of ``src`` through the sandbox's file API."""
    size_mb = src.stat().st_size / 1e6
    t = time.perf_counter()
    sb.files.upload(src, "input/bench.bin")
    up = size_mb / (time.perf_counter() - t)
    t = time.perf_counter()
    sb.files.download("input/bench.bin", dst)
    down = size_mb / (time.perf_counter() - t)
    sb.files.remove("input/bench.bin")
    return round(up, 1), round(down, 1)


def run(calls: int, mib: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.bin"
        src.write_bytes(os.urandom(mib * 1024 * 1024))
        t = time.perf_counter()
        shutil.copyfile(src, Path(tmp) / "copy.bin")
        local = mib * 1.048576 / (time.perf_counter() - t)
        out["host_local_copy_mb_s"] = round(local, 1)
        for mode in ("shared", "api"):
            with agent_vm.Sandbox.create(workspace=mode) as sb:
                up, down = transfer(sb, src, Path(tmp) / f"back-{mode}.bin")
                out[f"transfer_{mode}_mb_s"] = {
                    "upload": up,
                    "download": down,
                    "upload_over_local_copy": round(up / local, 3),
                    "download_over_local_copy": round(down / local, 3),
                }
                if mode == "shared":
                    rtts = round_trips(sb, calls)
                    base = statistics.median(host_true(max(calls, 20)))
                    out["exec_true_round_trip_ms"] = {
                        "n": len(rtts),
                        "p50": round(statistics.median(rtts) * 1000, 2),
                        "p99": round(pct(rtts, 0.99) * 1000, 2),
                    }
                    out["host_subprocess_true_ms"] = {"p50": round(base * 1000, 3)}
                    out["exec_p50_over_host_true_p50"] = round(statistics.median(rtts) / base, 1)
    out["file_mib"] = mib
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--mib", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(run(args.calls, args.mib), indent=2))


if __name__ == "__main__":
    main()
