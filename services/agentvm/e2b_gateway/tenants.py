"""API keys: who a caller is (its tenant) and how many sandboxes it may hold.

A key is ``e2b_`` + 40 hex digits (the shape E2B's keys have, which wrappers of
the SDK check). Only its SHA-256 is stored, in one JSON file (mode 0600) that
``agent-vm e2b key create|rm`` edit under a lock and the gateway re-reads when
it changes, so a revoked key stops working at once.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

KEY_PREFIX = "e2b_"
_KEY = re.compile(r"e2b_[0-9a-f]{40}")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_MAX_SANDBOXES = 20


class TenantError(Exception):
    """A key or tenant operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Key:
    """One API key: its tenant, its hash, when it was made and the tenant's limit."""

    tenant: str
    key_id: str  # the first 8 hex digits, to tell keys apart in listings
    sha256: str
    created_at: str
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TenantError(
            f"tenant name {name!r}: use 1-63 of a-z, 0-9 and '-' (starting with a letter or digit)"
        )
    return name


class KeyStore:
    """The key file: read by the gateway, edited by the CLI."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, int, list[Key]] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def all_keys(self) -> list[Key]:
        """Every key (re-read when the file changed)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self._cache and self._cache[:2] == (st.st_mtime, st.st_size):
            return self._cache[2]
        try:
            raw = json.loads(self.path.read_text())
            keys = [Key(**entry) for entry in raw["keys"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TenantError(
                f"{self.path} is not a key file agent-vm wrote ({exc}): "
                "move it away and create the keys again"
            ) from exc
        self._cache = (st.st_mtime, st.st_size, keys)
        return keys

    def _write(self, keys: list[Key]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys]}, f, indent=1)
        os.replace(tmp, self.path)
        self._cache = None

    def create(self, tenant: str, max_sandboxes: int = DEFAULT_MAX_SANDBOXES) -> str:
        """A new key for ``tenant`` (made on first use); the key itself is shown only now."""
        check_name(tenant)
        if not 1 <= max_sandboxes <= 10_000:
            raise TenantError(f"max sandboxes {max_sandboxes}: use 1 to 10000")
        key = KEY_PREFIX + secrets.token_hex(20)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with self._locked():
            keys = self.all_keys()
            # One limit per tenant: the newest key's applies to all of them.
            keys = [
                Key(**{**asdict(k), "max_sandboxes": max_sandboxes})
                for k in keys
                if k.tenant == tenant
            ] + [k for k in keys if k.tenant != tenant]
            keys.append(Key(tenant, key[4:12], _hash(key), now, max_sandboxes))
            self._write(keys)
        return key

    def remove(self, tenant: str, key_id: str = "") -> int:
        """Revoke ``tenant``'s keys (only the one whose id is ``key_id`` if given); how many."""
        with self._locked():
            keys = self.all_keys()
            keep = [
                k for k in keys if not (k.tenant == tenant and (not key_id or k.key_id == key_id))
            ]
            removed = len(keys) - len(keep)
            if removed == 0:
                raise TenantError(
                    f"no key of tenant {tenant!r}"
                    + (f" with id {key_id!r}" if key_id else "")
                    + ": `agent-vm e2b key list` shows them"
                )
            self._write(keep)
        return removed

    def verify(self, presented: str) -> Key | None:
        """The key ``presented`` is, or None (wrong shape, unknown or revoked)."""
        if not _KEY.fullmatch(presented):
            return None
        digest = _hash(presented)
        for key in self.all_keys():
            if hmac.compare_digest(key.sha256, digest):
                return key
        return None


class AccessTokens:
    """envd access tokens: HMAC of the sandbox id with the gateway's secret.

    Nothing is stored per sandbox. Only the sandbox's tenant is ever given its
    token (create, connect), so another tenant cannot present it. The secret
    (32 random bytes, 0600) is made on first use.
    """

    def __init__(self, secret_file: Path) -> None:
        secret_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        self._secret = secret_file.read_bytes()
        if len(self._secret) < 32:
            raise TenantError(f"{secret_file} is shorter than 32 bytes: remove it and restart")

    def token(self, sandbox_id: str) -> str:
        return hmac.new(self._secret, sandbox_id.encode(), hashlib.sha256).hexdigest()

    def valid(self, presented: str, sandbox_id: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.token(sandbox_id).encode())
