"""The unchanged E2B Python SDK drives agent-vm sandboxes through e2b-gateway (issue 18).

The SDK runs in its own venv (scripts/e2b-sdks.sh; the npm `e2b` too) against a real gateway
process in front of the tests' executor and real VMs; each scenario prints what
it observed and the checks are here.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from tests.vmharness import REPO, ExecutorProcess, GatewayProcess, free_port

pytestmark = pytest.mark.vm
SDK = "2.63.0"
# Still widely used; no code interpreter (e2b-code-interpreter needs e2b >= 2.55.1).
OLD_SDK = "2.45.1"


@pytest.fixture(scope="module")
def gateway(executor: ExecutorProcess) -> Iterator[GatewayProcess]:
    subprocess.run(["bash", str(REPO / "scripts/e2b-sdks.sh")], check=True)
    proc = GatewayProcess(base=executor.base, prefix=executor.prefix)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop_if_running()


def run_sdk(gateway: GatewayProcess, key: str, *argv: str, sdk: str = SDK, **extra: str) -> str:
    """Run a program under the SDK's venv, pointed at the gateway; its stdout."""
    url = f"http://127.0.0.1:{gateway.http_port}"
    env = {
        **os.environ,
        "E2B_API_URL": url,
        "E2B_SANDBOX_URL": url,
        "E2B_API_KEY": key,
        **extra,
    }
    python = REPO / ".tools" / f"e2b-sdk-{sdk}" / "bin" / "python"
    return run_client([str(python), *argv], env)


def run_client(argv: list[str], env: dict[str, str]) -> str:
    """A client program's stdout; its stderr in the failure when it fails."""
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def scenario(
    gateway: GatewayProcess, name: str, key: str, sdk: str = SDK, **extra: str
) -> dict[str, object]:
    out = run_sdk(gateway, key, str(REPO / "tests/e2b/sdk_scenarios.py"), name, sdk=sdk, **extra)
    return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("sdk", [SDK, OLD_SDK])
def test_the_sdk_creates_runs_moves_files_pauses_connects_and_kills(
    gateway: GatewayProcess, sdk: str
) -> None:
    key = gateway.cli("e2b", "key", "create", "lifecycle")
    seen = scenario(gateway, "lifecycle", key, sdk=sdk)
    assert str(seen["stdout"]).startswith("hello bar\nLinux version")  # the guest kernel's
    assert seen["exit_code"] == 0
    assert seen["exit_exc"] == [3, "oops\n"]
    assert seen["read"] == "hi there"
    assert seen["big_ok"] is True  # 20 MiB byte for byte
    assert seen["exists"] == [True, False]
    assert seen["make_dir"] == [True, False]
    assert seen["list"] == ["b.txt"]
    assert seen["removed"] is False
    assert seen["bg_listed"] is True
    assert seen["listed"] == [seen["id"]]
    assert seen["paused_state"] == "paused"
    assert seen["after_resume"] == [True, True]  # files and the running process kept
    assert seen["running_after_kill"] is False
    # 2.63 names it; 2.45.1 has only the TimeoutException it derives from.
    assert seen["after_kill"] == (
        "SandboxNotRunningException" if sdk == SDK else "TimeoutException"
    )
    # The gateway's own /metrics counted what the SDK asked, by API.
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    for api, code in (("rest", "201"), ("envd-process", "200"), ("envd-filesystem", "200")):
        assert f'agentvm_e2b_http_requests_total{{api="{api}",code="{code}"' in text, api


def test_run_code_keeps_state_and_reports_exceptions(gateway: GatewayProcess) -> None:
    key = gateway.cli("e2b", "key", "create", "interp")
    seen = scenario(gateway, "interpreter", key)
    assert seen["value"] == "42"
    assert seen["stdout"] == ["hello world\n"]
    assert seen["error"] == ["ZeroDivisionError", True]
    assert seen["env"] == "'x'"
    assert seen["cell_timeout"] is True
    assert seen["after_timeout"] == "41"
    assert seen["ctx"] == ["7", "'/tmp'"]
    assert seen["ctx_isolated"] == "False"
    assert seen["contexts"] is True
    assert seen["after_restart"] == "False"  # a fresh interpreter
    assert seen["after_remove"] == ["default"]


def test_commands_timeouts_stdin_kill_terminals_file_info_filters_and_expiry(
    gateway: GatewayProcess,
) -> None:
    key = gateway.cli("e2b", "key", "create", "commands")
    seen = scenario(gateway, "commands", key)
    assert seen["env_cwd"] == "1\n/tmp\n"
    assert seen["timeout"] == "TimeoutException"
    assert seen["after_timeout"] == "none\n"  # the timed-out command was killed
    assert seen["stdin_echo"] == "ping\n"
    assert seen["listed"] is True
    assert seen["killed"] == [True, False]
    assert seen["kill_exit"][0] == -1  # type: ignore[index]
    assert seen["pty_exit"] == 7
    assert seen["pty_size"] is True
    assert seen["pty_tty"] is True
    assert seen["pty_kill"] is True
    assert seen["get_info"] == ["/workspace/info.txt", "info.txt", "file", 7]
    assert seen["filter"] == [[seen["id"]], []]
    assert seen["alive_after_timeout"] is False  # set_timeout(5) ended it


