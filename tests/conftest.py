"""Fixtures: a real sftpvault server process on a free loopback port, driven by
the real OpenSSH client binaries and by paramiko's SFTP client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=10",
]
PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(home: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "sftpvault", "--home", str(home), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sftpvault {' '.join(args)} failed: {proc.stderr}")
    return proc


@dataclass
class Vault:
    """One running server with user `demo` (password and key) and a work dir."""

    home: Path
    port: int
    key: Path
    work: Path
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "server.log"

    @property
    def user_dir(self) -> Path:
        return self.home / "data" / "demo"

    def start(self, extra_env: dict[str, str] | None = None, workers: int = 1) -> None:
        env = {**os.environ, **(extra_env or {})}
        seen = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sftpvault",
                    "--home",
                    str(self.home),
                    "serve",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(workers),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            if b"listening on" in self.log.read_bytes()[seen:]:
                return
            time.sleep(0.05)
        raise AssertionError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc = None

    def sftp(
        self, *commands: str, check: bool = True, user: str = "demo", opts: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        """Run OpenSSH `sftp -b` with the given batch commands from the work dir."""
        batch = self.work / f"batch-{threading.get_ident()}"  # callers may run in parallel
        batch.write_text("\n".join(commands) + "\n")
        return self._openssh("sftp", [*opts, "-b", str(batch), f"{user}@127.0.0.1"], check)

    def sftp_with_password(
        self, user: str, password: str, commands: str, *opts: str, key: bool = False
    ) -> subprocess.CompletedProcess:
        """Interactive OpenSSH sftp typing `password` through SSH_ASKPASS (batch mode allows no password).

        The commands come on stdin; with key=False no public key is offered.
        """
        askpass = self.work / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        key_opts = ["-i", str(self.key)] if key else ["-o", "PubkeyAuthentication=no"]
        return subprocess.run(
            ["sftp", "-P", str(self.port), *SSH_OPTS[:4], *key_opts, *opts, f"{user}@127.0.0.1"],
            env=env,
            input=commands,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.work,
        )

    def scp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._openssh("scp", list(args), check)

    def _openssh(self, tool: str, args: list[str], check: bool) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [tool, "-q", "-P", str(self.port), "-i", str(self.key), *SSH_OPTS, *args],
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
        return proc

    def client(self) -> paramiko.SFTPClient:
        """A paramiko SFTP client logged in as demo with the password."""
        transport = paramiko.Transport(("127.0.0.1", self.port))
        transport.connect(username="demo", password=PASSWORD)
        return paramiko.SFTPClient.from_transport(transport)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="session")
def template_home(tmp_path_factory: pytest.TempPathFactory, client_key: Path) -> Path:
    """A state dir with host keys, keystore and user demo, made once and copied per server."""
    home = tmp_path_factory.mktemp("template")
    run_cli(
        home, "user", "add", "demo", "--password-stdin", "--authorized-key", f"{client_key}.pub", input=PASSWORD + "\n"
    )
    from sftpvault.app import build
    from sftpvault.config import load
    from sftpvault.ssh.hostkeys import ensure_host_keys

    ensure_host_keys(home / "keys")
    build(load(home)).key_service.create_if_missing()
    return home


def make_vault(template_home: Path, client_key: Path, tmp_path: Path) -> Vault:
    home = tmp_path / "home"
    shutil.copytree(template_home, home)
    work = tmp_path / "work"
    work.mkdir()
    return Vault(home=home, port=free_port(), key=client_key, work=work)


@pytest.fixture
def vault(template_home: Path, client_key: Path, tmp_path: Path) -> Iterator[Vault]:
    """A fresh server per test (about half a second to start)."""
    v = make_vault(template_home, client_key, tmp_path)
    v.start()
    yield v
    if v.proc is not None:
        v.stop()
