"""The paramiko workarounds in sftpvault/ssh/paramiko_compat.py, against real paramiko transports.

They reach into paramiko internals, so the first test pins what they rely on:
a paramiko release that renames any of it fails here, not in production.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paramiko
import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.packet import Packetizer

from sftpvault.ssh import paramiko_compat
from sftpvault.ssh.paramiko_compat import BatchingPacketizer, ChunkPipe, channel_sendall
from sftpvault.ssh.server import QuickAckSocket

PACKETIZER_INTERNALS = [
    "_Packetizer__socket",
    "_Packetizer__remainder",
    "_Packetizer__closed",
    "_Packetizer__need_rekey",
    "_Packetizer__write_lock",
    "_Packetizer__block_engine_out",
    "_Packetizer__block_size_out",
    "_Packetizer__aead_out",
    "_Packetizer__compress_engine_out",
    "_Packetizer__iv_out",
    "_Packetizer__sequence_number_out",
    "_Packetizer__sent_bytes",
    "_Packetizer__sent_packets",
    "_Packetizer__received_bytes_overflow",
    "_Packetizer__received_packets_overflow",
    "_initial_kex_done",
]


def test_paramiko_is_the_pinned_release_with_the_internals_we_use() -> None:
    major, minor = (int(x) for x in paramiko.__version__.split(".")[:2])
    assert (5, 1) <= (major, minor) < (6, 0), "paramiko_compat is written against paramiko >=5.1,<6"
    a, b = socket.socketpair()
    with a, b:
        missing = [name for name in PACKETIZER_INTERNALS if not hasattr(Packetizer(a), name)]
    assert not missing
    for owner, name in [
        (Packetizer, "_inc_iv_counter"),
        (Packetizer, "_trigger_rekey"),
        (Packetizer, "_check_keepalive"),
        (Packetizer, "handshake_timed_out"),
        (paramiko.Channel, "_wait_for_send_window"),
        (paramiko.Channel, "_check_add_window"),
        (paramiko.Transport, "_send_user_message"),
        (paramiko.auth_handler.AuthHandler, "_send_auth_result"),
        (BufferedPipe, "_buffer_frombytes"),
        (BufferedPipe, "_buffer_tobytes"),
    ]:
        assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name}"
    pipe = BufferedPipe()
    assert all(hasattr(pipe, name) for name in ("_lock", "_cv", "_closed", "_buffer"))
    with socket.socket() as sock:
        transport = paramiko.Transport(sock)
        assert all(hasattr(transport, name) for name in ("active", "clear_to_send", "clear_to_send_lock"))


class _Open(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED


@contextmanager
def _connected(
    cipher: str, client_window: int = 2**21, wrap: Callable[[socket.socket], Any] = lambda sock: sock
) -> Iterator[tuple[paramiko.Channel, paramiko.Channel]]:
    """A (server, client) channel pair over loopback: our packetizer serves, stock paramiko is the client."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname())
        server_sock, _ = listener.accept()
    server = paramiko.Transport(wrap(server_sock), packetizer_class=BatchingPacketizer)
    server.add_server_key(paramiko.ECDSAKey.generate())
    server.start_server(event=threading.Event(), server=_Open())  # returns at once: the client runs next
    client = paramiko.Transport(client_sock, default_window_size=client_window)
    client.get_security_options().ciphers = (cipher,)
    try:
        client.connect()
        client.auth_none("tester")
        client_channel = client.open_session()
        server_channel = server.accept(10)
        assert server_channel is not None
        paramiko_compat.use_chunk_pipe(server_channel)  # before any data: as the subsystem handler does
        yield server_channel, client_channel
    finally:
        client.close()
        server.close()


