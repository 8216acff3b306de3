"""The Transit key service against a real OpenBao (`bao server -dev` on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sftpvault.audit import AuditLog
from sftpvault.errors import KeyServiceError
from sftpvault.keyring import Keyring
from sftpvault.keyservice.transit import TransitKeyService
from tests.conftest import Vault, make_vault, run_cli
from tests.openbao import OpenBao, bao_binary, start_openbao


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path / "bao")
    server.enable_transit("transit")
    yield server
    server.stop()


def transit_config(bao: OpenBao, home: Path, key_type: str = "aes256-gcm96") -> str:
    token_file = home / "bao-token"
    token_file.write_text(bao.token)
    token_file.chmod(0o600)
    return (
        f'[keys]\nservice = "transit"\n[transit]\naddress = "{bao.address}"\ntoken_file = "{token_file}"\n'
        f'key = "sftpvault-{key_type}"\nkey_type = "{key_type}"\ntimeout = 2.0\nretries = 1\n'
    )


@pytest.fixture(params=["aes256-gcm96", "rsa-4096"])
def transit_vault(
    request: pytest.FixtureRequest, bao: OpenBao, template_home: Path, client_key: Path, tmp_path: Path
) -> Iterator[Vault]:
    vault = make_vault(template_home, client_key, tmp_path)
    (vault.home / "sftpvault.toml").write_text(transit_config(bao, vault.home, request.param))
    vault.start()
    yield vault
    if vault.proc is not None:
        vault.stop()


def record_of(vault: Vault, user: str = "demo") -> dict:
    name = f".{hashlib.sha224(user.encode()).hexdigest()}.secret"
    return json.loads((vault.home / "keys" / "keks" / name).read_text())


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    """The server finishes a session after the client has gone: wait for it, bounded."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def current_entry(vault: Vault, user: str = "demo") -> dict:
    record = record_of(vault, user)
    return record["deks"][record["current"]]


def test_login_creates_dek_through_transit_and_files_survive_rotation(transit_vault: Vault, bao: OpenBao) -> None:
    vault = transit_vault
    data = os.urandom(200_000)
    (vault.work / "f").write_bytes(data)
    vault.sftp("put f")
    entry = current_entry(vault)
    assert entry["service"] == "transit" and entry["kek_version"] == 1
    assert entry["ciphertext"].startswith("vault:v1:")
    assert "created Transit key" in vault.log.read_text()

    connected = vault.client()  # a user stays connected through the rotation
    out = run_cli(vault.home, "kek", "rotate")
    assert "now at version 2" in out.stdout and "1 done, 0 failed" in out.stdout
    assert current_entry(vault)["kek_version"] == 2
    assert connected.open("f").read() == data
    with connected.open("g", "wb") as f:
        f.write(b"written after rotation")
    connected.close()

    out = run_cli(vault.home, "kek", "rotate", "--min-decryption-version")
    assert "now at version 3" in out.stdout
    key = f"sftpvault-{entry['algorithm'].removeprefix('transit-')}"
    info = bao.api("GET", f"transit/keys/{key}").json()["data"]
    assert info["min_decryption_version"] == 3
    vault.sftp("get f back", "get g g2")  # a new login unwraps the version-3 record
    assert (vault.work / "back").read_bytes() == data
    assert (vault.work / "g2").read_bytes() == b"written after rotation"
    status = json.loads(run_cli(vault.home, "kek", "status", "--json").stdout)
    assert status["latest_version"] == 3 and status["deks"] == [{"service": "transit", "kek_version": 3, "count": 1}]


def test_rewrap_on_close_after_rotation_and_audit(transit_vault: Vault, bao: OpenBao) -> None:
    vault = transit_vault
    vault.sftp("pwd")
    key = f"sftpvault-{current_entry(vault)['algorithm'].removeprefix('transit-')}"
    bao.api("POST", f"transit/keys/{key}/rotate").raise_for_status()  # rotated behind our back
    vault.sftp("pwd")  # the session closes: its record moves to version 2
    wait_for(lambda: current_entry(vault)["kek_version"] == 2)
    actions = [e["action"] for e in AuditLog(vault.home / "keys" / "audit.jsonl").entries()]
    assert "dek.create" in actions and "dek.unwrap" in actions and "dek.rewrap" in actions
    text = (vault.home / "keys" / "audit.jsonl").read_text()
    assert "plaintext" not in text and "vault:v" not in text


def test_copied_record_does_not_unwrap_for_another_user(bao: OpenBao, tmp_path: Path) -> None:
    for key_type in ("aes256-gcm96", "rsa-4096"):
        service = TransitKeyService(bao.address, bao.token, key=f"bind-{key_type}", key_type=key_type)
        service.startup()
        ring = Keyring(tmp_path / key_type, {"transit": service}, "transit", AuditLog(tmp_path / "audit", "t"))
        ring.acquire("alice")
        ring.record_path("mallory").write_bytes(
            ring.record_path("alice").read_bytes().replace(b'"alice"', b'"mallory"')
        )
        with pytest.raises(KeyServiceError):
            ring.acquire("mallory")


def test_wrong_token_is_a_clear_error(bao: OpenBao, vault: Vault) -> None:
    (vault.home / "bad-token").write_text("not-the-token")
    (vault.home / "sftpvault.toml").write_text(
        f'[keys]\nservice = "transit"\n[transit]\naddress = "{bao.address}"\n'
        f'token_file = "{vault.home / "bad-token"}"\n'
    )
    out = run_cli(vault.home, "kek", "status", check=False)
    assert out.returncode == 1 and "denied permission" in out.stderr and "not-the-token" not in out.stderr
    assert "Traceback" not in out.stderr


def test_sealed_openbao_is_named(bao: OpenBao, vault: Vault) -> None:
    (vault.home / "sftpvault.toml").write_text(transit_config(bao, vault.home))
    env = {**os.environ, "BAO_ADDR": bao.address, "BAO_TOKEN": bao.token, "HOME": str(bao.home)}
    subprocess.run([bao_binary(), "operator", "seal"], env=env, check=True, capture_output=True)
    out = run_cli(vault.home, "kek", "status", check=False)
    assert out.returncode == 1 and "sealed" in out.stderr


def test_openbao_down_at_login_and_at_close(
    bao: OpenBao, template_home: Path, client_key: Path, tmp_path: Path
) -> None:
    vault = make_vault(template_home, client_key, tmp_path)
    (vault.home / "sftpvault.toml").write_text(transit_config(bao, vault.home))
    run_cli(vault.home, "user", "add", "other", "--authorized-key", f"{client_key}.pub")
    vault.start()
    try:
        (vault.work / "f").write_bytes(b"demo's file")
        vault.sftp("put f")  # demo's record exists
        demo_session = vault.client()
        record_before = json.dumps(record_of(vault))
        bao.stop()
        # a new user cannot log in: clear message, no half-made record
        out = vault.sftp("pwd", user="other", check=False)
        assert out.returncode != 0 and "key service unavailable" in out.stderr
        assert not any("other" in p.read_text() for p in (vault.home / "keys" / "keks").glob("*.secret"))
        # demo's open session keeps working, and closing it leaves the record as it was
        assert demo_session.open("f").read() == b"demo's file"
        demo_session.close()
        assert json.dumps(record_of(vault)) == record_before
        assert "cannot open the file system of other" in vault.log.read_text()
    finally:
        vault.stop()
