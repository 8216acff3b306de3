"""Crashes, disconnects and shutdown: the target is always a complete file."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import Vault


def temps(vault: Vault) -> list[str]:
    return [p.name for p in vault.user_dir.rglob(".sftpvault-upload-*")]


def test_kill_9_during_upload_keeps_old_file_and_restart_cleans_up(vault: Vault) -> None:
    old, new = os.urandom(200_000), os.urandom(500_000)
    client = vault.client()
    with client.open("doc", "wb") as f:
        f.write(old)
    f = client.open("doc", "wb")
    f.write(new[:300_000])
    f.flush()
    g = client.open("fresh", "wb")  # a brand-new file mid-upload
    g.write(new[:100_000])
    g.flush()
    assert len(temps(vault)) == 2
    vault.stop(signal.SIGKILL)
    assert len(temps(vault)) == 2

    vault.start()
    assert temps(vault) == []
    assert "removed 2 unfinished upload(s)" in vault.log.read_text()
    client = vault.client()
    assert client.open("doc").read() == old
    assert "fresh" not in client.listdir(".")
    client.close()


def test_abrupt_disconnect_keeps_what_was_received_for_reput(vault: Vault) -> None:
    data = os.urandom(400_000)
    client = vault.client()
    f = client.open("part", "wb")
    f.write(data[:250_000])
    f.flush()
    client.get_channel().get_transport().sock.close()  # no CLOSE, no channel close: the network went away
    deadline = time.monotonic() + 30
    while "part" not in os.listdir(vault.user_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    client = vault.client()
    assert client.stat("part").st_size == 250_000
    with client.open("part", "r+b") as f:  # resume as `reput` does
        f.seek(250_000)
        f.write(data[250_000:])
    assert client.open("part").read() == data
    client.close()


def test_sigterm_commits_open_uploads_and_exits_cleanly(vault: Vault) -> None:
    data = os.urandom(150_000)
    client = vault.client()
    f = client.open("late", "wb")
    f.write(data)
    f.flush()
    assert vault.stop(signal.SIGTERM) == 0
    assert temps(vault) == []
    vault.start()
    assert vault.client().open("late").read() == data


def test_startup_cleanup_never_follows_a_users_symlink_out_of_the_jail(vault: Vault, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    bait = outside / ".sftpvault-upload-not-ours"
    bait.write_bytes(b"belongs to someone else")
    client = vault.client()
    client.symlink(str(outside), "escape")  # a user's link: chroot-style inside, a real path on disk
    client.close()
    vault.stop()
    vault.start()
    assert bait.read_bytes() == b"belongs to someone else"
