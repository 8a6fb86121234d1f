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

Records are only ever appended. A kill can leave the last record cut short,
or, on some file systems after a power loss, zero-filled: such a tail is torn
and dropped at load. Any other record whose checksum fails is corruption.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import CannotLoadStore, CannotWriteToStore
from .accel import LogTailBase, accelerated_replay_log
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    Finding,
    crc32,
    decode_header,
    framed,
    fsync_directory,
    parse_header,
    pwrite_all,
    write_framed,
)

MAGIC = b"L2SLOG\0\0"
OP_SET = 1
OP_REMOVE = 2
_OP_SET_BYTE = bytes([OP_SET])
_OP_REMOVE_BYTE = bytes([OP_REMOVE])

#: Pending bytes of unflushed appends (``flush=False``) handed to the OS
#: once they reach this size, to bound memory.
PENDING_LIMIT = 1 << 20


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
    complete = len(buffer) - len(buffer) % size
    position = 0
    if accelerated_replay_log is not None:  # the same loop in C, to the first bad record
        position = accelerated_replay_log(buffer, expected.key_size, expected.value_size, bindings)
    while position < complete:
        record = buffer[position : position + size]
        op = record[0]
        if crc32(record) != CRC_RESIDUE or op not in (OP_SET, OP_REMOVE):
            if not any(buffer[position:]):
                break  # zero-filled tail: torn
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
    scan.torn_bytes = len(buffer) - position
    return scan


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


class LogWriter(LogTailBase):  # type: ignore[misc]
    """Appends records to one log file; the writer owns the file's tail.

    With the accelerator, the tail (``_fd``, ``_end``, ``records``,
    ``_fsync``, ``_pending``) lives in the C base, which the index's C put
    appends through.
    """

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
        self._expected = expected
        self._end = end
        self._fsync = bool(fsync)
        self._pending = bytearray()
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
        """Open an existing log for appending after ``scan``; a torn tail is cut off."""
        fd = os.open(path, os.O_RDWR)
        try:
            if scan.torn_bytes:
                os.ftruncate(fd, scan.end)
                if fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, scan.generation, expected, scan.end, scan.records, fsync)

    def append_set(self, key: bytes, value: bytes, flush: bool) -> None:
        """Append a binding of ``key`` to ``value``."""
        if flush and not self._pending:
            # _append's first branch, inlined: this is every flushed add.
            try:
                size = write_framed(self._fd, self._end, _OP_SET_BYTE, key, value)
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as error:
                raise self._failed_write(error) from error
            self._end += size
            self.records += 1
        else:
            self._append(flush, _OP_SET_BYTE, key, value)

    def append_remove(self, key: bytes, flush: bool) -> None:
        """Append the removal of ``key``."""
        self._append(flush, _OP_REMOVE_BYTE, key, self._zero_value)

    def _append(self, flush: bool, *parts: bytes) -> None:
        """Append the record of ``parts``; if this raises, the record is not in the log."""
        if flush and not self._pending:
            try:
                size = write_framed(self._fd, self._end, *parts)
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as error:
                raise self._failed_write(error) from error
            self._end += size
        else:
            mark = len(self._pending)
            self._pending += framed(*parts)
            if flush or len(self._pending) >= PENDING_LIMIT:
                try:
                    self.flush()
                except BaseException:
                    del self._pending[mark:]
                    raise
        self.records += 1

    def flush(self) -> None:
        """Hand every pending record to the OS (and to the disk with ``fsync``).

        On error the pending records stay pending, for a later flush.
        """
        if self._pending:
            self._write(bytes(self._pending))
            self._pending.clear()
        elif self._fsync:
            try:
                os.fsync(self._fd)
            except OSError as error:
                raise self._write_error(error) from error

    def _write(self, data: bytes) -> None:
        try:
            pwrite_all(self._fd, data, self._end)
            if self._fsync:
                os.fsync(self._fd)
        except OSError as error:
            raise self._failed_write(error) from error
        self._end += len(data)

    def _failed_write(self, error: OSError) -> CannotWriteToStore:
        """Cut what the failed write left behind, so no later append follows it."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._end)
        return self._write_error(error)

    def _write_error(self, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(
            f"cannot append to log {self.path}: {error}", name=self._expected.name, path=self.path
        )

    def close(self) -> None:
        """Flush and close the file; if the flush fails, the file stays open."""
        if self._fd < 0:
            return
        self.flush()
        self.abandon()

    def abandon(self) -> None:
        """Close the file without flushing (after a failed :meth:`close`)."""
        if self._fd >= 0:
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
        if not any(buffer[position:]):
            yield Finding(
                path, offset, "zero-filled tail (torn; dropped at the next writer load)", False
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
