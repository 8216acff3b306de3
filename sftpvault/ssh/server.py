"""The SSH listener: accepts TCP connections and runs one paramiko Transport each.

Transport setup lives here: the algorithm allowlist (no CBC, 3DES, SHA-1 or
MD5; strict KEX stays on), the large window and packet size that keep uploads
fast, the login grace timer and the connection cap. SIGTERM/SIGINT stop the
listener and commit every open upload before the process exits.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

import paramiko

from sftpvault import __version__
from sftpvault.app import App
from sftpvault.auth.defender import Defender
from sftpvault.sftp.session import SFTPSession
from sftpvault.ssh import paramiko_compat
from sftpvault.ssh.connection import Connection
from sftpvault.ssh.hostkeys import load_host_keys

log = logging.getLogger("sftpvault.ssh")

KEX = (
    "mlkem768x25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group14-sha256",
)
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512")
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256")
VERSION_STRING = f"SSH-2.0-sftpvault_{__version__}"


def configure_transport(transport: paramiko.Transport, ciphers: list[str]) -> None:
    """Offer only strong algorithms (an allowlist, so new weak ones never slip in)."""
    transport.local_version = VERSION_STRING
    options = transport.get_security_options()
    options.ciphers = tuple(ciphers)
    options.digests = MACS
    options.kex = tuple(k for k in KEX if k in transport._kex_info)  # ML-KEM needs a recent cryptography
    options.key_types = HOST_KEY_TYPES


def tcp_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class QuickAckSocket:
    """A connected socket with Nagle off that acknowledges at once while the client logs in.

    OpenSSH clients leave Nagle's algorithm on outside interactive sessions, so
    a message sent right after one the server does not answer (ECDH_INIT after
    KEXINIT, SERVICE_REQUEST after NEWKEYS) waits for the server's ACK, which
    Linux delays by 40 ms. Linux drops TCP_QUICKACK after a while, so it is set
    again before every read until the login is over; from then on SFTP replies
    carry the ACKs, and the extra system call (which runs the loopback peer's
    receive path while holding the GIL) would only cost time.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()
        self.logging_in = True
        # paramiko writes each SSH packet on its own: with Nagle's algorithm a reply
        # following another small packet would wait for the client's delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def settimeout(self, timeout: float | None) -> None:
        """paramiko's timeout (a 0.1 s tick), kept by the kernel: SO_RCVTIMEO and SO_SNDTIMEO.

        With Python's own timeouts every read and write first waits in poll(),
        a second system call per SSH packet; a blocking socket with kernel
        timeouts makes one. A read or write that times out raises TimeoutError,
        as with Python's timeouts.
        """
        self._timeout = timeout
        kernel_timeout = timeout or 0.0  # 0.0 turns the kernel's timeouts off
        self._sock.settimeout(None if kernel_timeout else timeout)  # blocking, unless 0.0 asked for non-blocking
        seconds = int(kernel_timeout)
        timeval = struct.pack("ll", seconds, int((kernel_timeout - seconds) * 1e6))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def gettimeout(self) -> float | None:
        return self._timeout

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)  # paramiko reads only the version banner with recv
        return bytes(buffer[: self.recv_into(memoryview(buffer))])

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        self._ack_quickly()
        try:
            return self._sock.recv_into(buffer, nbytes, flags)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def send(self, data: bytes | memoryview) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            raise TimeoutError("timed out") from None

    def _ack_quickly(self) -> None:
        if self.logging_in:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SSHServer:
    """Listens on one address and serves SFTP until stop() is called."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.settings.server
        self.host_keys = load_host_keys(app.settings.keys_dir)
        paramiko_compat.install()
        self.defender = Defender(app.settings.defender)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._sock: socket.socket | None = None

    def bind(self, reuse_port: bool = False) -> tuple[str, int]:
        """Listen on the configured address; with reuse_port, beside other workers on the same port."""
        sock = tcp_socket(self.settings.host, self.settings.port, reuse_port)
        sock.listen(128)
        sock.settimeout(0.5)
        self._sock = sock
        return sock.getsockname()[:2]

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        while not self._stop.is_set():
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            threading.Thread(
                target=self._serve_connection,
                args=(client, f"{addr[0]}:{addr[1]}"),
                name=f"conn-{addr[0]}:{addr[1]}",
                daemon=True,
            ).start()
        self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
            conn.transport.close()
        log.info("stopped: %d connection(s) closed, uploads committed", len(connections))

    def _await_login(self, conn: Connection) -> bool:
        """Wait up to the grace time for a login; False early if the client hung up."""
        deadline = time.monotonic() + self.settings.login_grace_time
        while conn.transport.is_active() and time.monotonic() < deadline:
            if conn.settled.wait(0.25):
                return True
        return False

    def _serve_connection(self, client: socket.socket, peer: str) -> None:
        client.settimeout(None)
        ip = peer.rsplit(":", 1)[0]
        with self._lock:
            full = len(self._connections) >= self.settings.max_connections
        refused = f"{self.settings.max_connections} connections already" if full else self.defender.admit(ip)
        if refused:
            log.warning("refused %s: %s", peer, refused)
            client.close()
            return
        outcome = "noauth"
        try:
            outcome = self._serve_admitted(client, peer)
        finally:
            if outcome != "login":  # as OpenSSH's PerSourcePenalties: one penalty per failed connection
                self.defender.closed_unauthenticated(ip, outcome)

    def _serve_admitted(self, client: socket.socket, peer: str) -> str:
        """Run one connection to its end: "login", "authfail" (refused attempts) or "noauth"."""
        sock = QuickAckSocket(client)
        transport = paramiko.Transport(
            sock,
            default_window_size=self.settings.window_size,
            default_max_packet_size=self.settings.max_packet_size,
            packetizer_class=paramiko_compat.BatchingPacketizer,
        )
        configure_transport(transport, self.settings.ciphers)
        transport.packetizer.busy_poll = self.settings.busy_poll_us / 1e6
        for key in self.host_keys:
            transport.add_server_key(key)
        transport.set_subsystem_handler("sftp", SFTPSession)
        conn = Connection(self.app, transport, peer, self.defender)
        with self._lock:
            self._connections.add(conn)
        try:
            transport.start_server(event=threading.Event(), server=conn)
            if not self._await_login(conn) or not conn.username:
                log.info("closing %s: not logged in", peer)
                transport.close()
            sock.logging_in = False
            transport.join()
        except Exception as exc:
            log.info("connection %s ended: %s", peer, exc)
            transport.close()
        finally:
            try:
                conn.close()
            finally:
                with self._lock:
                    self._connections.discard(conn)
        return "login" if conn.username else "authfail" if conn.failures else "noauth"
