"""PAM against the real pam_unix stack, with throwaway local users (needs root, as in CI)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Vault, make_vault
from tests.test_ldap import password_login

USERS = {"svpam_ok": "ok-Pass-123", "svpam_locked": "locked-Pass-456", "svpam_expired": "expired-Pass-789"}


@pytest.fixture(scope="module")
def pam_setup() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the PAM tests create system users: run them as root (CI does)")
    service = f"sftpvault-test-{secrets.token_hex(4)}"
    service_file = Path("/etc/pam.d") / service
    service_file.write_text("auth     required  pam_unix.so\naccount  required  pam_unix.so\n")
    try:
        for user, password in USERS.items():
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True, capture_output=True)
            subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        subprocess.run(["usermod", "-L", "svpam_locked"], check=True)
        subprocess.run(["chage", "-E", "0", "svpam_expired"], check=True)
        yield service
    finally:
        for user in USERS:
            subprocess.run(["userdel", user], capture_output=True)
        service_file.unlink(missing_ok=True)


@pytest.fixture
def pam_vault(pam_setup: str, template_home: Path, client_key: Path, tmp_path: Path) -> Iterator[Vault]:
    vault = make_vault(template_home, client_key, tmp_path)
    (vault.home / "sftpvault.toml").write_text(f'[auth]\nbackends = ["pam"]\n[pam]\nservice = "{pam_setup}"\n')
    vault.start()
    yield vault
    vault.stop()


def test_pam_good_bad_locked_expired(pam_vault: Vault) -> None:
    assert password_login(pam_vault, "svpam_ok", USERS["svpam_ok"])
    assert not password_login(pam_vault, "svpam_ok", "wrong-password")
    assert not password_login(pam_vault, "svpam_ok", "")
    assert not password_login(pam_vault, "svpam_locked", USERS["svpam_locked"])
    assert not password_login(pam_vault, "svpam_expired", USERS["svpam_expired"])
    assert not password_login(pam_vault, "demo", "correct horse battery staple")  # embedded is not in the chain
    assert "refused by service" in pam_vault.log.read_text()


def test_pam_login_with_openssh(pam_vault: Vault) -> None:
    (pam_vault.work / "f").write_bytes(b"via pam")
    out = pam_vault.sftp_with_password("svpam_ok", USERS["svpam_ok"], "put f\nbye\n")
    assert out.returncode == 0, out.stderr
    assert (pam_vault.home / "data" / "svpam_ok" / "f").exists()
