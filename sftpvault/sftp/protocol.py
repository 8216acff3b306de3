"""SFTP version 3 wire format (draft-ietf-secsh-filexfer-02) and OpenSSH extensions.

Only encoding and decoding live here: packet framing, the request reader, reply
builders, file attributes and `ls -l` style long names.
"""

from __future__ import annotations

import stat
import struct
import time
from collections.abc import Iterable

from sftpvault.vfs.fs import Attrs, SetAttrs

VERSION = 3
MAX_PACKET = 256 * 1024  # as OpenSSH's sftp-server (SFTP_MAX_MSG_LENGTH)
MAX_READ = MAX_PACKET - 1024

(
    INIT,
    VERSION_REPLY,
    OPEN,
    CLOSE,
    READ,
    WRITE,
    LSTAT,
    FSTAT,
    SETSTAT,
    FSETSTAT,
    OPENDIR,
    READDIR,
    REMOVE,
    MKDIR,
    RMDIR,
    REALPATH,
    STAT,
    RENAME,
    READLINK,
    SYMLINK,
) = range(1, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = range(101, 106)
EXTENDED, EXTENDED_REPLY = 200, 201

OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, NO_CONNECTION, CONNECTION_LOST, OP_UNSUPPORTED = range(
    9
)

FLAG_READ, FLAG_WRITE, FLAG_APPEND, FLAG_CREAT, FLAG_TRUNC, FLAG_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20

ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
ATTR_EXTENDED = 0x80000000

U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_STATUS_HEAD = struct.Struct(">IBII")  # length, type, request id, code


class ProtocolError(Exception):
    """The client sent a malformed packet."""


class Reader:
    """Decodes the fields of one request payload."""

    def __init__(self, payload: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(payload)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._view):
            raise ProtocolError("truncated packet")
        piece = self._view[self._pos : end]
        self._pos = end
        return piece

    def u32(self) -> int:
        return U32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def binary(self) -> memoryview:
        return self._take(self.u32())

    def bytes(self) -> bytes:
        return bytes(self.binary())

    def text(self) -> str:
        try:
            return str(self.binary(), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("path is not valid UTF-8") from None

    def attrs(self) -> tuple[SetAttrs, bool]:
        """The attributes to set, and whether a uid/gid change was asked for."""
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        chown = bool(flags & ATTR_UIDGID)
        if chown:
            self.u32(), self.u32()
        mode = self.u32() if flags & ATTR_PERMISSIONS else None
        times = (self.u32(), self.u32()) if flags & ATTR_ACMODTIME else None
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.binary(), self.binary()
        return SetAttrs(size=size, mode=mode, times=times), chown


def string(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return U32.pack(len(raw)) + raw


def u32(value: int) -> bytes:
    return U32.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def packet(kind: int, request_id: int, *fields: bytes) -> bytes:
    body = b"".join(fields)
    return U32.pack(len(body) + 5) + bytes([kind]) + U32.pack(request_id) + body


def status(request_id: int, code: int, message: str) -> bytes:
    tail = string(message) + string("")
    return _STATUS_HEAD.pack(len(tail) + 9, STATUS, request_id, code) + tail


def data_reply(request_id: int, data: bytes) -> bytes:
    return U32.pack(len(data) + 9) + bytes([DATA]) + U32.pack(request_id) + U32.pack(len(data)) + data


def version_reply(extensions: Iterable[tuple[str, str]]) -> bytes:
    body = u32(VERSION) + b"".join(string(name) + string(value) for name, value in extensions)
    return U32.pack(len(body) + 1) + bytes([VERSION_REPLY]) + body


def encode_attrs(attrs: Attrs) -> bytes:
    flags = ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME
    return struct.pack(
        ">IQIIIII",
        flags,
        attrs.size,
        attrs.uid,
        attrs.gid,
        attrs.mode,
        attrs.atime & 0xFFFFFFFF,
        attrs.mtime & 0xFFFFFFFF,
    )


def name_reply(request_id: int, entries: Iterable[tuple[str, str, Attrs | None]]) -> bytes:
    """NAME with (filename, longname, attrs) triples; attrs None sends empty attributes."""
    items = list(entries)
    fields = [u32(len(items))]
    for filename, longname, attrs in items:
        fields += [string(filename), string(longname), encode_attrs(attrs) if attrs else u32(0)]
    return packet(NAME, request_id, *fields)


def long_name(name: str, attrs: Attrs, owner: str, now: float | None = None) -> str:
    """An `ls -l` line as OpenSSH's sftp-server writes it."""
    now = time.time() if now is None else now
    recent = now - 182 * 86400 < attrs.mtime < now + 86400
    when = time.strftime("%b %e %H:%M" if recent else "%b %e  %Y", time.localtime(attrs.mtime))
    return f"{stat.filemode(attrs.mode)} {attrs.nlink:>4} {owner:<8} {owner:<8} {attrs.size:>8} {when} {name}"
