"""The one place we reach into paramiko internals (pinned: paramiko >=5.1,<6).

The workarounds that live here, each checked by tests/test_paramiko_compat.py:

1. Verified public-key results. paramiko asks `check_auth_publickey` both for
   unsigned probes and for signed requests, and verifies the signature itself
   afterwards, without telling the ServerInterface which happened. Multi-factor
   rules must count a public key only once its signature verified. paramiko
   calls `AuthHandler._send_auth_result` exactly then (a probe returns early
   with PK_OK), so the hook passes that verified outcome to
   `server_object.auth_result()`, which may turn it into a partial success or
   a failure.

2. Batched channel data. OpenSSH clients accept at most 32 KiB per channel
   packet, so one 255 KiB SFTP read reply is 8 SSH packets. paramiko builds
   each through a Message, copies the payload about seven times and makes
   two system calls per packet, which was most of a download's CPU time. The
   random padding comes from a pool refilled from os.urandom, not one
   getrandom() per reply. `channel_sendall` takes as much of the channel
   window as is open and hands the pieces to `BatchingPacketizer`, which
   seals them with the negotiated AEAD cipher (the only kind we offer
   besides CTR+EtM, which falls back to paramiko's own path) and writes them
   with one system call. It goes through `Transport._send_user_message`, so
   it waits during key re-exchange exactly as paramiko's own channel writes
   do. Reads are buffered too: one recv brings in many packets instead of
   two system calls per packet, and a packet longer than MAX_PACKET_LENGTH
   ends the connection. paramiko itself has no limit: a client could
   announce a 4 GiB packet before logging in and make us buffer whatever it
   sends (OpenSSH stops at 256 KiB).

3. Channel input without copies. paramiko's BufferedPipe keeps a channel's
   input in an array, copying every packet in and again out. `ChunkPipe`
   keeps the byte strings as they arrive (its hooks `_buffer_frombytes` and
   `_buffer_tobytes` exist for this); paramiko's own locking and waiting are
   unchanged. `use_chunk_pipe` swaps it in from the transport thread, the only
   thread that feeds a channel, so nothing already fed is lost.

4. Answering in the transport thread. Passing each request from paramiko's
   transport thread to the session thread and waking it cost more than
   answering a small request. A ChunkPipe may have a `consumer`: the
   transport thread offers it each piece of input first, and the consumer
   either takes it (answering what it can at once) or declines, and the piece
   is queued for the session thread as before. The transport thread must never
   wait for anything only it can bring (a window adjust, the end of a key
   re-exchange), so `can_send_now` says when a reply of a given size goes out
   without waiting, `send_now` then sends it without the waits, and
   `grant_window` does Channel.recv's window accounting for input the
   consumer took.

5. Polling for the next request. After answering a request the transport
   thread would go back to sleep in recv, and the client's next request
   would have to wake it, which costs tens of microseconds when the CPU went
   idle (on a VM the hypervisor has to wake it). `poll_for_next_packet`
   makes the next read poll the socket, without sleeping, for up to
   `BatchingPacketizer.busy_poll` seconds first, as Linux's busy_read does
   for NIC queues (which loopback lacks). It needs a blocking socket with
   kernel timeouts (QuickAckSocket): with Python's own timeout every try
   would first wait in poll().
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paramiko.transport
from paramiko.auth_handler import AuthHandler
from paramiko.buffered_pipe import BufferedPipe
from paramiko.channel import Channel
from paramiko.common import MSG_CHANNEL_DATA, cMSG_CHANNEL_DATA, cMSG_CHANNEL_WINDOW_ADJUST, xffffffff
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer
from paramiko.ssh_exception import SSHException

READ_SIZE = 256 * 1024  # one recv: up to several full channel packets
PADDING_POOL = 16 * 1024  # random padding for a few hundred packets
MAX_PACKET_LENGTH = 1024 * 1024  # server.max_packet_size is at most 512 KiB, plus SSH framing
_DATA_HEADER = struct.Struct(">IBBII")  # packet length, padding length, CHANNEL_DATA, channel, data length


class VerifiedResultAuthHandler(AuthHandler):
    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        hook = getattr(self.transport.server_object, "auth_result", None)
        if hook is not None:
            result = hook(username, method, result)
        super()._send_auth_result(username, method, result)


def install() -> None:
    """Make new transports use the hooked handler (idempotent)."""
    transport_module: Any = paramiko.transport
    transport_module.AuthHandler = VerifiedResultAuthHandler


class ChannelData:
    """Pieces of one channel's data stream, each within the peer's packet size, sent as one batch."""

    def __init__(self, remote_chanid: int, pieces: list[memoryview]) -> None:
        self.remote_chanid = remote_chanid
        self.pieces = pieces

    def messages(self) -> list[Message]:
        """paramiko's own form, for the non-AEAD path."""
        out = []
        for piece in self.pieces:
            m = Message()
            m.add_byte(cMSG_CHANNEL_DATA)
            m.add_int(self.remote_chanid)
            m.add_string(bytes(piece))
            out.append(m)
        return out


