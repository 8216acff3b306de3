"""SFTPSession: the `sftp` subsystem of one SSH channel.

Reads requests from the channel, runs them against the user's UserFS and
writes one reply per request, in order. We implement the subsystem ourselves
rather than using paramiko's SFTPServer so that we control the extensions
(limits, statvfs, fsync, hardlink, expand-path), the caps that keep a hostile
client from making us buffer without bound, and the error text clients see.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol

import paramiko

from sftpvault.errors import IntegrityError, KeyServiceError, UserError
from sftpvault.sftp import protocol as p
from sftpvault.ssh.paramiko_compat import (
    ChunkPipe,
    can_send_now,
    channel_sendall,
    grant_window,
    poll_for_next_packet,
    send_now,
)
from sftpvault.vfs.fs import Attrs, SetAttrs, UserFS
from sftpvault.vfs.openfile import OpenFile, OpenMode

log = logging.getLogger("sftpvault.sftp")
READDIR_BATCH = 100
# Requests that move more (an upload's WRITE, a READ of a large file) are left to
# the session thread, so that their encryption and disk I/O overlap the transport
# thread reading and decrypting what follows.
INLINE_MAX = 16 * 1024
RECV_SIZE = 2 * 1024 * 1024  # all the channel holds: paramiko's buffer shifted on partial reads

_ERRNO_STATUS = {
    errno.ENOENT: p.NO_SUCH_FILE,
    errno.ENOTDIR: p.NO_SUCH_FILE,
    errno.EACCES: p.PERMISSION_DENIED,
    errno.EPERM: p.PERMISSION_DENIED,
    errno.EBADF: p.PERMISSION_DENIED,
}

EXTENSIONS = (
    ("posix-rename@openssh.com", "1"),
    ("statvfs@openssh.com", "2"),
    ("fstatvfs@openssh.com", "2"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("lsetstat@openssh.com", "1"),
    ("limits@openssh.com", "1"),
    ("expand-path@openssh.com", "1"),
)


class SessionHost(Protocol):
    """What the SSH layer hands an SFTP session: who it is and their file system."""

    username: str
    max_handles: int
    sessions: set[SFTPSession]

    def open_fs(self) -> UserFS: ...


class Denied(Exception):
    """A request refused with a specific SFTP status and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status_for(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, Denied):
        return exc.code, str(exc)
    if isinstance(exc, IntegrityError):
        return p.FAILURE, f"integrity check failed: {exc}"
    if isinstance(exc, KeyServiceError):
        return p.FAILURE, "key service unavailable"
    if isinstance(exc, UserError):
        return p.PERMISSION_DENIED, str(exc)
    if isinstance(exc, p.ProtocolError):
        return p.BAD_MESSAGE, str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_STATUS.get(exc.errno, p.FAILURE), os.strerror(exc.errno)
    return p.FAILURE, "internal server error"


def _settable(r: p.Reader) -> SetAttrs:
    """The attributes a setstat asks for; an owner change is refused (files belong to the server)."""
    attrs, chown = r.attrs()
    if chown:
        raise Denied(p.PERMISSION_DENIED, "changing the owner is not permitted")
    return attrs


