"""Connection: paramiko's ServerInterface for one SSH connection.

Decides authentication (asking the auth backends), allows exactly one kind of
channel use (the `sftp` subsystem), and owns the user's DEK lease: acquired
when the first SFTP session opens, released when the connection ends, however
it ends (clean exit, abrupt disconnect, shutdown).
"""

from __future__ import annotations

import logging
import threading

import paramiko

from sftpvault.app import App
from sftpvault.keyring import UserKeys
from sftpvault.sftp.session import SFTPSession
from sftpvault.vfs.fs import UserFS

log = logging.getLogger("sftpvault.auth")
MAX_SESSIONS = 10


class Connection(paramiko.ServerInterface):
    def __init__(self, app: App, transport: paramiko.Transport, peer: str) -> None:
        self.app = app
        self.transport = transport
        self.peer = peer
        self.username = ""
        self.max_handles = app.settings.server.max_handles
        self.settled = threading.Event()  # set once logged in, or once auth failures reach the cap
        self.sessions: set[SFTPSession] = set()
        self._failures = 0
        self._method = ""
        self._keys: UserKeys | None = None
        self._lock = threading.Lock()

    # -- authentication ------------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        ok = any(backend.check_password(username, password) for backend in self.app.backends)
        return self._decide(username, "password", ok, "wrong password or unknown user")

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko asks this for unsigned probes too and verifies the signature
        # itself afterwards; the login counts only once a channel is opened.
        blob = key.asbytes()
        ok = any(blob in backend.authorized_key_blobs(username) for backend in self.app.backends)
        return self._decide(username, "publickey", ok, f"key {key.fingerprint} not authorized")

    def _decide(self, username: str, method: str, ok: bool, reason: str) -> int:
        if self._failures >= self.app.settings.server.max_auth_tries:
            return paramiko.AUTH_FAILED  # closing already: no further attempt is even evaluated
        if ok:
            self._method = method
            return paramiko.AUTH_SUCCESSFUL
        self._failures += 1
        log.info("auth: refused user=%r from=%s method=%s reason=%s", username, self.peer, method, reason)
        if self._failures >= self.app.settings.server.max_auth_tries:
            log.warning("auth: too many failures from %s, closing", self.peer)
            self.settled.set()
        return paramiko.AUTH_FAILED

    # -- channels ------------------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or len(self.sessions) >= MAX_SESSIONS:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if not self.username:
            self.username = self.transport.get_username() or ""
            log.info("auth: login user=%r from=%s method=%s", self.username, self.peer, self._method)
            self.settled.set()
        return paramiko.OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return name == "sftp" and bool(super().check_channel_subsystem_request(channel, name))

    # -- what SFTP sessions need -----------------------------------------------------

    def open_fs(self) -> UserFS:
        with self._lock:
            if self._keys is None:
                self._keys = self.app.keyring.acquire(self.username)
            keys = self._keys
        return self.app.user_fs(self.username, keys)

    def close(self) -> None:
        """Commit every open upload, then drop this connection's DEK lease."""
        for session in list(self.sessions):
            session.close_all()
        with self._lock:
            if self._keys is not None:
                self._keys = None
                self.app.keyring.release(self.username)
