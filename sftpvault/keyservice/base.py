"""The key-service interface: everything the keyring needs from a KEK holder.

A key service (the embedded keystore, OpenBao/Vault Transit, a Mo-Vault EaaS)
holds versioned key-encryption keys and wraps data keys under them. `context`
binds a wrapped key to its owner, so a record copied to another user fails to
unwrap.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class WrappedKey:
    """A data key as the key service returned it, plus what is needed to unwrap it."""

    service: str
    kek_name: str
    kek_version: int
    algorithm: str
    ciphertext: str  # service-specific text form (base64 or the service's own)


class KeyService(abc.ABC):
    """Wraps and unwraps 256-bit data keys under a versioned KEK."""

    service_id: str

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, context: bytes) -> WrappedKey:
        """Wrap `plaintext` under the latest KEK version."""

    @abc.abstractmethod
    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        """Recover the data key; KeyServiceError if it cannot."""

    def rewrap(self, wrapped: WrappedKey, context: bytes) -> WrappedKey:
        """Move `wrapped` to the latest KEK version (services may avoid exposing it)."""
        return self.wrap(self.unwrap(wrapped, context), context)

    @abc.abstractmethod
    def rotate(self) -> int:
        """Create a new KEK version and return its number."""

    @abc.abstractmethod
    def latest_version(self) -> int:
        """The version `wrap` uses now."""

    def startup(self) -> list[str]:
        """Prepare for serving (create what is missing); returns warnings for the log."""
        self.health()
        return []

    @abc.abstractmethod
    def health(self) -> None:
        """Raise KeyServiceError if the service cannot serve requests."""
