"""The path jail: resolve a client's virtual path inside the user's root.

Resolution walks one component at a time from an open descriptor of the root,
opening each directory relative to its parent with O_NOFOLLOW. Symlinks are
read and resolved by us, chroot-style: an absolute target starts again at the
user's root and `..` never climbs above it. Because every step is relative to
a descriptor we hold and never follows a link in the kernel, swapping a
directory for a symlink between check and use cannot lead outside the root.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TEMP_PREFIX = ".sftpvault-upload-"  # in-progress uploads: invisible to clients
MAX_SYMLINK_HOPS = 40
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Location:
    """A resolved entry: its parent directory descriptor and its name there."""

    dir_fd: int
    name: str  # "." for the root itself
    vpath: str  # canonical virtual path, as the client should see it


def is_hidden(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def _error(code: int, vpath: str) -> OSError:
    return OSError(code, os.strerror(code), vpath)


class Jail:
    """Resolves virtual paths below one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.root_fd)

    @contextmanager
    def resolve(self, vpath: str, follow: bool = True) -> Iterator[Location]:
        """Resolve `vpath`; the final component need not exist, its parent must.

        With follow=False a final symlink is returned itself (for lstat,
        readlink, remove, rename).
        """
        if "\x00" in vpath:
            raise _error(errno.EINVAL, vpath)
        stack: list[tuple[int, str]] = []  # open directories below the root
        try:
            location = self._walk(vpath, follow, stack)
            yield location
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _walk(self, vpath: str, follow: bool, stack: list[tuple[int, str]]) -> Location:
        todo = deque(vpath.split("/"))
        hops = 0
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if stack:
                    os.close(stack.pop()[0])
                continue
            if is_hidden(name):
                raise _error(errno.ENOENT, vpath)
            parent = stack[-1][0] if stack else self.root_fd
            is_last = not any(part not in ("", ".") for part in todo)
            target = self._link_target(parent, name) if follow or not is_last else None
            if target is not None:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _error(errno.ELOOP, vpath)
                if target.startswith("/"):
                    while stack:
                        os.close(stack.pop()[0])
                todo.extendleft(reversed(target.split("/")))
                continue
            if is_last:
                return Location(parent, name, self._vpath(stack, name))
            try:
                stack.append((os.open(name, _DIR_FLAGS, dir_fd=parent), name))
            except OSError as exc:
                raise _error(exc.errno or errno.ENOENT, vpath) from None
        if not stack:
            return Location(self.root_fd, ".", "/")
        fd, name = stack.pop()
        os.close(fd)
        parent = stack[-1][0] if stack else self.root_fd
        return Location(parent, name, self._vpath(stack, name))

    @staticmethod
    def _link_target(parent: int, name: str) -> str | None:
        try:
            return os.readlink(name, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return None
            raise

    @staticmethod
    def _vpath(stack: list[tuple[int, str]], name: str) -> str:
        return "/" + "/".join([n for _, n in stack] + [name])
