"""Side-by-side benchmark: sftpvault vs OpenSSH sshd (internal-sftp) vs rclone serve sftp (crypt remote).

Every server runs on its own loopback port with its data in a temp dir on the
same disk, and every measurement is made with the same client: OpenSSH `sftp
-b` with aes128-gcm@openssh.com. Each row is the median of --repeat runs; the
runs of the targets are interleaved, and each measurement starts after a
sync(). It reports; it does not judge (exit status 0 even when a target is
missed).

Also reports the key-lifecycle figures of the key-service issue against a
local OpenBao: `kek rotate` over many DEK records, `dek rotate` over many file
headers, and the median DEK unwrap time at login.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CIPHER = "aes128-gcm@openssh.com"
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def process_tree(pid: int) -> Iterator[int]:
    """`pid` and its live descendants."""
    todo = [pid]
    while todo:
        current = todo.pop()
        yield current
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue


def largest_process_rss(pid: int) -> int:
    """Resident bytes of the largest process among `pid` and its descendants.

    Per process, not summed: forked workers share copy-on-write pages that a
    sum would count once per process (and the targets are per worker).
    """
    largest = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            largest = max(largest, int(status.split("VmRSS:")[1].split()[0]) * 1024 if "VmRSS:" in status else 0)
        except (OSError, ValueError, IndexError):
            continue
    return largest


def server_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and its descendants, with that of descendants that ended and were waited for."""
    ticks = 0
    for current in process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak resident memory of the largest server process while a measurement runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, largest_process_rss(self.pid))
            self._stop.wait(0.05)


class Target:
    """One server under test."""

    name = ""

    def __init__(self, work: Path, pubkey: Path) -> None:
        self.dir = work / self.name
        self.dir.mkdir()
        self.port = free_port()
        self.pubkey = pubkey
        self.proc: subprocess.Popen | None = None
        self.user = "bench"
        self.remote = ""  # prefix for remote paths

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sftpvault(Target):
    name = "sftpvault"

    def __init__(self, work: Path, pubkey: Path, workers: int) -> None:
        super().__init__(work, pubkey)
        self.workers = workers

    def start(self) -> None:
        sv = [sys.executable, "-m", "sftpvault", "--home", str(self.dir)]
        subprocess.run(
            [*sv, "user", "add", self.user, "--authorized-key", str(self.pubkey)], check=True, capture_output=True
        )
        extra = ["--workers", str(self.workers)] if self.workers else []
        self.proc = subprocess.Popen(
            [*sv, "serve", "--port", str(self.port), *extra],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "log").open("wb"),
        )
        wait_port(self.port, self.proc)


class OpenSSH(Target):
    name = "openssh"

    def start(self) -> None:
        data = self.dir / "data"
        data.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "hostkey")], check=True)
        shutil.copy(self.pubkey, self.dir / "authorized_keys")
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'hostkey'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"Subsystem sftp internal-sftp\nPidFile {self.dir / 'pid'}\nMaxStartups 100\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        # -D: stay in the foreground; -r: no re-exec per connection (fails in this sandbox)
        self.proc = subprocess.Popen(
            [sshd, "-D", "-r", "-f", str(self.dir / "sshd_config"), "-E", str(self.dir / "log")]
        )
        self.user = os.environ.get("USER") or "root"
        self.remote = f"{data}/"
        wait_port(self.port, self.proc)