def _receive(channel: paramiko.Channel, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = channel.recv(size - len(out))
        assert chunk, "channel closed early"
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr"])
def test_batched_channel_data_reaches_a_stock_paramiko_client_intact(cipher: str) -> None:
    # aes128-ctr has no AEAD: the batch falls back to paramiko's own packets
    data = os.urandom(3 * 2**20 + 12345)
    with _connected(cipher) as (server_channel, client_channel):
        assert isinstance(server_channel.transport.packetizer, BatchingPacketizer)
        sender = threading.Thread(target=channel_sendall, args=(server_channel, data))
        sender.start()
        assert _receive(client_channel, len(data)) == data
        sender.join(10)


def test_batches_wait_for_the_window_and_survive_key_reexchange() -> None:
    # a 64 KiB client window forces the sender to block for WINDOW_ADJUST again and again;
    # a tiny rekey limit makes our side re-key many times in the middle of batches
    data = os.urandom(2**21)
    with _connected("aes128-gcm@openssh.com", client_window=2**16) as (server_channel, client_channel):
        server_channel.transport.packetizer.REKEY_BYTES = 2**18
        sender = threading.Thread(target=channel_sendall, args=(server_channel, data))
        sender.start()
        assert _receive(client_channel, len(data)) == data
        sender.join(10)
        assert server_channel.transport.packetizer._Packetizer__sent_bytes < 2**19  # counters reset: it re-keyed


def test_buffered_reads_deliver_client_data_in_order() -> None:
    # many writes of odd sizes: packets straddle our recv boundaries
    pieces = [os.urandom(random.randrange(1, 70000)) for _ in range(200)]
    with _connected("aes128-gcm@openssh.com") as (server_channel, client_channel):
        writer = threading.Thread(target=lambda: [client_channel.sendall(p) for p in pieces])
        writer.start()
        assert _receive(server_channel, sum(map(len, pieces))) == b"".join(pieces)
        writer.join(10)


def test_channel_sendall_on_a_closed_channel_is_an_os_error() -> None:
    with _connected("aes128-gcm@openssh.com") as (server_channel, client_channel):
        client_channel.close()
        server_channel.close()
        with pytest.raises(OSError):
            channel_sendall(server_channel, b"late")


def test_chunk_pipe_reads_exactly_as_paramikos_buffered_pipe() -> None:
    rng = random.Random(7)
    ours, theirs = ChunkPipe(), BufferedPipe()
    for _ in range(2000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randrange(0, 300))
            ours.feed(data)
            theirs.feed(data)
        elif len(theirs):
            size = rng.randrange(1, 700)
            assert ours.read(size) == theirs.read(size)
        assert len(ours) == len(theirs)
        assert ours.read_ready() == theirs.read_ready()
    assert ours.empty() == theirs.empty()


def test_chunk_pipe_times_out_when_empty_and_ends_when_closed() -> None:
    pipe = ChunkPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.05)
    pipe.feed(b"last")
    pipe.close()
    assert pipe.read(10) == b"last"
    assert pipe.read(10) == b""


def test_chunk_pipe_offers_each_piece_to_its_consumer_first() -> None:
    pipe, taken = ChunkPipe(), []

    def consumer(data: bytes) -> bool:
        if data.startswith(b"take"):
            taken.append(data)
            return True
        return False

    pipe.consumer = consumer
    for piece in (b"take-1", b"keep-1", b"take-2", b"keep-2"):
        pipe.feed(piece)
    assert taken == [b"take-1", b"take-2"]
    assert pipe.read(100) == b"keep-1keep-2"


def test_chunk_pipe_wait_returns_on_input_on_close_and_on_wake() -> None:
    pipe, flag = ChunkPipe(), threading.Event()
    threading.Timer(0.05, pipe.feed, args=(b"x",)).start()
    assert pipe.wait(flag.is_set) is True  # input
    pipe.read(1)
    threading.Timer(0.05, lambda: (flag.set(), pipe.wake())).start()
    assert pipe.wait(flag.is_set) is False  # only woken: nothing to read
    flag.clear()
    threading.Timer(0.05, pipe.close).start()
    assert pipe.wait(flag.is_set) is True  # closed: a read returns b""


def test_input_taken_by_a_consumer_still_opens_the_window() -> None:
    # The server window is 64 KiB: the client can send 1 MiB only if every byte the
    # consumer takes (instead of Channel.recv) is granted back with WINDOW_ADJUST.
    received = bytearray()

    def take(data: bytes) -> bool:
        received.extend(data)
        paramiko_compat.grant_window(server_channel, len(data))
        return True

    data = os.urandom(2**20)
    with _connected("aes128-gcm@openssh.com") as (server_channel, client_channel):
        server_channel.in_window_size = 2**16  # as negotiated by a server with a 64 KiB window
        server_channel.in_window_threshold = 2**14
        client_channel.out_window_size = 2**16
        server_channel.in_buffer.consumer = take
        client_channel.settimeout(10)
        client_channel.sendall(data)  # times out if the window stays shut
        deadline = time.monotonic() + 10
        while len(received) < len(data) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bytes(received) == data


def test_can_send_now_only_within_the_window_and_outside_key_exchange() -> None:
    with _connected("aes128-gcm@openssh.com", client_window=2**16) as (server_channel, _):
        transport = server_channel.transport
        assert paramiko_compat.can_send_now(server_channel, 2**16)
        assert not paramiko_compat.can_send_now(server_channel, 2**16 + 1)
        with transport.clear_to_send_lock:  # what paramiko does when a key re-exchange starts
            transport.clear_to_send.clear()
        assert not paramiko_compat.can_send_now(server_channel, 1)
        transport.clear_to_send.set()
        server_channel.close()
        assert not paramiko_compat.can_send_now(server_channel, 1)


def test_send_now_splits_by_the_peer_packet_size_and_takes_the_window() -> None:
    data = os.urandom(100_000)  # the stock client takes packets of at most 32 KiB
    with _connected("aes128-gcm@openssh.com") as (server_channel, client_channel):
        window = server_channel.out_window_size
        assert paramiko_compat.can_send_now(server_channel, len(data))
        paramiko_compat.send_now(server_channel, data)
        assert server_channel.out_window_size == window - len(data)
        assert _receive(client_channel, len(data)) == data


