"""The installation's CA and certificates, and mutual TLS between in-process peers."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentvm.common import tls, tls_issue
from agentvm.common.config import Settings
from agentvm.common.errors import FailedPrecondition
from agentvm.common.grpc_util import Caller, tls_files

ECHO = "/test.Echo/Who"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ensure_makes_a_private_ca_and_one_pair_per_identity(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    assert sorted(tls.ensure(d)) == sorted(tls.IDENTITIES)
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert os.stat(d / "ca.key").st_mode & 0o777 == 0o600
    ca = _cert(d / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for who in tls.IDENTITIES:
        assert os.stat(d / f"{who}.key").st_mode & 0o777 == 0o600
        cert = _cert(d / f"{who}.pem")
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == f"agent-vm-{who}"
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        if who == tls.CLIENT:
            # The client certificate cannot serve as any service.
            assert ExtendedKeyUsageOID.SERVER_AUTH not in usages
            with pytest.raises(x509.ExtensionNotFound):
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        else:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == [f"{who}.agent-vm"]
    # Idempotent: nothing is remade, nothing changes.
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert tls.ensure(d) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_concurrent_starters_agree_on_one_ca(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    errors: list[BaseException] = []

    def start(who: str) -> None:
        try:
            tls.ensure(d, (who,))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(who,)) for who in tls.IDENTITIES * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ca = _cert(d / "ca.pem")
    for who in tls.IDENTITIES:
        _cert(d / f"{who}.pem").verify_directly_issued_by(ca)


def test_a_certificate_about_to_expire_is_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "tls"
    monkeypatch.setattr(tls_issue, "LEAF_DAYS", 10)
    tls.ensure(d, ("executor",))
    old = _cert(d / "executor.pem")
    monkeypatch.setattr(tls_issue, "LEAF_DAYS", 825)
    assert tls.ensure(d, ("executor",)) == ["executor"]
    new = _cert(d / "executor.pem")
    assert new.not_valid_after_utc - old.not_valid_after_utc > datetime.timedelta(days=700)
    assert tls.ensure(d, ("executor",)) == []


def test_explicit_files_are_all_or_nothing_and_never_generated(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSError, match="AGENTVM_TLS_KEY not set"):
        tls.configured_files(tmp_path, "executor", {"AGENTVM_TLS_CA": "a", "AGENTVM_TLS_CERT": "b"})
    env = {"AGENTVM_TLS_CA": "/x/ca", "AGENTVM_TLS_CERT": "/x/c", "AGENTVM_TLS_KEY": "/x/k"}
    files, generate = tls.configured_files(tmp_path, "executor", env)
    assert files == tls.TLSFiles(Path("/x/ca"), Path("/x/c"), Path("/x/k"))
    assert not generate
    with pytest.raises(tls.TLSError, match=r"cannot read /x/ca.*AGENTVM_TLS_CA"):
        files.read()


def test_modes_and_bad_identities(tmp_path: Path) -> None:
    assert tls.for_identity("off", tmp_path / "never", "executor") is None
    assert not (tmp_path / "never").exists()
    with pytest.raises(tls.TLSError, match="use mutual or off"):
        tls.for_identity("on", tmp_path, "executor")
    with pytest.raises(tls.TLSError, match="unknown identity 'root'"):
        tls.ensure(tmp_path / "tls", ("root",))


def test_an_unusable_directory_is_failed_precondition_naming_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings(tls="mutual", tls_dir=blocker / "tls")
    with pytest.raises(FailedPrecondition) as err:
        tls_files(settings, "executor")
    assert str(blocker / "tls") in err.value.message
    assert "AGENTVM_TLS_CERT" in err.value.message


def test_settings_refuse_an_unknown_tls_mode() -> None:
    with pytest.raises(Exception, match="AGENTVM_TLS='yes': use mutual or off"):
        Settings(tls="yes")


# -- mutual TLS between in-process peers ---------------------------------------------------
def _who_handler() -> Any:
    async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return tls.peer_identity(context).encode()

    return grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )


def _call(address: str, credentials: grpc.ChannelCredentials, service: str) -> str:
    with grpc.secure_channel(address, credentials, tls.target_options(service)) as ch:
        reply: bytes = ch.unary_unary(ECHO, None, None)(b"", timeout=5)
        return reply.decode()


def test_mutual_tls_names_the_caller_and_refuses_strangers(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    tls.ensure(d)
    other = tmp_path / "other"
    tls.ensure(other, (tls.CLIENT,))
    address = f"unix:{tmp_path}/vmm.sock"
    results: dict[str, str] = {}

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_who_handler(),))
        server.add_secure_port(address, tls.server_credentials(tls.files_in(d, "vm-manager")))
        await server.start()
        try:
            results.update(await asyncio.to_thread(calls))
        finally:
            await server.stop(None)

    def calls() -> dict[str, str]:
        out = {}
        for who in ("executor", tls.CLIENT):
            out[who] = _call(address, tls.channel_credentials(tls.files_in(d, who)), "vm-manager")
        ca, _, _ = tls.files_in(d, tls.CLIENT).read()
        _, cert, key = tls.files_in(other, tls.CLIENT).read()
        strangers = {
            "plaintext": None,
            "no certificate": grpc.ssl_channel_credentials(ca),
            "another CA": grpc.ssl_channel_credentials(ca, key, cert),
        }
        for what, credentials in strangers.items():
            try:
                if credentials is None:
                    with grpc.insecure_channel(address) as ch:
                        ch.unary_unary(ECHO, None, None)(b"", timeout=5)
                else:
                    _call(address, credentials, "vm-manager")
                out[what] = "answered"
            except grpc.RpcError as exc:
                out[what] = exc.code().name
        # The caller checks who answers: vm-manager's socket is not the executor.
        try:
            _call(address, tls.channel_credentials(tls.files_in(d, "client")), "executor")
            out["wrong server"] = "answered"
        except grpc.RpcError as exc:
            out["wrong server"] = exc.code().name
        return out

    asyncio.run(main())
    assert results == {
        "executor": "agent-vm-executor",
        "client": "agent-vm-client",
        "plaintext": "UNAVAILABLE",
        "no certificate": "UNAVAILABLE",
        "another CA": "UNAVAILABLE",
        "wrong server": "UNAVAILABLE",
    }


def test_caller_of_settings_presents_the_client_certificate(tmp_path: Path) -> None:
    settings = Settings(tls="mutual", tls_dir=tmp_path / "tls", auth="none")
    caller = Caller.of(settings)
    assert caller.token is None
    assert caller.credentials is not None
    assert (tmp_path / "tls" / "client.pem").exists()
    assert Caller.of(Settings(tls="off", tls_dir=tmp_path / "x", auth="none")).credentials is None


def test_a_new_ca_makes_the_old_pairs_be_remade(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    tls.ensure(d)
    (d / "ca.pem").unlink()
    (d / "ca.key").unlink()
    assert sorted(tls.ensure(d, ("executor", "client"))) == ["client", "executor"]
    ca = _cert(d / "ca.pem")
    _cert(d / "executor.pem").verify_directly_issued_by(ca)


def test_a_pair_that_cannot_be_renewed_serves_until_it_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "tls"
    monkeypatch.setattr(tls_issue, "LEAF_DAYS", 10)  # due for renewal at once
    tls.ensure(d, ("executor",))

    def read_only(tls_dir: Path) -> Any:
        raise tls.TLSError(f"cannot use the TLS directory {tls_dir}: Read-only file system")

    monkeypatch.setattr(tls_issue, "_locked", read_only)
    files = tls.for_identity("mutual", d, "executor")
    assert files == tls.files_in(d, "executor")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=11)
    monkeypatch.setattr(tls_issue, "_now", lambda: later)
    with pytest.raises(tls.TLSError, match="Read-only"):
        tls.for_identity("mutual", d, "executor")


def test_a_user_who_cannot_read_the_certificates_gets_one_line_naming_the_fix(
    tmp_path: Path,
) -> None:
    """The CLI run by another user than the services' (here: nobody) cannot read the
    installation's 0700 directory: one line, exit 2, saying what to do."""
    d = tmp_path / "tls"
    tls.ensure(d)
    # Not measured by coverage: nobody could not write its data file (the checkout's).
    own_env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE", "COVERAGE"))}
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "agentvm.cli.main", "vm", "list"],
        env={**own_env, "AGENTVM_TLS": "mutual", "AGENTVM_TLS_DIR": str(d),
             "AGENTVM_VM_MANAGER_ADDR": f"unix:{tmp_path}/nothing.sock", "HOME": "/"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"cannot use the TLS directory {d}" in lines[0]
    assert "AGENTVM_TLS_CERT" in lines[0]


def test_reads_wait_while_a_pair_is_being_renewed(tmp_path: Path) -> None:
    """A reader never gets a new key with the old certificate: it waits for ensure()."""
    d = tmp_path / "tls"
    tls.ensure(d)
    done = threading.Event()

    def read() -> None:
        tls.files_in(d, "executor").read()
        done.set()

    with tls_issue._locked(d):  # what ensure() holds while it writes
        reader = threading.Thread(target=read)
        reader.start()
        assert not done.wait(0.3), "read() did not wait for the renewal"
    assert done.wait(5)
    reader.join()


def test_a_service_channel_before_tls_is_decided_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No accidental plaintext: setup_tls() or use_plaintext() must come first."""
    from agentvm.common import grpc_util

    monkeypatch.setattr(grpc_util, "_TLS_DECIDED", [])
    with pytest.raises(RuntimeError, match="setup_tls"):
        grpc_util.aio_channel("unix:/nonexistent.sock", "vm-manager")


def test_a_pair_checked_once_is_not_parsed_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """for_identity remembers a good check (the CLI then starts without cryptography);
    a renewed pair, a new CA or a pair due for renewal is checked again."""
    d = tmp_path / "tls"
    tls.ensure(d)
    calls: list[str] = []
    real = tls_issue.ensure_own

    def counting(tls_dir: Path, who: str) -> None:
        calls.append(who)
        real(tls_dir, who)

    monkeypatch.setattr(tls_issue, "ensure_own", counting)
    for _ in range(3):
        assert tls.for_identity("mutual", d, tls.CLIENT) == tls.files_in(d, tls.CLIENT)
    assert calls == [tls.CLIENT]  # checked once, then the stamp vouches
    # Another process renews the pair: the stamp no longer matches the files.
    monkeypatch.setattr(tls_issue, "LEAF_DAYS", 10)
    (d / "client.pem").unlink()
    tls.ensure(d, (tls.CLIENT,))
    tls.for_identity("mutual", d, tls.CLIENT)
    assert calls == [tls.CLIENT] * 2
    # That pair is due for renewal (10 days < 30): renewed now, checked again next time.
    monkeypatch.setattr(tls_issue, "LEAF_DAYS", 825)
    tls.for_identity("mutual", d, tls.CLIENT)
    assert _cert(d / "client.pem").not_valid_after_utc > datetime.datetime.now(
        datetime.UTC
    ) + datetime.timedelta(days=800)
    tls.for_identity("mutual", d, tls.CLIENT)
    tls.for_identity("mutual", d, tls.CLIENT)
    assert calls == [tls.CLIENT] * 4
    # A stamp that says "renew now" is not trusted.
    stamp = tls.checked_stamp(d, tls.CLIENT)
    data = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**data, "renew_at": 0}))
    tls.for_identity("mutual", d, tls.CLIENT)
    assert calls == [tls.CLIENT] * 5
    # A garbled stamp is a check, never an error.
    stamp.write_text("{not json")
    tls.for_identity("mutual", d, tls.CLIENT)
    assert calls == [tls.CLIENT] * 6


def test_a_client_with_a_checked_pair_starts_without_cryptography(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    tls.ensure(d)
    tls.for_identity("mutual", d, tls.CLIENT)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agentvm.common import tls\n"
        f"files = tls.for_identity('mutual', Path({str(d)!r}), 'client')\n"
        "tls.channel_credentials(files)\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
