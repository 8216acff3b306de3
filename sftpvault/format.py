"""The encrypted file format (version 1), documented in docs/FORMAT.md.

A file is a fixed-size header followed by chunks. Each chunk holds up to
CHUNK_SIZE plaintext bytes sealed with AES-256-GCM under the file's own key:

    header  = MAGIC(7) | VERSION(1) | file_id(16) | dek_id(16)
              | wrap_nonce(12) | wrapped_file_key(32 + 16)
    chunk_i = nonce(12) | ciphertext | tag(16)

The file key is wrapped under the user's DEK with the first 40 header bytes as
AAD, so a header cannot be edited or moved to another file without detection.
Each chunk's AAD binds the version, the file id, the chunk index and a flag
that is set on the one final chunk; an empty file has one empty final chunk.
All chunks but the last are full, so the plaintext size is a pure function of
the ciphertext size.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sftpvault.errors import IntegrityError

MAGIC = b"SFTPVLT"
VERSION = 1
CHUNK_SIZE = 64 * 1024
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
ID_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
SEALED_CHUNK = CHUNK_SIZE + CHUNK_OVERHEAD

_PREFIX = MAGIC + bytes([VERSION])
_BOUND_LEN = len(_PREFIX) + 2 * ID_SIZE  # the header bytes the wrap authenticates
HEADER_SIZE = _BOUND_LEN + NONCE_SIZE + KEY_SIZE + TAG_SIZE
_INDEX = struct.Struct(">QB")


@dataclass(frozen=True)
class Header:
    """A parsed file header: identifiers plus the wrapped file key."""

    file_id: bytes
    dek_id: bytes
    wrap_nonce: bytes
    wrapped_key: bytes

    def bound_bytes(self) -> bytes:
        return _PREFIX + self.file_id + self.dek_id

    def to_bytes(self) -> bytes:
        return self.bound_bytes() + self.wrap_nonce + self.wrapped_key

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
            raise IntegrityError("not an sftpvault file (bad header)")
        if raw[len(MAGIC)] != VERSION:
            raise IntegrityError(f"unsupported format version {raw[len(MAGIC)]}")
        file_id = raw[8:24]
        dek_id = raw[24:40]
        return cls(file_id, dek_id, raw[40:52], raw[52:HEADER_SIZE])


def seal_header(dek: bytes, dek_id: bytes, file_key: bytes, file_id: bytes, nonce: bytes) -> Header:
    """Wrap `file_key` under `dek`, binding it to this file id and DEK id."""
    bound = _PREFIX + file_id + dek_id
    return Header(file_id, dek_id, nonce, AESGCM(dek).encrypt(nonce, file_key, bound))


def new_header(dek: bytes, dek_id: bytes) -> tuple[Header, bytes]:
    """A header for a new file with a fresh random file key; returns (header, file key)."""
    file_key = AESGCM.generate_key(bit_length=256)
    header = seal_header(dek, dek_id, file_key, os.urandom(ID_SIZE), os.urandom(NONCE_SIZE))
    return header, file_key


def open_header(header: Header, dek: bytes) -> bytes:
    """Unwrap the file key; IntegrityError if the header was altered or the DEK is wrong."""
    try:
        return AESGCM(dek).decrypt(header.wrap_nonce, header.wrapped_key, header.bound_bytes())
    except InvalidTag:
        raise IntegrityError("file header failed authentication") from None


def rewrap_header(header: Header, old_dek: bytes, new_dek: bytes, new_dek_id: bytes) -> Header:
    """Move a file key under another DEK; the chunks stay as they are."""
    file_key = open_header(header, old_dek)
    return seal_header(new_dek, new_dek_id, file_key, header.file_id, os.urandom(NONCE_SIZE))


def chunk_aad(file_id: bytes, index: int, final: bool) -> bytes:
    return _PREFIX + file_id + _INDEX.pack(index, 1 if final else 0)


def seal_chunk(cipher: AESGCM, file_id: bytes, index: int, final: bool, plaintext: bytes, nonce: bytes) -> bytes:
    """nonce | ciphertext | tag for one chunk (callers pass a fresh random nonce)."""
    return nonce + cipher.encrypt(nonce, plaintext, chunk_aad(file_id, index, final))


def open_chunk(cipher: AESGCM, file_id: bytes, index: int, final: bool, sealed: bytes) -> bytes:
    """Decrypt one chunk; IntegrityError if it was altered, moved or cut."""
    if len(sealed) < CHUNK_OVERHEAD:
        raise IntegrityError(f"chunk {index} is truncated")
    try:
        return cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], chunk_aad(file_id, index, final))
    except InvalidTag:
        raise IntegrityError(f"chunk {index} failed authentication") from None


def chunk_count(plain_size: int) -> int:
    """Chunks a file of `plain_size` bytes has: at least one, the final one."""
    return max(1, -(-plain_size // CHUNK_SIZE))


def chunk_length(plain_size: int, index: int) -> int:
    """Plaintext bytes in chunk `index` of a file of `plain_size` bytes."""
    return max(0, min(CHUNK_SIZE, plain_size - index * CHUNK_SIZE))


def chunk_offset(index: int) -> int:
    return HEADER_SIZE + index * SEALED_CHUNK


def cipher_size(plain_size: int) -> int:
    return HEADER_SIZE + plain_size + CHUNK_OVERHEAD * chunk_count(plain_size)


def plain_size(cipher_size_: int) -> int:
    """Inverse of cipher_size; IntegrityError for a size no valid file has."""
    body = cipher_size_ - HEADER_SIZE
    if body < CHUNK_OVERHEAD:
        raise IntegrityError("file is shorter than an empty encrypted file")
    chunks = -(-body // SEALED_CHUNK)
    size = body - CHUNK_OVERHEAD * chunks
    if cipher_size(size) != cipher_size_:
        raise IntegrityError("file size does not match the chunk layout (truncated?)")
    return size
