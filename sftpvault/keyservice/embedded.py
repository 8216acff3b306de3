"""The embedded key service: versioned KEKs in a local keystore file.

`keys/keystore.json` (mode 0600) holds every KEK version. With a passphrase
(env SFTPVAULT_KEYSTORE_PASSPHRASE or `keystore_passphrase_file`) the KEKs are
sealed under a scrypt-derived key, so the file alone reveals nothing; without
one they are stored as raw keys, like an SSH host key, and the server warns.
For production, a remote key service (OpenBao Transit) keeps KEKs off the host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sftpvault.errors import KeyServiceError
from sftpvault.fsutil import atomic_write
from sftpvault.keyservice.base import KeyService, WrappedKey

ALGORITHM = "aes256-gcm"
KEK_NAME = "sftpvault"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_WRAP_LABEL = b"sftpvault-dek\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class EmbeddedKeyService(KeyService):
    """KEKs live in a keystore file next to the wrapped DEK records."""

    service_id = "embedded"
    kek_name = KEK_NAME

    def __init__(self, path: Path, passphrase: bytes | None = None) -> None:
        self.path = path
        self._passphrase = passphrase
        self._lock = threading.Lock()
        self._loaded_mtime: int | None = None
        self._keks: dict[int, bytes] = {}

    @property
    def sealed(self) -> bool:
        return self._passphrase is not None

    def create_if_missing(self) -> bool:
        """Create the keystore with KEK version 1; True if it was created."""
        with self._lock:
            if self.path.exists():
                return False
            salt = os.urandom(16)
            self._save({1: AESGCM.generate_key(bit_length=256)}, salt)
            logging.getLogger("sftpvault.keys").info("created the embedded keystore %s", self.path)
            return True

    def startup(self) -> list[str]:
        self.create_if_missing()
        self.health()
        if self.sealed:
            return []
        return [
            "the embedded keystore is not passphrase-protected; set SFTPVAULT_KEYSTORE_PASSPHRASE before "
            "first start, or use a remote key service, to keep KEKs off this disk"
        ]

    def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        version = self.latest_version()
        nonce = os.urandom(12)
        sealed = AESGCM(self._kek(version)).encrypt(nonce, plaintext, _WRAP_LABEL + context)
        return WrappedKey(self.service_id, KEK_NAME, version, ALGORITHM, _b64(nonce + sealed))

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        if wrapped.algorithm != ALGORITHM or wrapped.kek_name != KEK_NAME:
            raise KeyServiceError(f"embedded key service cannot unwrap {wrapped.algorithm} under {wrapped.kek_name}")
        raw = _unb64(wrapped.ciphertext)
        try:
            return AESGCM(self._kek(wrapped.kek_version)).decrypt(raw[:12], raw[12:], _WRAP_LABEL + context)
        except InvalidTag:
            raise KeyServiceError("wrapped key does not unwrap for this user (altered or copied record)") from None

    def rotate(self) -> int:
        with self._lock:
            keks, salt = self._read()
            version = max(keks) + 1
            keks[version] = AESGCM.generate_key(bit_length=256)
            self._save(keks, salt)
            return version

    def latest_version(self) -> int:
        return max(self._current())

    def health(self) -> None:
        self._current()

    # -- storage ------------------------------------------------------------

    def _kek(self, version: int) -> bytes:
        keks = self._current()
        if version not in keks:
            raise KeyServiceError(f"KEK version {version} is not in the embedded keystore")
        return keks[version]

    def _current(self) -> dict[int, bytes]:
        """The KEKs, re-read when another process (the CLI) has rotated them."""
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                raise KeyServiceError(
                    f"keystore {self.path} is missing (run 'sftpvault serve' once to create it)"
                ) from None
            if mtime != self._loaded_mtime:
                self._keks, _ = self._read()
                self._loaded_mtime = mtime
            return self._keks

    def _read(self) -> tuple[dict[int, bytes], bytes]:
        try:
            doc = json.loads(self.path.read_text())
            salt = _unb64(doc["salt"])
            entries = doc["keks"]
        except (OSError, ValueError, KeyError) as exc:
            raise KeyServiceError(f"keystore {self.path} is unreadable: {exc.__class__.__name__}") from None
        if doc.get("sealed") and self._passphrase is None:
            raise KeyServiceError("the keystore is passphrase-protected: set SFTPVAULT_KEYSTORE_PASSPHRASE")
        if not doc.get("sealed") and self._passphrase is not None:
            raise KeyServiceError("a keystore passphrase is set but the keystore is not sealed")
        box = self._box(salt) if doc.get("sealed") else None
        keks = {}
        for version, text in entries.items():
            raw = _unb64(text)
            if box is not None:
                try:
                    raw = box.decrypt(raw[:12], raw[12:], f"kek:{version}".encode())
                except InvalidTag:
                    raise KeyServiceError("wrong keystore passphrase") from None
            keks[int(version)] = raw
        return keks, salt

    def _save(self, keks: dict[int, bytes], salt: bytes) -> None:
        box = self._box(salt) if self.sealed else None
        entries = {}
        for version, key in keks.items():
            if box is not None:
                nonce = os.urandom(12)
                key = nonce + box.encrypt(nonce, key, f"kek:{version}".encode())
            entries[str(version)] = _b64(key)
        doc = {
            "format": 1,
            "name": KEK_NAME,
            "sealed": self.sealed,
            "salt": _b64(salt),
            "updated": int(time.time()),
            "keks": entries,
        }
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(doc, indent=1).encode())

    def _box(self, salt: bytes) -> AESGCM:
        assert self._passphrase is not None
        key = hashlib.scrypt(self._passphrase, salt=salt, dklen=32, maxmem=64 * 1024 * 1024, **_SCRYPT)
        return AESGCM(key)
