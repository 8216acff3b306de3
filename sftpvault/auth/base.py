"""The authentication-backend interface.

A backend answers two questions about a login name: does this password match,
and which public keys may log in. The SSH layer asks the configured backends
in their configured order (`auth.backends`); the first that accepts wins.
"""

from __future__ import annotations

import abc

from sftpvault.auth.keys import AuthorizedKey


class AuthBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def check_password(self, user: str, password: str) -> bool:
        """True only if `user` exists here and `password` is theirs."""

    def authorized_keys(self, user: str) -> list[AuthorizedKey]:
        """Public keys that may log in as `user` (none if unknown or not supported)."""
        return []

    def area(self, user: str) -> str | None:
        """The area (directory under data/, and owner of the DEK) `user` works in, if this backend
        names one; None leaves the default, the login name."""
        return None


def acceptable_password(password: str) -> bool:
    """Empty, blank or NUL-containing passwords never reach a backend (an empty LDAP
    password is an unauthenticated bind that many servers accept)."""
    return bool(password.strip()) and "\x00" not in password
