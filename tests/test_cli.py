"""The admin CLI: commands work, and bad input gets one line and a non-zero exit."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sftpvault import __version__
from sftpvault import format as fmt
from tests.conftest import PASSWORD, Vault, run_cli


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "sftpvault", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_init_writes_a_loadable_default_config(tmp_path: Path) -> None:
    run_cli(tmp_path, "init")
    text = (tmp_path / "sftpvault.toml").read_text()
    assert "port = 2222" in text and text.count("#") > 10
    from sftpvault.config import Settings, load

    assert load(tmp_path) == Settings(home=tmp_path.resolve())  # the file states the defaults
    assert_clean_error(run_cli(tmp_path, "init", check=False), "exists")


def test_readme_lists_every_setting_with_its_default() -> None:
    from sftpvault.config import _SECTIONS

    documented: dict[str, str] = {}
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    for row in reference.splitlines():
        cells = row.split(" | ")
        if row.startswith("| `") and len(cells) >= 3:
            keys, defaults = re.findall(r"`([a-z_]+\.[a-z_]+)`", cells[0]), re.findall(r"`([^`]*)`", cells[1])
            if len(defaults) == 1:  # one default for several settings
                defaults *= len(keys)
            documented.update(zip(keys, defaults, strict=True))
    for section, settings in _SECTIONS.items():
        for setting in dataclasses.fields(settings):
            key, default = f"{section}.{setting.name}", getattr(settings(), setting.name)
            assert key in documented, f"README does not list {key}"
            assert documented[key] == _toml(default), f"README gives {key} the default {documented[key]}"


def _toml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def test_user_lifecycle(tmp_path: Path, client_key: Path) -> None:
    run_cli(tmp_path, "user", "add", "alice", "--password-stdin", input="s3cret-pass\n")
    run_cli(tmp_path, "user", "add", "bob", "--authorized-key", f"{client_key}.pub")
    listing = run_cli(tmp_path, "user", "list").stdout
    assert "alice\tpassword, 0 key(s)" in listing and "bob\t1 key(s)" in listing
    assert "s3cret-pass" not in (tmp_path / "users.json").read_text()
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    run_cli(tmp_path, "user", "set-password", "bob", "--password-stdin", input="another-pass\n")
    run_cli(tmp_path, "user", "add-key", "alice", f"{client_key}.pub")
    assert "alice\tpassword, 1 key(s)" in run_cli(tmp_path, "user", "list").stdout
    run_cli(tmp_path, "user", "remove", "alice")
    assert "alice" not in run_cli(tmp_path, "user", "list").stdout


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    run_cli(tmp_path, "user", "add", "alice", "--password-stdin", input="pw-one\n")
    assert_clean_error(
        run_cli(tmp_path, "user", "add", "alice", "--password-stdin", input="pw\n", check=False), "already exists"
    )
    assert_clean_error(run_cli(tmp_path, "user", "remove", "nobody", check=False), "no such user")
    assert_clean_error(
        run_cli(tmp_path, "user", "add", "Bad/Name", "--password-stdin", input="pw\n", check=False), "invalid user name"
    )
    assert_clean_error(run_cli(tmp_path, "user", "add", "carol", "--password-stdin", input="\n", check=False), "empty")
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("not a key\n")
    assert_clean_error(run_cli(tmp_path, "user", "add-key", "alice", str(bogus), check=False), "public key")


@pytest.mark.parametrize(
    "config, words",
    [
        ("[server]\nport = 70000\n", ("server.port",)),
        ('[server]\nport = "x"\n', ("server.port", "int")),
        ("[server]\nprot = 22\n", ("unknown setting", "server.prot")),
        ("[nope]\n", ("unknown section",)),
        ("[server\n", ("sftpvault.toml",)),
        ('[keys]\nservice = "vault"\n', ("keys.service",)),
        ('[server]\nciphers = ["3des-cbc"]\n', ("server.ciphers",)),
        ("[server]\nmax_packet_size = 1048576\nwindow_size = 8388608\n", ("server.max_packet_size", "524288")),
        ("[server]\nbusy_poll_us = -1\n", ("server.busy_poll_us", "0-10000")),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, config: str, words: tuple[str, ...]) -> None:
    (tmp_path / "sftpvault.toml").write_text(config)
    assert_clean_error(run_cli(tmp_path, "user", "list", check=False), *words)


def test_serve_on_a_busy_port_is_one_line(vault: Vault) -> None:
    assert_clean_error(run_cli(vault.home, "serve", "--port", str(vault.port), check=False), "cannot listen")
    assert run_cli(vault.home, "serve", "--port", "0", check=False).returncode != 0


def test_cat_import_verify(vault: Vault, tmp_path: Path) -> None:
    data = os.urandom(100_000) + b"\x00" * 10
    (vault.work / "f").write_bytes(data)
    vault.sftp("put f")
    cat = subprocess.run(
        [sys.executable, "-m", "sftpvault", "--home", str(vault.home), "cat", "demo", "/f"],
        capture_output=True,
        timeout=60,
    )
    assert cat.returncode == 0 and cat.stdout == data

    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    out = run_cli(vault.home, "import", "demo", str(src), "/imported")
    assert "imported 2 file(s)" in out.stdout
    vault.sftp("get imported/sub/b.bin b.bin")
    assert (vault.work / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert b"alpha" not in (vault.user_dir / "imported" / "a.txt").read_bytes()

    ok = run_cli(vault.home, "verify")
    assert "3 ok, 0 failed" in ok.stdout
    raw = bytearray((vault.user_dir / "imported" / "a.txt").read_bytes())
    raw[fmt.HEADER_SIZE + 14] ^= 1
    (vault.user_dir / "imported" / "a.txt").write_bytes(bytes(raw))
    bad = run_cli(vault.home, "verify", "demo", check=False)
    assert bad.returncode == 1
    assert "FAILED demo:/imported/a.txt" in bad.stderr and "2 ok, 1 failed" in bad.stdout
    assert_clean_error(run_cli(vault.home, "cat", "demo", "/imported/a.txt", check=False), "integrity")


def test_cat_errors_are_one_line(vault: Vault) -> None:
    assert_clean_error(run_cli(vault.home, "cat", "nobody", "/x", check=False), "nobody")
    vault.sftp("pwd")  # first login creates demo's DEK record
    assert_clean_error(run_cli(vault.home, "cat", "demo", "/missing", check=False), "No such file")
    assert_clean_error(run_cli(vault.home, "cat", "demo", "/../../etc/passwd", check=False), "No such file")


def test_no_secret_in_argv_of_the_server(vault: Vault) -> None:
    cmdline = Path(f"/proc/{vault.proc.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline


def test_serve_script_prints_how_to_connect(tmp_path: Path) -> None:
    """./scripts/serve on an empty home: creates demo and serves; we stop it once it listens."""
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    script = Path(__file__).resolve().parent.parent / "scripts" / "serve"
    env = {**os.environ, "SFTPVAULT_HOME": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [str(script), "--port", str(number)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert "created user demo with password:" in text
        assert f"sftp -P {number} demo@127.0.0.1" in text
        password = text.split("created user demo with password: ")[1].split()[0]
        assert password not in (tmp_path / "users.json").read_text()
    finally:
        proc.terminate()
        proc.wait(30)