class BatchingPacketizer(Packetizer):
    """paramiko's Packetizer with buffered reads and batched AEAD channel data."""

    def __init__(self, socket: Any) -> None:
        super().__init__(socket)
        self._inbuf = bytearray()
        self._inpos = 0
        self._chunk = memoryview(bytearray(READ_SIZE))  # made once: read_all runs twice per packet
        self._padding_pool = memoryview(b"")
        self._padding_pos = 0
        self.busy_poll = 0.0  # seconds a read after poll_for_next_packet polls before it sleeps
        self._poll_next = False

    # -- reading -----------------------------------------------------------------

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        """As Packetizer.read_all (same timeout, rekey and keepalive handling), one recv for many packets."""
        if n > MAX_PACKET_LENGTH:
            raise SSHException(f"packet of {n} bytes refused")
        if self._Packetizer__remainder:  # bytes read past the version banner
            self._inbuf += self._Packetizer__remainder
            self._Packetizer__remainder = b""
        while len(self._inbuf) - self._inpos < n:
            if self.handshake_timed_out():
                raise EOFError()
            try:
                got = self._recv()
                if got == 0:
                    raise EOFError()
                if self._inpos:
                    del self._inbuf[: self._inpos]
                    self._inpos = 0
                self._inbuf += self._chunk[:got]
                continue
            except TimeoutError:
                pass
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    if self._Packetizer__closed:
                        raise EOFError() from exc
                    raise
            if self._Packetizer__closed:
                raise EOFError()
            if check_rekey and len(self._inbuf) == self._inpos and self._Packetizer__need_rekey:
                raise NeedRekeyException()
            self._check_keepalive()
        start = self._inpos
        self._inpos += n
        with memoryview(self._inbuf) as buffered:  # one copy (slicing the bytearray would make two)
            return bytes(buffered[start : self._inpos])

    def poll_next(self) -> None:
        """Have the next read that finds no input poll for busy_poll seconds before it sleeps."""
        self._poll_next = self.busy_poll > 0

    def _recv(self) -> int:
        sock = self._Packetizer__socket
        if self._poll_next:
            self._poll_next = False
            deadline = time.perf_counter() + self.busy_poll
            while True:
                try:
                    return sock.recv_into(self._chunk, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, TimeoutError):  # nothing yet (QuickAckSocket says TimeoutError)
                    if time.perf_counter() >= deadline:
                        break
        return sock.recv_into(self._chunk)

    # -- writing -----------------------------------------------------------------

    def send_message(self, data: Any) -> None:
        if not isinstance(data, ChannelData):
            super().send_message(data)
        elif not self._Packetizer__aead_out or self._Packetizer__compress_engine_out is not None:
            for message in data.messages():
                super().send_message(message)
        else:
            self._send_sealed(data)

    def _send_sealed(self, data: ChannelData) -> None:
        """CHANNEL_DATA packets as Packetizer._build_packet and send_message make them, in one write."""
        block = self._Packetizer__block_size_out
        paddings = [3 + block - ((len(piece) + 13) % block) for piece in data.pieces]  # 13: 9 payload + 4 length
        with self._Packetizer__write_lock:
            randomness = self._padding_bytes(sum(paddings))
            engine = self._Packetizer__block_engine_out
            out: list[bytes] = []
            used = 0
            for piece, padding in zip(data.pieces, paddings, strict=True):
                header = _DATA_HEADER.pack(
                    len(piece) + 10 + padding, padding, MSG_CHANNEL_DATA, data.remote_chanid, len(piece)
                )
                sealed = b"".join((header[4:], piece, randomness[used : used + padding]))
                used += padding
                out += (header[:4], engine.encrypt(self._Packetizer__iv_out, sealed, header[:4]))
                self._Packetizer__iv_out = self._inc_iv_counter(self._Packetizer__iv_out)
                self._advance_sequence()
            wire = b"".join(out)
            self.write_all(wire)
            self._count_sent(len(wire), len(data.pieces))

    def _padding_bytes(self, size: int) -> memoryview:
        """Random padding from a pool refilled from os.urandom: one getrandom() per many packets, not per reply."""
        if self._padding_pos + size > len(self._padding_pool):
            self._padding_pool = memoryview(os.urandom(max(PADDING_POOL, size)))
            self._padding_pos = 0
        start = self._padding_pos
        self._padding_pos += size
        return self._padding_pool[start : self._padding_pos]

    def _advance_sequence(self) -> None:
        next_seq = (self._Packetizer__sequence_number_out + 1) & xffffffff
        if next_seq == 0 and not self._initial_kex_done:
            raise SSHException("Sequence number rolled over during initial kex!")
        self._Packetizer__sequence_number_out = next_seq

    def _count_sent(self, size: int, packets: int) -> None:
        self._Packetizer__sent_bytes += size
        self._Packetizer__sent_packets += packets
        packets_done = self._Packetizer__sent_packets >= self.REKEY_PACKETS
        if (packets_done or self._Packetizer__sent_bytes >= self.REKEY_BYTES) and not self._Packetizer__need_rekey:
            self._Packetizer__received_bytes_overflow = 0
            self._Packetizer__received_packets_overflow = 0
            self._trigger_rekey()


