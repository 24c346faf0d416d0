"""Mutual TLS between and into services: one private CA per installation.

Design (docs/SECURITY.md, "Authentication"):

- ``AGENTVM_TLS=mutual`` (the default): every service serves TLS only and
  requires a client certificate signed by the installation's CA; every caller
  (service, CLI, Python client) presents one. ``off``: plaintext (the token and
  the sockets' modes remain).
- ``AGENTVM_TLS_DIR`` (default ``/etc/agent-vm/tls``) holds ``ca.pem`` and
  ``ca.key``, and one ``<who>.pem`` / ``<who>.key`` per identity: the four
  services and ``client`` (local callers). ``agent-vm up`` creates them all;
  a process that finds its own pair missing creates it from the CA (and the
  CA, when there is none), under a lock, so concurrent starters agree.
- Identity: the certificate's common name, ``agent-vm-<who>``. A service's
  certificate also names ``<who>.agent-vm`` (DNS), the name its callers
  verify, so a pool-manager key cannot pose as vm-manager.
- Real deployments point ``AGENTVM_TLS_CA``, ``AGENTVM_TLS_CERT`` and
  ``AGENTVM_TLS_KEY`` at their own files; nothing is generated then.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("agentvm.tls")

SERVICES = ("vm-manager", "pool-manager", "executor", "monitor", "e2b-gateway")
CLIENT = "client"
IDENTITIES = (*SERVICES, CLIENT)
# One process's own files (an operator's PKI); never generated.
FILE_VARIABLES = ("AGENTVM_TLS_CA", "AGENTVM_TLS_CERT", "AGENTVM_TLS_KEY")


class TLSError(Exception):
    """Certificates cannot be read or made; the message says what to do."""


def common_name(who: str) -> str:
    """The certificate common name (the audited identity) of ``who``."""
    return f"agent-vm-{who}"


def server_name(service: str) -> str:
    """The DNS name a service's certificate carries and its callers verify."""
    return f"{service}.agent-vm"


@dataclass(frozen=True)
class TLSFiles:
    """PEM files one process uses: the CA it trusts, its certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) bytes; TLSError naming the file and the fix.

        In a directory that :func:`ensure` manages, read under its lock (shared):
        never a new key with the old certificate while a pair is being renewed.
        """
        out = []
        with _shared_lock(self.cert.parent):
            for path in (self.ca, self.cert, self.key):
                try:
                    out.append(path.read_bytes())
                except OSError as exc:
                    raise TLSError(
                        f"cannot read {path}: {exc.strerror}; run `agent-vm up` as the "
                        "services' user (it makes the installation's certificates), or set "
                        "AGENTVM_TLS_CA, AGENTVM_TLS_CERT and AGENTVM_TLS_KEY"
                    ) from None
        return out[0], out[1], out[2]


def files_in(tls_dir: Path, who: str) -> TLSFiles:
    return TLSFiles(tls_dir / "ca.pem", tls_dir / f"{who}.pem", tls_dir / f"{who}.key")


def configured_files(
    tls_dir: Path, who: str, env: Mapping[str, str] | None = None
) -> tuple[TLSFiles, bool]:
    """The files ``who`` uses, and whether they may be generated.

    AGENTVM_TLS_CA/CERT/KEY (all three) override the directory and are never generated.
    """
    env = os.environ if env is None else env
    names = FILE_VARIABLES
    given = [env.get(n, "").strip() for n in names]
    if any(given):
        if not all(given):
            missing = ", ".join(n for n, v in zip(names, given, strict=True) if not v)
            raise TLSError(f"{missing} not set: set all of {', '.join(names)} or none")
        return TLSFiles(Path(given[0]), Path(given[1]), Path(given[2])), False
    return files_in(tls_dir, who), True


def for_identity(mode: str, tls_dir: Path, who: str) -> TLSFiles | None:
    """The files ``who`` presents under AGENTVM_TLS=``mode`` (None: TLS is off).

    Creates the pair (and the CA) in ``tls_dir`` when missing or due for
    renewal, unless AGENTVM_TLS_CA/CERT/KEY name other files. A pair checked
    before and unchanged since (:func:`checked_stamp`) is not parsed again.
    """
    if mode == "off":
        return None
    if mode != "mutual":
        raise TLSError(f"AGENTVM_TLS={mode!r}: use mutual or off")
    files, generate = configured_files(tls_dir, who)
    if generate and not _still_good(tls_dir, who):
        from agentvm.common import tls_issue

        tls_issue.ensure_own(tls_dir, who)
    return files


# -- the check-once stamp ------------------------------------------------------------------
def stat_key(files: TLSFiles) -> list[list[int]]:
    """What identifies the exact files checked: a renewal or a new CA changes it."""
    out = []
    for path in (files.ca, files.cert, files.key):
        st = path.stat()
        out.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    return out


def checked_stamp(tls_dir: Path, who: str) -> Path:
    """Where the last check of ``who``'s pair is remembered (written by tls_issue)."""
    return tls_dir / f".checked-{who}.json"


def _still_good(tls_dir: Path, who: str) -> bool:
    """``who``'s pair was checked (signed by the CA, not due for renewal) and is unchanged."""
    try:
        stamp = json.loads(checked_stamp(tls_dir, who).read_text())
        return bool(
            stamp["files"] == stat_key(files_in(tls_dir, who))
            and time.time() < float(stamp["renew_at"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -- issuing (agentvm.common.tls_issue, imported on demand) --------------------------------
def ensure(tls_dir: Path, identities: tuple[str, ...] = IDENTITIES) -> list[str]:
    """Create the CA and the pairs of ``identities`` that are missing or about to expire.

    Returns who got a new pair. Idempotent; safe for concurrent callers.
    """
    from agentvm.common import tls_issue

    return tls_issue.ensure(tls_dir, identities)


def expires(cert_file: Path) -> datetime.datetime:
    """When the certificate in ``cert_file`` stops being valid (UTC)."""
    from agentvm.common import tls_issue

    return tls_issue.expires(cert_file)


def http_server_files(tls_dir: Path, who: str, names: list[str]) -> TLSFiles:
    """A server certificate from the installation's CA for an HTTPS endpoint named
    ``names`` (:func:`agentvm.common.tls_issue.http_server_files`)."""
    from agentvm.common import tls_issue

    return tls_issue.http_server_files(tls_dir, who, names)


@contextlib.contextmanager
def _shared_lock(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / ".lock", os.O_RDONLY)
    except OSError:  # not a directory ensure() manages (or not readable): no lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


# -- gRPC credentials ------------------------------------------------------------------
def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """TLS that requires a client certificate signed by the installation's CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """TLS that trusts the installation's CA only and presents ``files``' certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def target_options(service: str) -> list[tuple[str, Any]]:
    """Channel options verifying that the peer is ``service`` (whatever the address)."""
    return [("grpc.ssl_target_name_override", server_name(service))]


def peer_uses_tls(context: Any) -> bool:
    """Whether a call came over TLS (then it always has a verified certificate)."""
    try:
        kind = context.auth_context().get("transport_security_type") or []
    except Exception:  # noqa: BLE001 - a context without auth data is not TLS
        return False
    return bool(kind) and kind[0] in (b"ssl", "ssl")


def peer_identity(context: Any) -> str:
    """The verified certificate common name of a call's caller ("" without TLS)."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # noqa: BLE001 - a context without auth data has no identity
        return ""
    if not names:
        return ""
    value = names[0]
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