def test_a_sandbox_set_to_pause_on_timeout_pauses_when_idle(gateway: GatewayProcess) -> None:
    key = gateway.cli("e2b", "key", "create", "autopause")
    seen = scenario(gateway, "autopause", key)
    assert seen["state"] == "paused"
    assert seen["after_connect"] == ["running", "still here"]


def test_a_tenant_sees_and_touches_only_its_own_sandboxes_within_its_quota(
    gateway: GatewayProcess,
) -> None:
    key = gateway.cli("e2b", "key", "create", "tenant-a")
    other = gateway.cli("e2b", "key", "create", "tenant-b", "--max-sandboxes", "1")
    seen = scenario(gateway, "tenants", key, OTHER_KEY=other)
    ids = seen["ids"]
    assert isinstance(ids, list)
    mine, theirs = ids
    assert "limit" in str(seen["quota"])
    assert seen["their_list"] == [theirs]
    assert seen["my_list"] == [mine]
    assert seen["connect_other"] == "NotFound"
    assert seen["kill_other"] is False
    assert seen["info_other"] == "NotFound"
    assert seen["envd_other"] == 404
    assert seen["mine_alive"] is True
    # A revoked key stops working at once.
    gateway.cli("e2b", "key", "rm", "tenant-b")
    with pytest.raises(AssertionError, match="invalid API key"):
        scenario(gateway, "tenants", other, OTHER_KEY=other)


def test_paths_outside_the_workspace_are_the_sandboxs_own(gateway: GatewayProcess) -> None:
    key = gateway.cli("e2b", "key", "create", "outside")
    seen = scenario(gateway, "outside", key)
    assert seen["blob"] is True
    # What a command in the sandbox reads is what was written (3 MiB, byte for byte).
    assert seen["seen_by_command"] == hashlib.sha256(bytes(range(256)) * 4096 * 3).hexdigest()
    assert seen["root"] == ["dir", "dir"]
    assert seen["exists"] == [True, False]
    assert seen["make_dir"] == [True, False]
    assert seen["moved"] == ["moved.bin"]
    assert seen["info"] == [3 * 2**20, "-rw-r--r--"]
    assert seen["removed"] is False


@pytest.mark.parametrize("example", ["quickstart_e2b.py", "quickstart_code_interpreter.py"])
def test_the_sdks_quickstarts_run_as_published(gateway: GatewayProcess, example: str) -> None:
    key = gateway.cli("e2b", "key", "create", "quickstart")
    out = run_sdk(gateway, key, str(REPO / "tests/e2b" / example))
    if example == "quickstart_e2b.py":
        assert out.splitlines() == ["Hello from E2B!", "", "Hello, World!"]
    else:
        assert out.splitlines()[0] == "Logs(stdout: ['hello world\\n'], stderr: [])"
        assert "name='etc'" in out  # files.list("/") lists the sandbox's root


def test_the_javascript_sdk_from_npm(gateway: GatewayProcess) -> None:
    key = gateway.cli("e2b", "key", "create", "js")
    url = f"http://127.0.0.1:{gateway.http_port}"
    env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key}
    out = run_client(["node", str(REPO / ".tools/e2b-js/scenario.mjs")], env)
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["stdout"] == "hello bar\n"
    assert seen["exit"] == 4
    assert seen["read"] == "from js"
    assert seen["list"] == ["a.txt"]
    assert seen["listed"] is True
    assert seen["killed"] is True
    assert seen["sandboxes"] == [seen["id"]]
    assert seen["running"] is False


def test_https_with_a_certificate_from_the_installations_ca(executor: ExecutorProcess) -> None:
    """AGENTVM_E2B_TLS=ca: HTTP/2 over TLS, verified by the SDK against ca.pem."""
    proc = GatewayProcess(
        base=executor.base,
        prefix=executor.prefix,
        name="e2b-gateway-tls",
        extra_env={
            "AGENTVM_E2B_TLS": "ca",
            "AGENTVM_E2B_HOSTNAMES": "localhost",
            "AGENTVM_E2B_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        },
    )
    proc.start()
    try:
        key = proc.cli("e2b", "key", "create", "tls")
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in proc.cli("e2b", "env", "--key", key).splitlines()
            if line.startswith("export ")
        )
        assert exports["E2B_API_URL"] == f"https://localhost:{proc.http_port}"
        ca = exports["SSL_CERT_FILE"]
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", proc.http_port)) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls_sock,
        ):
            assert tls_sock.selected_alpn_protocol() == "h2"
        python = REPO / ".tools" / f"e2b-sdk-{SDK}" / "bin" / "python"
        out = run_client(
            [str(python), str(REPO / "tests/e2b/quickstart_e2b.py")], {**os.environ, **exports}
        )
        assert out.splitlines() == ["Hello from E2B!", "", "Hello, World!"]
        # Plain HTTP is refused off loopback.
        plain = GatewayProcess(
            base=executor.base,
            prefix=executor.prefix,
            name="e2b-gateway-plain",
            extra_env={"AGENTVM_E2B_HTTP_ADDR": f"0.0.0.0:{free_port()}"},
        )
        with pytest.raises(RuntimeError, match="plain HTTP is served on loopback only"):
            plain.start(timeout=15)
    finally:
        proc.stop_if_running()
