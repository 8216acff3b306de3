"""The Dockerfile, checked outside a container (no container engine runs here):
its build context installs, and its ENTRYPOINT + CMD serve and stop cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+)$", DOCKERFILE, re.M)


def test_copied_sources_build_a_wheel_with_the_console_script(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for line in instruction("COPY"):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
            copy(ROOT / source, context / source)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "w").glob("sftpvault-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "sftpvault/cli.py" in names and "sftpvault/vfs/handle.py" in names
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sftpvault = sftpvault.cli:main" in entry_points


def test_entrypoint_serves_answers_healthcheck_and_stops_on_stopsignal(tmp_path: Path) -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    cmd = json.loads(instruction("CMD")[0])
    assert entrypoint == ["sftpvault"] and cmd[0] == "serve"
    port = free_port()
    # the image listens on 0.0.0.0:2222; tests stay on loopback with a free port
    args = [a.replace("0.0.0.0", "127.0.0.1").replace("2222", str(port)) for a in cmd]
    env_home = re.search(r"SFTPVAULT_HOME=(\S+)", DOCKERFILE).group(1)
    assert env_home == "/var/lib/sftpvault"
    exe = Path(sys.executable).with_name("sftpvault")
    proc = subprocess.Popen(
        [str(exe), *args],
        env={**os.environ, "SFTPVAULT_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "listening on" in line:
                break
        health = instruction("HEALTHCHECK")[0].split(" CMD ", 1)[1].replace("2222", str(port))
        assert subprocess.run(health, shell=True, timeout=30).returncode == 0
        stop = getattr(signal, re.search(r"^STOPSIGNAL\s+(\S+)", DOCKERFILE, re.M).group(1))
        proc.send_signal(stop)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0.1)
    assert (tmp_path / "keys" / "keystore.json").exists()
