"""UserFS: the file system one user sees, over their encrypted directory.

Every operation takes a virtual path, resolves it through the Jail and acts
relative to the resolved parent descriptor, never following a symlink in the
kernel. Sizes reported are plaintext sizes, derived from ciphertext sizes
without decrypting. Errors are OSError (with errno) or IntegrityError; the
SFTP layer maps them to status codes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from sftpvault import format as fmt
from sftpvault.errors import IntegrityError
from sftpvault.keyring import UserKeys
from sftpvault.vfs.jail import Jail, is_hidden
from sftpvault.vfs.openfile import OpenFile, OpenMode


@dataclass(frozen=True)
class Attrs:
    """What SFTP shows of a file: plaintext size, ownership, mode and times."""

    size: int
    uid: int
    gid: int
    mode: int
    atime: int
    mtime: int
    nlink: int = 1

    @classmethod
    def from_stat(cls, st: os.stat_result, size: int | None = None) -> Attrs:
        """Attributes of a stat result; `size` overrides (an open handle knows its plaintext size)."""
        if size is None and stat.S_ISREG(st.st_mode):
            try:
                size = fmt.plain_size(st.st_size)
            except IntegrityError:
                size = 0  # damaged file: reading it fails; `sftpvault verify` names it
        return cls(
            st.st_size if size is None else size,
            st.st_uid,
            st.st_gid,
            st.st_mode,
            int(st.st_atime),
            int(st.st_mtime),
            st.st_nlink,
        )


@dataclass(frozen=True)
class SetAttrs:
    """The attributes a client asked to change; None means leave as is."""

    size: int | None = None
    mode: int | None = None
    times: tuple[int, int] | None = None


def _not_permitted(what: str, vpath: str) -> OSError:
    return PermissionError(errno.EPERM, what, vpath)


class UserFS:
    """One user's jailed, encrypting file system."""

    def __init__(self, root: Path, keys: UserKeys, fsync_on_close: bool = False) -> None:
        self.jail = Jail(root)
        self.keys = keys
        self.fsync_on_close = fsync_on_close

    def close(self) -> None:
        self.jail.close()

    # -- metadata ------------------------------------------------------------

    def stat(self, vpath: str, follow: bool = True) -> Attrs:
        with self.jail.resolve(vpath, follow) as loc:
            return Attrs.from_stat(os.stat(loc.name, dir_fd=loc.dir_fd, follow_symlinks=False))

    def realpath(self, vpath: str) -> str:
        with self.jail.resolve(vpath) as loc:
            return loc.vpath

    def listdir(self, vpath: str) -> list[tuple[str, Attrs]]:
        with self.jail.resolve(vpath) as loc:
            fd = os.open(loc.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc.dir_fd)
        here = Attrs.from_stat(os.fstat(fd))
        entries = [(".", here), ("..", here)]
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if is_hidden(entry.name):
                        continue
                    try:
                        entries.append((entry.name, Attrs.from_stat(entry.stat(follow_symlinks=False))))
                    except FileNotFoundError:
                        continue  # removed while listing
        finally:
            os.close(fd)
        return entries

    def setattrs(self, vpath: str, attrs: SetAttrs) -> None:
        with self.jail.resolve(vpath) as loc:
            if attrs.size is not None:
                handle = OpenFile(loc.dir_fd, loc.name, OpenMode(write=True), self.keys, 0o600, self.fsync_on_close)
                try:
                    handle.truncate(attrs.size)
                    if attrs.times is not None:
                        handle.set_times(*attrs.times)
                finally:
                    handle.close()
                attrs = replace(attrs, size=None, times=None)
            if attrs.mode is not None:
                fd = os.open(loc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc.dir_fd)
                try:
                    mode = attrs.mode & 0o7777
                    os.fchmod(fd, mode if stat.S_ISDIR(os.fstat(fd).st_mode) else mode | 0o600)
                finally:
                    os.close(fd)
            if attrs.times is not None:
                os.utime(loc.name, attrs.times, dir_fd=loc.dir_fd, follow_symlinks=False)

    def statvfs(self, vpath: str) -> os.statvfs_result:
        with self.jail.resolve(vpath) as loc:
            fd = os.open(loc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc.dir_fd)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    # -- files -----------------------------------------------------------------

    def open(self, vpath: str, mode: OpenMode, file_mode: int = 0o644) -> OpenFile:
        with self.jail.resolve(vpath) as loc:
            if loc.name == ".":
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), vpath)
            return OpenFile(loc.dir_fd, loc.name, mode, self.keys, file_mode, self.fsync_on_close)

    def remove(self, vpath: str) -> None:
        with self.jail.resolve(vpath, follow=False) as loc:
            if stat.S_ISDIR(os.stat(loc.name, dir_fd=loc.dir_fd, follow_symlinks=False).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), vpath)
            os.unlink(loc.name, dir_fd=loc.dir_fd)

    def mkdir(self, vpath: str, mode: int = 0o755) -> None:
        with self.jail.resolve(vpath, follow=False) as loc:
            os.mkdir(loc.name, (mode & 0o777) | 0o700, dir_fd=loc.dir_fd)

    def rmdir(self, vpath: str) -> None:
        with self.jail.resolve(vpath, follow=False) as loc:
            if loc.name == ".":
                raise _not_permitted("cannot remove the root directory", vpath)
            os.rmdir(loc.name, dir_fd=loc.dir_fd)

    def rename(self, old: str, new: str, overwrite: bool) -> None:
        """SFTP rename refuses an existing target; posix-rename replaces it."""
        with self.jail.resolve(old, follow=False) as src, self.jail.resolve(new, follow=False) as dst:
            if "." in (src.name, dst.name):
                raise _not_permitted("cannot rename the root directory", old)
            if not overwrite and _exists(dst.dir_fd, dst.name):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)
            os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)

    def hardlink(self, old: str, new: str) -> None:
        with self.jail.resolve(old, follow=False) as src, self.jail.resolve(new, follow=False) as dst:
            os.link(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd, follow_symlinks=False)

    def symlink(self, target: str, vpath: str) -> None:
        """Targets are stored as given and resolved inside the jail, chroot-style."""
        if "\x00" in target or any(is_hidden(part) for part in target.split("/")):
            raise OSError(errno.EINVAL, "invalid symlink target", target)
        with self.jail.resolve(vpath, follow=False) as loc:
            os.symlink(target, loc.name, dir_fd=loc.dir_fd)

    def readlink(self, vpath: str) -> str:
        with self.jail.resolve(vpath, follow=False) as loc:
            return os.readlink(loc.name, dir_fd=loc.dir_fd)

    def walk_files(self, include_uploads: bool = False) -> Iterator[tuple[int, str, str]]:
        """(parent fd, name, virtual path) of every regular file, never following a link.

        Iterate lazily: a directory's descriptor is closed once the walk leaves it.

        With include_uploads, in-progress uploads (hidden temporaries) are
        included, as key rotation must see every header on disk.
        """
        yield from self._walk(self.jail.root_fd, "", include_uploads)

    def _walk(self, dir_fd: int, prefix: str, include_uploads: bool) -> Iterator[tuple[int, str, str]]:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if is_hidden(entry.name) and not include_uploads:
                continue
            vpath = f"{prefix}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(
                        entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                    )
                except OSError:
                    continue  # replaced or removed while walking
                try:
                    yield from self._walk(sub, vpath, include_uploads)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False):
                yield dir_fd, entry.name, vpath

    def read_header(self, dir_fd: int, name: str, writable: bool = False) -> tuple[int, fmt.Header]:
        """An open descriptor on a file and its parsed header (caller closes the descriptor)."""
        fd = os.open(name, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return fd, fmt.Header.parse(os.pread(fd, fmt.HEADER_SIZE, 0))
        except BaseException:
            os.close(fd)
            raise

    def rewrap_header(self, dir_fd: int, name: str, new_dek_id: bytes) -> bool:
        """Move one file's key under the DEK `new_dek_id`; the chunks are not touched."""
        fd, header = self.read_header(dir_fd, name, writable=True)
        try:
            if header.dek_id == new_dek_id:
                return False
            moved = fmt.rewrap_header(header, self.keys.get(header.dek_id), self.keys.get(new_dek_id), new_dek_id)
            os.pwrite(fd, moved.to_bytes(), 0)  # same size, one write: never a half header
            return True
        finally:
            os.close(fd)

    def dek_ids_in_use(self) -> set[bytes]:
        """DEK ids named by any file header, in-progress uploads included."""
        used = set()
        for dir_fd, name, _ in self.walk_files(include_uploads=True):
            try:
                fd, header = self.read_header(dir_fd, name)
            except (OSError, IntegrityError):
                continue  # vanished, or a temporary whose header is not written yet
            os.close(fd)
            used.add(header.dek_id)
        return used


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
