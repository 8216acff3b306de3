"""OpenFile: one client handle on a file, with atomic replacement for writers.

A handle opened for writing works on a hidden temporary file in the target's
directory (a new file, or a ciphertext copy of the existing one when the client
does not truncate, as `reput` does) and renames it over the target on close.
So the target always shows a complete old or new file: a killed server leaves
only a stale temporary, which startup removes. Readers hold the file they
opened even if a writer replaces it meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from sftpvault.keyring import UserKeys
from sftpvault.vfs.handle import EncryptedFile
from sftpvault.vfs.jail import TEMP_PREFIX

_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass(frozen=True)
class OpenMode:
    read: bool = False
    write: bool = False
    append: bool = False
    create: bool = False
    truncate: bool = False
    exclusive: bool = False


def _copy_ciphertext(src: int, dst: int) -> None:
    remaining = os.fstat(src).st_size
    offset = 0
    while remaining > 0:
        copied = os.copy_file_range(src, dst, remaining, offset, offset)
        if copied == 0:
            raise OSError(errno.EIO, "short copy of existing file", None)
        offset += copied
        remaining -= copied


class OpenFile:
    """A client's open file: plaintext I/O plus commit-on-close for writers."""

    def __init__(
        self, dir_fd: int, name: str, mode: OpenMode, keys: UserKeys, file_mode: int, fsync_on_close: bool = False
    ) -> None:
        self.mode = mode
        self.name = name
        self._fsync_on_close = fsync_on_close
        self._temp: str | None = None
        self._times: tuple[int, int] | None = None
        self._lock = threading.Lock()
        changes = mode.write or mode.create or mode.truncate  # as open(2): O_CREAT acts without write access
        # a writer renames in its directory at close, after the caller's resolution is gone
        self._dir_fd = os.dup(dir_fd) if changes else -1
        try:
            self.file = self._open_for_write(keys, file_mode) if changes else self._open_for_read(dir_fd, keys)
        except BaseException:
            self._discard()
            raise

    def _open_for_read(self, dir_fd: int, keys: UserKeys) -> EncryptedFile:
        fd = os.open(self.name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
        try:
            return EncryptedFile.open(fd, keys.get, _require_regular(fd).st_size)
        except BaseException:
            os.close(fd)
            raise

    def _open_for_write(self, keys: UserKeys, file_mode: int) -> EncryptedFile:
        try:
            existing = os.open(self.name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=self._dir_fd)
        except FileNotFoundError:
            existing = None
            if not self.mode.create:
                raise
        if existing is not None:
            try:
                if self.mode.create and self.mode.exclusive:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.name)
                file_mode = _require_regular(existing).st_mode
            except BaseException:
                os.close(existing)
                raise
        self._temp = TEMP_PREFIX + os.urandom(8).hex()
        fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600, dir_fd=self._dir_fd)
        try:
            os.fchmod(fd, (file_mode & 0o7777) | 0o600)  # the server must always read its own files
            if existing is None or self.mode.truncate:
                return EncryptedFile.create(fd, keys.current, keys.current_id)
            _copy_ciphertext(existing, fd)
            return EncryptedFile.open(fd, keys.get, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if existing is not None:
                os.close(existing)

    # -- I/O -------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if not self.mode.read:
            raise PermissionError(errno.EBADF, "handle not open for reading", self.name)
        with self._lock:
            return self._live().read(offset, length)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self.mode.write:
            raise PermissionError(errno.EBADF, "handle not open for writing", self.name)
        with self._lock:
            self._live().write(self.file.size if self.mode.append else offset, data)

    def truncate(self, size: int) -> None:
        if not self.mode.write:
            raise PermissionError(errno.EBADF, "handle not open for writing", self.name)
        with self._lock:
            self._live().truncate(size)

    def chmod(self, mode: int) -> None:
        with self._lock:
            os.fchmod(self.file.fd, (mode & 0o7777) | 0o600)

    def set_times(self, atime: int, mtime: int) -> None:
        """Applied at close for writers, so sealing the last chunk does not reset them."""
        with self._lock:
            if self._temp is None:
                os.utime(self.file.fd, (atime, mtime))
            else:
                self._times = (atime, mtime)

    def fstat(self) -> os.stat_result:
        with self._lock:
            return os.fstat(self.file.fd)

    def sync(self) -> None:
        """fsync@openssh.com: make what was written so far durable (in the temporary)."""
        with self._lock:
            if self._temp is not None:
                self._live().flush()
            os.fsync(self.file.fd)

    def close(self) -> None:
        """Seal what is buffered and, for writers, rename the result over the target."""
        with self._lock:
            try:
                if self._temp is not None:
                    self.file.flush()
                    if self._times is not None:
                        os.utime(self.file.fd, self._times)
                    if self._fsync_on_close:
                        os.fsync(self.file.fd)
                    os.rename(self._temp, self.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                    self._temp = None
            finally:
                self._release()

    def abort(self) -> None:
        """Drop the handle without committing: the target keeps its old content."""
        with self._lock:
            self._release()

    def _live(self) -> EncryptedFile:
        """The file, unless this handle is closed: then EBADF, even for a write that would only buffer."""
        if self.file.fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF), self.name)
        return self.file

    def _release(self) -> None:
        """Close the descriptor. A request still holding this handle (the shutdown path
        closes handles under running requests) then fails with EBADF, instead of
        writing to whatever file reuses the descriptor number."""
        fd, self.file.fd = self.file.fd, -1
        if fd >= 0:
            os.close(fd)
        self._discard()

    def _discard(self) -> None:
        if self._temp is not None:
            try:
                os.unlink(self._temp, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            self._temp = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _require_regular(fd: int) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), None)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", None)
    return st


def remove_stale_uploads(root: Path) -> int:
    """Delete temporaries a killed server left behind; returns how many.

    rglob does not descend into symlinked directories, so a user's link never
    leads the cleanup out of the data tree (tests/test_lifecycle.py checks it).
    """
    removed = 0
    for path in root.rglob(TEMP_PREFIX + "*"):
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    return removed
