"""The key-service interface: everything the keyring needs from a KEK holder.

A key service (the embedded keystore, OpenBao/Vault Transit, a Mo-Vault EaaS)
holds versioned key-encryption keys and wraps data keys under them. `context`
(the user name) binds a wrapped key to its owner, so a record copied to
another user fails to unwrap.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import os
from dataclasses import dataclass

from sftpvault.errors import KeyServiceError

DEK_SIZE = 32


@dataclass(frozen=True)
class WrappedKey:
    """A data key as the key service returned it, plus what is needed to unwrap it."""

    service: str
    kek_name: str
    kek_version: int
    algorithm: str
    ciphertext: str  # service-specific text form (base64, "vault:v1:...", hex)


class KeyService(abc.ABC):
    """Wraps and unwraps 256-bit data keys under a versioned KEK."""

    service_id: str
    kek_name: str

    def new_dek(self, context: bytes) -> tuple[bytes, WrappedKey]:
        """A fresh random DEK and its wrapped form (services may generate it themselves)."""
        dek = os.urandom(DEK_SIZE)
        return dek, self.wrap(dek, context)

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        """Wrap `plaintext` under the latest KEK version."""

    @abc.abstractmethod
    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        """Recover the data key; KeyServiceError if it cannot."""

    def rewrap(self, wrapped: WrappedKey, context: bytes) -> WrappedKey:
        """Move `wrapped` to the latest KEK version (services may avoid exposing it)."""
        return self.wrap(self.unwrap(wrapped, context), context)

    def rewrap_many(self, items: list[tuple[WrappedKey, bytes]]) -> list[WrappedKey | KeyServiceError]:
        """Rewrap a batch; one result (or the error for that item) per item."""
        results: list[WrappedKey | KeyServiceError] = []
        for wrapped, context in items:
            try:
                results.append(self.rewrap(wrapped, context))
            except KeyServiceError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def rotate(self) -> int:
        """Create a new KEK version and return its number."""

    @abc.abstractmethod
    def latest_version(self) -> int:
        """The version `wrap` uses now."""

    def raise_floor(self, version: int) -> None:
        """Refuse to decrypt with KEK versions below `version` (Transit's min_decryption_version)."""
        raise KeyServiceError(f"the {self.service_id} key service has no minimum decryption version")

    @abc.abstractmethod
    def health(self) -> None:
        """Raise KeyServiceError if the service cannot serve requests."""

    def startup(self) -> list[str]:
        """Prepare for serving (create what is missing); returns warnings for the log."""
        self.health()
        return []


_BINDING = 16


def bind(dek: bytes, context: bytes) -> bytes:
    """For ciphers without associated data (RSA): prefix the DEK with a hash of its owner."""
    return hashlib.sha256(b"sftpvault-owner\x00" + context).digest()[:_BINDING] + dek


def unbind(plaintext: bytes, context: bytes) -> bytes:
    """Inverse of bind(); KeyServiceError if the key belongs to someone else."""
    expected = bind(b"", context)
    if len(plaintext) != _BINDING + DEK_SIZE or not hmac.compare_digest(plaintext[:_BINDING], expected):
        raise KeyServiceError("wrapped key does not unwrap for this user (altered or copied record)")
    return plaintext[_BINDING:]
