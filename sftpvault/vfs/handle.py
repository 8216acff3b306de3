"""EncryptedFile: random-access plaintext view of one encrypted file.

Writes land in per-chunk plaintext buffers (`_dirty`) and a chunk is sealed
once, when it is complete and no longer the last chunk, so a sequential upload
encrypts every chunk exactly once. `flush()` seals whatever is left, including
the final chunk, and trims the file to its exact ciphertext size.

Between flushes the disk holds a valid prefix of `_valid` sealed chunks; only
the last of them may be partial or carry the final flag (`_tail`). Anything past
that prefix is zeros (a hole) until written.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sftpvault import format as fmt

DekLookup = Callable[[bytes], bytes]
MAX_DIRTY_CHUNKS = 16  # bounds the plaintext one handle buffers (1 MiB)


class EncryptedFile:
    """Plaintext reads and writes at any offset over a ciphertext file descriptor."""

    def __init__(self, fd: int, header: fmt.Header, file_key: bytes, size: int) -> None:
        self.fd = fd
        self.header = header
        self.size = size
        self._cipher = AESGCM(file_key)
        self._valid = fmt.chunk_count(size)
        self._tail = (fmt.chunk_length(size, self._valid - 1), True)  # (length, final) of slot _valid-1
        self._dirty: dict[int, bytearray] = {}
        self._cache: tuple[int, bytes] | None = None  # last chunk read from disk

    @classmethod
    def create(cls, fd: int, dek: bytes, dek_id: bytes) -> EncryptedFile:
        """Start a new, empty file on the (empty) descriptor `fd`."""
        header, file_key = fmt.new_header(dek, dek_id)
        os.pwrite(fd, header.to_bytes(), 0)
        handle = cls(fd, header, file_key, 0)
        handle._valid = 0  # nothing sealed yet: flush() writes the empty final chunk
        return handle

    @classmethod
    def open(cls, fd: int, dek_for: DekLookup, cipher_size: int) -> EncryptedFile:
        """Open an existing file of `cipher_size` bytes: authenticate its header and derive its size."""
        header = fmt.Header.parse(os.pread(fd, fmt.HEADER_SIZE, 0))
        file_key = fmt.open_header(header, dek_for(header.dek_id))
        return cls(fd, header, file_key, fmt.plain_size(cipher_size))

    # -- reading ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` plaintext bytes at `offset`; b"" at or past the end."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // fmt.CHUNK_SIZE, (end - 1) // fmt.CHUNK_SIZE
        if first == last:
            base = first * fmt.CHUNK_SIZE
            return bytes(self._chunk_plaintext(first)[offset - base : end - base])
        parts = []
        for index in range(first, last + 1):
            base = index * fmt.CHUNK_SIZE
            lo, hi = max(offset, base) - base, min(end, base + fmt.CHUNK_SIZE) - base
            parts.append(self._chunk_plaintext(index)[lo:hi])
        return b"".join(parts)

    def _chunk_plaintext(self, index: int) -> bytes | bytearray:
        """The logical content of one chunk, zero-padded to its current length."""
        want = fmt.chunk_length(self.size, index)
        data: bytes | bytearray
        if index in self._dirty:
            data = self._dirty[index]
        elif index < self._valid:
            data = self._read_sealed(index)
        else:
            data = b""
        if len(data) < want:
            return bytes(data) + bytes(want - len(data))
        return data[:want] if len(data) > want else data

    def _read_sealed(self, index: int) -> bytes:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        length, final = self._slot_state(index)
        sealed = os.pread(self.fd, length + fmt.CHUNK_OVERHEAD, fmt.chunk_offset(index))
        plaintext = fmt.open_chunk(self._cipher, self.header.file_id, index, final, sealed)
        if len(plaintext) != length:
            raise fmt.IntegrityError(f"chunk {index} has the wrong length")
        self._cache = (index, plaintext)
        return plaintext

    def _slot_state(self, index: int) -> tuple[int, bool]:
        return self._tail if index == self._valid - 1 else (fmt.CHUNK_SIZE, False)

    # -- writing ------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write plaintext at `offset`; a gap past the end reads as zeros."""
        view = memoryview(data)
        end = offset + len(view)
        pos = offset
        while pos < end:
            index, within = divmod(pos, fmt.CHUNK_SIZE)
            take = min(end - pos, fmt.CHUNK_SIZE - within)
            buf = self._dirty_chunk(index, covers_all=within == 0 and take >= fmt.chunk_length(self.size, index))
            if len(buf) < within:
                buf.extend(bytes(within - len(buf)))
            buf[within : within + take] = view[pos - offset : pos - offset + take]
            pos += take
        self.size = max(self.size, end)
        self._seal_complete_chunks()

    def _dirty_chunk(self, index: int, covers_all: bool) -> bytearray:
        buf = self._dirty.get(index)
        if buf is None:
            buf = bytearray() if covers_all else bytearray(self._chunk_plaintext(index))
            self._dirty[index] = buf
            self._cache = None
        return buf

    def _seal_complete_chunks(self) -> None:
        """Seal full chunks that are no longer last; spill more if too many buffer."""
        last = fmt.chunk_count(self.size) - 1
        for index in sorted(self._dirty):
            buf = self._dirty.get(index)
            if buf is not None and index < last and index <= self._valid and len(buf) == fmt.CHUNK_SIZE:
                self._seal_slot(index, self._dirty.pop(index), final=False)
        if len(self._dirty) > MAX_DIRTY_CHUNKS:
            self._seal_through(max(i for i in self._dirty if i < last), last)

    def truncate(self, new_size: int) -> None:
        """Shrink or extend to `new_size` bytes; extension reads as zeros."""
        if new_size < self.size:
            keep = fmt.chunk_count(new_size)
            tail = bytearray(self._chunk_plaintext(keep - 1)[: fmt.chunk_length(new_size, keep - 1)])
            self._dirty = {i: b for i, b in self._dirty.items() if i < keep - 1}
            self._dirty[keep - 1] = tail
            if self._valid > keep - 1:
                os.ftruncate(self.fd, fmt.chunk_offset(keep - 1))
                self._valid = keep - 1
                self._tail = (fmt.CHUNK_SIZE, False)
            self._cache = None
        self.size = new_size

    def flush(self) -> None:
        """Seal everything so the file on disk is complete and exact."""
        last = fmt.chunk_count(self.size) - 1
        self._seal_through(last, last)
        os.ftruncate(self.fd, fmt.cipher_size(self.size))

    def _seal_through(self, upto: int, last: int) -> None:
        """Make slots 0..upto sealed and current, filling holes with zeros."""
        start = min([max(self._valid - 1, 0), *self._dirty])
        for index in range(start, upto + 1):
            stale_tail = index == self._valid - 1 and self._tail != (fmt.chunk_length(self.size, index), index == last)
            if index in self._dirty or index >= self._valid or stale_tail:
                self._seal_slot(index, self._chunk_plaintext(index), final=index == last)
                self._dirty.pop(index, None)

    def _seal_slot(self, index: int, plaintext: bytes | bytearray, final: bool) -> None:
        if index >= self._valid:
            self._seal_tail_if_short(index)
        sealed = fmt.seal_chunk(
            self._cipher, self.header.file_id, index, final, bytes(plaintext), os.urandom(fmt.NONCE_SIZE)
        )
        os.pwrite(self.fd, sealed, fmt.chunk_offset(index))
        if index >= self._valid - 1:
            self._valid = index + 1
            self._tail = (len(plaintext), final)
        self._cache = None

    def _seal_tail_if_short(self, index: int) -> None:
        """Before appending slot `index`, the previous slots must be full and non-final."""
        for gap in range(max(self._valid - 1, 0), index):
            if gap == self._valid - 1 and self._tail == (fmt.CHUNK_SIZE, False):
                continue
            content = self._chunk_plaintext(gap)
            self._dirty.pop(gap, None)
            self._seal_slot(gap, content, final=False)
