"""`serve --workers N`: several processes on one port, supervised by a master."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import Vault, run_cli
from tests.test_transit import wait_for


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_workers_serve_parallel_sessions_and_stop_cleanly(vault: Vault, client_key: Path) -> None:
    vault.stop()
    vault.start(workers=3)
    workers = children(vault.proc.pid)
    assert len(workers) == 3
    run_cli(vault.home, "user", "add", "fresh", "--authorized-key", f"{client_key}.pub")
    payloads = {i: os.urandom(300_000 + i) for i in range(8)}
    for i, data in payloads.items():
        (vault.work / f"p{i}").write_bytes(data)

    def session(i: int) -> None:
        user = "fresh" if i % 2 else "demo"  # first logins of `fresh` race across workers
        vault.sftp(f"put p{i} q{i}", f"get q{i} r{i}", user=user)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(session, payloads))
    for i, data in payloads.items():
        assert (vault.work / f"r{i}").read_bytes() == data
    records = list((vault.home / "keys" / "keks").glob("*.secret"))
    assert len(records) == 2  # demo and fresh: exactly one DEK record each

    client = vault.client()
    upload = client.open("pending", "wb")
    upload.write(b"committed at shutdown")
    upload.flush()
    assert vault.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in workers)
    assert (vault.user_dir / "pending").exists()


def test_a_dead_worker_is_replaced_and_workers_die_with_the_master(vault: Vault) -> None:
    vault.stop()
    vault.start(workers=2)
    first = children(vault.proc.pid)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = {pid: os.sched_getaffinity(pid) for pid in first}  # server.pin_workers is on by default
    assert sorted(pinned.values(), key=min) == [{cpus[0]}, {cpus[1 % len(cpus)]}]
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(children(vault.proc.pid)) == 2 and first[0] not in children(vault.proc.pid))
    assert "starting another" in vault.log.read_text()
    (replacement,) = set(children(vault.proc.pid)) - set(first)
    wait_for(lambda: os.sched_getaffinity(replacement) == pinned[first[0]])  # it takes the dead one's CPU
    time.sleep(0.5)
    for _ in range(4):
        assert "Remote working directory" in vault.sftp("pwd").stdout
    workers = children(vault.proc.pid)
    vault.proc.kill()
    vault.proc.wait()
    vault.proc = None
    wait_for(lambda: not any(alive(pid) for pid in workers))
    out = subprocess.run(["pgrep", "-f", str(vault.home)], capture_output=True, text=True)
    assert out.stdout.strip() == ""


ARENA_PROBE = """
import ctypes, sys, threading
from sftpvault.ssh.workers import limit_malloc_arenas
if sys.argv[1] == "limit":
    limit_malloc_arenas()
barrier = threading.Barrier(7)
def hold():
    held = [bytearray(60000) for _ in range(50)]  # under the mmap threshold: from an arena
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=hold) for _ in range(6)]
for t in threads:
    t.start()
barrier.wait()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
barrier.wait()
"""


def test_server_processes_cap_malloc_arenas() -> None:
    # without the cap each connection thread may take an arena of its own and keep its freed memory
    def arenas(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        done = subprocess.run(
            [sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, env=env, check=True
        )
        return sum(line.startswith("Arena ") for line in done.stderr.splitlines())

    assert arenas("none") > 1
    assert arenas("limit") == 1


def test_default_worker_count_follows_the_cpus_we_may_use(vault: Vault) -> None:
    # os.cpu_count() would count the host's CPUs inside a container limited by a cpuset
    cpus = sorted(os.sched_getaffinity(0))
    vault.stop()
    os.sched_setaffinity(0, {cpus[0]})  # the server inherits this thread's CPU set
    try:
        vault.start(workers=0)
    finally:
        os.sched_setaffinity(0, cpus)
    assert children(vault.proc.pid) == []  # one CPU: one process, no workers
    vault.stop()
    vault.start(workers=0)
    assert len(children(vault.proc.pid)) == (len(cpus) if len(cpus) > 1 else 0)  # one worker per CPU
