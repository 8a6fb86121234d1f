"""The file-system operations that decide what survives a crash, behind one seam.

Every file and directory the stores create, every ``fsync``, every rename and
every unlink goes through the :class:`FileSystem` installed here (by default
the real one, :class:`OsFileSystem`). Reads and the writes of bytes do not:
they go straight to the OS, from Python or from the C accelerator (``pwrite``,
``pwritev``, stores through a shared map), and a layer that models a power
loss sees them in the files' contents.

Tests install a fault-injection layer with :func:`installed` (the port of
LevelDB's ``Env`` and RocksDB's ``FileSystem`` seams): it remembers what each
``fsync`` made durable and, at a simulated power loss, keeps only that, plus
whatever part of the rest it chooses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def naming(path: str) -> Iterator[None]:
    """Give ``path`` to the OSErrors raised inside that name no file (calls on a descriptor)."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            error.filename = path
        raise


class FileSystem:
    """The operations that change what a power loss leaves; each as its ``os`` namesake."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """``os.open``; used for every open that may create the file."""
        return os.open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        """``os.fsync``: the file's bytes and size are durable once it returns."""
        os.fsync(fd)

    def fsync_directory(self, path: str) -> None:
        """Make the entries of directory ``path`` durable (creations, renames, unlinks)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, source: str, target: str) -> None:
        """``os.replace``: ``target`` names ``source``'s file, atomically; same directory."""
        os.replace(source, target)

    def unlink(self, path: str) -> None:
        """``os.unlink``."""
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        """``os.mkdir``."""
        os.mkdir(path, 0o777)

    def exchange(self, first: str, second: str) -> None:
        """Swap the entries ``first`` and ``second`` (files or directories) atomically:
        Linux's ``renameat2(RENAME_EXCHANGE)``; OSError where it is not supported."""
        renameat2 = _renameat2()
        if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), 2) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number), first, None, second)


_AT_FDCWD = -100


def _unsupported(*_: object) -> int:
    ctypes.set_errno(errno.ENOSYS)
    return -1


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, or a stand-in failing with ENOSYS where it has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return _unsupported
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class OsFileSystem(FileSystem):
    """The real file system (every method is the ``os`` call)."""


_installed: FileSystem = OsFileSystem()
_install_lock = threading.Lock()


def current() -> FileSystem:
    """The file system the stores use now."""
    return _installed


@contextmanager
def installed(file_system: FileSystem) -> Iterator[FileSystem]:
    """Make ``file_system`` the one every store of this process uses, until the block ends.

    For tests: stores opened before or kept after the block are not told.
    """
    global _installed
    with _install_lock:
        previous, _installed = _installed, file_system
    try:
        yield file_system
    finally:
        with _install_lock:
            _installed = previous


# The calls the engine makes, each through the installed file system.


def open_file(path: str, flags: int, mode: int = 0o644) -> int:
    """Open ``path`` (see :meth:`FileSystem.open`)."""
    return _installed.open(path, flags, mode)


def fsync(fd: int) -> None:
    """Make the file of ``fd`` durable (see :meth:`FileSystem.fsync`)."""
    _installed.fsync(fd)


def fsync_directory(path: str) -> None:
    """Make the entries of directory ``path`` durable."""
    _installed.fsync_directory(path)


def rename(source: str, target: str) -> None:
    """Rename ``source`` to ``target``, replacing it (see :meth:`FileSystem.rename`)."""
    _installed.rename(source, target)


def unlink(path: str) -> None:
    """Delete the file ``path``."""
    _installed.unlink(path)


def make_directories(path: str) -> None:
    """Create ``path`` and its missing parents, durably: each new entry's parent is fsynced.

    Whatever ``fsync`` setting a store has, the directories holding its files
    must outlive a power loss: a merge's fsynced data file is lost with a
    directory whose own entry never reached the disk.
    """
    missing = []
    current_path = os.path.abspath(path)
    while not os.path.isdir(current_path):
        missing.append(current_path)
        parent = os.path.dirname(current_path)
        if parent == current_path:
            break
        current_path = parent
    for directory in reversed(missing):
        try:
            _installed.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else, who syncs it
        _installed.fsync_directory(os.path.dirname(directory))


def exchange(first: str, second: str) -> None:
    """Swap ``first`` and ``second`` atomically (see :meth:`FileSystem.exchange`)."""
    _installed.exchange(first, second)


def fsync_tree(path: str) -> None:
    """Make every file and directory under ``path`` (or the file ``path``) durable."""
    if not os.path.isdir(path):
        with open(path, "rb") as file:
            _installed.fsync(file.fileno())
        return
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                _installed.fsync(file.fileno())
        _installed.fsync_directory(root)


def remove_tree(path: str) -> None:
    """Delete the file or the directory tree ``path``, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            _installed.unlink(path)