class SFTPSession(paramiko.SubsystemHandler):
    """One client's SFTP conversation."""

    def __init__(self, channel: paramiko.Channel, name: str, server: SessionHost) -> None:
        super().__init__(channel, name, server)
        self.host = server
        self.channel = channel
        self.fs: UserFS | None = None
        self.files: dict[bytes, OpenFile] = {}
        self.dirs: dict[bytes, list[tuple[str, Attrs]]] = {}
        self._next_handle = 0
        self._exit_status = 0
        self._inbuf = bytearray()  # received, not yet parsed: at most one packet plus one recv
        self._pos = 0
        # Requests are answered by this session's thread or, when it is idle, by
        # paramiko's transport thread (see _answer_inline); whoever holds the turn.
        self._turn = threading.Lock()
        self._woken = False  # the transport thread left work for the session thread
        self._unsent: bytes | None = None  # a reply the transport thread could not send without waiting
        self._inline_error: BaseException | None = None  # an error the transport thread met, for the session thread
        server.sessions.add(self)
        self._closing = threading.Lock()
        self._handlers: dict[int, Callable[[int, p.Reader], bytes]] = {
            p.OPEN: self._open,
            p.CLOSE: self._close,
            p.READ: self._read,
            p.WRITE: self._write,
            p.LSTAT: self._lstat,
            p.FSTAT: self._fstat,
            p.STAT: self._stat,
            p.SETSTAT: self._setstat,
            p.FSETSTAT: self._fsetstat,
            p.OPENDIR: self._opendir,
            p.READDIR: self._readdir,
            p.REMOVE: self._remove,
            p.MKDIR: self._mkdir,
            p.RMDIR: self._rmdir,
            p.REALPATH: self._realpath,
            p.RENAME: self._rename,
            p.READLINK: self._readlink,
            p.SYMLINK: self._symlink,
            p.EXTENDED: self._extended,
        }
        self._extended_handlers: dict[str, Callable[[int, p.Reader], bytes]] = {
            "posix-rename@openssh.com": self._posix_rename,
            "statvfs@openssh.com": self._statvfs,
            "fstatvfs@openssh.com": self._fstatvfs,
            "hardlink@openssh.com": self._hardlink,
            "fsync@openssh.com": self._fsync,
            "lsetstat@openssh.com": self._lsetstat,
            "limits@openssh.com": self._limits,
            "expand-path@openssh.com": self._expand_path,
        }

    # -- the request loop -------------------------------------------------------

    def start_subsystem(self, name: str, transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        try:
            self.fs = self.host.open_fs()
        except Exception as exc:  # key service down, missing home: refuse this session only
            log.error("sftp: cannot open the file system of %s: %s", self.host.username, exc)
            channel.sendall_stderr(f"sftpvault: cannot open your files: {_status_for(exc)[1]}\n".encode())
            self._exit_status = 1
            return
        try:
            if self._first_request()[0] != p.INIT:
                return
            channel_sendall(channel, p.version_reply(EXTENSIONS))
            self._serve(channel.in_buffer)
        except (EOFError, OSError, paramiko.SSHException, p.ProtocolError) as exc:
            log.debug("sftp: session of %s ended: %s", self.host.username, exc)

    def _serve(self, pipe: ChunkPipe) -> None:
        """Answer requests until the channel closes, sharing the work with the transport thread."""
        pipe.consumer = self._answer_inline
        while True:
            readable = pipe.wait(lambda: self._woken)
            with self._turn:
                try:
                    self._take_over()
                    chunk = self.channel.recv(RECV_SIZE) if readable else None
                    if chunk is not None:
                        self._take(chunk)
                    while self._has_request():
                        channel_sendall(self.channel, self._dispatch(*self._pop_request()))
                    if chunk == b"":
                        raise EOFError("channel closed")
                except BaseException:
                    pipe.consumer = None  # while we hold the turn: nothing is answered after the session ends
                    raise

    def _take_over(self) -> None:
        """Finish what the transport thread left: raise the error it met, send the reply it could not."""
        self._woken = False
        error, self._inline_error = self._inline_error, None
        if error is not None:
            raise error
        if self._unsent is not None:
            reply, self._unsent = self._unsent, None
            channel_sendall(self.channel, reply)

    def _answer_inline(self, data: bytes) -> bool:
        """In the transport thread: take `data` and answer what can be answered at once, or decline.

        Declined while the session thread has the turn, holds unread input (it
        comes first) or has work left, or during a key re-exchange. What is
        taken but is not finished here (a request over INLINE_MAX, a reply
        larger than the window, an error) is left for the session thread,
        which is woken.
        """
        channel = self.channel
        if not self._turn.acquire(blocking=False):
            return False
        try:
            if len(channel.in_buffer) or self._woken or not can_send_now(channel, 0):
                return False
            self._take(data)
            grant_window(channel, len(data))
            try:
                while self._has_request():
                    if not self._is_small_work():
                        break
                    reply = self._dispatch(*self._pop_request())
                    if not can_send_now(channel, len(reply)):
                        self._unsent = reply
                        break
                    send_now(channel, reply)
                else:
                    poll_for_next_packet(channel)
                    return True
            except (EOFError, OSError, paramiko.SSHException, p.ProtocolError) as exc:
                self._inline_error = exc
            self._woken = True
            channel.in_buffer.wake()
            return True
        finally:
            self._turn.release()

    def _is_small_work(self) -> bool:
        """Whether the next buffered request moves at most INLINE_MAX bytes (a READ: by what is left to read)."""
        (length,) = p.U32.unpack_from(self._inbuf, self._pos)
        if length > INLINE_MAX:
            return False
        start = self._pos + 4
        if self._inbuf[start] != p.READ:
            return True
        r = p.Reader(bytes(self._inbuf[start + 5 : start + length]))  # after the type and the request id
        try:
            f = self.files.get(r.bytes())
            offset, wanted = r.u64(), r.u32()
        except p.ProtocolError:
            return True  # answered with an error status
        return f is None or min(wanted, f.file.size - offset) <= INLINE_MAX

    def finish_subsystem(self) -> None:
        self.close_all()
        self.host.sessions.discard(self)
        try:
            self.channel.send_exit_status(self._exit_status)  # scp checks it, as sshd sends it
        except (OSError, EOFError, paramiko.SSHException):
            pass
        super().finish_subsystem()

    def close_all(self) -> None:
        """Commit every open upload; safe to call from the shutdown path too."""
        with self._closing:
            for handle, f in list(self.files.items()):
                try:
                    f.close()
                except Exception as exc:
                    log.error("sftp: closing %s for %s failed: %s", f.name, self.host.username, exc)
                self.files.pop(handle, None)
            self.dirs.clear()
            if self.fs is not None:
                self.fs.close()
                self.fs = None

    def _take(self, data: bytes) -> None:
        if self._pos:
            del self._inbuf[: self._pos]
            self._pos = 0
        self._inbuf += data

    def _has_request(self) -> bool:
        """Whether a whole request is buffered; a length no client may send ends the session."""
        if len(self._inbuf) - self._pos < 4:
            return False
        (length,) = p.U32.unpack_from(self._inbuf, self._pos)
        if length == 0 or length > p.MAX_PACKET:
            raise p.ProtocolError(f"packet of {length} bytes refused")
        return len(self._inbuf) - self._pos >= 4 + length

    def _pop_request(self) -> tuple[int, bytes]:
        (length,) = p.U32.unpack_from(self._inbuf, self._pos)
        start = self._pos + 4
        with memoryview(self._inbuf) as buffered:  # one copy (slicing the bytearray would make two)
            body = bytes(buffered[start : start + length])
        self._pos = start + length
        return body[0], body

    def _first_request(self) -> tuple[int, bytes]:
        while not self._has_request():
            chunk = self.channel.recv(RECV_SIZE)
            if not chunk:
                raise EOFError("channel closed")
            self._take(chunk)
        return self._pop_request()

    def _dispatch(self, kind: int, body: bytes) -> bytes:
        reader = p.Reader(memoryview(body)[1:])
        request_id = reader.u32()
        handler = self._handlers.get(kind)
        if handler is None:
            return p.status(request_id, p.OP_UNSUPPORTED, "operation unsupported")
        try:
            return handler(request_id, reader)
        except Exception as exc:
            code, message = _status_for(exc)
            if code == p.FAILURE and message == "internal server error":
                log.exception("sftp: request %d of %s failed", kind, self.host.username)
            elif isinstance(exc, IntegrityError):
                log.error("sftp: integrity failure for %s: %s", self.host.username, exc)
            return p.status(request_id, code, message)

    # -- helpers ---------------------------------------------------------------

    @property
    def _fs(self) -> UserFS:
        assert self.fs is not None
        return self.fs

    def _new_handle(self) -> bytes:
        if len(self.files) + len(self.dirs) >= self.host.max_handles:
            raise Denied(p.FAILURE, "too many open handles")
        self._next_handle += 1
        return str(self._next_handle).encode()

    def _file(self, reader: p.Reader) -> OpenFile:
        f = self.files.get(reader.bytes())
        if f is None:
            raise Denied(p.FAILURE, "invalid handle")
        return f

    def _ok(self, request_id: int) -> bytes:
        return p.status(request_id, p.OK, "Success")

    def _attrs_reply(self, request_id: int, attrs: Attrs) -> bytes:
        return p.packet(p.ATTRS, request_id, p.encode_attrs(attrs))

    def _path_reply(self, request_id: int, vpath: str) -> bytes:
        return p.name_reply(request_id, [(vpath, vpath, None)])

    # -- files -----------------------------------------------------------------

    def _open(self, request_id: int, r: p.Reader) -> bytes:
        path, flags = r.text(), r.u32()
        attrs, _ = r.attrs()
        mode = OpenMode(
            read=bool(flags & p.FLAG_READ),
            write=bool(flags & (p.FLAG_WRITE | p.FLAG_APPEND)),
            append=bool(flags & p.FLAG_APPEND),
            create=bool(flags & p.FLAG_CREAT),
            truncate=bool(flags & p.FLAG_TRUNC),
            exclusive=bool(flags & p.FLAG_EXCL),
        )
        handle = self._new_handle()
        self.files[handle] = self._fs.open(path, mode, attrs.mode if attrs.mode is not None else 0o644)
        return p.packet(p.HANDLE, request_id, p.string(handle))

    def _close(self, request_id: int, r: p.Reader) -> bytes:
        handle = r.bytes()
        if self.dirs.pop(handle, None) is not None:
            return self._ok(request_id)
        f = self.files.pop(handle, None)
        if f is None:
            raise Denied(p.FAILURE, "invalid handle")
        f.close()
        return self._ok(request_id)

    def _read(self, request_id: int, r: p.Reader) -> bytes:
        f = self._file(r)
        offset, length = r.u64(), r.u32()
        data = f.read(offset, min(length, p.MAX_READ))
        if not data:
            return p.status(request_id, p.EOF, "End of file")
        return p.data_reply(request_id, data)

    def _write(self, request_id: int, r: p.Reader) -> bytes:
        f = self._file(r)
        offset = r.u64()
        f.write(offset, r.binary())
        return self._ok(request_id)

    def _fstat(self, request_id: int, r: p.Reader) -> bytes:
        f = self._file(r)
        return self._attrs_reply(request_id, Attrs.from_stat(f.fstat(), size=f.file.size))

    def _fsetstat(self, request_id: int, r: p.Reader) -> bytes:
        f = self._file(r)
        attrs = _settable(r)
        if attrs.size is not None:
            f.truncate(attrs.size)
        if attrs.mode is not None:
            f.chmod(attrs.mode)
        if attrs.times is not None:
            f.set_times(*attrs.times)
        return self._ok(request_id)

    def _fsync(self, request_id: int, r: p.Reader) -> bytes:
        self._file(r).sync()
        return self._ok(request_id)

    def _fstatvfs(self, request_id: int, r: p.Reader) -> bytes:
        self._file(r)
        return self._statvfs_reply(request_id, "/")

    # -- paths -----------------------------------------------------------------

    def _stat(self, request_id: int, r: p.Reader) -> bytes:
        return self._attrs_reply(request_id, self._fs.stat(r.text()))

    def _lstat(self, request_id: int, r: p.Reader) -> bytes:
        return self._attrs_reply(request_id, self._fs.stat(r.text(), follow=False))

    def _setstat(self, request_id: int, r: p.Reader, follow: bool = True) -> bytes:
        path = r.text()
        attrs = _settable(r)
        if not follow and (attrs.size is not None or attrs.mode is not None):
            raise Denied(p.OP_UNSUPPORTED, "only times can be set on a link itself")
        self._fs.setattrs(path, attrs)
        return self._ok(request_id)

    def _lsetstat(self, request_id: int, r: p.Reader) -> bytes:
        return self._setstat(request_id, r, follow=False)

    def _opendir(self, request_id: int, r: p.Reader) -> bytes:
        entries = self._fs.listdir(r.text())
        handle = self._new_handle()
        self.dirs[handle] = entries
        return p.packet(p.HANDLE, request_id, p.string(handle))

    def _readdir(self, request_id: int, r: p.Reader) -> bytes:
        entries = self.dirs.get(r.bytes())
        if entries is None:
            raise Denied(p.FAILURE, "invalid handle")
        if not entries:
            return p.status(request_id, p.EOF, "End of file")
        batch, entries[:] = entries[:READDIR_BATCH], entries[READDIR_BATCH:]
        owner = self.host.username
        return p.name_reply(request_id, [(name, p.long_name(name, a, owner), a) for name, a in batch])

    def _remove(self, request_id: int, r: p.Reader) -> bytes:
        self._fs.remove(r.text())
        return self._ok(request_id)

    def _mkdir(self, request_id: int, r: p.Reader) -> bytes:
        path = r.text()
        attrs, _ = r.attrs()
        self._fs.mkdir(path, attrs.mode if attrs.mode is not None else 0o755)
        return self._ok(request_id)

    def _rmdir(self, request_id: int, r: p.Reader) -> bytes:
        self._fs.rmdir(r.text())
        return self._ok(request_id)

    def _realpath(self, request_id: int, r: p.Reader) -> bytes:
        return self._path_reply(request_id, self._fs.realpath(r.text() or "."))

    def _expand_path(self, request_id: int, r: p.Reader) -> bytes:
        """`~` and `~/x` (and `~<own name>`) are the user's root, as in OpenSSH."""
        path = r.text()
        if path.startswith("~"):
            head, _, rest = path[1:].partition("/")
            if head not in ("", self.host.username):
                raise Denied(p.NO_SUCH_FILE, "no such user")
            path = "/" + rest
        return self._path_reply(request_id, self._fs.realpath(path))

    def _rename(self, request_id: int, r: p.Reader) -> bytes:
        self._fs.rename(r.text(), r.text(), overwrite=False)
        return self._ok(request_id)

    def _posix_rename(self, request_id: int, r: p.Reader) -> bytes:
        self._fs.rename(r.text(), r.text(), overwrite=True)
        return self._ok(request_id)

    def _hardlink(self, request_id: int, r: p.Reader) -> bytes:
        self._fs.hardlink(r.text(), r.text())
        return self._ok(request_id)

    def _readlink(self, request_id: int, r: p.Reader) -> bytes:
        return self._path_reply(request_id, self._fs.readlink(r.text()))

    def _symlink(self, request_id: int, r: p.Reader) -> bytes:
        # OpenSSH sends (target, link path): the reverse of the draft; every client follows OpenSSH
        target, link = r.text(), r.text()
        self._fs.symlink(target, link)
        return self._ok(request_id)

    def _statvfs(self, request_id: int, r: p.Reader) -> bytes:
        return self._statvfs_reply(request_id, r.text())

    def _statvfs_reply(self, request_id: int, path: str) -> bytes:
        v = self._fs.statvfs(path)
        fields = (
            v.f_bsize,
            v.f_frsize,
            v.f_blocks,
            v.f_bfree,
            v.f_bavail,
            v.f_files,
            v.f_ffree,
            v.f_favail,
            v.f_fsid,
            v.f_flag & 0x3,
            v.f_namemax,
        )
        return p.packet(p.EXTENDED_REPLY, request_id, *(p.u64(x) for x in fields))

    def _limits(self, request_id: int, r: p.Reader) -> bytes:
        values = (p.MAX_PACKET, p.MAX_READ, p.MAX_READ, self.host.max_handles)
        return p.packet(p.EXTENDED_REPLY, request_id, *(p.u64(x) for x in values))

    def _extended(self, request_id: int, r: p.Reader) -> bytes:
        handler = self._extended_handlers.get(r.text())
        if handler is None:
            return p.status(request_id, p.OP_UNSUPPORTED, "extension unsupported")
        return handler(request_id, r)
