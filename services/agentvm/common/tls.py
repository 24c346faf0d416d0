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
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("agentvm.tls")

SERVICES = ("vm-manager", "pool-manager", "executor", "monitor", "e2b-gateway")
CLIENT = "client"
IDENTITIES = (*SERVICES, CLIENT)
# One process's own files (an operator's PKI); never generated.
FILE_VARIABLES = ("AGENTVM_TLS_CA", "AGENTVM_TLS_CERT", "AGENTVM_TLS_KEY")
CA_DAYS = 3650
LEAF_DAYS = 825
# A leaf with less than this left is renewed by the process that uses it.
RENEW_BEFORE = datetime.timedelta(days=30)


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

    Creates the pair (and the CA) in ``tls_dir`` when missing, unless
    AGENTVM_TLS_CA/CERT/KEY name other files.
    """
    if mode == "off":
        return None
    if mode != "mutual":
        raise TLSError(f"AGENTVM_TLS={mode!r}: use mutual or off")
    files, generate = configured_files(tls_dir, who)
    if generate:
        try:
            ensure(tls_dir, (who,))
        except TLSError as exc:
            # Cannot renew (a read-only directory, another user's): a pair that
            # is still valid serves until it expires.
            if not _valid(tls_dir, who, datetime.timedelta(0)):
                raise
            log.warning(
                "using %s's certificate until it expires (%s): it cannot be renewed: %s",
                who,
                expires(files.cert).isoformat(),
                exc,
            )
    return files


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


# -- generation ----------------------------------------------------------------------------
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
