"""The sorted data file: every binding merged so far, sorted by key hash.

Layout of ``data.<generation>`` (integers little-endian; n rows, k fan-out
bits, R = key size + value size + 4)::

    offset          size          section
    0               64            file header (see ``framing``), magic
                                  ``L2SDATA\\0``, count = n, fan-out bits = k,
                                  tag = the store's word (carried by merges)
    H = 64          4 n           hash column: u32 hash of each row's key,
                                  ascending; rows of equal hash by key
    W = H + 4 n     R n           rows: key | value | crc32(key | value)
    F = W + R n     8 (2^k + 1)   fan-out: u64 index of the first row of
                                  each bucket, then n; bucket = hash >> (32 - k)
    C = F + ...     4 2^k         crc32 of each bucket's slice of the hash column
    E = C + 4 2^k   4             crc32 of the fan-out and bucket checksums

A lookup hashes the key, reads its bucket's bounds from the fan-out, checks
the bucket's hash slice against its checksum the first time the bucket is
used (the file never changes, so once is enough), bisects the slice (in C,
on a ``memoryview`` of the mmap'd file) and compares the key of each row of
equal hash, checking the row's checksum every time. Nothing but the file
header is read at open, apart from the fan-out checksum; the file is never
loaded whole. Buckets hold about ``BUCKET_ROWS`` rows, so a bucket's hash
slice is half a page or less. With the C accelerator (see ``accel``) the
whole lookup is one C call, reading the same bytes and checking the same
checksums; a bucket not verified yet, or a corrupt row, is handed back to
Python, which checks it and raises.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CannotLoadStore, CannotReadFromStore
from . import filesystem
from .accel import AcceleratedLookup
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
)

if TYPE_CHECKING:
    from ._accel import Lookup, MergePlan

MAGIC = b"L2SDATA\0"
HASH_SIZE = 4
FANOUT_ENTRY_SIZE = 8
BUCKET_ROWS = 512
MAX_FANOUT_BITS = 24
IOV_MAX = 1024  # buffers per os.writev call (the POSIX minimum of IOV_MAX)

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
key_hash = crc32


def fanout_bits_for(count: int) -> int:
    """Fan-out bits giving buckets of at most about ``BUCKET_ROWS`` rows."""
    bits = 0
    while (count >> bits) > BUCKET_ROWS and bits < MAX_FANOUT_BITS:
        bits += 1
    return bits


def row_size(expected: Expected) -> int:
    """Bytes of one row for the given encoding sizes."""
    return expected.key_size + expected.value_size + CRC_SIZE


class _Sections:
    """Offsets of the sections of a data file of ``count`` rows."""

    def __init__(self, count: int, bits: int, row: int) -> None:
        self.hashes = HEADER_SIZE
        self.rows = self.hashes + HASH_SIZE * count
        self.fanout = self.rows + row * count
        self.bucket_crcs = self.fanout + FANOUT_ENTRY_SIZE * ((1 << bits) + 1)
        self.footer = self.bucket_crcs + CRC_SIZE * (1 << bits)
        self.size = self.footer + CRC_SIZE


class _LittleEndianView(Sequence[int]):
    """Integers of a little-endian column, for big-endian hosts."""

    def __init__(self, buffer: memoryview, width: int) -> None:
        self._buffer = buffer
        self._struct = struct.Struct("<Q" if width == 8 else "<I")
        self._width = width

    def __len__(self) -> int:
        return len(self._buffer) // self._width

    def __getitem__(self, index: Any) -> Any:
        return self._struct.unpack_from(self._buffer, index * self._width)[0]


def _int_column(buffer: memoryview, width: int) -> Sequence[int]:
    if _LITTLE_ENDIAN_HOST:
        return buffer.cast("Q" if width == 8 else "I")
    return _LittleEndianView(buffer, width)


def _handback(reference: weakref.ref[DataFile]) -> Callable[[bytes, int], bytes | None]:
    # A weak reference, so that the lookup does not keep its file alive.
    def handback(key: bytes, code: int) -> bytes | None:
        data = reference()
        if data is None:
            raise RuntimeError("lookup used after its data file was dropped")
        return data._handback(key, code)

    return handback


class DataFile:
    """A read-only, mmap'd data file.

    ``find(key)`` gives the value bound to ``key``, or None (the C lookup when
    there is one).
    """

    def __init__(self, path: str, expected: Expected) -> None:
        self.path = path
        self._expected = expected
        self._key_size = expected.key_size
        self._row_size = self.row_size = row_size(expected)
        with open(path, "rb") as file:
            header = decode_header(file.read(HEADER_SIZE), MAGIC, path, expected)
            self.generation = header.generation
            self.count = header.count
            self.tag = header.tag
            bits = header.fanout_bits
            sections = _Sections(self.count, bits, self._row_size)
            size = os.fstat(file.fileno()).st_size
            if size != sections.size or bits > MAX_FANOUT_BITS:
                raise self._load_error(
                    f"data file of {size} bytes, {sections.size} expected for "
                    f"{self.count} rows and {bits} fan-out bits",
                    min(size, sections.size),
                )
            self._mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(self._mm)
        if crc32(view[sections.fanout : sections.footer]) != int.from_bytes(
            view[sections.footer :], "little"
        ):
            view.release()
            self._mm.close()
            raise self._load_error("fan-out checksum mismatch", sections.fanout)
        self._view = view
        self._sections = sections
        self._shift = 32 - bits
        self._buckets = 1 << bits
        self._hash_bytes = view[sections.hashes : sections.rows]
        self._hashes = _int_column(self._hash_bytes, HASH_SIZE)
        self._fanout = _int_column(view[sections.fanout : sections.bucket_crcs], 8)
        self._bucket_crcs = _int_column(view[sections.bucket_crcs : sections.footer], 4)
        self._verified = bytearray(self._buckets)
        self._rows_start = sections.rows
        if self._fanout[0] != 0 or self._fanout[self._buckets] != self.count:
            raise self._load_error("fan-out does not span the rows", sections.fanout)
        self._lookup: Lookup | None = None
        if AcceleratedLookup is not None:
            self._lookup = AcceleratedLookup(
                self._mm,
                self._verified,
                self._key_size,
                self._row_size,
                self.count,
                sections.hashes,
                sections.rows,
                sections.fanout,
                bits,
                _handback(weakref.ref(self)),
            )
            self.find = self._lookup.find  # type: ignore[method-assign,assignment]

    def _load_error(self, what: str, offset: int) -> CannotLoadStore:
        return CannotLoadStore(
            f"{what} (file {self.path}, offset {offset})",
            name=self._expected.name,
            path=self.path,
            offset=offset,
        )

    def _read_error(self, what: str, offset: int) -> CannotReadFromStore:
        return CannotReadFromStore(
            f"{what} (file {self.path}, offset {offset})",
            name=self._expected.name,
            path=self.path,
            offset=offset,
        )

    def _bucket_bounds(self, bucket: int) -> tuple[int, int]:
        low = self._fanout[bucket]
        high = self._fanout[bucket + 1]
        if not self._verified[bucket]:
            self._verify_bucket(bucket, low, high)
        return low, high

    def _verify_bucket(self, bucket: int, low: int, high: int) -> None:
        if not low <= high <= self.count:
            raise self._read_error(
                f"fan-out entry {bucket} out of order",
                self._sections.fanout + FANOUT_ENTRY_SIZE * bucket,
            )
        if crc32(self._hash_bytes[low * HASH_SIZE : high * HASH_SIZE]) != self._bucket_crcs[bucket]:
            raise self._read_error(
                f"hash column checksum mismatch in bucket {bucket}",
                self._sections.hashes + HASH_SIZE * low,
            )
        self._verified[bucket] = 1

    def _row(self, index: int) -> bytes:
        offset = self._sections.rows + index * self._row_size
        row = self._mm[offset : offset + self._row_size]
        if crc32(row) != CRC_RESIDUE:
            raise self.row_error(index)
        return row

    def _handback(self, key: bytes, code: int) -> bytes | None:
        # What the C lookup hands back: a bucket to verify first (which raises
        # if it is corrupt), or a row whose checksum failed.
        if code >= 0:
            self._bucket_bounds(code)
            return self._find(key)
        raise self.row_error(-code - 1)

    def _find(self, key: bytes) -> bytes | None:
        # The pure-Python lookup: _bucket_bounds and _row, inlined.
        hashed = key_hash(key)
        bucket = hashed >> self._shift
        fanout = self._fanout
        low = fanout[bucket]
        high = fanout[bucket + 1]
        if not self._verified[bucket]:
            self._verify_bucket(bucket, low, high)
        hashes = self._hashes
        index = bisect_left(hashes, hashed, low, high)
        key_size = self._key_size
        row_size = self._row_size
        while index < high and hashes[index] == hashed:
            offset = self._rows_start + index * row_size
            row = self._mm[offset : offset + row_size]
            if crc32(row) != CRC_RESIDUE:
                raise self.row_error(index)
            if row[:key_size] == key:
                return row[key_size:-CRC_SIZE]
            index += 1
        return None

    #: The value bound to ``key``, or None; the C lookup replaces it per instance.
    find = _find

    def locate(self, hashed: int, key: bytes, low: int = 0) -> tuple[int, bool]:
        """First row index from ``low`` not before ``(hashed, key)``; whether it holds ``key``."""
        hashes = self._hashes
        index = bisect_left(hashes, hashed, low)
        key_size = self._key_size
        while index < self.count and hashes[index] == hashed:
            found = self._row(index)[:key_size]
            if found == key:
                return index, True
            if found > key:
                break
            index += 1
        return index, False

    def place(self, hashed: int, key: bytes, low: int = 0) -> tuple[int, bool]:
        """As :meth:`locate`, bisecting only ``hashed``'s bucket; rows before ``low`` are smaller.

        The bucket must have been verified (see :meth:`verify_hash_column`).
        """
        fanout = self._fanout
        bucket = hashed >> self._shift
        start = fanout[bucket]
        index = bisect_left(self._hashes, hashed, low if low > start else start, fanout[bucket + 1])
        if index < self.count and self._hashes[index] == hashed:
            return self.locate(hashed, key, index)
        return index, False

    @property
    def lookup(self) -> Lookup | None:
        """The C lookup of this file, None when running pure Python."""
        return self._lookup

    def row_error(self, index: int) -> CannotReadFromStore:
        """The error of row ``index`` failing its checksum."""
        return self._read_error(
            f"row {index} checksum mismatch", self._rows_start + index * self._row_size
        )

    def verify_hash_column(self) -> None:
        """Check every bucket of the hash column against its checksum (once per bucket)."""
        if self._lookup is not None:
            bucket = self._lookup.verify_all()
            if bucket < 0:
                return
            self._bucket_bounds(bucket)  # raises the bucket's error
        for bucket in range(self._buckets):
            self._bucket_bounds(bucket)

    def hash_slice(self, low: int, high: int) -> memoryview:
        """The hash column of rows ``low`` to ``high``, as bytes."""
        return self._hash_bytes[low * HASH_SIZE : high * HASH_SIZE]

    def row_slice(self, low: int, high: int) -> memoryview:
        """Rows ``low`` to ``high``, checksums included, as bytes."""
        start = self._sections.rows
        return self._view[start + low * self._row_size : start + high * self._row_size]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) row, in file order, each checked."""
        key_size = self._key_size
        for index in range(self.count):
            row = self._row(index)
            yield row[:key_size], row[key_size:-CRC_SIZE]

    def close(self) -> None:
        """Unmap the file; a slice still held elsewhere keeps the mapping until freed."""
        if self._lookup is not None:
            self._lookup.release()
        for column in (self._hashes, self._fanout, self._bucket_crcs):
            if isinstance(column, memoryview):
                column.release()
        self._hash_bytes.release()
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


