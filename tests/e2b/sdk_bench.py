"""The E2B SDK's side of tests/performance/bench_e2b.py: timings as JSON.

Usage: python sdk_bench.py CREATES COMMANDS; environment from `agent-vm e2b env`.
"""

import json
import sys
import time


def main() -> None:
    from e2b import Sandbox

    creates, commands = int(sys.argv[1]), int(sys.argv[2])
    out: dict[str, list[float]] = {"create_s": [], "command_ms": [], "file_1mib_ms": []}
    payload = bytes(range(256)) * 4096
    for i in range(creates):
        t0 = time.perf_counter()
        sb = Sandbox.create(timeout=600)
        out["create_s"].append(time.perf_counter() - t0)
        try:
            if i == 0:
                sb.commands.run("/bin/true")  # warm
                for _ in range(commands):
                    t0 = time.perf_counter()
                    sb.commands.run("/bin/true")
                    out["command_ms"].append((time.perf_counter() - t0) * 1000)
                for _ in range(5):
                    t0 = time.perf_counter()
                    sb.files.write("/workspace/bench.bin", payload)
                    assert sb.files.read("/workspace/bench.bin", format="bytes") == payload
                    out["file_1mib_ms"].append((time.perf_counter() - t0) * 1000)
        finally:
            sb.kill()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
