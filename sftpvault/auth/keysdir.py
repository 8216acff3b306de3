"""Public keys from a directory of OpenSSH `authorized_keys` files, one per user
(`<dir>/<user>`), for batch users managed by configuration management."""

from __future__ import annotations

import logging
from pathlib import Path

from sftpvault.auth.base import AuthBackend
from sftpvault.auth.embedded import USER_NAME
from sftpvault.auth.keys import AuthorizedKey, parse_authorized_key
from sftpvault.errors import UserError

log = logging.getLogger("sftpvault.auth")


class AuthorizedKeysDir(AuthBackend):
    name = "authorized_keys"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def check_password(self, user: str, password: str) -> bool:
        return False

    def authorized_keys(self, user: str) -> list[AuthorizedKey]:
        if not USER_NAME.match(user):
            return []  # never a path outside the directory
        try:
            lines = (self.directory / user).read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return []
        keys = []
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    keys.append(parse_authorized_key(line))
                except UserError as exc:
                    log.warning("authorized_keys %s line %d ignored: %s", user, number, exc)
        return keys