class DataFileWriter:
    """Writes a data file from its hash column and rows, then its fan-out.

    Sections are handed over as lists of buffers (slices of the old file's
    mapping and new rows) and written with ``os.writev``, many at a time,
    without copying them into one buffer first.
    """

    def __init__(
        self, path: str, expected: Expected, generation: int, count: int, tag: int = 0
    ) -> None:
        self.path = path
        self._expected = expected
        self._count = count
        self._bits = fanout_bits_for(count)
        self._row_size = row_size(expected)
        self._sections = _Sections(count, self._bits, self._row_size)
        header = FileHeader(
            MAGIC,
            expected.key_size,
            expected.value_size,
            expected.header_size,
            generation,
            count,
            self._bits,
            tag=tag,
        )
        self._fd = filesystem.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self._written = 0
        self._write([header.encode()])

    def _write(self, buffers: Sequence[bytes | memoryview]) -> None:
        fd = self._fd
        for start in range(0, len(buffers), IOV_MAX):
            batch = buffers[start : start + IOV_MAX]
            size = sum(map(len, batch))
            done = os.writev(fd, batch)
            if done < size:  # a short write: finish this batch one buffer at a time
                self._finish_short_write(batch, done)
            self._written += size

    def _finish_short_write(self, batch: Sequence[bytes | memoryview], done: int) -> None:
        for buffer in batch:
            view = memoryview(buffer)
            if done >= len(view):
                done -= len(view)
                continue
            view = view[done:]
            done = 0
            while view:
                view = view[os.write(self._fd, view) :]

    def write_hashes(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write the whole hash column, ascending."""
        self._write(chunks)

    def write_rows(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write every row, in the order of the hash column."""
        self._write(chunks)

    def write_plan(self, plan: MergePlan, fsync: bool) -> None:
        """Write the hash column, rows and fan-out of a C merge plan, then close the file."""
        tail = plan.write(self._fd, self._sections.hashes, self._bits)
        self._written = self._sections.fanout
        os.lseek(self._fd, self._written, os.SEEK_SET)
        self._finish(tail, fsync)

    def finish(self, fsync: bool) -> None:
        """Write the fan-out and checksums, then close (and fsync) the file."""
        if self._written != self._sections.fanout:
            raise AssertionError(
                f"data file {self.path}: {self._written} bytes written, "
                f"{self._sections.fanout} expected before the fan-out"
            )
        bits, count = self._bits, self._count
        buckets = 1 << bits
        shift = 32 - bits
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                hash_bytes = view[self._sections.hashes : self._sections.rows]
                hashes = _int_column(hash_bytes, HASH_SIZE)
                fanout = [0] * (buckets + 1)
                fanout[buckets] = count
                for bucket in range(1, buckets):
                    fanout[bucket] = bisect_left(hashes, bucket << shift, fanout[bucket - 1])
                bucket_crcs = [
                    crc32(hash_bytes[fanout[b] * HASH_SIZE : fanout[b + 1] * HASH_SIZE])
                    for b in range(buckets)
                ]
                del hashes, hash_bytes
            finally:
                view.release()
        self._finish(struct.pack(f"<{buckets + 1}Q{buckets}I", *fanout, *bucket_crcs), fsync)

    def _finish(self, tail: bytes, fsync: bool) -> None:
        self._write([tail, crc32(tail).to_bytes(CRC_SIZE, "little")])
        if fsync:
            filesystem.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        try:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        finally:
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(self.path)


MAX_FINDINGS = 20


def check_data_file(path: str, name: str = "") -> Iterator[Finding]:
    """Check the data file at ``path`` whole: sections, fan-out, every checksum and the order.

    Stops after ``MAX_FINDINGS`` problems.
    """
    with open(path, "rb") as file:
        try:
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name)
        except CannotLoadStore as error:
            yield Finding(path, 0, error.reason)
            return
        size = os.fstat(file.fileno()).st_size
        row = header.key_size + header.value_size + CRC_SIZE
        bits = header.fanout_bits
        sections = _Sections(header.count, bits, row)
        if size != sections.size or bits > MAX_FANOUT_BITS:
            yield Finding(
                path,
                min(size, sections.size),
                f"data file of {size} bytes, {sections.size} expected for {header.count} rows "
                f"and {bits} fan-out bits",
            )
            return
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        yield from _check_sections(path, view, header, sections)
    finally:
        view.release()
        with contextlib.suppress(BufferError):
            mapped.close()


