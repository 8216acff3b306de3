"""Precise SFTP operations through paramiko's client against the real server."""

from __future__ import annotations

import errno
import filecmp
import os
import stat
import struct
import sys
import threading
from pathlib import Path

import paramiko
import pytest

from sftpvault import format as fmt
from sftpvault.sftp import protocol
from tests.conftest import PASSWORD, Vault


def test_random_offset_and_out_of_order_writes(vault: Vault) -> None:
    client = vault.client()
    model = bytearray(300_000)
    with client.open("r", "wb") as f:
        pieces = [
            (200_000, os.urandom(70_000)),
            (5, os.urandom(100)),
            (65_530, os.urandom(20)),
            (131_072, os.urandom(65_536)),
            (0, os.urandom(3)),
        ]
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
            model[offset : offset + len(data)] = data
        del model[270_000:]
    with client.open("r", "rb") as f:
        assert f.read() == bytes(model)
        f.seek(65_000)
        assert f.read(2_000) == bytes(model[65_000:67_000])
    client.close()


def test_read_write_handle_modifies_in_place(vault: Vault) -> None:
    client = vault.client()
    original = os.urandom(200_000)
    with client.open("rw", "wb") as f:
        f.write(original)
    with client.open("rw", "r+b") as f:
        f.seek(100_000)
        f.write(b"PATCH")
        f.seek(99_998)
        assert f.read(9) == original[99_998:100_000] + b"PATCH" + original[100_005:100_007]
    with client.open("rw", "rb") as f:
        assert f.read() == original[:100_000] + b"PATCH" + original[100_005:]
    client.close()


def test_truncate_and_extend(vault: Vault) -> None:
    client = vault.client()
    data = os.urandom(150_000)
    with client.open("t", "wb") as f:
        f.write(data)
    client.truncate("t", 70_000)
    assert client.stat("t").st_size == 70_000
    client.truncate("t", 200_000)  # extension reads as zeros
    with client.open("t", "rb") as f:
        assert f.read() == data[:70_000] + bytes(130_000)
    with client.open("t", "r+b") as f:
        f.truncate(10)
        assert f.stat().st_size == 10
    assert client.open("t").read() == data[:10]
    client.truncate("t", 0)
    assert client.open("t").read() == b""
    assert (vault.user_dir / "t").stat().st_size == fmt.cipher_size(0)
    client.close()


def test_append_mode_writes_at_end(vault: Vault) -> None:
    client = vault.client()
    with client.open("a", "wb") as f:
        f.write(b"first")
    with client.open("a", "ab") as f:
        f.write(b"-second")
    assert client.open("a").read() == b"first-second"
    client.close()


def test_exclusive_create_refuses_existing(vault: Vault) -> None:
    client = vault.client()
    client.open("x", "wb").close()
    with pytest.raises(OSError):
        client.open("x", "xb")
    client.close()


def test_setstat_mode_and_times(vault: Vault) -> None:
    client = vault.client()
    with client.open("m", "wb") as f:
        f.write(b"x" * 100)
    client.chmod("m", 0o640)
    client.utime("m", (1_000_000, 2_000_000))
    st = client.stat("m")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 2_000_000 and st.st_size == 100
    with pytest.raises(PermissionError):
        client.chown("m", 0, 0)
    client.close()


def test_rename_refuses_existing_target_but_posix_rename_replaces(vault: Vault) -> None:
    client = vault.client()
    for name in ("a", "b"):
        with client.open(name, "wb") as f:
            f.write(name.encode())
    with pytest.raises(OSError):
        client.rename("a", "b")
    client.posix_rename("a", "b")
    assert client.open("b").read() == b"a"
    client.close()


def test_upload_is_invisible_until_closed_and_temp_never_listed(vault: Vault) -> None:
    client = vault.client()
    with client.open("new", "wb") as f:
        f.write(b"partial")
        f.flush()
        assert "new" not in client.listdir(".")
        assert all(not n.startswith(".sftpvault") for n in client.listdir("."))
        temps = [p.name for p in vault.user_dir.iterdir()]
        assert len(temps) == 1 and temps[0].startswith(".sftpvault-upload-")
        with pytest.raises(FileNotFoundError):
            client.stat(temps[0])
    assert client.listdir(".") == ["new"]
    client.close()


