"""The file format: docs/FORMAT.md's test vectors, size arithmetic, tamper cases."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sftpvault import format as fmt
from sftpvault.errors import IntegrityError
from sftpvault.vfs.handle import EncryptedFile

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def doc_vectors() -> dict[str, str]:
    block = re.search(r"```vectors\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/FORMAT.md has no vectors block"
    return dict(line.split(" = ", 1) for line in block.group(1).strip().splitlines())


V = doc_vectors()
DEK, DEK_ID = bytes.fromhex(V["dek"]), bytes.fromhex(V["dek_id"])
FILE_KEY, FILE_ID = bytes.fromhex(V["file_key"]), bytes.fromhex(V["file_id"])


def header() -> bytes:
    return fmt.seal_header(DEK, DEK_ID, FILE_KEY, FILE_ID, bytes.fromhex(V["wrap_nonce"])).to_bytes()


def encode(plaintext: bytes, nonces: list[bytes]) -> bytes:
    cipher = AESGCM(FILE_KEY)
    chunks = [plaintext[i : i + fmt.CHUNK_SIZE] for i in range(0, max(len(plaintext), 1), fmt.CHUNK_SIZE)]
    return header() + b"".join(
        fmt.seal_chunk(cipher, FILE_ID, i, i == len(chunks) - 1, c, nonces[i]) for i, c in enumerate(chunks)
    )


def decode(raw: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "f"
    path.write_bytes(raw)
    fd = os.open(path, os.O_RDONLY)
    try:
        handle = EncryptedFile.open(fd, lambda dek_id: DEK if dek_id == DEK_ID else b"", len(raw))
        return handle.read(0, handle.size + 1)
    finally:
        os.close(fd)


def nonces(name: str) -> list[bytes]:
    return [bytes.fromhex(n) for n in V[f"{name}.chunk_nonces"].split()]


def test_header_vector() -> None:
    assert header().hex() == V["header"]
    assert len(header()) == fmt.HEADER_SIZE == 100
    assert fmt.open_header(fmt.Header.parse(bytes.fromhex(V["header"])), DEK) == FILE_KEY


def test_empty_file_vector(tmp_path: Path) -> None:
    raw = bytes.fromhex(V["empty.file"])
    assert encode(b"", nonces("empty")) == raw
    assert len(raw) == 128 == fmt.cipher_size(0)
    assert decode(raw, tmp_path) == b""


def test_small_file_vector(tmp_path: Path) -> None:
    plaintext = bytes.fromhex(V["hello.plaintext"])
    assert plaintext == b"hello, sftpvault\n"
    raw = bytes.fromhex(V["hello.file"])
    assert encode(plaintext, nonces("hello")) == raw
    assert decode(raw, tmp_path) == plaintext


def test_two_chunk_vector(tmp_path: Path) -> None:
    plaintext = bytes(i % 251 for i in range(65537))
    raw = encode(plaintext, nonces("two_chunks"))
    assert len(raw) == int(V["two_chunks.size"])
    assert hashlib.sha256(raw).hexdigest() == V["two_chunks.sha256"]
    assert decode(raw, tmp_path) == plaintext


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 131072, 131073, 10**9 + 7])
def test_plain_size_inverts_cipher_size(size: int) -> None:
    assert fmt.plain_size(fmt.cipher_size(size)) == size


def test_sizes_of_no_valid_file_are_rejected() -> None:
    valid = {fmt.cipher_size(s) for s in range(0, 3 * fmt.CHUNK_SIZE + 2)}
    for raw_size in range(0, fmt.cipher_size(3 * fmt.CHUNK_SIZE) + 1):
        if raw_size in valid:
            assert fmt.cipher_size(fmt.plain_size(raw_size)) == raw_size
        else:
            with pytest.raises(IntegrityError):
                fmt.plain_size(raw_size)


def test_wrong_dek_or_edited_header_fails() -> None:
    parsed = fmt.Header.parse(bytes.fromhex(V["header"]))
    with pytest.raises(IntegrityError):
        fmt.open_header(parsed, bytes(32))
    edited = bytearray(bytes.fromhex(V["header"]))
    edited[30] ^= 1  # inside dek_id
    with pytest.raises(IntegrityError):
        fmt.open_header(fmt.Header.parse(bytes(edited)), DEK)


def test_rewrap_header_keeps_file_key() -> None:
    new_dek, new_id = os.urandom(32), os.urandom(16)
    moved = fmt.rewrap_header(fmt.Header.parse(header()), DEK, new_dek, new_id)
    assert moved.file_id == FILE_ID and moved.dek_id == new_id
    assert fmt.open_header(moved, new_dek) == FILE_KEY


def test_final_flag_is_authenticated(tmp_path: Path) -> None:
    """A file cut at a chunk boundary fails: its new last chunk was sealed non-final."""
    raw = encode(bytes(2 * fmt.CHUNK_SIZE + 5), [os.urandom(12) for _ in range(3)])
    with pytest.raises(IntegrityError):
        decode(raw[: fmt.chunk_offset(2)], tmp_path)
    with pytest.raises(IntegrityError):
        decode(raw[: fmt.chunk_offset(1)], tmp_path)
