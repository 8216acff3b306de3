"""The Mo-Vault key service, and migrating records between key services."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftpvault.errors import KeyServiceError
from sftpvault.keyservice.movault import MoVaultKeyService
from tests.conftest import Vault, run_cli
from tests.movault_server import MoVault
from tests.openbao import OpenBao, start_openbao
from tests.test_transit import current_entry, transit_config


@pytest.fixture
def movault() -> Iterator[MoVault]:
    server = MoVault().start()
    yield server
    server.stop()


def movault_config(movault: MoVault) -> str:
    return f'[movault]\nurl = "{movault.url}"\nsecret_path = "dropzone/kek"\n'


def test_movault_wraps_unwraps_and_rotates(movault: MoVault, tmp_path: Path) -> None:
    service = MoVaultKeyService(movault.url, "dropzone/kek", tmp_path / "movault.json")
    assert service.startup() == ["created Mo-Vault key dropzone/kek version 1"]
    dek, wrapped = service.new_dek(b"alice")
    assert wrapped.kek_version == 1 and bytes.fromhex(wrapped.ciphertext)
    assert service.unwrap(wrapped, b"alice") == dek
    with pytest.raises(KeyServiceError, match="does not unwrap for this user"):
        service.unwrap(wrapped, b"bob")
    assert service.rotate() == 2
    assert json.loads((tmp_path / "movault.json").read_text())["secret_version"] == 2
    moved = service.rewrap(wrapped, b"alice")
    assert moved.kek_version == 2 and service.unwrap(moved, b"alice") == dek


def test_movault_error_shapes_are_errors(movault: MoVault, tmp_path: Path) -> None:
    service = MoVaultKeyService(movault.url, "dropzone/kek", tmp_path / "movault.json", retries=0)
    with pytest.raises(KeyServiceError, match="no Mo-Vault key version"):
        service.wrap(os.urandom(32), b"u")
    service.startup()
    _, wrapped = service.new_dek(b"u")
    bogus = type(wrapped)(wrapped.service, wrapped.kek_name, 7, wrapped.algorithm, wrapped.ciphertext)
    with pytest.raises(KeyServiceError, match="refused: no such secret"):
        service.unwrap(bogus, b"u")
    broken = type(wrapped)(wrapped.service, wrapped.kek_name, 1, wrapped.algorithm, "00" * 256)
    with pytest.raises(KeyServiceError, match="decryption failed"):
        service.unwrap(broken, b"u")
    movault.stop()
    with pytest.raises(KeyServiceError, match="cannot reach"):
        service.unwrap(wrapped, b"u")


def test_server_on_movault_then_migrate_to_transit(movault: MoVault, vault: Vault, tmp_path: Path) -> None:
    vault.stop()
    (vault.home / "sftpvault.toml").write_text('[keys]\nservice = "movault"\n' + movault_config(movault))
    vault.start()
    data = os.urandom(100_000)
    (vault.work / "f").write_bytes(data)
    vault.sftp("put f")
    assert current_entry(vault)["service"] == "movault"
    assert "/key/decrypt/rsa" in movault.calls

    bao: OpenBao = start_openbao(tmp_path / "bao")
    try:
        bao.enable_transit("transit")
        vault.stop()
        config = transit_config(bao, vault.home).replace('service = "transit"', 'service = "movault"')
        (vault.home / "sftpvault.toml").write_text(config + movault_config(movault))
        out = run_cli(vault.home, "kek", "migrate", "--to", "transit")
        assert "migrated: 1 done, 0 failed" in out.stdout and "keys.service" in out.stderr
        assert current_entry(vault)["service"] == "transit"
        (vault.home / "sftpvault.toml").write_text(transit_config(bao, vault.home))  # Mo-Vault gone for good
        vault.start()
        vault.sftp("get f back")
        assert (vault.work / "back").read_bytes() == data
    finally:
        bao.stop()


def test_slow_key_service_at_login_is_a_bounded_clear_refusal(movault: MoVault, vault: Vault, client_key: Path) -> None:
    vault.stop()
    (vault.home / "sftpvault.toml").write_text(
        '[keys]\nservice = "movault"\n' + movault_config(movault) + "timeout = 0.5\nretries = 1\n"
    )
    run_cli(vault.home, "user", "add", "late", "--authorized-key", f"{client_key}.pub")
    vault.start()
    vault.sftp("pwd")  # demo's DEK exists and is unwrapped quickly
    demo = vault.client()
    movault.delay = 3.0
    started = time.monotonic()
    out = vault.sftp("pwd", user="late", check=False)
    assert out.returncode != 0 and "key service unavailable" in out.stderr
    assert time.monotonic() - started < 20  # two attempts of 0.5 s plus backoff, not the service's 3 s each
    assert not any(b"late" in p.read_bytes() for p in (vault.home / "keys" / "keks").glob("*.secret"))
    with demo.open("still-works", "wb") as f:  # an open session is not held up
        f.write(b"ok")
    demo.close()
    movault.delay = 0.0
    assert "cannot reach the Mo-Vault key service" in vault.log.read_text()
