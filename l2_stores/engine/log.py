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

Format versions (the header's version field):

- 1: the file ends at its last record, or in a torn one.
- 2 (written since): the file may also end in zero-filled *free space*,
  allocated ahead so that the C put writes records through a shared map,
  without a system call. A kill in the middle of such a store leaves a
  record that fails its checksum with only zeros after it: that record is
  torn too. A writer's close cuts the free space off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import CannotLoadStore, CannotWriteToStore
from .accel import LogTailBase, accelerated_mappable, accelerated_replay_log
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

logger = logging.getLogger(__name__)

MAGIC = b"L2SLOG\0\0"
#: The version new logs are written with, and the versions read.
LOG_VERSION = 2
LOG_VERSIONS = (1, 2)
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


#: The most bytes a log allocates ahead for the C put to write through a map.
MAP_LIMIT = 16 << 20


@dataclass
class LogScan:
    """What reading a log file found."""

    generation: int
    bindings: dict[bytes, bytes | None] = field(default_factory=dict)
    records: int = 0
    end: int = HEADER_SIZE
    #: Bytes of a record cut short or left half-written at the end.
    torn_bytes: int = 0
    #: Zero-filled bytes after the records (free space of a version 2 log).
    free_bytes: int = 0
    version: int = LOG_VERSION


#: Bytes of log records read at a time (about): a reader's sync reads up to
#: the end of the records, not the free space after them.
READ_CHUNK = 1 << 16


def _replay(
    buffer: bytes | memoryview, expected: Expected, bindings: dict[bytes, bytes | None]
) -> int:
    """Replay the whole records of ``buffer`` up to the first bad one; return where it stopped."""
    size = record_size(expected)
    complete = len(buffer) - len(buffer) % size
    if accelerated_replay_log is not None:  # the same loop in C
        return int(accelerated_replay_log(buffer, expected.key_size, expected.value_size, bindings))
    key_end = 1 + expected.key_size
    value_end = key_end + expected.value_size
    position = 0
    while position < complete:
        record = bytes(buffer[position : position + size])
        op = record[0]
        if crc32(record) != CRC_RESIDUE or op not in (OP_SET, OP_REMOVE):
            break
        bindings[record[1:key_end]] = record[key_end:value_end] if op == OP_SET else None
        position += size
    return position


def _is_zero(data: bytes) -> bool:
    return data == bytes(len(data))


@dataclass(frozen=True)
class _Stop:
    """What the bytes where a replay stopped are."""

    torn: int = 0  #: bytes of a torn record
    free: int = 0  #: zero-filled bytes after the records
    corrupt: bool = False


def _classify_stop(
    version: int, rest: bytes, size: int, remaining: int, more: Callable[[], bytes], whole: bool
) -> _Stop:
    """Classify ``rest``, the bytes from the first record a replay did not take on.

    ``rest`` holds that record and the next, or runs to the end of the file;
    ``remaining`` counts the bytes from there to the end of the file, and
    ``more()`` reads those past ``rest``. Version 2: a zero-filled record
    ends the log (free space); a bad record with a zero-filled record, or
    less than a record of zeros, after it is a store cut short; a record
    cut short by the end of the file is torn. With ``whole`` (the writer's
    load: nothing is appended meanwhile), everything after the end must be
    zeros too, or the log is corrupt. Version 1: a record cut short by the
    end of the file, or a bad one followed by zeros only to the end, is torn.
    """
    record = rest[:size]
    if len(record) < size and (version < 2 or not _is_zero(record)):
        return _Stop(torn=len(record))  # at the end of the file: the lookahead read nothing more
    if version >= 2:
        if _is_zero(record):
            stop = _Stop(free=remaining)
        elif _is_zero(rest[size : 2 * size]) and len(rest) > size:
            stop = _Stop(torn=size, free=remaining - size)
        else:
            return _Stop(corrupt=True)
        if whole and not (_is_zero(rest[size:]) and _is_zero(more())):
            return _Stop(corrupt=True)
        return stop
    rest += more()
    if _is_zero(rest):
        return _Stop(torn=len(rest))
    return _Stop(corrupt=True)


#: A reader that finds a bad record reads it again this many times, a
#: millisecond apart, before calling it corrupt: its read may have copied
#: a writer's stores into the map half-way (a page before them, the next
#: one after).
_SETTLE_ATTEMPTS = 3


def read_log(
    path: str,
    expected: Expected,
    into: dict[bytes, bytes | None] | None = None,
    scan: LogScan | None = None,
    *,
    whole: bool = False,
) -> LogScan:
    """Replay the records of the log at ``path``.

    Bindings go into ``into`` (a remove as ``None``). With ``scan`` from an
    earlier call, reading resumes at ``scan.end``. A torn record and the
    free space after the records are counted in ``torn_bytes`` and
    ``free_bytes`` and left alone; a corrupted record raises
    :class:`CannotLoadStore` with its offset. ``whole``: the caller holds
    the writer's lock, so the file does not change meanwhile and every byte
    after the records is checked.
    """
    with open(path, "rb") as file:
        if scan is None:
            head = file.read(HEADER_SIZE)
            header = decode_header(head, MAGIC, path, expected, LOG_VERSIONS)
            bindings = into if into is not None else {}
            scan = LogScan(header.generation, bindings, version=header.version)
        for attempt in range(1 if whole else _SETTLE_ATTEMPTS):
            if attempt:
                time.sleep(0.001)
            stop = _read_records(file, expected, scan, whole)
            if not stop.corrupt:
                break
    if stop.corrupt:
        raise CannotLoadStore(
            f"corrupted log record (file {path}, offset {scan.end})",
            name=expected.name,
            path=path,
            offset=scan.end,
        )
    scan.torn_bytes, scan.free_bytes = stop.torn, stop.free
    return scan


def _read_records(file: BinaryIO, expected: Expected, scan: LogScan, whole: bool) -> _Stop:
    """Replay the records from ``scan.end`` on, in chunks, and classify where they stop."""
    size = record_size(expected)
    step = max(1, READ_CHUNK // size) * size
    fd = file.fileno()
    while True:  # a chunk, and one record more to tell a torn store from corruption
        buffer = os.pread(fd, step + size, scan.end)
        position = _replay(memoryview(buffer)[:step], expected, scan.bindings)
        scan.records += position // size
        scan.end += position
        if position < step or len(buffer) <= step:
            break
    rest = buffer[position:]
    remaining = max(len(rest), os.fstat(fd).st_size - scan.end)

    def more() -> bytes:
        file.seek(scan.end + len(rest))
        return file.read()

    return _classify_stop(scan.version, rest, size, remaining, more, whole)


class SpareLog:
    """An empty log prepared ahead under a temporary name, its header fsynced.

    A merge prepares the next log this way, so that the writer that freezes
    the log only renames it into place.
    """

    def __init__(self, temporary: str, path: str, fd: int, generation: int) -> None:
        self.temporary = temporary
        self.path = path
        self.generation = generation
        #: Bytes allocated ahead at the start of the file (0: none).
        self.allocated = 0
        self._fd = fd

    @classmethod
    def prepare(cls, path: str, generation: int, expected: Expected, ahead: int = 0) -> SpareLog:
        """Write the header of log ``path`` at ``path.tmp`` and fsync it.

        ``ahead``: bytes of records to allocate for writing through a map,
        where the file system allows it (see :func:`allocate_ahead`).
        """
        header = FileHeader(
            MAGIC,
            expected.key_size,
            expected.value_size,
            expected.header_size,
            generation,
            version=LOG_VERSION,
        )
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        spare = cls(temporary, path, fd, generation)
        try:
            os.write(fd, header.encode())
            os.fsync(fd)
            spare.allocated = allocate_ahead(fd, HEADER_SIZE, ahead, record_size(expected))
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


def allocate_ahead(fd: int, end: int, ahead: int, record: int) -> int:
    """Allocate the log's first ``end + ahead`` bytes on disk, to be written through a map.

    Returns the bytes allocated, or 0 when the log is to be written with
    system calls: no accelerator, nothing asked, a file system where a store
    into a map could meet a full disk (and kill the process with SIGBUS), or
    no room now. ``end + ahead`` is capped at :data:`MAP_LIMIT`, and never
    ends on a record's end: a record written whole inside the space
    (``record`` bytes) has free space after it, which marks it torn if a
    kill cuts it short.
    """
    size = min(end + ahead, MAP_LIMIT)
    if (size - end) % record == 0:
        size += 1
    if ahead <= 0 or size <= end or accelerated_mappable is None or not accelerated_mappable(fd):
        return 0
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.ftruncate(fd, end)  # whatever was allocated goes; writes take over
        return 0
    return size


class LogWriter(LogTailBase):  # type: ignore[misc]
    """Appends records to one log file; the writer owns the file's tail.

    With the accelerator, the tail (``_fd``, ``_end``, ``records``,
    ``_fsync``, ``_pending``) lives in the C base, which the index's C put
    appends through: into the file's map when ``allocated`` bytes were
    allocated ahead (the Python paths still write, which the map sees),
    else with one ``pwritev``.
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
        allocated: int = 0,
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
        #: The file's size when it was allocated ahead (0: none); the close cuts it to the end.
        self._allocated = allocated
        self._owner = os.getpid()
        if allocated:
            try:
                self._map(allocated)
            except OSError:
                logger.debug("%s: cannot map; appends are written", path, exc_info=True)

    @classmethod
    def create(
        cls, path: str, generation: int, expected: Expected, fsync: bool, ahead: int = 0
    ) -> LogWriter:
        """Create a new, empty log file; it appears whole (header written) or not at all.

        The header and the directory entry are fsynced whatever ``fsync`` says,
        so that no power loss leaves a log without a header beside the data
        file that replaced its predecessor.
        """
        spare = SpareLog.prepare(path, generation, expected, ahead)
        return cls.install(spare, expected, fsync, True)

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
        fd = spare.take_fd()
        return cls(
            spare.path, fd, spare.generation, expected, HEADER_SIZE, 0, fsync, spare.allocated
        )

    @classmethod
    def reopen(
        cls, path: str, scan: LogScan, expected: Expected, fsync: bool, ahead: int = 0
    ) -> LogWriter:
        """Open an existing log for appending after ``scan``; a torn tail is cut off.

        A version 2 log gets ``ahead`` bytes allocated again; a version 1 log
        is only ever written to.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            if scan.torn_bytes or scan.free_bytes:
                os.ftruncate(fd, scan.end)
                if fsync:
                    os.fsync(fd)
            allocated = (
                allocate_ahead(fd, scan.end, ahead, record_size(expected))
                if scan.version >= 2
                else 0
            )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, scan.generation, expected, scan.end, scan.records, fsync, allocated)

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
        self._unmap()  # a store past the cut would raise SIGBUS
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._end)
        return self._write_error(error)

    def _write_error(self, error: OSError) -> CannotWriteToStore:
        return CannotWriteToStore(
            f"cannot append to log {self.path}: {error}", name=self._expected.name, path=self.path
        )

    def close(self) -> None:
        """Flush, cut off the free space and close the file; if the flush fails, it stays open."""
        if self._fd < 0:
            return
        self.flush()
        if self._allocated and os.getpid() == self._owner:  # not in a child forked meanwhile
            self._unmap()
            with contextlib.suppress(OSError):  # the free space is harmless if it stays
                os.ftruncate(self._fd, self._end)
        self.abandon()

    def abandon(self) -> None:
        """Close the file without flushing (after a failed :meth:`close`), free space left."""
        self._unmap()
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
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name, LOG_VERSIONS)
        except CannotLoadStore as error:
            yield Finding(path, 0, error.reason)
            return
        buffer = file.read()
    size = 1 + header.key_size + header.value_size + CRC_SIZE
    position = 0
    while position < len(buffer):
        record = buffer[position : position + size]
        if (
            len(record) == size
            and crc32(record) == CRC_RESIDUE
            and record[0] in (OP_SET, OP_REMOVE)
        ):
            position += size
            continue
        offset = HEADER_SIZE + position
        rest = buffer[position:]
        stop = _classify_stop(header.version, rest, size, len(rest), bytes, False)
        if stop.corrupt:
            yield Finding(path, offset, "log record checksum mismatch or bad op code")
            position += size
            continue
        if header.version >= 2 and not stop.torn:
            what = f"zero-filled space after the last record ({stop.free} bytes: free, or torn)"
        elif header.version < 2 and _is_zero(rest):
            what = "zero-filled tail (torn; dropped at the next writer load)"
        elif stop.torn < size:
            what = (
                f"torn record at the end, {stop.torn} of {size} bytes "
                "(dropped at the next writer load)"
            )
        else:
            what = "half-written record at the end (torn; dropped at the next writer load)"
        yield Finding(path, offset, what, False)
        ignored = rest[stop.torn :]
        if not _is_zero(ignored):
            yield Finding(
                path,
                offset + stop.torn,
                "bytes other than zeros after the end of the records "
                "(a writer's load refuses the log)",
            )
        return