def test_thousands_of_small_replies_arrive_intact() -> None:
    # each packet's random padding comes from a pool: these cross many refills
    replies = [os.urandom(random.randrange(1, 200)) for _ in range(3000)]
    with _connected("aes128-gcm@openssh.com") as (server_channel, client_channel):
        sender = threading.Thread(target=lambda: [channel_sendall(server_channel, r) for r in replies])
        sender.start()
        assert _receive(client_channel, sum(map(len, replies))) == b"".join(replies)
        sender.join(10)


class _FlagRecorder(QuickAckSocket):
    """The server's socket, noting the flags of every read."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.read_flags: list[int] = []

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        self.read_flags.append(flags)
        return super().recv_into(buffer, nbytes, flags)


@contextmanager
def _polling_reader(busy_poll: float) -> Iterator[tuple[BatchingPacketizer, _FlagRecorder, socket.socket]]:
    """A packetizer reading a loopback connection as the server's does; the client's end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    with ours, peer:
        sock = _FlagRecorder(ours)
        sock.settimeout(0.1)  # paramiko's tick
        packetizer = BatchingPacketizer(sock)
        packetizer.busy_poll = busy_poll
        yield packetizer, sock, peer


def _send_once(peer: socket.socket, data: bytes, reads: list[int], when: Callable[[list[int]], bool]) -> None:
    """Send `data` from another thread once the reads seen so far satisfy `when` (no guessing at timings)."""

    def send() -> None:
        deadline = time.monotonic() + 10
        while not when(reads) and time.monotonic() < deadline:
            time.sleep(0.001)
        peer.sendall(data)

    threading.Thread(target=send, daemon=True).start()


def test_the_read_after_poll_next_polls_instead_of_sleeping() -> None:
    with _polling_reader(busy_poll=60.0) as (packetizer, sock, peer):
        packetizer.poll_next()
        _send_once(peer, b"request", sock.read_flags, lambda reads: len(reads) >= 3)
        assert packetizer.read_all(7) == b"request"
        assert set(sock.read_flags) == {socket.MSG_DONTWAIT}  # it polled until the request came
        sock.read_flags.clear()
        _send_once(peer, b"next", sock.read_flags, lambda reads: len(reads) >= 1)
        assert packetizer.read_all(4) == b"next"
        assert set(sock.read_flags) == {0}  # only the read right after poll_next polls


def test_polling_gives_up_after_busy_poll_and_sleeps() -> None:
    with _polling_reader(busy_poll=0.01) as (packetizer, sock, peer):
        packetizer.poll_next()
        _send_once(peer, b"late", sock.read_flags, lambda reads: 0 in reads)  # once a read sleeps
        assert packetizer.read_all(4) == b"late"
        polls = sock.read_flags.count(socket.MSG_DONTWAIT)
        assert polls >= 1 and sock.read_flags[:polls] == [socket.MSG_DONTWAIT] * polls
        assert sock.read_flags[polls:] and set(sock.read_flags[polls:]) == {0}  # then blocking reads


def test_poll_next_does_nothing_when_busy_poll_is_off() -> None:
    with _polling_reader(busy_poll=0.0) as (packetizer, sock, peer):
        packetizer.poll_next()
        peer.sendall(b"x")
        assert packetizer.read_all(1) == b"x"
        assert sock.read_flags == [0]


def test_polling_sees_the_peer_go_away() -> None:
    with _polling_reader(busy_poll=60.0) as (packetizer, sock, peer):
        packetizer.poll_next()
        threading.Timer(0.05, peer.shutdown, args=(socket.SHUT_WR,)).start()
        with pytest.raises(EOFError):
            packetizer.read_all(1)
        assert set(sock.read_flags) == {socket.MSG_DONTWAIT}


def test_poll_for_next_packet_makes_the_servers_next_read_poll() -> None:
    with _connected("aes128-gcm@openssh.com", wrap=_FlagRecorder) as (server_channel, client_channel):
        server_channel.transport.packetizer.busy_poll = 1.0
        sock = server_channel.transport.sock

        def answer(data: bytes) -> bool:  # as the SFTP session answers in the transport thread
            paramiko_compat.send_now(server_channel, data.upper())
            paramiko_compat.poll_for_next_packet(server_channel)
            return True

        server_channel.in_buffer.consumer = answer
        assert socket.MSG_DONTWAIT not in sock.read_flags  # the login's reads all slept
        client_channel.sendall(b"ping")
        assert _receive(client_channel, 4) == b"PING"
        time.sleep(0.05)
        client_channel.sendall(b"pong")
        assert _receive(client_channel, 4) == b"PONG"
        assert socket.MSG_DONTWAIT in sock.read_flags
