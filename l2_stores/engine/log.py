"""The append-only log of recent bindings.

Layout of ``log.<generation>`` (integers little-endian)::

    offset  size  field
         0    64  file header (see ``framing``), magic ``L2SLOG\\0\\0``
        64     R  record 0
      64+R     R  record 1 ...

    record (R = 1 + key size + value size + 4 bytes):
         0     1  op: 1 = set, 2 = remove
         1     K  key
       1+K     V  value (zeros for a remove)
     1+K+V     4  crc32 of the 1+K+V bytes before it

Records are only ever appended, through a shared map of zeros written ahead
of them (see ``tail``); a writer that closes the log cuts the zeros off.

Torn tails, dropped at load: a last record cut short at the end of the file;
a record that fails its check and is followed by nothing but zeros, one or
more (a kill during its copy into the map; or a power loss); zeros from a
record boundary to the end (the writer's run of zeros, or a power loss). Any
other record whose check fails is corruption: a failing last record of a
sealed file, or one followed by other bytes than zeros.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import CannotLoadStore, CannotWriteToStore
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    Finding,
    crc32,
    decode_header,
    fsync_directory,
    parse_header,
    zero_from,
)
from .tail import FileTail

MAGIC = b"L2SLOG\0\0"
OP_SET = 1
OP_REMOVE = 2
_OP_SET_BYTE = bytes([OP_SET])
_OP_REMOVE_BYTE = bytes([OP_REMOVE])


def record_size(expected: Expected) -> int:
    """Bytes of one log record for the given encoding sizes."""
    return 1 + expected.key_size + expected.value_size + CRC_SIZE


@dataclass
class LogScan:
    """What reading a log file found."""

    generation: int
    bindings: dict[bytes, bytes | None] = field(default_factory=dict)
    records: int = 0
    end: int = HEADER_SIZE
    torn_bytes: int = 0


def read_log(
    path: str,
    expected: Expected,
    into: dict[bytes, bytes | None] | None = None,
    scan: LogScan | None = None,
) -> LogScan:
    """Replay the records of the log at ``path``.

    Bindings go into ``into`` (a remove as ``None``). With ``scan`` from an
    earlier call, reading resumes at ``scan.end``. A torn tail is counted in
    ``torn_bytes`` and left alone; a corrupted record raises
    :class:`CannotLoadStore` with its offset.
    """
    with open(path, "rb") as file:
        if scan is None:
            head = file.read(HEADER_SIZE)
            header = decode_header(head, MAGIC, path, expected)
            scan = LogScan(header.generation, into if into is not None else {})
        file.seek(scan.end)
        buffer = file.read()
        bindings = scan.bindings
        size = record_size(expected)
        key_end = 1 + expected.key_size
        value_end = key_end + expected.value_size
        position = 0
        while position + size <= len(buffer):
            record = buffer[position : position + size]
            op = record[0]
            if crc32(record) != CRC_RESIDUE or op not in (OP_SET, OP_REMOVE):
                if _ends_torn(buffer, position, size):
                    break
                # A writer may have been storing this record as we read it:
                # once we saw bytes past it, it is whole. Read it again.
                record = os.pread(file.fileno(), size, scan.end + position)
                op = record[0] if record else 0
                if crc32(record) != CRC_RESIDUE or op not in (OP_SET, OP_REMOVE):
                    offset = scan.end + position
                    raise CannotLoadStore(
                        f"corrupted log record (file {path}, offset {offset})",
                        name=expected.name,
                        path=path,
                        offset=offset,
                    )
            key = record[1:key_end]
            bindings[key] = record[key_end:value_end] if op == OP_SET else None
            position += size
    scan.records += position // size
    scan.end += position
    scan.torn_bytes = 0 if zero_from(buffer, position) else len(buffer) - position
    return scan


def _ends_torn(buffer: bytes, position: int, size: int) -> bool:
    """Whether the failing record at ``position`` is a torn tail (see the module docstring)."""
    after = position + size
    return zero_from(buffer, position) or (after < len(buffer) and zero_from(buffer, after))


class SpareLog:
    """An empty log prepared ahead under a temporary name, its header fsynced.

    A merge prepares the next log this way, so that the writer that freezes
    the log only renames it into place.
    """

    def __init__(self, temporary: str, path: str, fd: int, generation: int) -> None:
        self.temporary = temporary
        self.path = path
        self.generation = generation
        self._fd = fd

    @classmethod
    def prepare(cls, path: str, generation: int, expected: Expected) -> SpareLog:
        """Write the header of log ``path`` at ``path.tmp`` and fsync it."""
        header = FileHeader(
            MAGIC, expected.key_size, expected.value_size, expected.header_size, generation
        )
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        spare = cls(temporary, path, fd, generation)
        try:
            os.write(fd, header.encode())
            os.fsync(fd)
        except BaseException:
            spare.discard()
            raise
        return spare

    def take_fd(self) -> int:
        """The file descriptor, now the caller's to close."""
        fd, self._fd = self._fd, -1
        return fd

    def discard(self) -> None:
        """Close and delete the temporary file (a leftover is deleted at the next load)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.temporary)


class LogWriter:
    """Appends records to one log file; the writer owns the file's tail."""

    def __init__(
        self,
        path: str,
        fd: int,
        generation: int,
        expected: Expected,
        end: int,
        records: int,
        fsync: bool,
    ) -> None:
        self.path = path
        self.generation = generation
        self.records = records
        self._fd = fd
        self._tail = FileTail(fd, end)
        self._expected = expected
        self._fsync = fsync
        self._zero_value = bytes(expected.value_size)

    @classmethod
    def create(cls, path: str, generation: int, expected: Expected, fsync: bool) -> LogWriter:
        """Create a new, empty log file; it appears whole (header written) or not at all.

        The header and the directory entry are fsynced whatever ``fsync`` says,
        so that no power loss leaves a log without a header beside the data
        file that replaced its predecessor.
        """
        return cls.install(SpareLog.prepare(path, generation, expected), expected, fsync, True)

    @classmethod
    def install(
        cls, spare: SpareLog, expected: Expected, fsync: bool, sync_directory: bool
    ) -> LogWriter:
        """Rename a prepared ``spare`` into place and append to it; on error it is discarded.

        ``sync_directory`` (or ``fsync``) fsyncs the directory entry too;
        without it, the caller makes the name durable later (a merge syncs
        the directory before renaming the data file that supersedes the
        previous log).
        """
        try:
            os.rename(spare.temporary, spare.path)
            if fsync or sync_directory:
                fsync_directory(os.path.dirname(spare.path))
        except BaseException:
            spare.discard()
            raise
        return cls(spare.path, spare.take_fd(), spare.generation, expected, HEADER_SIZE, 0, fsync)

    @classmethod
    def reopen(cls, path: str, scan: LogScan, expected: Expected, fsync: bool) -> LogWriter:
        """Open an existing log for appending after ``scan``; what follows it is cut off."""
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size > scan.end:
                os.ftruncate(fd, scan.end)
                if fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, scan.generation, expected, scan.end, scan.records, fsync)

    def append_set(self, key: bytes, value: bytes, flush: bool) -> None:
        """Append a binding of ``key`` to ``value``."""
        try:
            offset = self._tail.append(_OP_SET_BYTE, key, value)
        except OSError as error:
            raise self._write_error(error) from error
        if flush and self._fsync:
            self._sync_or_take_back(offset)
        self.records += 1

    def append_remove(self, key: bytes, flush: bool) -> None:
        """Append the removal of ``key``."""
        try:
            offset = self._tail.append(_OP_REMOVE_BYTE, key, self._zero_value)
        except OSError as error:
            raise self._write_error(error) from error
        if flush and self._fsync:
            self._sync_or_take_back(offset)
        self.records += 1

    def _sync_or_take_back(self, offset: int) -> None:
        """Make the record at ``offset`` durable; if that fails, it is not in the log."""
        try:
            self._tail.sync()
        except OSError as error:
            with contextlib.suppress(OSError):
                self._tail.take_back(offset)
            raise self._write_error(error) from error

    def flush(self) -> None:
        """Make every record durable with ``fsync``; without, each is the OS's once appended."""
        if self._fsync:
            try:
                self._tail.sync()
            except OSError as error:
                raise self._write_error(error) from error

    def _write_error(self, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(
            f"cannot append to log {self.path}: {error}", name=self._expected.name, path=self.path
        )

    def close(self) -> None:
        """Flush, cut the zeros off and close the file; if the flush fails, it stays open."""
        if self._fd < 0:
            return
        self.flush()
        self.abandon()

    def abandon(self) -> None:
        """Cut the file after its last record and close it, without flushing."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self._tail.seal()
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def check_log(path: str, name: str = "") -> Iterator[Finding]:
    """Check every record of the log at ``path``: header, framing, op codes, checksums.

    A torn tail is a note, not a problem: the next writer load drops it.
    """
    with open(path, "rb") as file:
        try:
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name)
        except CannotLoadStore as error:
            yield Finding(path, 0, error.reason)
            return
        buffer = file.read()
    size = 1 + header.key_size + header.value_size + CRC_SIZE
    complete = len(buffer) - len(buffer) % size
    for position in range(0, complete, size):
        record = buffer[position : position + size]
        if crc32(record) == CRC_RESIDUE and record[0] in (OP_SET, OP_REMOVE):
            continue
        offset = HEADER_SIZE + position
        if zero_from(buffer, position):
            yield Finding(
                path, offset, "zero-filled tail (torn; dropped at the next writer load)", False
            )
            return
        if _ends_torn(buffer, position, size):
            yield Finding(
                path,
                offset,
                "torn record followed by zeros (dropped at the next writer load)",
                False,
            )
            return
        yield Finding(path, offset, "log record checksum mismatch or bad op code")
    if complete < len(buffer):
        yield Finding(
            path,
            HEADER_SIZE + complete,
            f"torn record at the end, {len(buffer) - complete} of {size} bytes "
            "(dropped at the next writer load)",
            False,
        )
