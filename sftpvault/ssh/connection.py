"""Connection: paramiko's ServerInterface for one SSH connection.

Decides authentication (asking the auth backends), allows exactly one kind of
channel use (the `sftp` subsystem), and owns the user's DEK lease: acquired
when the first SFTP session opens, released when the connection ends, however
it ends (clean exit, abrupt disconnect, shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import paramiko

from sftpvault.app import App
from sftpvault.auth.base import AuthBackend
from sftpvault.auth.defender import Defender
from sftpvault.errors import UserError
from sftpvault.keyring import UserKeys
from sftpvault.sftp.session import SFTPSession
from sftpvault.ssh import paramiko_compat
from sftpvault.vfs.fs import UserFS

log = logging.getLogger("sftpvault.auth")
T = TypeVar("T")
MAX_SESSIONS = 10


class Connection(paramiko.ServerInterface):
    def __init__(self, app: App, transport: paramiko.Transport, peer: str, defender: Defender) -> None:
        self.app = app
        self.defender = defender
        self.transport = transport
        self.peer = peer
        self.peer_ip = peer.rsplit(":", 1)[0]
        self.username = ""
        self.area = ""  # where the user's files and DEK live: set when the first SFTP session opens
        self.max_handles = app.settings.server.max_handles
        self.settled = threading.Event()  # set once logged in, or once auth failures reach the cap
        self.sessions: set[SFTPSession] = set()
        self._failures = 0  # refused attempts on this connection
        self._passed: list[str] = []  # factors verified so far, in order, for _factor_user
        self._factor_user = ""
        self._keys: UserKeys | None = None
        self._lock = threading.Lock()

    # -- authentication ------------------------------------------------------------

    def _chains(self, username: str) -> list[list[str]]:
        rules = self.app.settings.auth.user_methods.get(username, self.app.settings.auth.methods)
        return [rule.split(",") for rule in rules]

    def get_allowed_auths(self, username: str) -> str:
        """The methods that can come next, given the factors passed so far."""
        passed = self._passed if username == self._factor_user else []
        done = len(passed)
        following = {c[done] for c in self._chains(username) if c[:done] == passed and len(c) > done}
        return ",".join(sorted(following)) or "publickey,password"

    def auth_result(self, username: str, method: str, result: int) -> int:
        """paramiko's verified outcome of one attempt (see paramiko_compat): apply the methods rule."""
        if result == paramiko.AUTH_FAILED:
            return result
        if username != self._factor_user:  # factors never carry over to another user name
            self._passed, self._factor_user = [], username
        passed = [*self._passed, method]
        chains = self._chains(username)
        if passed in chains:
            self._passed = passed
            return paramiko.AUTH_SUCCESSFUL
        if any(c[: len(passed)] == passed for c in chains):
            self._passed = passed
            log.info("auth: partial user=%r from=%s method=%s", username, self.peer, method)
            return paramiko.AUTH_PARTIALLY_SUCCESSFUL
        self._decide(username, method, False, f"{method} is not allowed at this step")
        return paramiko.AUTH_FAILED

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        started = time.monotonic()
        ok = any(self._ask(backend, lambda b: b.check_password(username, password)) for backend in self.app.backends)
        if not ok:  # known or unknown user, right or wrong: a failure always takes the same time
            time.sleep(max(0.0, self.app.settings.defender.failed_auth_delay - (time.monotonic() - started)))
        return self._decide(username, "password", ok, "wrong password or unknown user")

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko asks this for unsigned probes too and verifies the signature
        # itself afterwards: a factor is recorded only in auth_result().
        cert = (
            key.public_blob if key.public_blob and key.public_blob.key_type.endswith("-cert-v01@openssh.com") else None
        )
        if cert is not None:
            why = self.app.ca.check(cert.key_blob, username, self.peer_ip) if self.app.ca else "no trusted user CA"
            return self._decide(username, "publickey", why is None, why or "")
        blob = key.asbytes()
        ok = any(
            k.blob == blob and k.allows(self.peer_ip) and not k.cert_authority
            for backend in self.app.backends
            for k in self._ask(backend, lambda b: b.authorized_keys(username)) or []
        )
        return self._decide(username, "publickey", ok, f"key {key.fingerprint} not authorized from {self.peer_ip}")

    def _ask(self, backend: AuthBackend, question: Callable[[AuthBackend], T]) -> T | None:
        """A backend that breaks refuses (and is logged); it never breaks the connection."""
        try:
            return question(backend)
        except Exception:
            log.exception("auth: the %s backend failed; treating it as a refusal", backend.name)
            return None

    def _decide(self, username: str, method: str, ok: bool, reason: str) -> int:
        if self._failures >= self.app.settings.server.max_auth_tries:
            return paramiko.AUTH_FAILED  # closing already: no further attempt is even evaluated
        if ok:
            return paramiko.AUTH_SUCCESSFUL  # a candidate: auth_result() decides once paramiko has verified it
        self._failures += 1
        log.info("auth: refused user=%r from=%s method=%s reason=%s", username, self.peer, method, reason)
        if self._failures >= self.app.settings.server.max_auth_tries:
            log.warning("auth: too many failures from %s, closing", self.peer)
            self.settled.set()
        return paramiko.AUTH_FAILED

    @property
    def failures(self) -> int:
        return self._failures

    # -- channels ------------------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or len(self.sessions) >= MAX_SESSIONS:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if not self.username:
            self.username = self.transport.get_username() or ""
            log.info("auth: login user=%r from=%s method=%s", self.username, self.peer, "+".join(self._passed))
            self.defender.authenticated(self.peer_ip)
            self.settled.set()
        return paramiko.OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            return False
        paramiko_compat.use_chunk_pipe(channel)  # we run in the transport thread: no input is in flight
        return bool(super().check_channel_subsystem_request(channel, name))

    # -- what SFTP sessions need -----------------------------------------------------

    def open_fs(self) -> UserFS:
        """The file system of this login's area (its own name unless a backend names another)."""
        with self._lock:
            if self._keys is None:
                self.area = self._area()
                self._keys = self.app.keyring.acquire(self.area)
            keys = self._keys
        return self.app.user_fs(self.area, keys)

    def _area(self) -> str:
        for backend in self.app.backends:
            area = backend.area(self.username)
            if area == "":
                raise UserError(f"the directory names no valid area for {self.username!r}")
            if area is not None:
                log.info("auth: %r works in area %r", self.username, area)
                return area
        return self.username

    def close(self) -> None:
        """Commit every open upload, then drop this connection's DEK lease."""
        for session in list(self.sessions):
            session.close_all()
        with self._lock:
            if self._keys is not None:
                self._keys = None
                self.app.keyring.release(self.area)
