"""The growing end of an append-only file, written through a shared map.

A writer appends framed records (``framing.framed``) to the end of a file.
Rather than one ``pwrite`` per record, the file is extended ahead of the
records by a run of zeros (``GROWTH_STEP`` bytes, written with ``pwrite``,
so that a full disk is an error now and never a ``SIGBUS`` later) and that
run is mapped shared and writable: a record is stored into the OS's page
cache by one copy, no system call. A kill after the copy keeps the record
(the pages belong to the file, not to the process); ``sync`` makes it
durable.

So between a kill and the next writer load, a file is::

    records | perhaps one record cut short | zeros, at least one, to the end

(the map stops one byte short of the end of the file, so a record cut short
is always followed by a zero). Readers take a record that fails its check
and is followed by nothing but zeros, one or more, for a torn tail. A sealed
file (closed by its writer) ends at its last record, as a file written with
``pwrite`` does, so there a failing last record is corruption.

Where no map can be had, records are written with ``pwrite``
(``framing.write_framed``), as they are with no zero run at all.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys

from .framing import CRC_SIZE, pwrite_all, store_framed, write_framed

#: Zeros written ahead of the records each time the mapped run is used up.
GROWTH_STEP = 256 << 10

_ZEROS = bytes(GROWTH_STEP)

#: ``madvise`` advice that faults a range in writable in one call (Linux 5.14+;
#: not named by Python 3.11's ``mmap``); None once the kernel refused it.
_populate_write: int | None = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None
)

#: Whether ``fsync`` alone makes the writes to a shared map durable
#: (elsewhere ``msync`` comes first, as POSIX asks).
_FSYNC_COVERS_MAPS = sys.platform.startswith("linux")


class FileTail:
    """Appends records at ``end`` of the file open as ``fd`` (the caller's to close)."""

    def __init__(self, fd: int, end: int, *, growth_step: int | None = None) -> None:
        self.end = end
        self._fd = fd
        self._step = GROWTH_STEP if growth_step is None else growth_step
        self._file_size = os.fstat(fd).st_size
        self._map: mmap.mmap | None = None
        self._map_start = 0  # file offset of the map's first byte
        self._mappable = True

    def append(self, *parts: bytes) -> int:
        """Store ``framed(*parts)`` at ``end``, advance ``end``; return the record's offset.

        Raises OSError when the file cannot grow, having stored nothing and
        left the file as it was.
        """
        offset = self.end
        mapped = self._map
        try:
            if mapped is None:
                raise ValueError("no map yet")
            size = store_framed(mapped, offset - self._map_start, *parts)
        except ValueError:  # past the mapped run, or no map
            size = self._append_grown(offset, parts)
        self.end = offset + size
        return offset

    def _append_grown(self, offset: int, parts: tuple[bytes, ...]) -> int:
        if self._mappable:
            mapped = self._grow(offset + sum(map(len, parts)) + CRC_SIZE)
            if mapped is not None:
                return store_framed(mapped, offset - self._map_start, *parts)
        try:
            return write_framed(self._fd, offset, *parts)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            raise

    def _grow(self, needed: int) -> mmap.mmap | None:
        """A map of the zeros up to ``needed`` bytes and beyond; None when no map can be had.

        The map stops one byte short of the end of the file: a record is
        never stored against the end, so a record cut short is always
        followed by a zero.
        """
        old_size = self._file_size
        if needed >= old_size:
            size = needed + self._step
            try:
                for at in range(old_size, size, len(_ZEROS)):
                    pwrite_all(self._fd, _ZEROS[: min(len(_ZEROS), size - at)], at)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, old_size)
                raise
            self._file_size = size
        self._unmap()
        start = self.end - self.end % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, self._file_size - 1 - start, offset=start)
        except (OSError, ValueError):
            self._mappable = False
            self._cut_zeros()
            return None
        self._map, self._map_start = mapped, start
        _populate(mapped, self.end - start)
        return mapped

    def sync(self) -> None:
        """Make every record appended so far durable."""
        if self._map is not None and not _FSYNC_COVERS_MAPS:
            self._map.flush()
        os.fsync(self._fd)

    def take_back(self, offset: int) -> None:
        """Undo the appends from ``offset`` on (zeroed in the map, cut off the file)."""
        mapped = self._map
        if mapped is not None and offset >= self._map_start:
            mapped[offset - self._map_start : self.end - self._map_start] = bytes(self.end - offset)
        else:
            self._unmap()
            os.ftruncate(self._fd, offset)
            self._file_size = offset
        self.end = offset

    def seal(self) -> None:
        """Drop the map and the zeros past ``end``: the file ends at its last record."""
        self._unmap()
        self._cut_zeros()

    def _cut_zeros(self) -> None:
        if self._file_size > self.end:
            os.ftruncate(self._fd, self.end)
            self._file_size = self.end

    def _unmap(self) -> None:
        mapped, self._map = self._map, None
        if mapped is not None:
            mapped.close()


def _populate(mapped: mmap.mmap, start: int) -> None:
    """Fault the map in from ``start`` now, in one call rather than a fault per page."""
    global _populate_write
    if _populate_write is None:
        return
    start -= start % mmap.PAGESIZE
    if start >= len(mapped):
        return
    try:
        mapped.madvise(_populate_write, start, len(mapped) - start)
    except OSError:  # EINVAL: an older kernel
        _populate_write = None
