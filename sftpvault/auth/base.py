"""The authentication-backend interface.

A backend answers two questions about a login name: does this password match,
and which public keys may log in. The SSH layer asks the configured backends in
order; later issues add LDAP and PAM behind the same interface.
"""

from __future__ import annotations

import abc


class AuthBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def check_password(self, user: str, password: str) -> bool:
        """True only if `user` exists and `password` is theirs (constant effort either way)."""

    @abc.abstractmethod
    def authorized_key_blobs(self, user: str) -> set[bytes]:
        """SSH wire-format public keys that may log in as `user` (empty if unknown)."""