def test_tampered_ciphertext_is_an_error_never_altered_data(vault: Vault) -> None:
    client = vault.client()
    data = os.urandom(3 * fmt.CHUNK_SIZE)
    for name in ("victim", "other"):
        with client.open(name, "wb") as f:
            f.write(data)
    path = vault.user_dir / "victim"
    pristine = path.read_bytes()
    other = (vault.user_dir / "other").read_bytes()

    def chunk(raw: bytes, i: int) -> bytes:
        return raw[fmt.chunk_offset(i) : fmt.chunk_offset(i) + fmt.SEALED_CHUNK]

    flipped = bytearray(pristine)
    flipped[fmt.chunk_offset(1) + 100] ^= 1
    cases = {
        "bit flip": bytes(flipped),
        "cut at chunk boundary": pristine[: fmt.chunk_offset(2)],
        "chunks reordered": pristine[: fmt.chunk_offset(0)]
        + chunk(pristine, 1)
        + chunk(pristine, 0)
        + pristine[fmt.chunk_offset(2) :],
        "chunk spliced from other file": pristine[: fmt.chunk_offset(1)]
        + chunk(other, 1)
        + pristine[fmt.chunk_offset(2) :],
        "header from other file": other[: fmt.HEADER_SIZE] + pristine[fmt.HEADER_SIZE :],
    }
    for label, tampered in cases.items():
        path.write_bytes(tampered)
        with pytest.raises(OSError) as failure:
            with client.open("victim", "rb") as f:
                f.read()
        assert "integrity" in str(failure.value) or failure.value.errno is None, label
    path.write_bytes(pristine)
    assert client.open("victim").read() == data
    client.close()


def test_tampered_chunk_returns_no_plaintext_of_that_chunk(vault: Vault) -> None:
    """Reads of good chunks still work; the damaged one yields an error, not bytes."""
    client = vault.client()
    data = os.urandom(3 * fmt.CHUNK_SIZE)
    with client.open("v", "wb") as f:
        f.write(data)
    raw = bytearray((vault.user_dir / "v").read_bytes())
    raw[fmt.chunk_offset(2) + 50] ^= 0x80
    (vault.user_dir / "v").write_bytes(bytes(raw))
    with client.open("v", "rb") as f:
        f.seek(0)
        assert f.read(fmt.CHUNK_SIZE) == data[: fmt.CHUNK_SIZE]
        f.seek(2 * fmt.CHUNK_SIZE)
        with pytest.raises(OSError):
            f.read(10)
    client.close()


def test_path_escapes_are_contained(vault: Vault) -> None:
    client = vault.client()
    outside = vault.home / "secret.txt"
    outside.write_text("outside the jail")
    (vault.user_dir / "up").symlink_to("../../secret.txt")  # planted link pointing out
    (vault.user_dir / "abs").symlink_to(str(outside))
    os.symlink("/", vault.user_dir / "root")
    for path in (
        "../secret.txt",
        "../../secret.txt",
        "/../../secret.txt",
        "up",
        "abs",
        "root/secret.txt",
        str(outside),
        "/etc/passwd",
        "root/etc/passwd",
        "../home/secret.txt",
    ):
        with pytest.raises(OSError):
            client.open(path).read()
    assert client.normalize("../../..") == "/"
    client.mkdir("a")
    assert client.normalize("/a/../..") == "/"
    assert client.listdir("..") == client.listdir("/")
    assert client.normalize("root") == "/"
    client.close()


def test_symlinks_resolve_inside_the_jail(vault: Vault) -> None:
    client = vault.client()
    client.mkdir("d")
    with client.open("d/f", "wb") as f:
        f.write(b"inside")
    client.symlink("/d/f", "abs-link")  # absolute target: relative to the user's root
    client.symlink("d", "dir-link")
    assert client.open("abs-link").read() == b"inside"
    assert client.open("dir-link/f").read() == b"inside"
    assert client.readlink("abs-link") == "/d/f"
    assert stat.S_ISLNK(client.lstat("abs-link").st_mode)
    assert client.normalize("dir-link/f") == "/d/f"
    client.close()


def test_symlink_swap_race_never_escapes(vault: Vault) -> None:
    """A directory swapped for a link to / while we resolve must never lead outside."""
    client = vault.client()
    client.mkdir("d")
    with client.open("d/passwd", "wb") as f:
        f.write(b"jailed")
    stop = threading.Event()

    def swapper() -> None:
        d, tmp, link = vault.user_dir / "d", vault.user_dir / "dtmp", vault.user_dir / "dlink"
        link.symlink_to("/etc")
        while not stop.is_set():
            os.rename(d, tmp)
            os.rename(link, d)
            os.rename(d, link)
            os.rename(tmp, d)

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(300):
            try:
                content = client.open("d/passwd").read()
            except OSError:
                continue
            assert content == b"jailed"
    finally:
        stop.set()
        thread.join()
        client.close()


