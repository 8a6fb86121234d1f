"""The values file of an indexed file: variable-size values, appended.

Layout of ``values.<number>`` (integers little-endian)::

    offset  size  field
         0    64  file header (see ``framing``), magic ``L2SVALS\\0``,
                  value size 0xFFFFFFFF (variable), generation = the file's
                  number, flags = GC_COPY for a file written by a GC
        64     .  records, one after the other

    record (K = key size, n = value length; 12 + K + n bytes):
         0     4  n
         4     K  key
       4+K     n  value
     4+K+n     4  n again, so the file can be read backwards from its end
     8+K+n     4  crc32 of the 8+K+n bytes before it

A writer reserves the file's blocks up to ``RESERVE_STEP`` past its end
(allocated, the size unchanged: the file holds the same bytes), so most
appends need no block allocation; the reservation is given back when the
file takes no more appends (closed, or left by a GC), and at a writer's
load after a kill (blocks past the end: a truncation to the same size).

A value is written at the end of the file before the index points at it, so
a kill leaves at most a record no index entry refers to (an orphan, never
read) or a record cut short at the end (torn). A read checks the record's
checksum, length and key against the index entry, so a wrong pointer or a
flipped byte is an error, never wrong data.

At a writer's load the store keeps the file as it is when the index points
at its last record (read backwards through the trailing length); otherwise
it cuts the file after the furthest record the index points at: what lies
beyond is orphans and torn bytes, none of it referenced.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence

from ..errors import CannotLoadStore, CannotReadFromStore, CannotWriteToStore
from . import filesystem
from .accel import ValuesTailBase
from .accel import accelerated_reserve as reserve
from .accel import accelerated_value_of_record as value_of_record
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    Finding,
    crc32,
    decode_header,
    parse_header,
    pwrite_all,
    write_framed,
)

MAGIC = b"L2SVALS\0"
VARIABLE_SIZE = 0xFFFFFFFF
LENGTH = struct.Struct("<I")
RECORD_OVERHEAD = 2 * LENGTH.size + CRC_SIZE
MAX_VALUE_SIZE = 0xFFFFFFFF - 1
assert RECORD_OVERHEAD == 12

#: Index entries of an indexed file: offset u64 | length u32 | file number u32 | header.
POINTER = struct.Struct("<QII")
assert POINTER.size == 16

#: Header flag of a values file written by a GC (see ``value_files``).
GC_COPY = 1

#: How far past its end a writer reserves a values file's blocks (when the
#: file system can: see ``reserve`` in ``csrc/files.c``); an append into
#: reserved blocks skips the file system's block allocation.
RESERVE_STEP = 1 << 20

#: Reads of records past a values file's map use ``pread`` until the unmapped
#: tail reaches an eighth of the map or this size; then the file is mapped again.
REMAP_STEP = 16 << 20


def values_expected(expected: Expected) -> Expected:
    """The header fields of a values file for an indexed file's sizes."""
    return Expected(expected.name, expected.key_size, VARIABLE_SIZE, expected.header_size)


