"""Scenarios run by the unchanged E2B SDK (in its own venv) against agent-vm's gateway.

Usage: python sdk_scenarios.py SCENARIO; environment from `agent-vm e2b env`.
Prints one JSON object of observations; the pytest side checks them.
"""

import json
import sys
import time


def lifecycle() -> dict:
    from e2b import CommandExitException, Sandbox

    out: dict = {}
    sb = Sandbox.create(metadata={"suite": "e2b"}, envs={"FOO": "bar"}, timeout=120)
    out["id"] = sb.sandbox_id
    r = sb.commands.run("echo hello $FOO; cat /proc/version")
    out["stdout"] = r.stdout
    out["exit_code"] = r.exit_code
    try:
        sb.commands.run("echo oops >&2; exit 3")
    except CommandExitException as exc:
        out["exit_exc"] = [exc.exit_code, exc.stderr]
    sb.files.write("a.txt", "hi there")
    out["read"] = sb.files.read("a.txt")
    big = bytes(range(256)) * (20 * 4096)  # 20 MiB
    sb.files.write("/workspace/big.bin", big)
    out["big_ok"] = sb.files.read("/workspace/big.bin", format="bytes") == big
    out["exists"] = [sb.files.exists("a.txt"), sb.files.exists("nope.txt")]
    out["make_dir"] = [sb.files.make_dir("d"), sb.files.make_dir("d")]
    sb.files.rename("a.txt", "d/b.txt")
    out["list"] = sorted(e.name for e in sb.files.list("d"))
    sb.files.remove("d")
    out["removed"] = sb.files.exists("d")
    h = sb.commands.run("sleep 60", background=True)
    out["bg_listed"] = h.pid in [p.pid for p in sb.commands.list()]
    out["listed"] = [s.sandbox_id for s in Sandbox.list().next_items()]
    sb.pause()
    out["paused_state"] = Sandbox.get_info(sb.sandbox_id).state.value
    s2 = Sandbox.connect(sb.sandbox_id)
    out["after_resume"] = [
        s2.files.read("/workspace/big.bin", format="bytes") == big,
        h.pid in [p.pid for p in s2.commands.list()],
    ]
    s2.kill()
    out["running_after_kill"] = sb.is_running()
    return out


def interpreter() -> dict:
    from e2b_code_interpreter import Sandbox

    out: dict = {}
    with Sandbox.create(timeout=120) as sbx:
        sbx.run_code("x = 41")
        out["value"] = sbx.run_code("x + 1").text
        ex = sbx.run_code("print('hello world')")
        out["stdout"] = ex.logs.stdout
        err = sbx.run_code("1/0").error
        out["error"] = [err.name, "ZeroDivisionError" in err.traceback]
    return out


if __name__ == "__main__":
    started = time.time()
    result = {"lifecycle": lifecycle, "interpreter": interpreter}[sys.argv[1]]()
    result["seconds"] = round(time.time() - started, 2)
    print(json.dumps(result))
