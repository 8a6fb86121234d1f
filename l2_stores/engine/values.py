"""The values file of an indexed file: variable-size values, appended.

Layout of ``values.<generation>`` (integers little-endian)::

    offset  size  field
         0    64  file header (see ``framing``), magic ``L2SVALS\\0``,
                  value size 0xFFFFFFFF (variable)
        64     .  records, one after the other

    record (K = key size, n = value length; 12 + K + n bytes):
         0     4  n
         4     K  key
       4+K     n  value
     4+K+n     4  n again, so the file can be read backwards from its end
     8+K+n     4  crc32 of the 8+K+n bytes before it

A value is written at the end of the file before the index points at it, so
a kill leaves at most a record no index entry refers to (an orphan, never
read) or a record cut short at the end (torn). A read checks the record's
checksum, length and key against the index entry, so a wrong pointer or a
flipped byte is an error, never wrong data.

At a writer's load, the last record is checked through its trailing length.
If that fails the tail is torn: the file is read forwards from the start,
record by record, and cut after the last whole one; a bad record before the
tail is corruption.
"""

from __future__ import annotations

import contextlib
import os
import struct

from ..errors import CannotLoadStore, CannotReadFromStore, CannotWriteToStore
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    crc32,
    decode_header,
    fsync_directory,
)

MAGIC = b"L2SVALS\0"
VARIABLE_SIZE = 0xFFFFFFFF
LENGTH = struct.Struct("<I")
RECORD_OVERHEAD = 2 * LENGTH.size + CRC_SIZE
MAX_VALUE_SIZE = 0xFFFFFFFF - 1
assert RECORD_OVERHEAD == 12

#: Index entries of an indexed file: offset u64 | length u32 | header bytes.
POINTER = struct.Struct("<QI")


def values_expected(expected: Expected) -> Expected:
    """The header fields of a values file for an indexed file's sizes."""
    return Expected(expected.name, expected.key_size, VARIABLE_SIZE, expected.header_size)


class ValuesFile:
    """Appends records and reads them back at their offsets (``pread``/``pwrite``)."""

    def __init__(self, path: str, expected: Expected, *, readonly: bool, fsync: bool) -> None:
        self.path = path
        self._expected = values_expected(expected)
        self._name = expected.name
        self._key_size = expected.key_size
        self._fsync = fsync
        self._readonly = readonly
        self._fd = -1
        self.end = self.valid_end = HEADER_SIZE
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
            self._check_header(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open_writer(self) -> None:
        if not os.path.exists(self.path):
            self._create()
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._check_header(fd)
            size = os.fstat(fd).st_size
            self.valid_end = self._valid_end(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.end = size

    @property
    def torn_bytes(self) -> int:
        """Bytes after the last whole record, found at a writer's load."""
        return self.end - self.valid_end

    def cut_torn_tail(self) -> None:
        """Cut the file after its last whole record (once the index agrees)."""
        os.ftruncate(self._fd, self.valid_end)
        if self._fsync:
            os.fsync(self._fd)
        self.end = self.valid_end

    def _create(self) -> None:
        e = self._expected
        header = FileHeader(MAGIC, e.key_size, e.value_size, e.header_size, generation=0)
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as file:
            file.write(header.encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        fsync_directory(os.path.dirname(self.path))

    def _check_header(self, fd: int) -> None:
        decode_header(os.pread(fd, HEADER_SIZE, 0), MAGIC, self.path, self._expected)

    def _valid_end(self, fd: int, size: int) -> int:
        """Where the last whole record ends (``size`` when the tail is whole)."""
        if size == HEADER_SIZE:
            return size
        if size > HEADER_SIZE + RECORD_OVERHEAD + self._key_size:
            trailer = os.pread(fd, 8, size - 8)
            (length,) = LENGTH.unpack_from(trailer)
            start = size - RECORD_OVERHEAD - self._key_size - length
            if start >= HEADER_SIZE and self._record_ok(fd, start, length, size - start):
                return size
        return self._scan_forward(fd, size)

    def _record_ok(self, fd: int, start: int, length: int, record_size: int) -> bool:
        record = os.pread(fd, record_size, start)
        return (
            len(record) == record_size
            and crc32(record) == CRC_RESIDUE
            and LENGTH.unpack_from(record)[0] == length
        )

    def _scan_forward(self, fd: int, size: int) -> int:
        """Offset just after the last whole record, reading from the start."""
        position = HEADER_SIZE
        overhead = RECORD_OVERHEAD + self._key_size
        while position + LENGTH.size <= size:
            (length,) = LENGTH.unpack(os.pread(fd, LENGTH.size, position))
            end = position + overhead + length
            if end > size:
                break  # cut short: torn (unless the index says otherwise)
            if not self._record_ok(fd, position, length, end - position):
                if not any(os.pread(fd, size - position, position)):
                    break  # zero-filled tail: torn
                raise CannotLoadStore(
                    f"corrupted value record (file {self.path}, offset {position})",
                    name=self._name,
                    path=self.path,
                )
            position = end
        return position

    # -- reading and writing

    def read(self, offset: int, length: int, key: bytes) -> bytes:
        """The value of ``length`` bytes recorded for ``key`` at ``offset``."""
        size = RECORD_OVERHEAD + self._key_size + length
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

    def _read_error(self, what: str, offset: int) -> CannotReadFromStore:
        return CannotReadFromStore(
            f"{what} (file {self.path}, offset {offset})", name=self._name, path=self.path
        )

    def append(self, key: bytes, value: bytes) -> int:
        """Write a record at the end of the file; return its offset."""
        length = len(value)
        if length > MAX_VALUE_SIZE:
            raise CannotWriteToStore(
                f"value of {length} bytes is too large", name=self._name, path=self.path
            )
        packed = LENGTH.pack(length)
        body = b"".join((packed, key, value, packed))
        record = body + crc32(body).to_bytes(CRC_SIZE, "little")
        offset = self.end
        try:
            written = 0
            view = memoryview(record)
            while written < len(record):
                written += os.pwrite(self._fd, view[written:], offset + written)
            if self._fsync:
                os.fsync(self._fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            raise CannotWriteToStore(
                f"cannot append value: {error}", name=self._name, path=self.path
            ) from error
        self.end = offset + len(record)
        return offset

    def reopen_if_missing(self) -> None:
        """Read-only: open the file if the writer created it since."""
        if self._fd < 0:
            self._open_readonly()

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
