"""Issuing and checking the installation's certificates (docs/SECURITY.md, "Authentication").

The part of :mod:`agentvm.common.tls` that needs ``cryptography``: imported
only when a pair must be made, renewed or checked, so that a client whose
pair was checked before (:func:`agentvm.common.tls.for_identity`) starts
without it (``agent-vm run`` pays ~30 ms for the import).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentvm.common.tls import (
    IDENTITIES,
    SERVICES,
    TLSError,
    TLSFiles,
    checked_stamp,
    common_name,
    files_in,
    server_name,
    stat_key,
)

CA_DAYS = 3650
LEAF_DAYS = 825
# A leaf with less than this left is renewed by the process that uses it.
RENEW_BEFORE = datetime.timedelta(days=30)

log = logging.getLogger("agentvm.tls")


@contextlib.contextmanager
def _locked(tls_dir: Path) -> Iterator[None]:
    try:
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tls_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise TLSError(
            f"cannot use the TLS directory {tls_dir}: {exc.strerror}; run as the services' "
            "user, or point AGENTVM_TLS_CA, AGENTVM_TLS_CERT and AGENTVM_TLS_KEY at a copy "
            f"of {tls_dir}/ca.pem and a client certificate of that CA (e.g. its client.pem "
            "and client.key)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically and durably (never an empty ca.pem after a crash)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agent-vm"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _make_ca(tls_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = _name("agent-vm CA " + secrets.token_hex(4))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(tls_dir / "ca.key", _key_pem(key), 0o600)
    _write(tls_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_ca(tls_dir: Path) -> tuple[x509.Certificate, Any]:
    try:
        cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise TLSError(
            f"cannot use the CA in {tls_dir} ({exc}): run as the services' user, or "
            f"move {tls_dir} away and run `agent-vm up` to make a new one"
        ) from None
    return cert, key


def _make_leaf(tls_dir: Path, who: str) -> None:
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    sans: list[x509.GeneralName] = []
    if who in SERVICES:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        sans = [x509.DNSName(server_name(who))]
    _issue(tls_dir, who, usages, sans)


def _issue(
    tls_dir: Path, who: str, usages: list[x509.ObjectIdentifier], sans: list[x509.GeneralName]
) -> None:
    """``<who>.pem``/``.key`` signed by the installation's CA."""
    ca_cert, ca_key = _load_ca(tls_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name(who)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    _write(tls_dir / f"{who}.key", _key_pem(key), 0o600)
    _write(tls_dir / f"{who}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def http_server_files(tls_dir: Path, who: str, names: list[str]) -> TLSFiles:
    """A server certificate from the installation's CA for an HTTPS endpoint named ``names``.

    ``<who>.pem``/``.key`` in ``tls_dir``, its subject alternative names the
    host names and IP addresses clients dial (the E2B SDKs verify them against
    ``ca.pem``). Made again when the names change or it nears its end.
    """
    import ipaddress

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert_file, key_file = tls_dir / f"{who}.pem", tls_dir / f"{who}.key"
    with _locked(tls_dir):
        if not (tls_dir / "ca.pem").exists():
            _make_ca(tls_dir)
        current: list[x509.GeneralName] = []
        if _exists(cert_file) and _exists(key_file):
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            with contextlib.suppress(x509.ExtensionNotFound):
                current = list(
                    cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                )
            fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE
        else:
            fresh = False
        if not fresh or sorted(map(str, current)) != sorted(map(str, sans)):
            _issue(tls_dir, who, [ExtendedKeyUsageOID.SERVER_AUTH], sans)
    return TLSFiles(ca=tls_dir / "ca.pem", cert=cert_file, key=key_file)


def expires(cert_file: Path) -> datetime.datetime:
    """When the certificate in ``cert_file`` stops being valid (UTC)."""
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc


def _exists(path: Path) -> bool:
    """Path.exists() that says False where it may not look (another user's directory)."""
    try:
        return path.exists()
    except OSError:
        return False


def _valid(tls_dir: Path, who: str, margin: datetime.timedelta) -> bool:
    """``who`` has a pair signed by the directory's CA, valid for ``margin`` more."""
    files = files_in(tls_dir, who)
    try:
        if not files.key.exists():
            return False
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca)  # a new CA makes every old pair unusable
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - _now() > margin


def _usable(tls_dir: Path, who: str) -> bool:
    return _valid(tls_dir, who, RENEW_BEFORE)


def ensure_own(tls_dir: Path, who: str) -> None:
    """Make or renew ``who``'s own pair as :func:`ensure` does, then remember the check.

    A pair that cannot be renewed (a read-only directory, another user's)
    serves until it expires, with a warning.
    """
    files = files_in(tls_dir, who)
    try:
        before = stat_key(files)
    except OSError:
        before = None
    try:
        made = ensure(tls_dir, (who,))
    except TLSError as exc:
        if not _valid(tls_dir, who, datetime.timedelta(0)):
            raise
        log.warning(
            "using %s's certificate until it expires (%s): it cannot be renewed: %s",
            who,
            expires(files.cert).isoformat(),
            exc,
        )
        return
    if made or before is None:
        return  # checked next time, from the files as they are then
    _remember(tls_dir, who, before)


def _remember(tls_dir: Path, who: str, checked: list[list[int]]) -> None:
    """Write the stamp for the files as they were stat'ed before the check (a file
    replaced meanwhile differs from the stamp, so it is checked again)."""
    try:
        renew_at = expires(files_in(tls_dir, who).cert) - RENEW_BEFORE
        _write(
            checked_stamp(tls_dir, who),
            json.dumps({"files": checked, "renew_at": renew_at.timestamp()}).encode(),
            0o644,
        )
    except (OSError, ValueError):
        pass  # a directory this process may not write: the check runs each time


def ensure(tls_dir: Path, identities: tuple[str, ...] = IDENTITIES) -> list[str]:
    """Create the CA and the pairs of ``identities`` that are missing or about to expire.

    Returns who got a new pair. Idempotent; safe for concurrent callers.
    """
    for who in identities:
        if who not in IDENTITIES:
            raise TLSError(f"unknown identity {who!r}: use one of {', '.join(IDENTITIES)}")
    if _exists(tls_dir / "ca.pem") and all(_usable(tls_dir, w) for w in identities):
        return []
    made: list[str] = []
    with _locked(tls_dir):
        if not _exists(tls_dir / "ca.pem"):
            try:
                _make_ca(tls_dir)
            except OSError as exc:
                raise TLSError(f"cannot write the CA in {tls_dir}: {exc.strerror}") from None
        for who in identities:
            if not _usable(tls_dir, who):
                try:
                    _make_leaf(tls_dir, who)
                except OSError as exc:
                    raise TLSError(
                        f"cannot write {who}'s certificate in {tls_dir}: {exc.strerror}"
                    ) from None
                made.append(who)
    return made
