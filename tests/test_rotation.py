"""DEK rotation: headers rewrapped (or files re-encrypted), bytes unchanged, old DEK retired."""

from __future__ import annotations

import os
from pathlib import Path

from sftpvault import format as fmt
from sftpvault.audit import AuditLog
from tests.conftest import Vault, run_cli
from tests.test_transit import record_of


def populate(vault: Vault, tmp_path: Path, count: int) -> dict[str, bytes]:
    src = tmp_path / "src"
    files = {}
    for i in range(count):
        rel = f"d{i % 7}/f{i}.bin"
        data = os.urandom(i * 997 % 150_000)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        files["/" + rel] = data
    run_cli(vault.home, "import", "demo", str(src))
    return files


def stored(vault: Vault, vpath: str) -> bytes:
    return (vault.user_dir / vpath.lstrip("/")).read_bytes()


def test_dek_rotate_rewraps_headers_only(vault: Vault, tmp_path: Path) -> None:
    files = populate(vault, tmp_path, 120)
    old_dek = record_of(vault)["current"]
    before = {p: stored(vault, p) for p in files}

    connected = vault.client()  # a session that holds the old DEK across the rotation
    upload = connected.open("in-flight", "wb")
    upload.write(b"started before the rotation")
    upload.flush()

    out = run_cli(vault.home, "dek", "rotate", "demo")
    assert "121 done, 0 failed" in out.stdout  # 120 files and the in-flight upload
    record = record_of(vault)
    new_dek = record["current"]
    assert new_dek != old_dek and list(record["deks"]) == [new_dek]  # the old DEK is retired
    for path, raw in before.items():
        after = stored(vault, path)
        assert fmt.Header.parse(after).dek_id.hex() == new_dek
        assert after[fmt.HEADER_SIZE :] == raw[fmt.HEADER_SIZE :]  # no chunk was re-encrypted

    upload.write(b" and finished after it")
    upload.close()
    assert connected.open("in-flight").read() == b"started before the rotation and finished after it"
    assert connected.open("d3/f3.bin").read() == files["/d3/f3.bin"]
    with connected.open("new-file", "wb") as f:
        f.write(b"new")
    assert fmt.Header.parse(stored(vault, "/new-file")).dek_id.hex() == new_dek
    connected.close()

    assert "0 failed" in run_cli(vault.home, "verify", "demo").stdout
    reader = vault.client()
    for path in ("/d0/f7.bin", "/d6/f13.bin", "/d4/f109.bin"):
        assert reader.open(path).read() == files[path]
    reader.close()
    vault.sftp("get d5/f12.bin x")
    assert (vault.work / "x").read_bytes() == files["/d5/f12.bin"]
    actions = [e["action"] for e in AuditLog(vault.home / "keys" / "audit.jsonl").entries()]
    assert {"dek.create", "dek.rotate", "dek.retire"} <= set(actions)


def test_dek_rotate_reencrypt_and_all(vault: Vault, tmp_path: Path, client_key: Path) -> None:
    files = populate(vault, tmp_path, 12)
    before = {p: stored(vault, p) for p in files}
    run_cli(vault.home, "user", "add", "other", "--authorized-key", f"{client_key}.pub")
    (vault.work / "o").write_bytes(b"other's data")
    vault.sftp("put o", user="other")

    run_cli(vault.home, "dek", "rotate", "--reencrypt", "demo")
    for path, raw in before.items():
        after = stored(vault, path)
        assert after[fmt.HEADER_SIZE :] != raw[fmt.HEADER_SIZE :] or len(files[path]) == 0
        assert fmt.Header.parse(after).file_id != fmt.Header.parse(raw).file_id
    out = run_cli(vault.home, "dek", "rotate", "--all")
    assert "0 failed" in out.stdout
    assert "0 failed" in run_cli(vault.home, "verify").stdout
    vault.sftp("get d1/f8.bin y")
    assert (vault.work / "y").read_bytes() == files["/d1/f8.bin"]
    vault.sftp("get o o2", user="other")
    assert (vault.work / "o2").read_bytes() == b"other's data"
    bad = run_cli(vault.home, "dek", "rotate", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
