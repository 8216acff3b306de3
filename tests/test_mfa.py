"""Multi-factor rules (auth.methods, like sshd's AuthenticationMethods)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paramiko
import pytest

from tests.conftest import PASSWORD, Vault


@pytest.fixture
def mfa_vault(vault: Vault) -> Vault:
    (vault.home / "sftpvault.toml").write_text('[auth]\nmethods = ["publickey,password"]\n')
    vault.stop()
    vault.start()
    return vault


def test_key_then_password_is_required(mfa_vault: Vault, client_key: Path) -> None:
    key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
    transport = paramiko.Transport(("127.0.0.1", mfa_vault.port))
    transport.connect()
    assert transport.auth_publickey("demo", key) == ["password"]  # partial success
    assert not transport.is_authenticated()
    assert transport.auth_password("demo", PASSWORD) == []
    assert transport.is_authenticated()
    transport.close()

    transport = paramiko.Transport(("127.0.0.1", mfa_vault.port))
    transport.connect()
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_password("demo", PASSWORD)  # a password alone is not enough
    transport.close()


def test_a_key_counts_only_once_its_signature_verified(mfa_vault: Vault, client_key: Path) -> None:
    """An authorized public key with a signature from another key must not pass the first factor."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(mfa_vault.work / "other")], check=True)
    other = paramiko.Ed25519Key.from_private_key_file(str(mfa_vault.work / "other"))

    class WrongSigner(paramiko.Ed25519Key):
        def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> paramiko.Message:
            return other.sign_ssh_data(data, algorithm)

    presented = WrongSigner.from_private_key_file(str(client_key))
    transport = paramiko.Transport(("127.0.0.1", mfa_vault.port))
    transport.connect()
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_publickey("demo", presented)
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_password("demo", PASSWORD)
    assert not transport.is_authenticated()
    transport.close()


def test_openssh_with_key_and_password(mfa_vault: Vault, client_key: Path) -> None:
    out = mfa_vault.sftp_with_password("demo", PASSWORD, "pwd\nbye\n", key=True)
    assert out.returncode == 0 and "Remote working directory" in out.stdout
    assert "auth: partial user='demo'" in mfa_vault.log.read_text()
    assert mfa_vault.sftp("pwd", check=False).returncode != 0  # batch mode: the key alone does not log in
