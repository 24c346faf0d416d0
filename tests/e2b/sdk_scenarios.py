"""Scenarios run by the unchanged E2B SDK (in its own venv) against agent-vm's gateway.

Usage: python sdk_scenarios.py SCENARIO; environment from `agent-vm e2b env`.
Prints one JSON object of observations; the pytest side checks them.
"""

import json
import sys
import time


def lifecycle() -> dict[str, object]:
    from e2b import CommandExitException, Sandbox

    out: dict[str, object] = {}
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
    from e2b import TimeoutException

    try:
        sb.commands.run("true")
    except TimeoutException as exc:  # the SDK's "the sandbox is gone"
        out["after_kill"] = type(exc).__name__
    return out


def outside() -> dict[str, object]:
    """Paths outside /workspace: the sandbox's own root."""
    from e2b import Sandbox

    out: dict[str, object] = {}
    sb = Sandbox.create(timeout=120)
    try:
        payload = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks
        sb.files.write("/home/user/data/blob.bin", payload)
        out["blob"] = sb.files.read("/home/user/data/blob.bin", format="bytes") == payload
        out["seen_by_command"] = sb.commands.run("sha256sum /home/user/data/blob.bin").stdout[:64]
        root = {e.name: e.type.value for e in sb.files.list("/")}
        out["root"] = [root.get("etc"), root.get("tmp")]
        out["exists"] = [sb.files.exists("/etc/os-release"), sb.files.exists("/nope")]
        out["make_dir"] = [sb.files.make_dir("/tmp/x/y"), sb.files.make_dir("/tmp/x/y")]
        sb.files.rename("/home/user/data/blob.bin", "/tmp/x/y/moved.bin")
        out["moved"] = [e.name for e in sb.files.list("/tmp/x/y")]
        info = sb.files.get_info("/tmp/x/y/moved.bin")
        out["info"] = [info.size, info.permissions]
        sb.files.remove("/tmp/x")
        out["removed"] = sb.files.exists("/tmp/x")
    finally:
        sb.kill()
    return out


def commands() -> dict[str, object]:
    from e2b import CommandExitException, PtySize, Sandbox, SandboxQuery, TimeoutException

    out: dict[str, object] = {}
    sb = Sandbox.create(timeout=180, metadata={"scenario": "commands"})
    try:
        out["env_cwd"] = sb.commands.run("echo $A; pwd", envs={"A": "1"}, cwd="/tmp").stdout
        try:
            sb.commands.run("sleep 30", timeout=3)
        except TimeoutException as exc:
            out["timeout"] = type(exc).__name__
        out["after_timeout"] = sb.commands.run("pgrep -x sleep || echo none").stdout
        cat = sb.commands.run("cat", background=True, stdin=True)
        sb.commands.send_stdin(cat.pid, "ping\n")
        sb.commands.close_stdin(cat.pid)
        out["stdin_echo"] = cat.wait().stdout
        sleeper = sb.commands.run("sleep 100", background=True, timeout=0)
        follower = sb.commands.connect(sleeper.pid, timeout=0)
        out["listed"] = sleeper.pid in [p.pid for p in sb.commands.list()]
        out["killed"] = [sb.commands.kill(sleeper.pid), sb.commands.kill(999999)]
        try:
            follower.wait()
        except CommandExitException as exc:
            out["kill_exit"] = [exc.exit_code, exc.error]
        # A terminal: its size after a resize, and its shell's exit status.
        chunks: list[bytes] = []
        term = sb.pty.create(PtySize(rows=24, cols=80), timeout=60)
        sb.pty.resize(term.pid, PtySize(rows=40, cols=100))
        sb.pty.send_stdin(term.pid, b"stty size; tty; exit 7\n")
        try:
            term.wait(on_pty=chunks.append)
        except CommandExitException as exc:
            out["pty_exit"] = exc.exit_code
        text = b"".join(chunks).decode(errors="replace")
        out["pty_size"] = "40 100" in text
        out["pty_tty"] = "/dev/pts/" in text
        other = sb.pty.create(PtySize(rows=24, cols=80), timeout=60)
        out["pty_kill"] = sb.pty.kill(other.pid)
        info = sb.files.write("/workspace/info.txt", b"\x00\x01bytes")
        got = sb.files.get_info("/workspace/info.txt")
        out["get_info"] = [info.path, got.name, got.type.value, got.size]
        out["filter"] = [
            [
                s.sandbox_id
                for s in Sandbox.list(query=SandboxQuery(metadata={"scenario": k})).next_items()
            ]
            for k in ("commands", "nothing")
        ]
        out["id"] = sb.sandbox_id
        sb.set_timeout(5)
        time.sleep(9)
        out["alive_after_timeout"] = sb.is_running()
    finally:
        sb.kill()
    return out


