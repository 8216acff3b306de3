"""End to end with the real OpenSSH `sftp` and `scp` binaries."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sftpvault import format as fmt
from tests.conftest import SSH_OPTS, Vault

MARKER = b"PLAINTEXT-MARKER-7d1e9c"


def marked_data(size: int) -> bytes:
    """Random bytes with the marker sprinkled in, so a plaintext leak is findable."""
    data = bytearray(os.urandom(size))
    for pos in range(0, max(size - len(MARKER), 0), 4096):
        data[pos : pos + len(MARKER)] = MARKER
    return bytes(data)


def assert_no_plaintext(root: Path, needles: list[bytes]) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            for needle in needles:
                assert needle not in content, f"plaintext found in {path}"


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 1024 * 1024 + 1])
def test_put_get_round_trip(vault: Vault, size: int) -> None:
    data = marked_data(size)
    (vault.work / "src").write_bytes(data)
    vault.sftp("put src stored", "get stored back")
    assert (vault.work / "back").read_bytes() == data
    stored = vault.user_dir / "stored"
    assert stored.stat().st_size == fmt.cipher_size(size)
    assert_no_plaintext(vault.home, [MARKER] if size > len(MARKER) else [])


def test_listing_shows_plaintext_sizes(vault: Vault) -> None:
    (vault.work / "a").write_bytes(b"x" * 70000)
    out = vault.sftp("put a", "ls -l a").stdout
    assert " 70000 " in out


def test_binary_file_ending_in_nul_bytes_and_enc_name(vault: Vault) -> None:
    """The dropzone stripped trailing zeros; we keep every byte."""
    data = os.urandom(1000) + b"\x00" * 4096
    (vault.work / "x.enc").write_bytes(data)
    vault.sftp("put x.enc", "get x.enc back.enc")
    assert (vault.work / "back.enc").read_bytes() == data


def test_reput_and_reget_resume(vault: Vault) -> None:
    data = marked_data(300_000)
    (vault.work / "big").write_bytes(data)
    # a partial upload, as a dropped connection leaves it
    client = vault.client()
    with client.open("big", "wb") as f:
        f.write(data[:123_457])
    client.close()
    assert "123457" in vault.sftp("ls -l big").stdout
    vault.sftp("reput big big")
    (vault.work / "back").write_bytes(data[:70_001])
    vault.sftp("reget big back")
    assert (vault.work / "back").read_bytes() == data


def test_df_ln_symlink_rename_chmod(vault: Vault) -> None:
    (vault.work / "f").write_bytes(b"hello world")
    out = vault.sftp("put f", "df", "ln f hard", "ln -s f soft", "rename f g", "chmod 600 g", "ls -l").stdout
    assert "Avail" in out
    g = vault.user_dir / "g"
    assert stat.S_IMODE(g.stat().st_mode) == 0o600
    assert (vault.user_dir / "hard").stat().st_ino == g.stat().st_ino
    assert os.readlink(vault.user_dir / "soft") == "f"
    vault.sftp("get hard h2")
    assert (vault.work / "h2").read_bytes() == b"hello world"


def test_mkdir_rmdir_rm(vault: Vault) -> None:
    (vault.work / "f").write_bytes(b"data")
    vault.sftp("mkdir d", "put f d/f", "rm d/f", "rmdir d")
    assert list(vault.user_dir.iterdir()) == []


def test_scp_with_tilde_paths(vault: Vault) -> None:
    data = marked_data(100_000)
    (vault.work / "s").write_bytes(data)
    vault.sftp("mkdir sub")
    vault.scp("s", "demo@127.0.0.1:~/sub/s1")
    vault.scp("demo@127.0.0.1:~/sub/s1", "back")
    assert (vault.work / "back").read_bytes() == data
    vault.scp("s", "demo@127.0.0.1:")
    assert (vault.user_dir / "s").exists()


def test_errors_are_reported_to_the_client(vault: Vault) -> None:
    out = vault.sftp("get missing", check=False)
    assert out.returncode != 0
    assert "No such file" in out.stderr or "not found" in out.stderr


def test_password_login_with_openssh(vault: Vault) -> None:
    """The password path with a real client (SSH_ASKPASS answers the prompt)."""
    proc = vault.sftp_with_password("demo", "correct horse battery staple", "pwd\nbye\n")
    assert proc.returncode == 0, proc.stderr
    assert "Remote working directory: /" in proc.stdout


def interrupt(vault: Vault, command: str, progress: Callable[[], int], at_least: int) -> None:
    """Start a rate-limited OpenSSH transfer and kill the client once `progress()` reaches `at_least`."""
    batch = vault.work / "slow"
    batch.write_text(command + "\n")
    proc = subprocess.Popen(
        [
            "sftp",
            "-q",
            "-l",
            "2000",
            "-P",
            str(vault.port),
            "-i",
            str(vault.key),
            *SSH_OPTS,
            "-b",
            str(batch),
            "demo@127.0.0.1",
        ],
        cwd=vault.work,
    )
    try:
        deadline = time.monotonic() + 60
        while progress() < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_interrupted_openssh_put_and_get_resume(vault: Vault) -> None:
    data = marked_data(3 * 1024 * 1024)
    (vault.work / "big").write_bytes(data)
    uploading = lambda: sum(size_of(p) for p in vault.user_dir.glob(".sftpvault-upload-*"))  # noqa: E731
    interrupt(vault, "put big", uploading, 300_000)
    deadline = time.monotonic() + 30
    while not (vault.user_dir / "big").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the server commits what the killed client sent
    partial = fmt.plain_size((vault.user_dir / "big").stat().st_size)
    assert 0 < partial < len(data)
    vault.sftp("reput big big")
    vault.sftp("get big whole")
    assert (vault.work / "whole").read_bytes() == data

    interrupt(vault, "get big down", lambda: size_of(vault.work / "down"), 300_000)
    assert 0 < size_of(vault.work / "down") < len(data)
    vault.sftp("reget big down")
    assert (vault.work / "down").read_bytes() == data