def _check_sections(
    path: str, data: memoryview, header: FileHeader, sections: _Sections
) -> Iterator[Finding]:
    found = 0

    def at(offset: int) -> memoryview:
        return data[offset:]

    fanout_bytes = at(sections.fanout)[: sections.footer - sections.fanout]
    if crc32(fanout_bytes) != int.from_bytes(at(sections.footer)[:CRC_SIZE], "little"):
        yield Finding(path, sections.fanout, "fan-out checksum mismatch")
        return
    count, buckets = header.count, 1 << header.fanout_bits
    fanout = [int.from_bytes(fanout_bytes[8 * i : 8 * i + 8], "little") for i in range(buckets + 1)]
    if fanout[0] != 0 or fanout[-1] != count or fanout != sorted(fanout):
        yield Finding(
            path, sections.fanout, "fan-out entries out of order or not spanning the rows"
        )
        return
    hash_bytes = at(sections.hashes)[: HASH_SIZE * count]
    hashes = _int_column(hash_bytes, HASH_SIZE)
    shift = 32 - header.fanout_bits
    for bucket in range(buckets):
        low, high = fanout[bucket], fanout[bucket + 1]
        expected_crc = int.from_bytes(
            at(sections.bucket_crcs + CRC_SIZE * bucket)[:CRC_SIZE], "little"
        )
        if crc32(hash_bytes[HASH_SIZE * low : HASH_SIZE * high]) != expected_crc:
            yield Finding(
                path,
                sections.hashes + HASH_SIZE * low,
                f"hash column checksum mismatch in bucket {bucket}",
            )
            found += 1
        elif any(hashed >> shift != bucket for hashed in hashes[low:high]):
            yield Finding(
                path, sections.hashes + HASH_SIZE * low, f"row hashed outside bucket {bucket}"
            )
            found += 1
        if found >= MAX_FINDINGS:
            return
    row_size = header.key_size + header.value_size + CRC_SIZE
    rows = at(sections.rows)
    previous = (-1, b"")
    for index in range(count):
        offset = sections.rows + index * row_size
        row = rows[index * row_size : (index + 1) * row_size]
        what = ""
        if crc32(row) != CRC_RESIDUE:
            what = f"row {index} checksum mismatch"
        else:
            key = bytes(row[: header.key_size])
            current = (key_hash(key), key)
            if current[0] != hashes[index]:
                what = f"row {index}: its key does not hash to the hash column's entry"
            elif current <= previous:
                what = f"row {index} out of order"
            previous = current
        if what:
            yield Finding(path, offset, what)
            found += 1
            if found >= MAX_FINDINGS:
                return