def test_two_sessions_of_one_user_share_the_dek(vault: Vault) -> None:
    first, second = vault.client(), vault.client()
    with first.open("shared", "wb") as f:
        f.write(b"one")
    assert second.open("shared").read() == b"one"
    first.close()
    with second.open("after", "wb") as f:  # still works after the other session ended
        f.write(b"two")
    assert second.open("after").read() == b"two"
    second.close()
    log = vault.log.read_text()
    assert log.count("opened DEKs of demo") == 1 and log.count("dropped DEKs of demo") <= 1


def raw_request(client: paramiko.SFTPClient, kind: int, *fields: bytes) -> tuple[int, bytes]:
    """Send one raw SFTP request and return (reply type, payload) - for caps paramiko won't send."""
    client._request_id = getattr(client, "_request_id", 1000) + 1
    client.sock.sendall(protocol.packet(kind, client._request_id, *fields))
    (length,) = struct.unpack(">I", client._read_all(4))
    body = client._read_all(length)
    return body[0], body[5:]


def test_read_request_is_capped(vault: Vault) -> None:
    client = vault.client()
    with client.open("big", "wb") as f:
        f.write(os.urandom(1024 * 1024))
    handle = client.open("big")
    kind, payload = raw_request(
        client, protocol.READ, protocol.string(handle.handle), protocol.u64(0), protocol.u32(16 * 1024 * 1024)
    )
    assert kind == protocol.DATA
    assert struct.unpack(">I", payload[:4])[0] == protocol.MAX_READ
    client.close()


def test_open_handles_are_capped(vault: Vault) -> None:
    (vault.home / "sftpvault.toml").write_text("[server]\nmax_handles = 5\n")
    vault.stop()
    vault.start()
    client = vault.client()
    client.open("f", "wb").close()
    handles = [client.open("f") for _ in range(5)]
    with pytest.raises(OSError, match="too many open handles"):
        client.open("f")
    handles[0].close()
    client.open("f").close()
    client.close()


def test_oversized_packet_closes_the_session(vault: Vault) -> None:
    client = vault.client()
    client.sock.sendall(struct.pack(">I", 64 * 1024 * 1024) + b"\x03")
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        client.sock.settimeout(10)
        assert client._read_all(4) == b""
        raise EOFError
    client.close()


def test_limits_and_statvfs_extensions(vault: Vault) -> None:
    client = vault.client()
    kind, payload = raw_request(client, protocol.EXTENDED, protocol.string("limits@openssh.com"))
    assert kind == protocol.EXTENDED_REPLY
    packet_len, read_len, write_len, handles = struct.unpack(">QQQQ", payload)
    assert (packet_len, read_len, write_len, handles) == (
        protocol.MAX_PACKET,
        protocol.MAX_READ,
        protocol.MAX_READ,
        256,
    )
    kind, payload = raw_request(client, protocol.EXTENDED, protocol.string("statvfs@openssh.com"), protocol.string("/"))
    assert kind == protocol.EXTENDED_REPLY and len(payload) == 11 * 8
    kind, payload = raw_request(
        client, protocol.EXTENDED, protocol.string("expand-path@openssh.com"), protocol.string("~/y")
    )
    assert kind == protocol.NAME and protocol.string("/y") in payload
    kind, _ = raw_request(
        client, protocol.EXTENDED, protocol.string("expand-path@openssh.com"), protocol.string("~root/y")
    )
    assert kind == protocol.STATUS
    client.close()


def test_unknown_request_gets_op_unsupported(vault: Vault) -> None:
    client = vault.client()
    kind, payload = raw_request(client, 99)
    assert kind == protocol.STATUS and struct.unpack(">I", payload[:4])[0] == protocol.OP_UNSUPPORTED
    client.close()


def test_remove_directory_with_rm_is_refused(vault: Vault) -> None:
    client = vault.client()
    client.mkdir("d")
    with pytest.raises(OSError) as failure:
        client.remove("d")
    assert failure.value.errno in (None, errno.EISDIR) or "directory" in str(failure.value).lower()
    with pytest.raises(OSError):
        client.rmdir("/")
    client.close()


