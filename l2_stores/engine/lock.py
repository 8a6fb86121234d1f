"""The writer lock: one ``READ_WRITE`` store per path, across processes.

The lock is an exclusive, non-blocking OS lock (``flock`` through
portalocker) on a lock file, held for as long as the store is open. Such a
lock conflicts with a second open of the same file in the same process too.
The lock file holds no store data, only who holds it (little-endian)::

    offset  size  field
         0     8  magic ``L2SLOCK\\0``
         8     2  format version
        10     2  flags: 1 = LOADED, the holder's load is done (0 while it recovers)
        12     4  pid of the holder
        16     4  crc32 of bytes 0..15

Nothing in it is needed to load a store (a power loss may tear it); a
reader only uses it to know that a live writer has finished its load.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import IO

import portalocker

from ..errors import CannotLoadStore, StoreLockedError
from . import filesystem
from .framing import FORMAT_VERSION, crc_ok, with_crc

MAGIC = b"L2SLOCK\0"
_LAYOUT = struct.Struct("<8sHHI")
LOCK_FILE_SIZE = 20
assert _LAYOUT.size + 4 == LOCK_FILE_SIZE
#: Flag of the lock file: the holder has loaded the store (its recovery is done).
LOADED = 1


class WriterLock:
    """An exclusive lock on ``path``, released by :meth:`release`."""

    def __init__(self, path: str, name: str, store_path: str) -> None:
        self.path = path
        try:
            # Not O_APPEND: on Linux a pwrite to an O_APPEND file goes to its end.
            fd = filesystem.open_file(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # umask
            file: IO[bytes] = open(fd, "r+b", buffering=0)  # noqa: SIM115 - held while locked
        except OSError as error:
            raise CannotLoadStore(
                f"cannot open lock file: {error}", name=name, path=store_path
            ) from error
        try:
            portalocker.lock(
                file, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
            )
        except portalocker.LockException as error:
            file.close()
            holder = holder_pid(path)
            who = f" (pid {holder})" if holder is not None else ""
            raise StoreLockedError(
                f"already opened for writing by another store{who}", name=name, path=store_path
            ) from error
        try:
            _record_holder(file.fileno())
        except BaseException as error:
            portalocker.unlock(file)
            file.close()
            if not isinstance(error, OSError):
                raise
            raise CannotLoadStore(
                f"cannot write lock file {path}: {error}", name=name, path=store_path
            ) from error
        self._file: IO[bytes] | None = file

    def loaded(self) -> None:
        """Record that this holder's load is done; readers may trust what it writes now."""
        if self._file is not None:
            _record_holder(self._file.fileno(), LOADED)

    def release(self) -> None:
        """Release the lock; the lock file stays."""
        if self._file is not None:
            try:
                portalocker.unlock(self._file)
            finally:
                self._file.close()
                self._file = None


def _record_holder(fd: int, flags: int = 0) -> None:
    """Write this process as the holder with ``flags``, in place, unless the file already
    names this process (and, for LOADED, says it).

    A new holder in the process that held the lock last writes nothing, so
    a load that fails changes nothing (its LOADED flag, left from before, is
    only trusted while a process holds the lock). In place rather than
    truncated and rewritten: truncating a page the kernel is writing back
    waits for that write, milliseconds after a merge or a close has written
    much (a reopen went from 1 to 16 ms).
    """
    record = with_crc(_LAYOUT.pack(MAGIC, FORMAT_VERSION, flags, os.getpid()))
    found = os.pread(fd, LOCK_FILE_SIZE + 1, 0)
    if found == record:
        return
    if (
        not flags
        and len(found) == LOCK_FILE_SIZE
        and crc_ok(found)
        and found[:8] == MAGIC
        and _LAYOUT.unpack(found[:-4])[3] == os.getpid()
    ):
        return
    if os.pwrite(fd, record, 0) != len(record):
        raise OSError(errno.EIO, "short write")
    if os.fstat(fd).st_size > LOCK_FILE_SIZE:
        os.ftruncate(fd, LOCK_FILE_SIZE)


def _holder_record(path: str) -> tuple[int, int] | None:
    """``(flags, pid)`` written by the last holder of the lock at ``path``, if readable."""
    try:
        with open(path, "rb") as file:
            raw = file.read(LOCK_FILE_SIZE)
    except OSError:
        return None
    if len(raw) != LOCK_FILE_SIZE or not crc_ok(raw) or raw[:8] != MAGIC:
        return None
    _, _, flags, pid = _LAYOUT.unpack(raw[:-4])
    return int(flags), int(pid)


def holder_pid(path: str) -> int | None:
    """The pid written by the last holder of the lock at ``path``, if readable."""
    record = _holder_record(path)
    return record[1] if record is not None else None


def loaded_writer(path: str) -> bool:
    """True when a live process holds the lock at ``path`` and has finished its load.

    What such a writer wrote since is whole in the page cache: only a power
    loss, which stops every reader too, could undo it.
    """
    holder = lock_holder(path)
    record = _holder_record(path)
    return holder is not None and record is not None and record == (LOADED, holder)


def lock_holder(path: str) -> int | None:
    """The pid of the process holding the writer lock at ``path``, None when nobody does.

    Reads ``/proc/locks`` (Linux), which takes no lock, so it never makes a
    starting writer fail; elsewhere it falls back to :func:`is_locked` and
    the pid written in the lock file.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        with open("/proc/locks") as locks:
            table = locks.read()
    except OSError:
        return holder_pid(path) if is_locked(path) else None
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" ("->" marks a waiter)
        waiter = "->" in fields
        if not waiter and len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def is_locked(path: str) -> bool:
    """True when some process holds the writer lock at ``path`` (probes with a shared lock)."""
    try:
        file = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return False
    with file:
        try:
            portalocker.lock(
                file, portalocker.LockFlags.SHARED | portalocker.LockFlags.NON_BLOCKING
            )
        except portalocker.LockException:
            return True
        portalocker.unlock(file)
        return False