class ValuesFile(ValuesTailBase):  # type: ignore[misc]
    """Appends records and reads them back at their offsets.

    Reads go through a read-only map of the file when the C accelerator
    checks the records (one call: bounds, length, key, checksum), else
    through ``pread``. With the accelerator, the tail (``_fd``, ``end``,
    ``_reserved``, ``_fsync``, ``_key_size``) lives in the C base, whose
    ``append`` writes the common record in one call and hands anything
    else to :meth:`_append_in_python`.
    """

    def __init__(
        self,
        path: str,
        expected: Expected,
        *,
        readonly: bool,
        fsync: bool,
        number: int = 0,
        flags: int = 0,
    ) -> None:
        self.path = path
        self.number = number
        self.flags = flags
        self._expected = values_expected(expected)
        self._name = expected.name
        self._key_size = expected.key_size
        self._fsync = bool(fsync)
        self._readonly = readonly
        self._fd = -1
        self._map: mmap.mmap | None = None
        self.end = HEADER_SIZE
        #: Where the reserved blocks end; 0 where reserving cannot be done.
        self._reserved = HEADER_SIZE
        #: Whether blocks past the end may be allocated (a reserve was asked).
        self._holds_reserve = False
        if readonly:
            self._open_readonly()
        else:
            self._open_writer()

    # -- opening

    def _open_readonly(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing appended yet: opened on a later sync()
        try:
            with filesystem.naming(self.path):
                self._check_header(fd)
                self.end = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open_writer(self) -> None:
        if not os.path.exists(self.path):
            self._create()
        fd = os.open(self.path, os.O_RDWR)
        try:
            with filesystem.naming(self.path):
                self._check_header(fd)
                status = os.fstat(fd)
            self.end = status.st_size
            if status.st_blocks * 512 > status.st_size + status.st_blksize:
                # blocks past the end: a reservation a kill left, given back
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, status.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def last_record(self) -> tuple[int, bytes, int] | None:
        """``(offset, key, length)`` of a whole record ending the file, else None."""
        overhead = RECORD_OVERHEAD + self._key_size
        if self.end < HEADER_SIZE + overhead:
            return None
        with filesystem.naming(self.path):
            (length,) = LENGTH.unpack(os.pread(self._fd, LENGTH.size, self.end - 8))
            start = self.end - overhead - length
            if start < HEADER_SIZE:
                return None
            record = os.pread(self._fd, overhead + length, start)
        if crc32(record) != CRC_RESIDUE or LENGTH.unpack_from(record)[0] != length:
            return None
        return start, record[LENGTH.size : LENGTH.size + self._key_size], length

    def record_end(self, offset: int, length: int) -> int:
        """Where the record of a value of ``length`` bytes at ``offset`` ends."""
        return offset + RECORD_OVERHEAD + self._key_size + length

    def cut(self, end: int) -> None:
        """Cut the file at ``end`` (a writer's load dropping an unreferenced tail).

        Always fsynced: records appended from there must not be followed,
        after a power loss, by the old bytes they replaced.
        """
        self._map = None
        with filesystem.naming(self.path):
            os.ftruncate(self._fd, end)
            filesystem.fsync(self._fd)
        self.end = end
        self._reserved = min(self._reserved, end)
        self._holds_reserve = False

    def _create(self) -> None:
        e = self._expected
        header = FileHeader(
            MAGIC, e.key_size, e.value_size, e.header_size, generation=self.number, flags=self.flags
        )
        temporary = self.path + ".tmp"
        fd = filesystem.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with filesystem.naming(temporary):
                pwrite_all(fd, header.encode(), 0)
                filesystem.fsync(fd)
        finally:
            os.close(fd)
        filesystem.rename(temporary, self.path)
        filesystem.fsync_directory(os.path.dirname(self.path))

    def _check_header(self, fd: int) -> None:
        header = decode_header(os.pread(fd, HEADER_SIZE, 0), MAGIC, self.path, self._expected)
        if header.generation != self.number:
            raise CannotLoadStore(
                f"{self.path} says it is values file {header.generation} (file {self.path}, "
                "offset 0)",
                name=self._name,
                path=self.path,
            )
        self.flags = header.flags

    # -- reading and writing

    def read(self, offset: int, length: int, key: bytes) -> bytes:
        """The value of ``length`` bytes recorded for ``key`` at ``offset``."""
        size = RECORD_OVERHEAD + self._key_size + length
        mapped = self._map
        if mapped is None or offset + size > len(mapped):
            mapped = self._map_covering(offset + size)
        if mapped is not None:
            assert value_of_record is not None
            value = value_of_record(mapped, offset, length, key)
            if value is None:
                raise self._read_error("value record does not match its index entry", offset)
            return value
        if self._fd < 0:
            raise self._read_error("values file missing", offset)
        record = os.pread(self._fd, size, offset)
        key_end = LENGTH.size + self._key_size
        if (
            len(record) != size
            or crc32(record) != CRC_RESIDUE
            or LENGTH.unpack_from(record)[0] != length
            or record[LENGTH.size : key_end] != key
        ):
            raise self._read_error("value record does not match its index entry", offset)
        return record[key_end : key_end + length]

    def _map_covering(self, needed: int) -> mmap.mmap | None:
        """A map of the file covering ``needed`` bytes, if one is worth making; else None.

        Records past the map are read with ``pread`` until the unmapped tail
        is an eighth of the map, or ``REMAP_STEP``; then the file is mapped
        again, whole (a map only ever covers bytes already written).
        """
        if value_of_record is None or self._fd < 0:
            return None
        mapped = self._map
        mapped_size = len(mapped) if mapped is not None else 0
        try:
            size = os.fstat(self._fd).st_size if self._readonly else self.end
            if needed > size or size - mapped_size < min(REMAP_STEP, mapped_size // 8):
                return None
            mapped = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # no map to be had: pread, which reports errors
            return None
        self._map = mapped
        return mapped

    def _read_error(self, what: str, offset: int) -> CannotReadFromStore:
        return CannotReadFromStore(
            f"{what} (file {self.path}, offset {offset})",
            name=self._name,
            path=self.path,
            offset=offset,
        )

    def _append_in_python(self, key: bytes, value: bytes) -> int:
        """Write a record at the end of the file; return its offset."""
        length = len(value)
        if length > MAX_VALUE_SIZE:
            raise CannotWriteToStore(
                f"value of {length} bytes is too large", name=self._name, path=self.path
            )
        packed = LENGTH.pack(length)
        offset = self.end
        try:
            if offset + RECORD_OVERHEAD + self._key_size + length > self._reserved > 0:
                self._reserve(offset + RECORD_OVERHEAD + self._key_size + length)
            size = write_framed(self._fd, offset, packed, key, value, packed)
            if self._fsync:
                filesystem.fsync(self._fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
                self._reserved = min(self._reserved, offset)
                self._holds_reserve = False
            raise CannotWriteToStore(
                f"cannot append value: {error}", name=self._name, path=self.path
            ) from error
        self.end = offset + size
        return offset

    def _append_entry_in_python(self, key: bytes, value: bytes, header: bytes) -> bytes:
        """Append a record; return the index entry pointing at it (``POINTER``, ``header``)."""
        return POINTER.pack(self.append(key, value), len(value), self.number) + header

    if not hasattr(ValuesTailBase, "append"):  # no accelerator: the Python appends
        append = _append_in_python
        append_entry = _append_entry_in_python

    def append_entries(self, writes: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """Append ``(key, value, header)`` records, not fsynced whatever ``fsync`` says (a
        batch's: its journal holds them); the index entries pointing at them."""
        fsync, self._fsync = self._fsync, False
        try:
            return [self.append_entry(key, value, header) for key, value, header in writes]
        finally:
            self._fsync = fsync

    def _reserve(self, needed: int) -> None:
        """Reserve the blocks up to ``RESERVE_STEP`` past ``needed``."""
        end = needed + RESERVE_STEP
        done = None if reserve is None else reserve(self._fd, self.end, end - self.end)
        if done is None:
            self._reserved = 0  # cannot be done here: appends allocate as they go
        else:
            # Failed (no room, interrupted): tried again a step further on.
            self._reserved = end
            self._holds_reserve = True

    def release_reserve(self) -> None:
        """Give back the blocks reserved past the end (the size stays); no append may run."""
        if self._fd >= 0 and not self._readonly and self._holds_reserve:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.end)
            self._holds_reserve = False
            self._reserved = min(self._reserved, self.end)

    @property
    def opened(self) -> bool:
        """False for a read-only file that did not exist when opened."""
        return self._fd >= 0

    def sync(self) -> None:
        """Make every appended record durable."""
        filesystem.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        self._map = None
        if self._fd >= 0:
            self.release_reserve()
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # A values file a GC deleted stays open while a snapshot still reads it.
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def check_values_file(
    path: str, name: str = "", referenced_end: int | None = None
) -> Iterator[Finding]:
    """Check the framing and checksum of every record of the values file at ``path``.

    With ``referenced_end``, where the last record the index points at
    ends: a break in the chain of records before it is a problem, anything
    after it a note (torn, or left by a power loss: never read, and cut off
    by the next writer load of the file appends go to). Without it: a torn
    tail (the last record cut short, or zero-filled) is a note; a break in
    the chain of records followed by a whole record is a problem.
    """
    with open(path, "rb") as file, filesystem.naming(path):
        fd = file.fileno()
        try:
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name)
        except CannotLoadStore as error:
            yield Finding(path, 0, error.reason)
            return
        if header.value_size != VARIABLE_SIZE:
            yield Finding(path, 0, f"value size {header.value_size} in a values file header")
            return
        overhead = RECORD_OVERHEAD + header.key_size
        size = os.fstat(fd).st_size
        offset = HEADER_SIZE
        whole = True
        while offset < size:
            if offset + overhead > size:
                whole = False
                break
            (length,) = LENGTH.unpack(os.pread(fd, LENGTH.size, offset))
            if offset + overhead + length > size:
                whole = False
                break
            record = os.pread(fd, overhead + length, offset)
            if (
                crc32(record) != CRC_RESIDUE
                or LENGTH.unpack_from(record, len(record) - 8)[0] != length
            ):
                break
            offset += overhead + length
        if offset >= size:
            return
        if referenced_end is not None:
            if offset < referenced_end:
                yield Finding(
                    path,
                    offset,
                    "value record checksum or framing mismatch before the end of the "
                    f"records the index points at ({referenced_end})",
                )
            else:
                yield Finding(
                    path,
                    offset,
                    f"{size - offset} bytes after the records the index points at "
                    "(torn, or left by a power loss; never read)",
                    False,
                )
            return
        rest = os.pread(fd, size - offset, offset)
        if not any(rest):
            yield Finding(path, offset, "zero-filled tail (torn; never referenced)", False)
        elif whole or _record_ends_file(fd, size, offset, overhead):
            yield Finding(path, offset, "value record checksum or framing mismatch")
        else:
            yield Finding(
                path,
                offset,
                f"torn record at the end, {size - offset} bytes (never referenced)",
                False,
            )


def _record_ends_file(fd: int, size: int, after: int, overhead: int) -> bool:
    """Whether a whole, valid record that starts after ``after`` ends the file."""
    (length,) = LENGTH.unpack(os.pread(fd, LENGTH.size, size - 8))
    start = size - overhead - length
    if start <= after:
        return False
    record = os.pread(fd, overhead + length, start)
    return crc32(record) == CRC_RESIDUE and LENGTH.unpack_from(record)[0] == length
