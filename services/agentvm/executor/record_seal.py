"""Sealing the sandbox record an executor keeps with its VM (docs/SCALE_OUT.md).

The record goes into the VM's libvirt metadata (vm-manager's SetVMRecord),
which libvirt's read-only socket shows to local users, and it holds the
default environment's secret values. So it leaves the executor sealed:
AES-256-GCM under a key every executor replica shares, with the VM's name as
associated data (a record copied onto another VM does not open there).

Sealed form: ``b"avr1"`` | 12-byte random nonce | ciphertext and 16-byte tag.
The key file holds the key as 64 hex digits (a Kubernetes Secret carries it as
text, mounted 0440 for the pod's fsGroup); a missing file is created, mode
0600, by the first replica to start. A key other users may read is refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentvm.common.errors import FailedPrecondition

MAGIC = b"avr1"
NONCE_BYTES = 12
KEY_BYTES = 32
TAG_BYTES = 16


class RecordUnreadable(ValueError):
    """A sealed record that does not open: not one of ours, another key, another VM."""


class RecordKey:
    """The key executor replicas seal their records with."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a record key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> RecordKey:
        """The key in ``path``; a new random one written there (0600) if it is missing."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            text = secrets.token_hex(KEY_BYTES) + "\n"
            # Written whole under a name of its own, then linked into place: when two
            # replicas start at once, one key wins (link fails for the other) and
            # neither ever reads a key half written (O_EXCL on the file itself did
            # let a second replica read it empty).
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                tmp.unlink()
        mode = path.stat().st_mode
        if mode & stat.S_IRWXO:
            raise FailedPrecondition(
                f"record key {path} is open to every user (mode {stat.S_IMODE(mode):o}): "
                f"it opens every sandbox's secrets; chmod 600 {path}"
            )
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
            return cls(key)
        except ValueError:
            raise FailedPrecondition(
                f"record key {path} is not {KEY_BYTES * 2} hex digits: restore the file every "
                "executor replica shares, or remove it on a single host to start afresh "
                "(open sandboxes' records then no longer open)"
            ) from None

    def seal(self, vm_name: str, record: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + nonce + self._aead.encrypt(nonce, record, vm_name.encode())

    def open(self, vm_name: str, sealed: bytes) -> bytes:
        """The record sealed for ``vm_name``; RecordUnreadable for anything else."""
        if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
            raise RecordUnreadable(f"the record of {vm_name} is not a sealed executor record")
        nonce = sealed[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[len(MAGIC) + NONCE_BYTES :], vm_name.encode())
        except InvalidTag:
            raise RecordUnreadable(
                f"the record of {vm_name} does not open: sealed under another record key "
                "(every executor replica must share one) or for another VM"
            ) from None