def channel_sendall(channel: Channel, data: bytes) -> None:
    """Channel.sendall, with everything the window allows sent as one batch."""
    if not isinstance(channel.transport.packetizer, BatchingPacketizer):
        channel.sendall(data)
        return
    view = memoryview(data)
    while view:
        pieces = []
        with channel.lock:
            if channel.closed:
                raise OSError(errno.EPIPE, "channel is closed")
            while view and (not pieces or channel.out_window_size > 0):
                size = channel._wait_for_send_window(len(view))  # blocks only for the first piece
                if size == 0:
                    raise OSError(errno.EPIPE, "channel is closed")
                pieces.append(view[:size])
                view = view[size:]
        # outside the channel lock, as paramiko does: sending may wait for a key re-exchange
        channel.transport._send_user_message(ChannelData(channel.remote_chanid, pieces))


class _Chunks:
    """Byte strings in arrival order, with the few array operations BufferedPipe uses."""

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._size += len(data)

    def first(self, limit: int | None) -> bytes:
        """Up to `limit` bytes from the front, without removing them (no copy when one part is taken whole)."""
        limit = self._size if limit is None else min(limit, self._size)
        taken, size = [], 0
        for part in self._parts:
            if size + len(part) > limit:
                taken.append(part[: limit - size])
                break
            taken.append(part)
            size += len(part)
            if size == limit:
                break
        return taken[0] if len(taken) == 1 else b"".join(taken)

    def __delitem__(self, span: slice) -> None:
        """Only `del chunks[:n]` and `del chunks[:]`, as BufferedPipe uses them."""
        drop = self._size if span.stop is None else min(span.stop, self._size)
        self._size -= drop
        while drop:
            part = self._parts.popleft()
            if len(part) > drop:
                self._parts.appendleft(part[drop:])
                break
            drop -= len(part)


class ChunkPipe(BufferedPipe):
    """BufferedPipe without the array: what arrives is handed out as it came.

    `consumer`, when set, is offered every piece first, in the feeding
    (transport) thread; a piece it declines (returns False) is buffered.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _Chunks()
        self.consumer: Callable[[bytes], bool] | None = None

    def feed(self, data: bytes) -> None:
        consumer = self.consumer
        if consumer is None or not consumer(data):
            super().feed(data)

    def wait(self, woken: Callable[[], bool]) -> bool:
        """Block until input is buffered, the pipe is closed or `woken()` holds; True unless only woken."""
        with self._lock:
            while not len(self._buffer) and not self._closed and not woken():
                self._cv.wait()
            return bool(len(self._buffer)) or self._closed

    def wake(self) -> None:
        """Make `wait` check its condition again."""
        with self._lock:
            self._cv.notify_all()

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.append(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.first(limit)


def use_chunk_pipe(channel: Channel) -> None:
    """Give `channel` a ChunkPipe; call from the transport thread (e.g. a channel request handler)."""
    pipe = ChunkPipe()
    pipe.feed(channel.in_buffer.empty())
    channel.in_buffer = pipe


def can_send_now(channel: Channel, size: int) -> bool:
    """Whether `size` bytes can go out on `channel` from the transport thread without waiting."""
    transport = channel.transport
    return (
        transport.active
        and transport.clear_to_send.is_set()  # no key re-exchange under way
        and not channel.closed
        and channel.out_window_size >= size
    )


def send_now(channel: Channel, data: bytes) -> None:
    """Send `data` from the transport thread once `can_send_now(channel, len(data))` said so.

    What channel_sendall adds is for other threads: waiting for the window
    and for a key re-exchange to end, which the check has ruled out.
    """
    limit = channel.out_max_packet_size - 64  # as Channel._wait_for_send_window
    view = memoryview(data)
    with channel.lock:
        channel.out_window_size -= len(view)
    pieces = [view[start : start + limit] for start in range(0, len(view), limit)]
    channel.transport.packetizer.send_message(ChannelData(channel.remote_chanid, pieces))


def poll_for_next_packet(channel: Channel) -> None:
    """From the transport thread, after answering a request: the next one is likely on its way."""
    packetizer = channel.transport.packetizer
    if isinstance(packetizer, BatchingPacketizer):
        packetizer.poll_next()


def grant_window(channel: Channel, size: int) -> None:
    """Channel.recv's window accounting for `size` bytes taken from the channel without recv."""
    ack = channel._check_add_window(size)
    if ack > 0:
        m = Message()
        m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
        m.add_int(channel.remote_chanid)
        m.add_int(ack)
        channel.transport._send_user_message(m)
