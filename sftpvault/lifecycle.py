"""Key lifecycle operations behind `sftpvault kek ...` and `sftpvault dek ...`.

All of them are safe while the server runs: record changes go through the
keyring's per-user lock with compare-and-swap, and sessions follow their record.
All are idempotent, so an interrupted run is finished by running it again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sftpvault.app import App
from sftpvault.errors import IntegrityError, KeyServiceError
from sftpvault.keyring import DekEntry
from sftpvault.vfs.fs import UserFS
from sftpvault.vfs.openfile import OpenMode

Progress = Callable[[int], None]
COPY_BLOCK = 1024 * 1024


def _no_progress(_: int) -> None:
    pass


@dataclass
class Outcome:
    done: int = 0
    failed: list[str] = field(default_factory=list)

    def fail(self, app: App, action: str, user: str, dek_id: str, exc: KeyServiceError) -> None:
        self.failed.append(f"{user}/{dek_id}: {exc}")
        app.keyring.audit.record(action, "error", user=user, dek_id=dek_id, error=str(exc))


def kek_status(app: App) -> dict[str, Any]:
    """The active service's KEK and how many DEKs sit on each (service, version)."""
    service = app.keyring.service
    counts: Counter[tuple[str, int]] = Counter()
    for user in app.keyring.users():
        record = app.keyring.load_record(user)
        for entry in record.deks.values() if record else []:
            counts[(entry.wrapped.service, entry.wrapped.kek_version)] += 1
    return {
        "service": service.service_id,
        "key": service.kek_name,
        "latest_version": service.latest_version(),
        "deks": [{"service": s, "kek_version": v, "count": n} for (s, v), n in sorted(counts.items())],
    }


def _stale(app: App) -> list[tuple[str, str, DekEntry]]:
    latest = app.keyring.service.latest_version()
    found = []
    for user in app.keyring.users():
        record = app.keyring.load_record(user)
        if record is not None:
            found += [(user, dek_id, entry) for dek_id, entry in app.keyring.stale_entries(record, latest)]
    return found


def count_stale(app: App) -> int:
    return len(_stale(app))


def rewrap_all(app: App, progress: Progress = _no_progress) -> Outcome:
    """Rewrap every DEK of the active service that is not on its latest KEK version."""
    keyring, outcome = app.keyring, Outcome()
    stale = _stale(app)
    results = keyring.service.rewrap_many([(entry.wrapped, user.encode()) for user, _, entry in stale])
    for (user, dek_id, entry), result in zip(stale, results, strict=True):
        try:
            if isinstance(result, KeyServiceError):
                raise result
            outcome.done += keyring.replace_wrapped(user, dek_id, entry.wrapped, result, "kek.rewrap")
        except KeyServiceError as exc:
            outcome.fail(app, "kek.rewrap", user, dek_id, exc)
        progress(1)
    return outcome


def rotate_kek(app: App, progress: Progress = _no_progress, raise_floor: bool = False) -> tuple[int, Outcome]:
    """New KEK version, then every DEK rewrapped to it; optionally retire older versions."""
    service = app.keyring.service
    version = service.rotate()
    app.keyring.audit.record("kek.rotate", service=service.service_id, kek_name=service.kek_name, kek_version=version)
    outcome = rewrap_all(app, progress)
    if raise_floor:
        if outcome.failed or count_stale(app):
            raise KeyServiceError(
                "not raising the minimum decryption version: some DEKs are still on older "
                "versions (run 'sftpvault kek rewrap')"
            )
        service.raise_floor(version)
        app.keyring.audit.record(
            "kek.min_decryption_version", service=service.service_id, kek_name=service.kek_name, kek_version=version
        )
    return version, outcome


def migrate(app: App, target_id: str, progress: Progress = _no_progress) -> Outcome:
    """Move every DEK record entry to the key service `target_id`."""
    keyring, outcome = app.keyring, Outcome()
    target = keyring.services.get(target_id)
    if target is None:
        raise KeyServiceError(f"the {target_id} key service is not configured in sftpvault.toml")
    target.startup()  # e.g. create the Transit key on first use
    for user in keyring.users():
        record = keyring.load_record(user)
        for dek_id, entry in list(record.deks.items()) if record else []:
            if entry.wrapped.service != target_id:
                try:
                    dek = keyring.unwrap(entry.wrapped, user)
                    moved = target.wrap(dek, user.encode())
                    outcome.done += keyring.replace_wrapped(user, dek_id, entry.wrapped, moved, "kek.migrate")
                except KeyServiceError as exc:
                    outcome.fail(app, "kek.migrate", user, dek_id, exc)
            progress(1)
    return outcome


def rotate_dek(app: App, user: str, reencrypt: bool = False, progress: Progress = _no_progress) -> Outcome:
    """Give `user` a new DEK and move every file under it; retire DEKs no file uses.

    Without reencrypt only the file headers are rewrapped (the chunks keep
    their file keys); with it every file gets a new file key and is sealed again.
    """
    keyring, outcome = app.keyring, Outcome()
    if keyring.load_record(user) is None:
        raise KeyServiceError(f"user {user!r} has no DEK record")
    new_id = bytes.fromhex(keyring.add_dek(user))
    keys = keyring.acquire(user)
    fs = app.user_fs(user, keys)
    try:
        for dir_fd, name, vpath in fs.walk_files(include_uploads=not reencrypt):  # lazily: dir fds stay open
            try:
                if reencrypt:
                    _reencrypt(fs, vpath)
                    outcome.done += 1
                else:
                    outcome.done += fs.rewrap_header(dir_fd, name, new_id)
            except (OSError, IntegrityError, KeyServiceError) as exc:
                outcome.failed.append(f"{vpath}: {exc}")
            progress(1)
        record = keyring.load_record(user)
        if record is not None and not outcome.failed:
            in_use = {dek_id.hex() for dek_id in fs.dek_ids_in_use()}
            retired = set(record.deks) - in_use - {record.current}
            if retired:
                keyring.retire_deks(user, retired)
    finally:
        fs.close()
        keyring.release(user)
    keyring.audit.record(
        "dek.rotate",
        "ok" if not outcome.failed else "partial",
        user=user,
        dek_id=new_id.hex(),
        files=outcome.done,
        reencrypt=reencrypt,
    )
    return outcome


def count_files(app: App, user: str) -> int:
    keys = app.keyring.acquire(user)
    fs = app.user_fs(user, keys)
    try:
        return sum(1 for _ in fs.walk_files(include_uploads=True))
    finally:
        fs.close()
        app.keyring.release(user)


def _reencrypt(fs: UserFS, vpath: str) -> None:
    """Seal a file again under a new file key; the original stays until the copy is complete."""
    source = fs.open(vpath, OpenMode(read=True))
    try:
        target = fs.open(vpath, OpenMode(write=True, truncate=True))
        try:
            offset = 0
            while data := source.read(offset, COPY_BLOCK):
                target.write(offset, data)
                offset += len(data)
        except BaseException:
            target.abort()
            raise
        target.close()
    finally:
        source.close()
