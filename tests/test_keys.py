"""The keyring and the embedded key service."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from sftpvault.audit import AuditLog
from sftpvault.errors import KeyServiceError
from sftpvault.keyring import Keyring
from sftpvault.keyservice.base import WrappedKey
from sftpvault.keyservice.embedded import EmbeddedKeyService


def make_keyring(keys_dir: Path, passphrase: bytes | None = None) -> Keyring:
    service = EmbeddedKeyService(keys_dir / "keystore.json", passphrase)
    service.create_if_missing()
    return Keyring(keys_dir, {"embedded": service}, "embedded", AuditLog(keys_dir / "audit.jsonl", "test"))


def test_record_is_written_before_use_and_reused(tmp_path: Path) -> None:
    ring = make_keyring(tmp_path)
    keys = ring.acquire("alice")
    record_path = ring.record_path("alice")
    assert record_path.name.startswith(".") and record_path.name.endswith(".secret")
    assert record_path.stat().st_mode & 0o777 == 0o600
    record = json.loads(record_path.read_text())
    assert record["current"] == keys.current_id.hex()
    entry = record["deks"][record["current"]]
    assert {"service", "kek_name", "kek_version", "algorithm", "ciphertext", "created", "rewrapped"} <= set(entry)
    assert keys.current.hex() not in record_path.read_text()
    ring.release("alice")
    again = make_keyring(tmp_path).acquire("alice")
    assert again.current == keys.current


def test_concurrent_first_logins_create_one_dek(tmp_path: Path) -> None:
    rings = [make_keyring(tmp_path) for _ in range(8)]  # separate keyrings, as separate workers
    results = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.acquire("bob").current)) for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1


def _first_login(keys_dir: str, queue: multiprocessing.Queue) -> None:
    queue.put(make_keyring(Path(keys_dir)).acquire("carol").current_id.hex())


def test_concurrent_first_logins_across_processes(tmp_path: Path) -> None:
    make_keyring(tmp_path)  # keystore exists before the race, as after `serve` started once
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_first_login, args=(str(tmp_path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert len({queue.get(timeout=5) for _ in procs}) == 1


def test_sessions_share_dek_and_last_close_rewraps_after_rotation(tmp_path: Path) -> None:
    ring = make_keyring(tmp_path)
    first = ring.acquire("dave")
    second = ring.acquire("dave")
    assert first is second
    assert ring.record_path("dave").exists()
    assert ring.service.rotate() == 2
    ring.release("dave")
    assert ring.load_record("dave").deks[first.current_id.hex()].wrapped.kek_version == 1  # a session remains
    ring.release("dave")  # the last session: the DEKs are dropped and the record rewrapped
    entry = ring.load_record("dave").deks[first.current_id.hex()]
    assert entry.wrapped.kek_version == 2
    assert ring.acquire("dave").current == first.current


def test_failed_rewrap_leaves_record_as_it_was(tmp_path: Path) -> None:
    ring = make_keyring(tmp_path)
    ring.acquire("erin")
    ring.service.rotate()
    before = ring.record_path("erin").read_bytes()
    ring.service.path.rename(tmp_path / "keystore.away")  # key service unavailable at close
    ring.release("erin")  # logs, does not raise
    assert ring.record_path("erin").read_bytes() == before


def test_copied_record_does_not_unwrap_for_another_user(tmp_path: Path) -> None:
    ring = make_keyring(tmp_path)
    ring.acquire("frank")
    ring.record_path("grace").write_bytes(ring.record_path("frank").read_bytes().replace(b'"frank"', b'"grace"'))
    with pytest.raises(KeyServiceError, match="does not unwrap"):
        make_keyring(tmp_path).acquire("grace")


def test_key_service_down_at_login_creates_no_record(tmp_path: Path) -> None:
    ring = make_keyring(tmp_path)
    ring.service.path.unlink()
    with pytest.raises(KeyServiceError):
        ring.acquire("heidi")
    assert ring.load_record("heidi") is None


def test_passphrase_sealed_keystore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = make_keyring(tmp_path, passphrase=b"open sesame")
    keys = ring.acquire("ivan")
    doc = json.loads((tmp_path / "keystore.json").read_text())
    assert doc["sealed"] is True
    with pytest.raises(KeyServiceError, match="passphrase"):
        EmbeddedKeyService(tmp_path / "keystore.json").latest_version()
    with pytest.raises(KeyServiceError, match="wrong keystore passphrase"):
        EmbeddedKeyService(tmp_path / "keystore.json", b"guess").latest_version()
    assert make_keyring(tmp_path, passphrase=b"open sesame").acquire("ivan").current == keys.current


def test_unknown_kek_version_is_a_clear_error(tmp_path: Path) -> None:
    service = make_keyring(tmp_path).service
    wrapped = service.wrap(os.urandom(32), b"u")
    bogus = WrappedKey(wrapped.service, wrapped.kek_name, 99, wrapped.algorithm, wrapped.ciphertext)
    with pytest.raises(KeyServiceError, match="version 99"):
        service.unwrap(bogus, b"u")


class StallingKeyService(EmbeddedKeyService):
    """A test double: unwraps for one user hang until released. It stands in for a slow
    remote service because only a double can stall one user's calls deterministically."""

    def __init__(self, path: Path, stalled_user: bytes) -> None:
        super().__init__(path)
        self.stalled_user = stalled_user
        self.entered = threading.Event()
        self.release = threading.Event()

    def unwrap(self, wrapped, context: bytes) -> bytes:
        if context == self.stalled_user:
            self.entered.set()
            self.release.wait(30)
        return super().unwrap(wrapped, context)


def test_one_users_slow_unwrap_does_not_block_another_users_login(tmp_path: Path) -> None:
    make_keyring(tmp_path).acquire("slow")  # records exist for both users
    make_keyring(tmp_path).acquire("fast")
    service = StallingKeyService(tmp_path / "keystore.json", b"slow")
    ring = Keyring(tmp_path, {"embedded": service}, "embedded", AuditLog(tmp_path / "audit.jsonl", "test"))
    stalled = threading.Thread(target=ring.acquire, args=("slow",))
    stalled.start()
    assert service.entered.wait(10)
    done = threading.Event()
    threading.Thread(target=lambda: (ring.acquire("fast"), done.set()), daemon=True).start()
    try:
        assert done.wait(10), "fast's login waited for slow's key service call"
    finally:
        service.release.set()
        stalled.join(30)