def tenants() -> dict[str, object]:
    """Two tenants (E2B_API_KEY and OTHER_KEY); the second may hold one sandbox."""
    import os

    from e2b import NotFoundException, RateLimitException, Sandbox

    out: dict[str, object] = {}
    mine = Sandbox.create(timeout=120)
    other_key = os.environ["OTHER_KEY"]
    try:
        theirs = Sandbox.create(timeout=120, api_key=other_key)
        try:
            Sandbox.create(timeout=120, api_key=other_key)
        except RateLimitException as exc:
            out["quota"] = str(exc)
        out["their_list"] = [s.sandbox_id for s in Sandbox.list(api_key=other_key).next_items()]
        out["my_list"] = [s.sandbox_id for s in Sandbox.list().next_items()]
        out["ids"] = [mine.sandbox_id, theirs.sandbox_id]
        try:
            Sandbox.connect(mine.sandbox_id, api_key=other_key)
        except NotFoundException:
            out["connect_other"] = "NotFound"
        out["kill_other"] = Sandbox.kill(mine.sandbox_id, api_key=other_key)
        try:
            Sandbox.get_info(mine.sandbox_id, api_key=other_key)
        except NotFoundException:
            out["info_other"] = "NotFound"
        # envd with my sandbox's id but their sandbox's access token.
        import urllib.error
        import urllib.request

        token = theirs._envd_access_token
        request = urllib.request.Request(  # noqa: S310 - the test's gateway
            os.environ["E2B_SANDBOX_URL"] + "/process.Process/List",
            data=b"{}",
            headers={
                "E2b-Sandbox-Id": mine.sandbox_id,
                "E2b-Sandbox-Port": "49983",
                "X-Access-Token": token or "",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request) as resp:  # noqa: S310 - the test's gateway
                out["envd_other"] = resp.status
        except urllib.error.HTTPError as exc:
            out["envd_other"] = exc.code
        out["mine_alive"] = mine.is_running()
        theirs.kill()
    finally:
        mine.kill()
    return out


def autopause() -> dict[str, object]:
    """lifecycle on_timeout=pause: an idle sandbox pauses instead of ending."""
    from e2b import Sandbox

    out: dict[str, object] = {}
    sb = Sandbox.create(timeout=10, lifecycle={"on_timeout": "pause"})
    try:
        sb.files.write("/workspace/kept.txt", "still here")
        deadline = time.time() + 60
        while time.time() < deadline:
            state = Sandbox.get_info(sb.sandbox_id).state.value
            if state == "paused":
                break
            time.sleep(2)
        out["state"] = state
        again = Sandbox.connect(sb.sandbox_id)
        out["after_connect"] = [
            Sandbox.get_info(sb.sandbox_id).state.value,
            again.files.read("/workspace/kept.txt"),
        ]
    finally:
        sb.kill()
    return out


def interpreter() -> dict[str, object]:
    from e2b_code_interpreter import Sandbox

    out: dict[str, object] = {}
    with Sandbox.create(timeout=120) as sbx:
        sbx.run_code("x = 41")
        out["value"] = sbx.run_code("x + 1").text
        ex = sbx.run_code("print('hello world')")
        out["stdout"] = ex.logs.stdout
        err = sbx.run_code("1/0").error
        out["error"] = [err.name, "ZeroDivisionError" in err.traceback]
        out["env"] = sbx.run_code("import os; os.environ['V']", envs={"V": "x"}).text
        from e2b import TimeoutException

        try:
            sbx.run_code("import time; time.sleep(60)", timeout=3)
        except TimeoutException:
            out["cell_timeout"] = True
        out["after_timeout"] = sbx.run_code("x").text  # interrupted, the context lives on
        ctx = sbx.create_code_context(cwd="/tmp")
        sbx.run_code("y = 7", context=ctx)
        out["ctx"] = [
            sbx.run_code("y", context=ctx).text,
            sbx.run_code("import os; os.getcwd()", context=ctx).text,
        ]
        out["ctx_isolated"] = sbx.run_code("'y' in dir()").text
        out["contexts"] = sorted(c.id for c in sbx.list_code_contexts()) == sorted(
            ["default", ctx.id]
        )
        sbx.restart_code_context(ctx)
        out["after_restart"] = sbx.run_code("'y' in dir()", context=ctx).text
        sbx.remove_code_context(ctx)
        out["after_remove"] = [c.id for c in sbx.list_code_contexts()]
    return out


if __name__ == "__main__":
    started = time.time()
    scenarios = {
        "lifecycle": lifecycle,
        "commands": commands,
        "outside": outside,
        "tenants": tenants,
        "interpreter": interpreter,
        "autopause": autopause,
    }
    result = scenarios[sys.argv[1]]()
    result["seconds"] = round(time.time() - started, 2)
    print(json.dumps(result))
