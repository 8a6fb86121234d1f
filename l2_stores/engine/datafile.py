"""A data file of the format before runs: every binding merged, sorted by key hash.

Stores of that format are converted to runs at their first writer load
(``Index._convert``); until then readers read them here, and the verify tool
checks them. Nothing writes this format any more.

Layout of ``data.<generation>`` (integers little-endian; n rows, k fan-out
bits, R = key size + value size + 4)::

    offset          size          section
    0               64            file header (see ``framing``), magic
                                  ``L2SDATA\\0``, count = n, fan-out bits = k,
                                  tag = the store's word
    H = 64          4 n           hash column: u32 hash of each row's key,
                                  ascending; rows of equal hash by key
    W = H + 4 n     R n           rows: key | value | crc32(key | value)
    F = W + R n     8 (2^k + 1)   fan-out: u64 index of the first row of
                                  each bucket, then n; bucket = hash >> (32 - k)
    C = F + ...     4 2^k         crc32 of each bucket's slice of the hash column
    E = C + 4 2^k   4             crc32 of the fan-out and bucket checksums

A lookup hashes the key, reads its bucket's bounds from the fan-out, checks
the bucket's hash slice against its checksum the first time the bucket is
used, bisects the slice and compares the key of each row of equal hash,
checking the row's checksum every time.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CannotLoadStore, CannotReadFromStore
from . import filesystem
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
    pass

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
        with open(path, "rb") as file, filesystem.naming(path):
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

    def find(self, key: bytes) -> bytes | None:
        """The value bound to ``key``, or None."""
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

    def row_error(self, index: int) -> CannotReadFromStore:
        """The error of row ``index`` failing its checksum."""
        return self._read_error(
            f"row {index} checksum mismatch", self._rows_start + index * self._row_size
        )

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) row, in file order, each checked."""
        key_size = self._key_size
        for index in range(self.count):
            row = self._row(index)
            yield row[:key_size], row[key_size:-CRC_SIZE]

    def close(self) -> None:
        """Unmap the file; a slice still held elsewhere keeps the mapping until freed."""
        for column in (self._hashes, self._fanout, self._bucket_crcs):
            if isinstance(column, memoryview):
                column.release()
        self._hash_bytes.release()
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


MAX_FINDINGS = 20


def check_data_file(path: str, name: str = "") -> Iterator[Finding]:
    """Check the data file at ``path`` whole: sections, fan-out, every checksum and the order.

    Stops after ``MAX_FINDINGS`` problems.
    """
    with open(path, "rb") as file, filesystem.naming(path):
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