@pytest.mark.timeout(120)
def test_replies_larger_than_the_client_window_arrive_whole(vault: Vault) -> None:
    # With a 16 KiB window a 255 KiB DATA reply or a 100-entry NAME reply cannot be sent
    # at once. Small requests are answered in paramiko's transport thread, which must
    # never wait for a window adjust (only it could read one): such replies pass to
    # the session thread, which sends them as the window opens.
    transport = paramiko.Transport(("127.0.0.1", vault.port))
    transport.connect(username="demo", password=PASSWORD)
    client = paramiko.SFTPClient.from_transport(transport, window_size=2**14)
    assert client is not None
    data = os.urandom(3 * 2**20 + 7)
    with client.open("big", "wb") as f:
        f.write(data)
    names = {f"{'n' * 200}{i:03d}" for i in range(150)}
    client.mkdir("many")
    for name in names:
        client.open(f"many/{name}", "wb").close()
    handle = client.open("big")
    kind, payload = raw_request(
        client, protocol.READ, protocol.string(handle.handle), protocol.u64(0), protocol.u32(protocol.MAX_READ)
    )
    assert kind == protocol.DATA and payload[4:] == data[: protocol.MAX_READ]
    assert set(client.listdir("many")) == names
    assert client.open("big").read() == data
    client.close()
    transport.close()


def _restart_with_hook(vault: Vault, tmp_path: Path, code: str) -> None:
    """Restart the server with `code` run as it starts (a sitecustomize module), with logging and BatchingPacketizer."""
    hook = tmp_path / "hook"
    hook.mkdir()
    prelude = "import logging\nfrom sftpvault.ssh.paramiko_compat import BatchingPacketizer\n"
    (hook / "sitecustomize.py").write_text(prelude + code)
    vault.stop()
    vault.start(extra_env={"PYTHONPATH": os.pathsep.join([str(hook), *sys.path])})


@pytest.mark.parametrize("busy_poll_us", [0, 250])
def test_after_answering_a_request_the_server_polls_for_the_next_as_configured(
    vault: Vault, tmp_path: Path, busy_poll_us: int
) -> None:
    (vault.home / "sftpvault.toml").write_text(f"[server]\nbusy_poll_us = {busy_poll_us}\n")
    _restart_with_hook(
        vault,
        tmp_path,
        "_arm = BatchingPacketizer.poll_next\n"
        "def _logged(self):\n"
        "    _arm(self)\n"
        "    if self._poll_next:\n"
        "        logging.getLogger('sftpvault').warning('test hook: polling for %d us', round(self.busy_poll * 1e6))\n"
        "BatchingPacketizer.poll_next = _logged\n",
    )
    (vault.work / "f").write_bytes(os.urandom(5000))
    vault.sftp("put f g", "get g back", "ls -l")
    assert (vault.work / "back").read_bytes() == (vault.work / "f").read_bytes()
    log = vault.log.read_text()
    if busy_poll_us:
        assert log.count(f"test hook: polling for {busy_poll_us} us") >= 5  # open, write, close, stat, read...
    else:
        assert "test hook: polling" not in log


@pytest.mark.timeout(300)
def test_requests_keep_their_order_across_server_initiated_key_reexchange(vault: Vault, tmp_path: Path) -> None:
    # The server re-keys every 64 KiB here (paramiko's limit is 512 MiB: too slow to reach in
    # a test), so requests keep arriving while its key exchange is under way: they must wait
    # for the session thread instead of being answered in the transport thread.
    _restart_with_hook(
        vault,
        tmp_path,
        "BatchingPacketizer.REKEY_BYTES = 2**16\n"
        "_trigger = BatchingPacketizer._trigger_rekey\n"
        "def _logged(self):\n"
        "    logging.getLogger('sftpvault').warning('test hook: server re-key')\n"
        "    _trigger(self)\n"
        "BatchingPacketizer._trigger_rekey = _logged\n",
    )
    small = vault.work / "small"
    small.mkdir()
    for i in range(60):
        (small / f"f{i:02d}").write_bytes(os.urandom(i * 700))
    (vault.work / "big").write_bytes(os.urandom(2 * 2**20 + 3))
    vault.sftp("put -r small small", "put big big", "get -r small back", "get big big.back")
    assert filecmp.cmp(vault.work / "big", vault.work / "big.back", shallow=False)
    for i in range(60):
        assert (vault.work / "back" / f"f{i:02d}").read_bytes() == (small / f"f{i:02d}").read_bytes()
    # pipelined requests, one SSH packet each: the server starts a re-key between two of them,
    # and those the client sent before it saw the server's KEXINIT arrive while it is under way
    client = vault.client()
    for i in range(3000):
        client.sock.sendall(protocol.packet(protocol.STAT, i, protocol.string("big")))
    for i in range(3000):
        (length,) = struct.unpack(">I", client._read_all(4))
        body = client._read_all(length)
        assert (body[0], struct.unpack(">I", body[1:5])[0]) == (protocol.ATTRS, i)
    client.close()
    assert vault.log.read_text().count("test hook: server re-key") >= 10
