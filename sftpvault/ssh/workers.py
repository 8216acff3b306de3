"""Several server processes on one port (`serve --workers N`).

One Python process does not scale across cores, so the master forks N
workers. Each listens on the same port with SO_REUSEPORT (the kernel spreads
connections over them) and has its own sessions and DEK cache; DEK records
stay consistent through the keyring's cross-process locks. The master does
the one-time startup work before forking, forwards SIGTERM/SIGINT, restarts a
worker that dies, and its workers get SIGTERM if the master itself dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable

from sftpvault.ssh.server import SSHServer, tcp_socket

log = logging.getLogger("sftpvault.ssh")
_PR_SET_PDEATHSIG = 1
_M_ARENA_MAX = -8
MALLOC_ARENAS = 1
RESTART_DELAY = 1.0


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas for this process (unless MALLOC_ARENA_MAX already does).

    glibc gives threads up to 8 arenas per core and keeps freed memory in each.
    Every connection runs in new threads, so a worker's resident memory crept
    up with the transfers it had served, one arena's worth at a time (81 to
    110 MiB over eight 1 GiB transfers; a 4 GiB transfer peaked a third above
    a 1 GiB one). With one arena it stays at the first transfer's level. The
    GIL already serialises our threads, so they gain nothing from more arenas
    (the benchmark shows no change in speed).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:  # glibc; other C libraries have no arenas to cap
        mallopt(_M_ARENA_MAX, count)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _worker(make_server: Callable[[], SSHServer], ready_fd: int, cpu: int | None) -> int:
    _die_with_parent()
    if cpu is not None:
        # a worker's threads take turns on the GIL anyway; on one CPU, handing a request
        # from the transport thread to the session thread takes ~15 us instead of ~45 us
        # (a wakeup on another CPU costs an inter-processor interrupt, dear under a hypervisor)
        os.sched_setaffinity(0, {cpu})
    server = make_server()
    server.bind(reuse_port=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    os.write(ready_fd, b"+")
    os.close(ready_fd)
    server.serve_forever()
    return 0


def _spawn(make_server: Callable[[], SSHServer], ready_fd: int, cpu: int | None) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            code = _worker(make_server, ready_fd, cpu)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            os._exit(code)
    return pid


def serve_workers(make_server: Callable[[], SSHServer], host: str, port: int, count: int, pin: bool = False) -> None:
    """Start `count` workers on host:port and supervise them until SIGTERM/SIGINT.

    The port is reserved first (port 0 picks a free one for all workers). With
    `pin`, worker n (and its replacement) runs only on the n-th CPU we may use.
    """
    reserved = tcp_socket(host, port, reuse_port=True)
    address = reserved.getsockname()[:2]
    make = _with_port(make_server, address[1])
    read_fd, write_fd = os.pipe()
    cpus = sorted(os.sched_getaffinity(0))

    def start(n: int) -> int:
        return _spawn(make, write_fd, cpus[n % len(cpus)] if pin else None)

    workers = {start(n): n for n in range(count)}
    for _ in range(count):  # every worker is listening before we say so
        if not os.read(read_fd, 1):
            break
    reserved.close()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    log.info("sftpvault listening on %s:%d with %d workers", address[0], address[1], count)
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        n = workers.pop(pid, None)
        if not stopping and n is not None:
            log.error("worker %d exited (%s); starting another", pid, os.waitstatus_to_exitcode(status))
            time.sleep(RESTART_DELAY)
            workers[start(n)] = n
    os.close(read_fd)
    os.close(write_fd)
    log.info("stopped: all workers finished")


def _with_port(make_server: Callable[[], SSHServer], port: int) -> Callable[[], SSHServer]:
    def make() -> SSHServer:
        server = make_server()
        server.settings.port = port
        return server

    return make
