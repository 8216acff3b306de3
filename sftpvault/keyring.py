"""The keyring: each user's wrapped DEK record and the DEKs of open sessions.

A record lives in `keys/keks/.<sha224(user)>.secret` (the dropzone's naming) as
versioned JSON. It is written atomically, under a per-user lock that spans
processes, before its DEK encrypts anything. A record may hold several DEKs
(after a DEK rotation); `current` names the one new files use.

Sessions of one user share the unwrapped DEKs (a reference count); the last
session to close drops them and, if the record sits on an old KEK version,
rewraps it, writing the new record only after the rewrap succeeded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftpvault.errors import KeyServiceError
from sftpvault.fsutil import atomic_write, private_dir
from sftpvault.keyservice.base import KeyService, WrappedKey

log = logging.getLogger("sftpvault.keyring")
RECORD_FORMAT = 1


@dataclass
class DekEntry:
    wrapped: WrappedKey
    created: int
    rewrapped: int


@dataclass
class DekRecord:
    user: str
    current: str  # hex id of the DEK new files are sealed with
    deks: dict[str, DekEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "format": RECORD_FORMAT,
            "user": self.user,
            "current": self.current,
            "deks": {
                i: {**asdict(e.wrapped), "created": e.created, "rewrapped": e.rewrapped} for i, e in self.deks.items()
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DekRecord:
        doc = json.loads(raw)
        if doc.get("format") != RECORD_FORMAT:
            raise KeyServiceError(f"unsupported DEK record format {doc.get('format')!r}")
        deks = {}
        for dek_id, e in doc["deks"].items():
            wrapped = WrappedKey(e["service"], e["kek_name"], int(e["kek_version"]), e["algorithm"], e["ciphertext"])
            deks[dek_id] = DekEntry(wrapped, int(e["created"]), int(e["rewrapped"]))
        return cls(doc["user"], doc["current"], deks)


@dataclass(frozen=True)
class UserKeys:
    """The unwrapped DEKs of one user while they have a session open."""

    user: str
    current_id: bytes
    deks: dict[bytes, bytes]

    @property
    def current(self) -> bytes:
        return self.deks[self.current_id]

    def get(self, dek_id: bytes) -> bytes:
        try:
            return self.deks[dek_id]
        except KeyError:
            raise KeyServiceError(f"file is sealed under unknown DEK {dek_id.hex()}") from None


class Keyring:
    """Creates, loads, shares and rewraps users' DEKs."""

    def __init__(self, keys_dir: Path, service: KeyService) -> None:
        self.records_dir = keys_dir / "keks"
        self.service = service
        self._lock = threading.Lock()
        self._open: dict[str, tuple[UserKeys, int]] = {}

    def record_path(self, user: str) -> Path:
        return self.records_dir / f".{hashlib.sha224(user.encode()).hexdigest()}.secret"

    def load_record(self, user: str) -> DekRecord | None:
        try:
            return DekRecord.from_json(self.record_path(user).read_bytes())
        except FileNotFoundError:
            return None

    def records(self) -> Iterator[DekRecord]:
        for path in sorted(self.records_dir.glob(".*.secret")):
            yield DekRecord.from_json(path.read_bytes())

    @contextmanager
    def record_lock(self, user: str) -> Iterator[None]:
        """Exclusive per-user lock across threads and processes (CLI and workers)."""
        private_dir(self.records_dir)
        lock_path = self.record_path(user).with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write_record(self, record: DekRecord) -> None:
        atomic_write(self.record_path(record.user), record.to_json())

    # -- sessions -------------------------------------------------------------

    def acquire(self, user: str) -> UserKeys:
        """The user's DEKs for a new session, creating the first DEK on first login."""
        with self._lock:
            if user in self._open:
                keys, count = self._open[user]
                self._open[user] = (keys, count + 1)
                return keys
            keys = self._unwrap_all(self._load_or_create(user))
            self._open[user] = (keys, 1)
            log.info("keyring: opened DEKs of %s (current %s)", user, keys.current_id.hex())
            return keys

    def release(self, user: str) -> None:
        """End one session; the last one drops the DEKs and rewraps an old record."""
        with self._lock:
            keys, count = self._open[user]
            if count > 1:
                self._open[user] = (keys, count - 1)
                return
            del self._open[user]
        log.info("keyring: dropped DEKs of %s", user)
        try:
            self.rewrap_if_stale(user)
        except (KeyServiceError, OSError) as exc:
            log.warning("keyring: rewrap of %s deferred, record left as it was: %s", user, exc)

    def open_users(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def rewrap_if_stale(self, user: str) -> bool:
        """Rewrap every DEK of `user` that is not on the latest KEK version."""
        with self.record_lock(user):
            record = self.load_record(user)
            if record is None:
                return False
            latest = self.service.latest_version()
            stale = [
                e
                for e in record.deks.values()
                if e.wrapped.service == self.service.service_id and e.wrapped.kek_version < latest
            ]
            context = user.encode()
            for entry in stale:
                rewrapped = self.service.rewrap(entry.wrapped, context)
                # never replace a record with one that cannot give back the same DEK
                if self.service.unwrap(rewrapped, context) != self.service.unwrap(entry.wrapped, context):
                    raise KeyServiceError(f"rewrapped DEK of {user} does not unwrap to the same key")
                entry.wrapped = rewrapped
                entry.rewrapped = int(time.time())
            if stale:
                self.write_record(record)
                log.info("keyring: rewrapped %d DEK(s) of %s to KEK version %d", len(stale), user, latest)
            return bool(stale)

    def _load_or_create(self, user: str) -> DekRecord:
        record = self.load_record(user)
        if record is not None:
            return record
        with self.record_lock(user):
            record = self.load_record(user)  # another process may have won the race
            if record is None:
                dek_id = os.urandom(16).hex()
                now = int(time.time())
                wrapped = self.service.wrap(os.urandom(32), user.encode())
                record = DekRecord(user, dek_id, {dek_id: DekEntry(wrapped, now, now)})
                self.write_record(record)
                log.info("keyring: created DEK %s for %s under KEK version %d", dek_id, user, wrapped.kek_version)
            return record

    def _unwrap_all(self, record: DekRecord) -> UserKeys:
        context = record.user.encode()
        deks = {bytes.fromhex(i): self.service.unwrap(e.wrapped, context) for i, e in record.deks.items()}
        return UserKeys(record.user, bytes.fromhex(record.current), deks)
