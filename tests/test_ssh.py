"""The SSH layer: algorithms, version string, grace timer, caps, host keys."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import paramiko
import pytest

from sftpvault.ssh.server import QuickAckSocket
from tests.conftest import PASSWORD, SSH_OPTS, Vault


def restart_with(vault: Vault, config: str) -> None:
    (vault.home / "sftpvault.toml").write_text(config)
    vault.stop()
    vault.start()


def test_version_string_names_sftpvault(vault: Vault) -> None:
    with socket.create_connection(("127.0.0.1", vault.port), timeout=10) as s:
        banner = s.recv(256)
    assert banner.startswith(b"SSH-2.0-sftpvault_")
    assert b"paramiko" not in banner.lower()


@pytest.mark.parametrize(
    "opts",
    [
        ("-o", "Ciphers=aes128-cbc,aes256-cbc,3des-cbc"),
        ("-o", "MACs=hmac-sha1,hmac-md5", "-o", "Ciphers=aes128-ctr"),
        ("-o", "KexAlgorithms=diffie-hellman-group14-sha1,diffie-hellman-group1-sha1"),
    ],
)
def test_weak_algorithms_are_refused(vault: Vault, opts: tuple[str, ...]) -> None:
    out = subprocess.run(
        [
            "ssh",
            "-o",
            "LogLevel=INFO",
            "-p",
            str(vault.port),
            "-i",
            str(vault.key),
            *SSH_OPTS,
            *opts,
            "-s",
            "demo@127.0.0.1",
            "sftp",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "no matching" in out.stderr.lower() or "unable to negotiate" in out.stderr.lower()


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes256-ctr"])
def test_strong_ciphers_work(vault: Vault, cipher: str) -> None:
    assert "Remote working directory" in vault.sftp("pwd", opts=("-c", cipher)).stdout


def test_strict_kex_and_aead_cipher_are_negotiated(vault: Vault) -> None:
    transport = paramiko.Transport(("127.0.0.1", vault.port))
    transport.start_client(timeout=10)
    try:
        assert transport.agreed_on_strict_kex
        assert transport.remote_cipher in ("aes128-ctr", "aes128-gcm@openssh.com")
        assert "cbc" not in transport.remote_cipher and "sha1" not in transport.remote_mac
    finally:
        transport.close()


def test_shell_and_exec_are_refused(vault: Vault) -> None:
    out = subprocess.run(
        ["ssh", "-p", str(vault.port), "-i", str(vault.key), *SSH_OPTS, "demo@127.0.0.1", "cat /etc/passwd"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode != 0
    assert "root:" not in out.stdout


def test_login_grace_time_closes_silent_connections(vault: Vault) -> None:
    restart_with(vault, "[server]\nlogin_grace_time = 2\n")
    with socket.create_connection(("127.0.0.1", vault.port), timeout=30) as s:
        s.recv(256)  # the banner; then say nothing
        s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        data = b"x"
        while data:
            data = s.recv(65536)  # returns b"" once the server hangs up (30 s socket timeout otherwise)
    assert "not logged in" in vault.log.read_text()


def test_oversized_packets_end_the_connection_before_login(vault: Vault) -> None:
    # paramiko would buffer whatever follows a 100 MiB length field; we hang up at once
    with socket.create_connection(("127.0.0.1", vault.port), timeout=30) as s:
        s.recv(256)
        s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        s.sendall((100 * 2**20 + 4).to_bytes(4, "big") + b"\x04" + b"\x00" * 3)  # length, padding, first block
        sent, closed = 0, False
        try:
            while sent < 8 * 2**20:
                s.sendall(b"\x00" * 65536)
                sent += 65536
            while s.recv(65536):  # the server's own banner and KEXINIT, then EOF
                pass
            closed = True
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed
    assert "packet of 104857600 bytes refused" in vault.log.read_text()


def test_failed_auth_attempts_are_capped(vault: Vault) -> None:
    restart_with(vault, "[server]\nmax_auth_tries = 3\n")
    transport = paramiko.Transport(("127.0.0.1", vault.port))
    transport.start_client(timeout=10)
    for _ in range(3):
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password("demo", "Hunter2-not-the-password")
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):  # even the right password is too late
        transport.auth_password("demo", PASSWORD)
    transport.close()
    assert "too many failures" in vault.log.read_text()
    assert "Hunter2" not in vault.log.read_text()  # the password never reaches the log


def test_connection_cap(vault: Vault) -> None:
    restart_with(vault, "[server]\nmax_connections = 2\n")
    first, second = vault.client(), vault.client()
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        vault.client()
    first.close()
    second.close()


def test_host_keys_are_private_and_of_three_kinds(vault: Vault) -> None:
    for kind in ("ed25519", "ecdsa", "rsa"):
        path = vault.home / "keys" / f"ssh_host_{kind}_key"
        assert path.stat().st_mode & 0o777 == 0o600
    rsa = paramiko.RSAKey.from_private_key_file(str(vault.home / "keys" / "ssh_host_rsa_key"))
    assert rsa.get_bits() >= 3072


@contextmanager
def connected_pair() -> Iterator[tuple[socket.socket, socket.socket, QuickAckSocket]]:
    """(client, accepted, our wrapper of accepted) over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    with client, accepted:
        yield client, accepted, QuickAckSocket(accepted)


def test_connection_socket_disables_nagle_and_delayed_acks() -> None:
    # OpenSSH clients send ECDH_INIT right behind KEXINIT with Nagle on: a delayed ACK
    # from us would stall every login by 40 ms (twice), so each read re-arms TCP_QUICKACK
    with connected_pair() as (client, accepted, wrapped):
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # as Linux does after a reply
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
        client.sendall(b"KEXINIT")
        wrapped.settimeout(5)
        assert wrapped.recv(64) == b"KEXINIT"
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
        assert wrapped.fileno() == accepted.fileno() and not wrapped._closed

        wrapped.logging_in = False  # after the login, replies carry the ACKs
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        client.sendall(b"READ")
        assert wrapped.recv(64) == b"READ"
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0


def test_connection_socket_keeps_paramikos_timeout_in_the_kernel() -> None:
    # paramiko sets a 0.1 s timeout to look at its state between reads. Python would
    # poll() before every read and write; the kernel's SO_RCVTIMEO/SO_SNDTIMEO give the
    # same tick with one system call, and a read that times out still raises TimeoutError.
    with connected_pair() as (client, accepted, wrapped):
        wrapped.settimeout(0.1)
        assert wrapped.gettimeout() == 0.1 and accepted.gettimeout() is None  # blocking: no poll()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            wrapped.recv_into(memoryview(bytearray(16)))
        assert 0.05 < time.monotonic() - started < 5
        with pytest.raises(TimeoutError):
            wrapped.recv(16)
        client.sendall(b"data")
        buffer = bytearray(16)
        assert wrapped.recv_into(memoryview(buffer)) == 4 and buffer[:4] == b"data"
        assert wrapped.send(b"reply") == 5 and client.recv(16) == b"reply"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with pytest.raises(TimeoutError):  # the peer reads nothing: the send buffer fills, then a tick passes
            while True:
                wrapped.send(b"x" * 65536)
        wrapped.settimeout(None)
        assert wrapped.gettimeout() is None
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16) == bytes(16)