class RcloneCrypt(Target):
    name = "rclone-crypt"

    def start(self) -> None:
        data = self.dir / "data"
        data.mkdir()
        # the crypt password goes through stdin ("-"), never argv
        secret = subprocess.run(
            ["rclone", "obscure", "-"], input=os.urandom(12).hex(), check=True, capture_output=True, text=True
        ).stdout.strip()
        config = self.dir / "rclone.conf"
        config.write_text(
            f"[base]\ntype = alias\nremote = {data}\n\n[sec]\ntype = crypt\nremote = base:\npassword = {secret}\n"
        )
        config.chmod(0o600)
        shutil.copy(self.pubkey, self.dir / "authorized_keys")
        self.proc = subprocess.Popen(
            [
                "rclone",
                "--config",
                str(config),
                "serve",
                "sftp",
                "sec:",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--authorized-keys",
                str(self.dir / "authorized_keys"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "log").open("wb"),
        )
        wait_port(self.port, self.proc)


class Client:
    """OpenSSH sftp, the same for every target."""

    def __init__(self, key: Path, local: Path) -> None:
        self.key, self.local = key, local

    def run(self, target: Target, *commands: str) -> None:
        batch = tempfile.NamedTemporaryFile("w", dir=self.local, delete=False, suffix=".batch")
        batch.write("\n".join(commands) + "\n")
        batch.close()
        try:
            subprocess.run(
                [
                    "sftp",
                    "-q",
                    "-c",
                    CIPHER,
                    "-P",
                    str(target.port),
                    "-i",
                    str(self.key),
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "LogLevel=ERROR",
                    "-b",
                    batch.name,
                    f"{target.user}@127.0.0.1",
                ],
                cwd=self.local,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=3600,
            )
        finally:
            os.unlink(batch.name)


def timed(fn: Callable[[], None]) -> float:
    """Seconds `fn` takes, after writing back what earlier measurements left dirty (it is not theirs to pay)."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_random_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            left -= len(block)


class Measurements:
    """Every row of every target, as a list of runs."""

    def __init__(self, client: Client, args: argparse.Namespace, local: Path, big_hash: str) -> None:
        self.client, self.args, self.local, self.big_hash = client, args, local, big_hash
        self.rows: dict[str, dict[str, list[float]]] = {}

    def add(self, target: Target, row: str, value: float) -> None:
        self.rows.setdefault(target.name, {}).setdefault(row, []).append(value)

    def medians(self) -> dict[str, dict[str, float]]:
        return {name: {row: statistics.median(v) for row, v in rows.items()} for name, rows in self.rows.items()}

    def single_stream(self, target: Target, run: int) -> None:
        args, client = self.args, self.client
        remote = f"{target.remote}big{run}"
        down = self.local / f"down{run}"
        with RssSampler(target.proc.pid) as rss:
            self.add(target, "upload MB/s", args.size / MB / timed(lambda: client.run(target, f"put big {remote}")))
            get = f"get {remote} {down.name}"
            self.add(target, "download MB/s", args.size / MB / timed(lambda: client.run(target, get)))
        self.add(target, f"peak RSS per process, single stream, {mib(args.size)} MiB file", rss.peak / 2**20)
        if sha256(down) != self.big_hash:
            raise RuntimeError(f"{target.name}: downloaded file differs")
        down.unlink()
        client.run(target, f"rm {remote}")

    def large_file(self, target: Target) -> None:
        """Memory must not grow with the file: once is enough for a peak."""
        remote, down = f"{target.remote}large", self.local / "large-back"
        with RssSampler(target.proc.pid) as rss:
            self.client.run(target, f"put large {remote}", f"get {remote} {down.name}", f"rm {remote}")
        self.add(target, f"peak RSS per process, single stream, {mib(self.args.large_size)} MiB file", rss.peak / 2**20)
        if not filecmp.cmp(self.local / "large", down, shallow=False):
            raise RuntimeError(f"{target.name}: downloaded large file differs")
        down.unlink()

    def parallel(self, target: Target, run: int) -> None:
        """Parallel streams, small files and logins."""
        args, client = self.args, self.client
        per_stream = args.size // args.streams

        def stream(i: int) -> None:
            name = f"{target.remote}par{run}-{i}"
            client.run(target, f"put part{i} {name}", f"get {name} back{i}", f"rm {name}")

        with ThreadPoolExecutor(args.streams) as pool, RssSampler(target.proc.pid) as rss:
            seconds = timed(lambda: list(pool.map(stream, range(args.streams))))
        self.add(target, f"{args.streams} streams up+down MB/s", 2 * per_stream * args.streams / MB / seconds)
        self.add(target, f"peak RSS per process, {args.streams} streams, MiB", rss.peak / 2**20)

        tree = f"{target.remote}small{run}"
        for way, command in (("upload", f"put -r small {tree}"), ("download", f"get -r {tree} smallback")):
            cpu = server_cpu_seconds(target.proc.pid)
            self.add(target, f"small files {way} files/s", args.small / timed(lambda c=command: client.run(target, c)))
            cpu = server_cpu_seconds(target.proc.pid) - cpu
            self.add(target, f"server CPU per small file {way}, us", cpu / args.small * 1e6)
        shutil.rmtree(self.local / "smallback", ignore_errors=True)

        seconds = timed(lambda: [client.run(target, "bye") for _ in range(args.logins)])
        self.add(target, "logins/s sequential", args.logins / seconds)
        with ThreadPoolExecutor(8) as pool:
            seconds = timed(lambda: list(pool.map(lambda _: client.run(target, "bye"), range(args.logins))))
        self.add(target, "logins/s 8 parallel", args.logins / seconds)


def interleaved(targets: list[Target], runs: int) -> Iterator[tuple[Target, int]]:
    """Each run visits every target, starting one further along each time: the machine's drift
    (writeback, the disk's reuse of freed inodes) falls on all of them alike."""
    for run in range(runs):
        shift = run % len(targets)
        for target in targets[shift:] + targets[:shift]:
            yield target, run


def key_benchmarks(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """kek rotate over many records, dek rotate over many headers, and unwrap latency, on a local OpenBao."""
    from sftpvault import format as fmt
    from sftpvault import lifecycle
    from sftpvault.app import build
    from sftpvault.config import load
    from tests.openbao import start_openbao

    bao = start_openbao(work / "bao")
    try:
        bao.enable_transit("transit")
        home = work / "keys-home"
        home.mkdir()
        (home / "token").write_text(bao.token)
        (home / "sftpvault.toml").write_text(
            f'[keys]\nservice = "transit"\n[transit]\naddress = "{bao.address}"\ntoken_file = "{home / "token"}"\n'
        )
        app = build(load(home), actor="bench")
        app.key_service.startup()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: app.keyring.add_dek(f"u{i}"), range(args.key_records)))
        results = {f"kek rotate, {args.key_records} DEK records, s": timed(lambda: lifecycle.rotate_kek(app))}

        unwraps = []
        for _ in range(200):
            start = time.perf_counter()
            app.keyring.acquire("u1")
            unwraps.append(time.perf_counter() - start)
            app.keyring.release("u1")
        results["login DEK unwrap via OpenBao, median ms"] = statistics.median(unwraps) * 1000

        keys = app.keyring.acquire("u2")
        root = app.user_home("u2")
        for d in range(args.key_headers // 1000 + 1):
            (root / f"d{d}").mkdir()
        header, file_key = fmt.new_header(keys.current, keys.current_id)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = fmt.seal_chunk(AESGCM(file_key), header.file_id, 0, True, b"", os.urandom(12))
        for i in range(args.key_headers):
            (root / f"d{i // 1000}" / f"f{i}").write_bytes(header.to_bytes() + body)
        app.keyring.release("u2")
        results[f"dek rotate, {args.key_headers} file headers, s"] = timed(lambda: lifecycle.rotate_dek(app, "u2"))
        return results
    finally:
        bao.stop()


def table(results: dict[str, dict[str, float]], names: list[str]) -> str:
    rows = list(next(iter(results.values())).keys())
    ratio_to = [n for n in ("openssh", "rclone-crypt") if n in results and "sftpvault" in results]
    header = ["measurement", *names, *[f"sftpvault/{n}" for n in ratio_to]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row] + [f"{results[n][row]:.1f}" for n in names]
        for other in ratio_to:
            mine, theirs = results["sftpvault"][row], results[other][row]
            cells.append(f"{mine / theirs:.2f}x" if theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def client_dir(args: argparse.Namespace) -> str | None:
    """Where the client keeps its local files: RAM (tmpfs) when it has room, else the default temp dir.

    The servers' data stays on disk. The client's side is kept off it because
    writeback of gigabytes of downloads and the creation of thousands of small
    files on this disk vary from run to run by more than the servers differ.
    """
    shm = Path("/dev/shm")
    need = 3 * max(args.size, args.large_size) + args.small * 8192 + 2**30
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
        return str(shm)
    return None


def mib(size: int) -> str:
    return f"{size / 2**20:.0f}"


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="single-stream file size (1G)")
    parser.add_argument(
        "--large-size", type=parse_size, default=parse_size("4G"), help="file for the memory-growth row (4G; 0: skip)"
    )
    parser.add_argument("--streams", type=int, default=8, help="parallel sessions (8)")
    parser.add_argument("--small", type=int, default=2000, help="number of 4 KiB files (2000)")
    parser.add_argument("--logins", type=int, default=100, help="logins per login measurement (100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported (3)")
    parser.add_argument("--workers", type=int, default=0, help="sftpvault serve --workers (default: its own)")
    parser.add_argument("--targets", default="sftpvault,openssh,rclone-crypt", help="comma-separated")
    parser.add_argument("--key-records", type=int, default=10_000, help="DEK records for kek rotate (10000)")
    parser.add_argument("--key-headers", type=int, default=100_000, help="file headers for dek rotate (100000)")
    parser.add_argument("--skip-keys", action="store_true", help="skip the key-lifecycle figures")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="sftpvault-bench-", dir=os.environ.get("BENCH_TMP")) as tmp,
        tempfile.TemporaryDirectory(prefix="sftpvault-bench-client-", dir=client_dir(args)) as client_tmp,
    ):
        work = Path(tmp)
        local = Path(client_tmp)
        key = work / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        make_random_file(local / "big", args.size)
        for i in range(args.streams):
            make_random_file(local / f"part{i}", args.size // args.streams)
        (local / "small").mkdir()
        for i in range(args.small):
            (local / "small" / f"s{i:05d}").write_bytes(os.urandom(4096))
        big_hash = sha256(local / "big")
        client = Client(key, local)

        kinds = {
            "sftpvault": lambda: Sftpvault(work, key.with_suffix(".pub"), args.workers),
            "openssh": lambda: OpenSSH(work, key.with_suffix(".pub")),
            "rclone-crypt": lambda: RcloneCrypt(work, key.with_suffix(".pub")),
        }
        names = [n for n in args.targets.split(",") if n in kinds]
        if "rclone-crypt" in names and not shutil.which("rclone"):
            names.remove("rclone-crypt")
        targets = [kinds[name]() for name in names]
        measurements = Measurements(client, args, local, big_hash)
        try:
            for target in targets:
                target.start()
            # every single-stream run first: a worker keeps memory from parallel stages, which would
            # otherwise show in the single-stream peak (the parallel peak has a row of its own)
            for target, run in interleaved(targets, args.repeat):
                print(f"{target.name}: single stream, run {run + 1}", file=sys.stderr, flush=True)
                measurements.single_stream(target, run)
            if args.large_size:
                # made for this stage only: with 4 GiB more in tmpfs, every server's single-stream
                # download measured at half speed here (the client writes its copy to tmpfs too)
                make_random_file(local / "large", args.large_size)
                for target in targets:
                    print(f"{target.name}: large file", file=sys.stderr, flush=True)
                    measurements.large_file(target)
                (local / "large").unlink()
            for target, run in interleaved(targets, args.repeat):
                print(f"{target.name}: parallel, small files, logins, run {run + 1}", file=sys.stderr, flush=True)
                measurements.parallel(target, run)
        finally:
            for target in targets:
                target.stop()
        results = measurements.medians()
        keys = {} if args.skip_keys else key_benchmarks(args, work)

    cores = os.cpu_count()
    print(
        f"\nsftpvault benchmark, {time.strftime('%Y-%m-%d')}, {cores} cores, file {args.size / 2**20:.0f} MiB, "
        f"{args.streams} streams, {args.small} small files, median of {args.repeat}\n"
    )
    print(table(results, names))
    if keys:
        print("\n| key operation | value |\n|---|---|")
        for row, value in keys.items():
            print(f"| {row} | {value:.1f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "cores": cores,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                    "keys": keys,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
