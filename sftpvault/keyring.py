"""The keyring: each user's wrapped DEK record and the DEKs of open sessions.

A record lives in `keys/keks/.<sha224(user)>.secret` (the dropzone's naming) as
versioned JSON. It is written atomically, under a per-user lock that spans
processes, before its DEK encrypts anything. A record may hold several DEKs
(after a DEK rotation); `current` names the one new files use. Each entry says
which key service and KEK version wrapped it, so records from several services
coexist during a migration.

Sessions of one user share the unwrapped DEKs (a reference count); the last
session to close drops them and, if the record sits on an old KEK version,
rewraps it, writing the new record only once it is proven to unwrap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftpvault.audit import AuditLog
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
        try:
            doc = json.loads(raw)
            if doc.get("format") != RECORD_FORMAT:
                raise KeyServiceError(f"unsupported DEK record format {doc.get('format')!r}")
            deks = {}
            for dek_id, e in doc["deks"].items():
                wrapped = WrappedKey(
                    e["service"], e["kek_name"], int(e["kek_version"]), e["algorithm"], e["ciphertext"]
                )
                deks[dek_id] = DekEntry(wrapped, int(e["created"]), int(e["rewrapped"]))
            return cls(doc["user"], doc["current"], deks)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyServiceError("a DEK record is damaged (not valid record JSON)") from None


class UserKeys:
    """The unwrapped DEKs of one user while they have a session open.

    Follows its record: when a DEK rotation (from the CLI, perhaps in another
    process) adds a DEK, `current` switches to it and `get` finds it.
    """

    def __init__(self, user: str, record_file: str, refresh: Callable[[UserKeys], None]) -> None:
        self.user = user
        self.record_file = record_file  # a plain string: it is stat'ed on every upload
        self.deks: dict[bytes, bytes] = {}
        self.current_id = b""
        self.record_mtime = -1
        self._refresh = refresh
        self.lock = threading.Lock()

    @property
    def current(self) -> bytes:
        self._refresh(self)
        return self.deks[self.current_id]

    def get(self, dek_id: bytes) -> bytes:
        if dek_id not in self.deks:
            self._refresh(self)
        try:
            return self.deks[dek_id]
        except KeyError:
            raise KeyServiceError(f"file is sealed under unknown DEK {dek_id.hex()}") from None


class Keyring:
    """Creates, loads, shares and rewraps users' DEKs."""

    def __init__(self, keys_dir: Path, services: dict[str, KeyService], active: str, audit: AuditLog) -> None:
        self.records_dir = keys_dir / "keks"
        self.services = services
        self.service = services[active]
        self.audit = audit
        self._lock = threading.Lock()
        self._open: dict[str, tuple[UserKeys, int]] = {}
        self._user_locks: dict[str, threading.Lock] = {}

    def service_for(self, wrapped: WrappedKey) -> KeyService:
        try:
            return self.services[wrapped.service]
        except KeyError:
            raise KeyServiceError(
                f"a DEK is wrapped by the {wrapped.service} key service, which is not configured"
            ) from None

    # -- records ---------------------------------------------------------------

    def record_path(self, user: str) -> Path:
        return self.records_dir / f".{hashlib.sha224(user.encode()).hexdigest()}.secret"

    def load_record(self, user: str) -> DekRecord | None:
        try:
            return DekRecord.from_json(self.record_path(user).read_bytes())
        except FileNotFoundError:
            return None

    def users(self) -> list[str]:
        return sorted(DekRecord.from_json(p.read_bytes()).user for p in self.records_dir.glob(".*.secret"))

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

    def unwrap(self, wrapped: WrappedKey, user: str) -> bytes:
        return self.service_for(wrapped).unwrap(wrapped, user.encode())

    def add_dek(self, user: str, first_only: bool = False) -> str:
        """Give `user` a new current DEK (creating the record on first use); returns its id.

        The record is written before the DEK can seal anything: a crash leaves
        either no new DEK or a usable one. With first_only, a user who already
        has a record (another process won the race) keeps it.
        """
        with self.record_lock(user):
            record = self.load_record(user)
            if record is not None and first_only:
                return record.current
            record = record or DekRecord(user, "")
            dek_id = os.urandom(16).hex()
            now = int(time.time())
            try:
                _, wrapped = self.service.new_dek(user.encode())
            except KeyServiceError as exc:
                self.audit.record("dek.create", "error", user=user, service=self.service.service_id, error=str(exc))
                raise
            record.deks[dek_id] = DekEntry(wrapped, now, now)
            record.current = dek_id
            self.write_record(record)
        self.audit.record(
            "dek.create",
            user=user,
            dek_id=dek_id,
            service=wrapped.service,
            kek_name=wrapped.kek_name,
            kek_version=wrapped.kek_version,
        )
        log.info(
            "keyring: created DEK %s for %s under %s KEK version %d", dek_id, user, wrapped.service, wrapped.kek_version
        )
        return dek_id

    def replace_wrapped(self, user: str, dek_id: str, old: WrappedKey, new: WrappedKey, action: str) -> bool:
        """Swap one entry's wrapped DEK, only if it still is `old` and `new` unwraps to the same key."""
        context = user.encode()
        if self.service_for(new).unwrap(new, context) != self.service_for(old).unwrap(old, context):
            raise KeyServiceError(f"rewrapped DEK of {user} does not unwrap to the same key")
        with self.record_lock(user):
            record = self.load_record(user)
            entry = record.deks.get(dek_id) if record else None
            if record is None or entry is None or entry.wrapped != old:
                return False  # changed meanwhile: leave it to the next run
            entry.wrapped = new
            entry.rewrapped = int(time.time())
            self.write_record(record)
        self.audit.record(
            action,
            user=user,
            dek_id=dek_id,
            service=new.service,
            kek_name=new.kek_name,
            kek_version=new.kek_version,
            previous_service=old.service,
            previous_version=old.kek_version,
        )
        return True

    def retire_deks(self, user: str, dek_ids: set[str]) -> None:
        with self.record_lock(user):
            record = self.load_record(user)
            if record is None:
                return
            for dek_id in dek_ids - {record.current}:
                record.deks.pop(dek_id, None)
            self.write_record(record)
        for dek_id in dek_ids:
            self.audit.record("dek.retire", user=user, dek_id=dek_id)

    # -- sessions -------------------------------------------------------------

    def acquire(self, user: str) -> UserKeys:
        """The user's DEKs for a new session, creating the first DEK on first login.

        The key-service calls run under a per-user lock only: one user's slow
        unwrap never holds up another user's login.
        """
        with self._lock:
            shared = self._share(user)
            if shared is not None:
                return shared
            user_lock = self._user_locks.setdefault(user, threading.Lock())
        with user_lock:
            with self._lock:
                shared = self._share(user)  # a concurrent session of this user may have just opened them
                if shared is not None:
                    return shared
            if self.load_record(user) is None:
                self.add_dek(user, first_only=True)
            keys = UserKeys(user, str(self.record_path(user)), self._refresh)
            self._refresh(keys)
            with self._lock:
                self._open[user] = (keys, 1)
        log.info("keyring: opened DEKs of %s (current %s)", user, keys.current_id.hex())
        return keys

    def _share(self, user: str) -> UserKeys | None:
        """Count one more session on DEKs already open (call with self._lock held)."""
        if user not in self._open:
            return None
        keys, count = self._open[user]
        self._open[user] = (keys, count + 1)
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
            self.rewrap_stale(user)
        except (KeyServiceError, OSError) as exc:
            log.warning("keyring: rewrap of %s deferred, record left as it was: %s", user, exc)

    def stale_entries(self, record: DekRecord, latest: int) -> list[tuple[str, DekEntry]]:
        return [
            (i, e)
            for i, e in record.deks.items()
            if e.wrapped.service == self.service.service_id and e.wrapped.kek_version < latest
        ]

    def rewrap_stale(self, user: str) -> int:
        """Rewrap every DEK of `user` that is not on the latest KEK version; returns how many."""
        record = self.load_record(user)
        if record is None:
            return 0
        latest = self.service.latest_version()
        done = 0
        for dek_id, entry in self.stale_entries(record, latest):
            new = self.service.rewrap(entry.wrapped, user.encode())
            done += self.replace_wrapped(user, dek_id, entry.wrapped, new, "dek.rewrap")
        if done:
            log.info("keyring: rewrapped %d DEK(s) of %s to KEK version %d", done, user, latest)
        return done

    def _refresh(self, keys: UserKeys) -> None:
        """Bring `keys` up to date with the user's record (cheap when unchanged: one stat)."""
        with keys.lock:
            try:
                mtime = os.stat(keys.record_file).st_mtime_ns
            except FileNotFoundError:
                raise KeyServiceError(f"the DEK record of {keys.user} is missing") from None
            if mtime == keys.record_mtime:
                return
            record = self.load_record(keys.user)
            assert record is not None
            for dek_id, entry in record.deks.items():
                raw_id = bytes.fromhex(dek_id)
                if raw_id not in keys.deks:
                    try:
                        keys.deks[raw_id] = self.unwrap(entry.wrapped, keys.user)
                    except KeyServiceError as exc:
                        self.audit.record("dek.unwrap", "error", user=keys.user, dek_id=dek_id, error=str(exc))
                        raise
                    self.audit.record(
                        "dek.unwrap",
                        user=keys.user,
                        dek_id=dek_id,
                        service=entry.wrapped.service,
                        kek_version=entry.wrapped.kek_version,
                    )
            keys.current_id = bytes.fromhex(record.current)
            keys.record_mtime = mtime
