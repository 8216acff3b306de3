"""EncryptedFile against a plain bytearray model: any sequence of writes,
truncates and flushes must read back the same bytes, before and after reopen."""

import errno
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from sftpvault import format as fmt
from sftpvault.vfs.handle import EncryptedFile

DEK = bytes(range(32))
DEK_ID = b"d" * 16
C = fmt.CHUNK_SIZE

offsets = st.integers(0, 5 * C + 10) | st.sampled_from([0, C - 1, C, C + 1, 2 * C, 3 * C - 5])
ops = st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(0, 2 * C + 3), st.integers(0, 255)),
    st.tuples(st.just("truncate"), offsets),
    st.tuples(st.just("flush")),
    st.tuples(st.just("read"), offsets, st.integers(0, 3 * C)),
)


def apply(model: bytearray, handle: EncryptedFile, op: tuple) -> None:
    if op[0] == "write":
        _, offset, length, byte = op
        data = bytes([byte]) * length
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset : offset + length] = data
        handle.write(offset, data)
    elif op[0] == "truncate":
        size = op[1]
        del model[size:]
        model.extend(bytes(size - len(model)))
        handle.truncate(size)
    elif op[0] == "flush":
        handle.flush()
    else:
        _, offset, length = op
        assert handle.read(offset, length) == bytes(model[offset : offset + length])
    assert handle.size == len(model)


def reopen(path: str, writable: bool) -> EncryptedFile:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    return EncryptedFile.open(fd, lambda dek_id: DEK, os.fstat(fd).st_size)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=12), st.lists(ops, max_size=6))
def test_matches_bytearray_model(first_session, second_session):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f")
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        handle = EncryptedFile.create(fd, DEK, DEK_ID)
        model = bytearray()
        for op in first_session:
            apply(model, handle, op)
        handle.flush()
        os.close(fd)
        assert os.path.getsize(path) == fmt.cipher_size(len(model))

        handle = reopen(path, writable=True)
        assert handle.size == len(model)
        assert handle.read(0, len(model) + 1) == bytes(model)
        for op in second_session:
            apply(model, handle, op)
        handle.flush()
        os.close(handle.fd)

        handle = reopen(path, writable=False)
        assert handle.read(0, len(model) + 1) == bytes(model)
        os.close(handle.fd)


def test_sequential_upload_seals_each_chunk_once(tmp_path, monkeypatch):
    """32 KiB writes, as OpenSSH sends them, encrypt every chunk exactly once."""
    sealed = []
    real_seal = fmt.seal_chunk
    monkeypatch.setattr(fmt, "seal_chunk", lambda *a: sealed.append(a[2]) or real_seal(*a))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    handle = EncryptedFile.create(fd, DEK, DEK_ID)
    data = os.urandom(10 * C + 123)
    for off in range(0, len(data), 32 * 1024):
        handle.write(off, data[off : off + 32 * 1024])
    handle.flush()
    assert sealed == list(range(11))
    assert handle.read(0, len(data)) == data
    os.close(fd)


def test_a_closed_handle_never_writes_to_a_reused_descriptor(tmp_path):
    # Shutdown commits open uploads while a request may still hold the handle: its late
    # write must fail, not land in whichever file the kernel gave the old descriptor number.
    from sftpvault.keyring import UserKeys
    from sftpvault.vfs.openfile import OpenFile, OpenMode

    keys = UserKeys("demo", str(tmp_path / "record"), lambda k: None)
    keys.deks, keys.current_id = {DEK_ID: DEK}, DEK_ID
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        handle = OpenFile(dir_fd, "upload", OpenMode(write=True, create=True), keys, 0o644)
        handle.write(0, b"first")
        old_fd = handle.file.fd
        handle.close()
        # the kernel hands out the lowest free numbers: these take the handle's (and its directory's)
        opened = [os.open(tmp_path / f"bystander{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(2)]
        try:
            assert old_fd in opened
            bystander = old_fd
            for late in (lambda: handle.write(0, b"x" * 100), handle.fstat, lambda: handle.chmod(0o600)):
                try:
                    late()
                except OSError as exc:
                    assert exc.errno == errno.EBADF
                else:
                    raise AssertionError("a closed handle still worked")
            assert os.fstat(bystander).st_size == 0
        finally:
            for fd in opened:
                os.close(fd)
    finally:
        os.close(dir_fd)
    assert reopen(str(tmp_path / "upload"), writable=False).read(0, 100) == b"first"
