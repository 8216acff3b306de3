"""OpenSSH user certificates (made with ssh-keygen) and authorized_keys options."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftpvault.auth.certs import CertificateAuthority
from tests.conftest import SSH_OPTS, Vault, make_vault


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def sign(ca: Path, key: Path, *args: str) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", f"id-{key.name}", *args, f"{key}.pub"],
        check=True,
        capture_output=True,
    )
    return Path(f"{key}-cert.pub")


@pytest.fixture
def cert_vault(template_home: Path, client_key: Path, tmp_path: Path) -> Iterator[Vault]:
    vault = make_vault(template_home, client_key, tmp_path)
    keygen(vault.home / "ca")
    keygen(vault.home / "rogue-ca")
    (vault.home / "trusted_ca").write_text(Path(f"{vault.home / 'ca'}.pub").read_text())
    # the defender stays out of the way: this test fails on purpose, many times, from one address
    (vault.home / "sftpvault.toml").write_text(
        f'[auth]\ntrusted_user_ca_keys = "{vault.home / "trusted_ca"}"\n[defender]\nenabled = false\n'
    )
    vault.start()
    yield vault
    vault.stop()


def login_with(vault: Vault, key: Path, cert: Path | None, user: str = "demo") -> bool:
    cert_opts = ["-o", f"CertificateFile={cert}"] if cert else []
    out = subprocess.run(
        [
            "sftp",
            "-q",
            "-P",
            str(vault.port),
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            *cert_opts,
            *SSH_OPTS,
            "-b",
            "-",
            f"{user}@127.0.0.1",
        ],
        input="pwd\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode == 0


def test_only_a_valid_user_certificate_logs_in(cert_vault: Vault, tmp_path: Path) -> None:
    ca, rogue = cert_vault.home / "ca", cert_vault.home / "rogue-ca"
    cases = {
        "right principal": (ca, ("-n", "demo,backup", "-V", "-5m:+1h"), True),
        "wrong principal": (ca, ("-n", "someone-else", "-V", "-5m:+1h"), False),
        "expired": (ca, ("-n", "demo", "-V", "20200101:20200102"), False),
        "not yet valid": (ca, ("-n", "demo", "-V", "+1d:+2d"), False),
        "host certificate": (ca, ("-h", "-n", "demo", "-V", "-5m:+1h"), False),
        "untrusted CA": (rogue, ("-n", "demo", "-V", "-5m:+1h"), False),
        "foreign source address": (ca, ("-n", "demo", "-O", "source-address=10.9.9.0/24"), False),
        "forced other command": (ca, ("-n", "demo", "-O", "force-command=/bin/sh"), False),
        "forced sftp": (ca, ("-n", "demo", "-O", "force-command=internal-sftp"), True),
    }
    for label, (signer, args, expected) in cases.items():
        key = keygen(tmp_path / label.replace(" ", "-"))
        cert = sign(signer, key, *args)
        assert login_with(cert_vault, key, cert) is expected, label
        bare = tmp_path / f"bare-{key.name}"  # ssh would pick up KEY-cert.pub beside KEY by itself
        shutil.copy(key, bare)
        assert not login_with(cert_vault, bare, None), f"{label}: the bare key is not authorized"
    log = cert_vault.log.read_text()
    for reason in (
        "has no principal 'demo'",
        "outside its validity window",
        "not signed by a trusted CA",
        "forces another command",
        "is not valid from 127.0.0.1",
    ):
        assert reason in log, reason
    # OpenSSH's client never offers a host certificate for user auth; check the server's rule directly
    host_cert = base64.b64decode((tmp_path / "host-certificate-cert.pub").read_text().split()[1])
    authority = CertificateAuthority(cert_vault.home / "trusted_ca")
    assert authority.check(host_cert, "demo", "127.0.0.1") == "not a user certificate"


def test_authorized_keys_dir_with_from_and_expiry(template_home: Path, client_key: Path, tmp_path: Path) -> None:
    vault = make_vault(template_home, client_key, tmp_path)
    keys_dir = vault.home / "authorized_keys"
    keys_dir.mkdir()
    ok, far, expired, forced = (keygen(tmp_path / n) for n in ("ok", "far", "expired", "forced"))
    pub = {k: Path(f"{k}.pub").read_text().strip() for k in (ok, far, expired, forced)}
    yesterday = time.strftime("%Y%m%d", time.gmtime(time.time() - 86400))
    (keys_dir / "batch").write_text(
        f'from="127.0.0.0/8,!10.*" {pub[ok]}\nfrom="192.0.2.*" {pub[far]}\n'
        f'expiry-time="{yesterday}Z" {pub[expired]}\ncommand="/bin/date" {pub[forced]}\n# comment\n'
    )
    (vault.home / "sftpvault.toml").write_text(
        f'[auth]\nbackends = ["embedded", "authorized_keys"]\nauthorized_keys_dir = "{keys_dir}"\n'
    )
    vault.start()
    try:
        assert login_with(vault, ok, None, "batch")
        assert not login_with(vault, far, None, "batch")
        assert not login_with(vault, expired, None, "batch")
        assert not login_with(vault, forced, None, "batch")
        assert "line 4 ignored: key is restricted to another command" in vault.log.read_text()
    finally:
        vault.stop()
