"""The embedded user store: `<home>/users.json` (mode 0600).

Passwords are kept only as scrypt hashes; public keys as OpenSSH
`authorized_keys` lines. Changes are written atomically under a file lock so
the CLI can edit users while the server runs; the server re-reads on change.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sftpvault.auth.base import AuthBackend
from sftpvault.auth.keys import AuthorizedKey, parse_authorized_key
from sftpvault.errors import UserError
from sftpvault.fsutil import atomic_write

USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise UserError(f"invalid user name {name!r}: use lowercase letters, digits, '_', '.', '-' (max 32)")
    return name


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(
        **_SCRYPT, salt=base64.b64encode(salt).decode(), digest=base64.b64encode(digest).decode()
    )


def verify_password(encoded: str, password: str) -> bool:
    _, n, r, p_, salt, digest = encoded.split("$")
    computed = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), dklen=32, n=int(n), r=int(r), p=int(p_))
    return hmac.compare_digest(computed, base64.b64decode(digest))


_DUMMY_HASH = hash_password(os.urandom(16).hex())  # unknown users cost the same as known ones


class UserStore(AuthBackend):
    """Users kept in a JSON file next to the keys."""

    name = "embedded"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: tuple[int, dict[str, Any]] | None = None

    # -- AuthBackend -------------------------------------------------------------

    def check_password(self, user: str, password: str) -> bool:
        record = self._users().get(user)
        encoded = record.get("password") if record else None
        matched = verify_password(encoded or _DUMMY_HASH, password)
        return bool(encoded) and matched

    def authorized_keys(self, user: str) -> list[AuthorizedKey]:
        record = self._users().get(user)
        return [parse_authorized_key(line) for line in record.get("keys", [])] if record else []

    # -- administration ------------------------------------------------------------

    def list(self) -> dict[str, dict[str, Any]]:
        return dict(self._users())

    def exists(self, user: str) -> bool:
        return user in self._users()

    def add(self, user: str, password: str | None, keys: list[str]) -> None:
        check_user_name(user)
        lines = [parse_authorized_key(k).line for k in keys]
        with self._editing() as users:
            if user in users:
                raise UserError(f"user {user!r} already exists")
            users[user] = {
                "password": hash_password(password) if password else None,
                "keys": lines,
                "created": int(time.time()),
            }

    def remove(self, user: str) -> None:
        with self._editing() as users:
            self._require(users, user)
            del users[user]

    def set_password(self, user: str, password: str) -> None:
        with self._editing() as users:
            self._require(users, user)["password"] = hash_password(password)

    def add_key(self, user: str, key_line: str) -> None:
        key = parse_authorized_key(key_line)
        with self._editing() as users:
            record = self._require(users, user)
            if key.blob not in {parse_authorized_key(k).blob for k in record["keys"]}:
                record["keys"].append(key.line)

    @staticmethod
    def _require(users: dict[str, Any], user: str) -> dict[str, Any]:
        if user not in users:
            raise UserError(f"no such user {user!r}")
        return users[user]

    @contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self._read()
            yield users
            atomic_write(self.path, json.dumps({"format": 1, "users": users}, indent=1).encode())
        finally:
            os.close(fd)

    def _users(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        with self._lock:
            if self._cache is None or self._cache[0] != mtime:
                self._cache = (mtime, self._read())
            return self._cache[1]

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())["users"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError):
            raise UserError(f"{self.path} is damaged (not a sftpvault user store)") from None
