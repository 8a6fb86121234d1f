"""A run: an immutable file of bindings sorted by key bytes, with a filter and an index.

Layout of ``run.<lo>-<hi>`` (integers little-endian; c the row capacity the
writer was given, n <= c rows, W = K + V + 4 the row size, m = filter blocks
for c keys, P rows per fence, F = ceil(c / P) fences of capacity, f =
ceil(n / P) fences used, 2^r radix buckets)::

    offset  size          section
    0       64            file header (``framing``): magic ``L2SRUN\\0\\0``,
                          generation = hi, count = n, fan-out bits = r, tag
    64      64            run header (``RUN_HEADER``): lo, capacity c, m, P,
                          removals, prefix length p, shift s, base u0,
                          live + 1 (0: not known), parts (6 bytes),
                          crc32 of bytes 64..123
    A = 128 64 m          filter (``filter``), over every row's key
    B       K F           fences: the key of rows 0, P, 2P, ..., f of them used
    C       4 (2^r + 1)   radix: u32 index of the first fence of each bucket, then f
    D       W n           rows: key | value | crc32(key | value), keys ascending,
                          each once; a removal has a zero value and its crc
                          inverted (xor 0xFFFFFFFF)
    E       4 ceil((D - A) / 4096)
                          crc32 of each 4 KiB page of A..D

The filter, fences and radix come first because their sizes follow from c,
which the writer knows before it has merged anything; the rows follow as
they are merged. So a run is written in one pass with bounded memory: the
index sections through a shared mapping of the file (page cache, not
process memory), the rows with ``pwrite``.

**Radix.** A key's bucket is ``(u(key) - u0) >> s``, where ``u(key)`` is
the 8 bytes of the key after the first ``p`` (zero-padded) as a big-endian
integer, ``p`` the length of the prefix common to the run's first and last
keys (at most 255: a byte of the header), ``u0`` = u(first key), and ``s``
the smallest shift that maps u(last key) into 2^r buckets. Buckets are
monotonic in the key order and spread evenly for random hashes as for dense
counters (``Int32ub`` levels), so a bucket names a fence or two; skewed keys
only make some buckets longer.

**Live.** The number of live keys (bound, not removed) of the store as of
generation ``hi``: of this run and every older one together. A run from
generation 0 counts its own rows that are not removals; a flush's run adds
what its log changed to the run below; a merge's keeps its newest input's.
Runs written before the field existed hold 0: not known (``live`` None).

**Parts.** The number of batch parts (see ``log``) the store had taken as of
generation ``hi``: a flush's run records the store's count when its log was
frozen, a merge's its newest input's. Runs written before hold 0, as do
stores that never took part in a batch.

**Lookup.** Filter; bounds (first and last key); radix -> fence range ->
bisect the fences -> bisect the fence's P rows (about 4 KiB) -> row
checksum. A seek (the first row at least a key) bisects the same way
and is proven by the checksums and keys of the two rows around its
answer; only when they disagree does it bisect again checking every row
it compares. Each 4 KiB page of A..D is checked against its CRC the first
time a lookup uses it (the file never changes, so once is enough); rows
are checked every time they are read. A run never returns a value that
its checksums do not vouch for: a corrupt byte on the way raises
``CannotReadFromStore`` with the file and offset.

**C.** With the C run reader (``_runs``, see ``accel.py``), a ``Run``
hands ``find``, ``seek``, ``may_contain``, the checked rows and the page
checks to a ``RunReader`` on its mapping, which holds the checked pages;
the same steps as the Python methods below, which run without it. A
``RunWriter`` hands its byte work (rows, filter, fences, radix, page
checksums) to a ``RunBuilder``, which writes the same bytes through the
writer's file descriptor and merges runs' readers without the GIL
(``runstack.merge_runs``); the headers, fsync and abort stay here.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import os
import struct
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, overload

from ..errors import CannotLoadStore, CannotReadFromStore
from . import filesystem, filter
from .accel import AcceleratedRunBuilder, AcceleratedRunReader, RunCorrupt, check_runs_format
from .framing import (
    CRC_RESIDUE,
    CRC_SIZE,
    HEADER_SIZE,
    Expected,
    FileHeader,
    Finding,
    crc32,
    crc_ok,
    decode_header,
    parse_header,
    pwrite_all,
)

if TYPE_CHECKING:
    from ._runs import RunBuilder, RunReader

MAGIC = b"L2SRUN\0\0"
RUN_HEADER = struct.Struct("<QQQIQBBQQ6sI")
PARTS_BYTES = 6
RUN_HEADER_SIZE = 64
assert RUN_HEADER.size == RUN_HEADER_SIZE
FILTER_OFFSET = HEADER_SIZE + RUN_HEADER_SIZE
PAGE = 4096
FENCE_BYTES = 4096  # rows per fence: the power of two of rows closest below this many bytes
RADIX_ENTRY = 4
MAX_RADIX_BITS = 22
MAX_PREFIX = 255  # the radix's prefix length is a byte of the run header
DENSE_SAMPLES = 16  # fences past the first that dense_step checks (not a format's: a reader's)
REMOVAL_MASK = 0xFFFFFFFF
REMOVAL_RESIDUE = zlib.crc32(b"l2" + (zlib.crc32(b"l2") ^ REMOVAL_MASK).to_bytes(4, "little"))
assert REMOVAL_RESIDUE != CRC_RESIDUE
WRITE_CHUNK = 1 << 20
ROW_MISMATCH = "run row checksum mismatch"

#: The run's part of the format, as the C run reader must have it (``_runs.FORMAT``).
FORMAT: Final = {
    "MAGIC": int.from_bytes(MAGIC, "little"),
    "HEADER_SIZE": HEADER_SIZE,
    "RUN_HEADER_SIZE": RUN_HEADER_SIZE,
    "FILTER_OFFSET": FILTER_OFFSET,
    "PAGE": PAGE,
    "CRC_SIZE": CRC_SIZE,
    "CRC_RESIDUE": CRC_RESIDUE,
    "REMOVAL_MASK": REMOVAL_MASK,
    "REMOVAL_RESIDUE": REMOVAL_RESIDUE,
    "RADIX_ENTRY": RADIX_ENTRY,
    "MAX_RADIX_BITS": MAX_RADIX_BITS,
    "MAX_PREFIX": MAX_PREFIX,
    "DENSE_SAMPLES": DENSE_SAMPLES,
}
check_runs_format("run", FORMAT)


class Removed:
    """The value a run holds for a removed key (a tombstone)."""

    _instance: Removed | None = None

    def __new__(cls) -> Removed:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REMOVED"


REMOVED: Final = Removed()

#: What a run holds for a key: a value, a removal, or (None) nothing.
Found = bytes | Removed | None


class _Undecided:
    """What ``Run._decide`` answers when the rows it checked prove nothing."""


UNDECIDED: Final = _Undecided()


def rows_per_fence(row_size: int) -> int:
    """Rows a fence stands for: the largest power of two whose rows fit ``FENCE_BYTES``."""
    rows = 1
    while rows * 2 * row_size <= FENCE_BYTES:
        rows *= 2
    return rows


def radix_bits_for(fences: int) -> int:
    """Radix bits giving about two fences a bucket."""
    bits = 0
    while (2 << bits) < fences and bits < MAX_RADIX_BITS:
        bits += 1
    return bits


def _normalized(key: bytes, prefix: int) -> int:
    return int.from_bytes(key[prefix : prefix + 8].ljust(8, b"\0"), "big")


def dense_step(
    first: bytes, last: bytes, count: int, prefix: int, g: Geometry, fences: Sequence[bytes]
) -> int:
    """A dense run's key spacing, else 0: the step by which the radix coordinate of
    row ``i`` is the first row's plus ``i * step``, at the first and last rows and at
    ``DENSE_SAMPLES + 1`` fences (read unchecked: the step only tells a lookup where to
    look first, and the rows it finds there must prove the answer)."""
    if count < 2 or prefix >= g.key_size:
        return 0
    base = _normalized(first, prefix)
    span = _normalized(last, prefix) - base
    if span <= 0 or span % (count - 1):
        return 0
    step = span // (count - 1)
    for i in range(DENSE_SAMPLES + 1):
        fence = (g.fences - 1) * i // DENSE_SAMPLES
        key = fences[fence]
        if key[:prefix] != first[:prefix] or _normalized(key, prefix) - base != (
            fence * g.fence_rows * step
        ):
            return 0
    return step


def _common_prefix(first: bytes, last: bytes) -> int:
    """The radix's prefix: the length of the prefix common to both keys, at most
    ``MAX_PREFIX`` (keys sharing more only share more of their normalized bytes)."""
    prefix = 0
    for a, b in zip(first[:MAX_PREFIX], last[:MAX_PREFIX], strict=True):
        if a != b:
            break
        prefix += 1
    return prefix


class Geometry:
    """Where each section of a run lies, from its sizes."""

    def __init__(self, expected: Expected, capacity: int, count: int) -> None:
        self.key_size = expected.key_size
        self.value_size = expected.value_size
        self.row_size = expected.key_size + expected.value_size + CRC_SIZE
        self.capacity = capacity
        self.count = count
        self.filter_blocks = filter.filter_blocks(capacity)
        self.fence_rows = rows_per_fence(self.row_size)
        self.fence_capacity = -(-capacity // self.fence_rows)
        self.fences = -(-count // self.fence_rows)
        self.radix_bits = radix_bits_for(self.fence_capacity)
        self.filter = FILTER_OFFSET
        self.fence = self.filter + self.filter_blocks * filter.BLOCK_BYTES
        self.radix = self.fence + self.fence_capacity * self.key_size
        self.rows = self.radix + ((1 << self.radix_bits) + 1) * RADIX_ENTRY
        self.pages = -(-(self.rows - self.filter) // PAGE)
        self.page_crcs = self.rows + count * self.row_size
        self.size = self.page_crcs + self.pages * CRC_SIZE

    def page_bounds(self, page: int) -> tuple[int, int]:
        """The bytes of index page ``page``."""
        start = self.filter + page * PAGE
        return start, min(start + PAGE, self.rows)


_SORT_CHUNK = 4096  # items sorted in one call by sorted_in_steps


def sorted_in_steps(items: list[Any], key: Callable[[Any], Any] | None = None) -> Iterable[Any]:
    """``items`` in order, sorted a chunk at a time.

    One ``sort`` of 100,000 items holds the GIL for tens of milliseconds,
    which readers in other threads would see as a stall; chunks and a lazy
    merge keep every step short.
    """
    if len(items) <= _SORT_CHUNK:
        return sorted(items, key=key)
    chunks = [
        sorted(items[start : start + _SORT_CHUNK], key=key)
        for start in range(0, len(items), _SORT_CHUNK)
    ]
    return heapq.merge(*chunks, key=key)


class _Keys(Sequence[bytes]):
    """Fixed-size keys at a stride in a buffer, as a sequence for ``bisect``."""

    def __init__(self, buffer: memoryview, offset: int, stride: int, size: int, count: int) -> None:
        self._buffer, self._offset, self._stride = buffer, offset, stride
        self._size, self._count = size, count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        start = self._offset + index * self._stride
        return bytes(self._buffer[start : start + self._size])


def _decoded_row(row: bytes | memoryview, key_size: int) -> tuple[bytes, bytes | Removed] | None:
    """A row's key and value (REMOVED for a removal), or None when its checksum fails."""
    residue = crc32(row)
    if residue == CRC_RESIDUE:
        return bytes(row[:key_size]), bytes(row[key_size:-CRC_SIZE])
    if residue == REMOVAL_RESIDUE:
        return bytes(row[:key_size]), REMOVED
    return None


class Run:
    """A run opened for reading: lookups, seeks and ordered scans on its mapping."""

    def __init__(self, path: str, expected: Expected, *, accelerated: bool = True) -> None:
        """Open the run at ``path``; with the C run reader unless not ``accelerated``."""
        self.path = path
        self._name = expected.name
        fd = os.open(path, os.O_RDONLY)
        try:
            with filesystem.naming(path):
                size = os.fstat(fd).st_size
                head = os.pread(fd, FILTER_OFFSET, 0)
            header = decode_header(head, MAGIC, path, expected)
            if len(head) < FILTER_OFFSET or not crc_ok(head[HEADER_SIZE:FILTER_OFFSET]):
                raise self._load_error("run header checksum mismatch", HEADER_SIZE)
            (lo, capacity, blocks, fence_rows, removals, prefix, shift, base, live, parts, _) = (
                RUN_HEADER.unpack(head[HEADER_SIZE:FILTER_OFFSET])
            )
            geometry = Geometry(expected, capacity, header.count)
            if (geometry.fence_rows, geometry.radix_bits, geometry.filter_blocks) != (
                fence_rows,
                header.fanout_bits,
                blocks,
            ) or not header.count <= capacity:
                raise self._load_error("run header disagrees with its sizes", HEADER_SIZE)
            if size != geometry.size:
                raise self._load_error(
                    f"run file is {size} bytes, {geometry.size} expected", min(size, geometry.size)
                )
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        self.header: FileHeader = header
        self.lo, self.hi = lo, header.generation
        self.tag = header.tag
        self.count = header.count
        self.removals = removals
        #: Live keys of the store as of ``hi`` (see the layout), None when not known.
        self.live: int | None = live - 1 if live else None
        #: Batch parts the store had taken as of ``hi`` (see the layout).
        self.parts = int.from_bytes(parts, "little")
        self.geometry = geometry
        self._prefix, self._shift, self._base = prefix, shift, base
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        g = geometry
        self._fences = _Keys(self._view, g.fence, g.key_size, g.key_size, g.fences)
        self._row_keys = _Keys(self._view, g.rows, g.row_size, g.key_size, header.count)
        self.first_key = self.last_key = b""
        self._reader: RunReader[Removed] | None = None
        try:
            self._check_bounds()
            if accelerated and AcceleratedRunReader is not None:
                self._reader = self._accelerated_reader()
            #: A dense run's key spacing: where lookups look first (see ``dense_step``);
            #: the C reader's when there is one (it samples the same fences at its init).
            self.dense_step = (
                self._reader.dense_step()
                if self._reader is not None
                else dense_step(
                    self.first_key, self.last_key, self.count, self._prefix, g, self._fences
                )
            )
        except BaseException:
            self.close()
            raise
        # The index pages checked so far, unless the reader holds them.
        self._checked = bytearray(0 if self._reader is not None else g.pages)

    def _check_bounds(self) -> None:
        """Read the first and last keys, and check the radix's header fields against them."""
        if not self.count:
            return
        first, last = self._row(0), self._row(self.count - 1)
        if first is None or last is None:
            bad = 0 if first is None else self.count - 1
            raise self._load_error(ROW_MISMATCH, self._row_offset(bad))
        self.first_key, self.last_key = first[0], last[0]
        prefix, base = self._prefix, self._base
        span = _normalized(self.last_key, prefix) - base
        if (
            _common_prefix(self.first_key, self.last_key) != prefix
            or _normalized(self.first_key, prefix) != base
            or span >> self._shift >= 1 << self.geometry.radix_bits
        ):
            # (a bucket outside the radix would send lookups to other sections)
            raise self._load_error("run header disagrees with its rows", HEADER_SIZE)

    def _accelerated_reader(self) -> RunReader[Removed]:
        assert AcceleratedRunReader is not None and self._map is not None
        g = self.geometry
        try:
            return AcceleratedRunReader(
                self._map,
                REMOVED,
                g.key_size,
                g.value_size,
                self.count,
                g.filter,
                g.filter_blocks,
                g.fence,
                g.fence_rows,
                g.fences,
                g.radix,
                g.radix_bits,
                g.rows,
                g.page_crcs,
                self._prefix,
                self._shift,
                self._base,
                self.first_key,
                self.last_key,
            )
        except ValueError as error:  # what the checks above should have refused
            raise self._load_error(f"run refused by the C reader: {error}", HEADER_SIZE) from None

    @property
    def reader(self) -> RunReader[Removed] | None:
        """The C reader of this run (for ``_runs.find_first``), or None without it."""
        return self._reader

    def _load_error(self, what: str, offset: int) -> CannotLoadStore:
        return CannotLoadStore(
            f"{what} (file {self.path}, offset {offset})",
            name=self._name,
            path=self.path,
            offset=offset,
        )

    def _read_error(self, what: str, offset: int) -> CannotReadFromStore:
        return CannotReadFromStore(
            f"{what} (file {self.path}, offset {offset})",
            name=self._name,
            path=self.path,
            offset=offset,
        )

    def corruption_error(self, error: RunCorrupt) -> CannotReadFromStore:
        """The store's error for what the C reader found (``RunCorrupt(what, offset)``)."""
        what, offset = error.args
        return self._read_error(str(what), int(offset))

    def _check_pages(self, start: int, end: int) -> None:
        """Check once every index page holding bytes ``start`` .. ``end``."""
        if self._reader is not None:
            try:
                return self._reader.check_pages(start, end)
            except RunCorrupt as error:
                raise self.corruption_error(error) from None
        g = self.geometry
        first, last = (start - g.filter) // PAGE, (end - 1 - g.filter) // PAGE
        for page in range(first, last + 1):
            if self._checked[page]:
                continue
            low, high = g.page_bounds(page)
            stored = int.from_bytes(
                self._view[g.page_crcs + page * CRC_SIZE : g.page_crcs + (page + 1) * CRC_SIZE],
                "little",
            )
            if crc32(self._view[low:high]) != stored:
                raise self._read_error("run index page checksum mismatch", low)
            self._checked[page] = 1

    def _row(self, index: int) -> tuple[bytes, bytes | Removed] | None:
        """Row ``index``, or None when its checksum fails."""
        g = self.geometry
        offset = g.rows + index * g.row_size
        return _decoded_row(self._view[offset : offset + g.row_size], g.key_size)

    def _row_offset(self, index: int) -> int:
        return self.geometry.rows + index * self.geometry.row_size

    def _checked_row(self, index: int) -> tuple[bytes, bytes | Removed]:
        if self._reader is not None:
            try:
                return self._reader.row(index)
            except RunCorrupt as error:
                raise self.corruption_error(error) from None
        row = self._row(index)
        if row is None:
            raise self._read_error(ROW_MISMATCH, self._row_offset(index))
        return row

    def may_contain(self, key_hash: int) -> bool:
        """False when the filter proves no row has a key of CRC-32 ``key_hash``."""
        if self._reader is not None:
            try:
                return self._reader.may_contain(key_hash)
            except RunCorrupt as error:
                raise self.corruption_error(error) from None
        g = self.geometry
        block, bits = filter.probes(key_hash, g.filter_blocks)
        start = g.filter + block * filter.BLOCK_BYTES
        self._check_pages(start, start + filter.BLOCK_BYTES)
        return all(self._view[start + (bit >> 3)] >> (bit & 7) & 1 for bit in bits)

    def _radix(self, bucket: int) -> int:
        offset = self.geometry.radix + bucket * RADIX_ENTRY
        self._check_pages(offset, offset + RADIX_ENTRY)
        return int.from_bytes(self._view[offset : offset + RADIX_ENTRY], "little")

    def _fence_of(self, key: bytes) -> int:
        """The last fence whose key is at most ``key`` (first key <= key <= last key)."""
        g = self.geometry
        bucket = (_normalized(key, self._prefix) - self._base) >> self._shift
        low, high = self._radix(bucket), self._radix(bucket + 1)
        if not (0 <= low <= high <= g.fences):
            raise self._read_error("run radix entry out of range", g.radix + bucket * RADIX_ENTRY)
        if high > low:
            self._check_pages(g.fence + low * g.key_size, g.fence + high * g.key_size)
        return bisect_right(self._fences, key, low, high) - 1

    def _rows_of_fence(self, fence: int) -> tuple[int, int]:
        rows = self.geometry.fence_rows
        if fence < 0:
            raise self._read_error("run fences do not cover their rows", self.geometry.fence)
        return fence * rows, min((fence + 1) * rows, self.count)

    def _decide(self, key: bytes, index: int) -> Found | _Undecided:
        """What rows ``index - 1`` and ``index`` prove of ``key``, both checksums checked:
        row ``index``'s value or ``REMOVED``, None when two sound adjacent rows enclose
        ``key``, else ``UNDECIDED`` (a row fails, or the keys disagree with the bisect)."""
        if index >= self.count:
            return UNDECIDED
        row = self._row(index)
        if row is None:
            return UNDECIDED
        if row[0] == key:
            return row[1]
        if row[0] < key or index == 0:
            return UNDECIDED
        before = self._row(index - 1)
        return None if before is not None and before[0] < key else UNDECIDED

    def _lower_bound(self, key: bytes, low: int, high: int) -> int:
        """The first row of ``low`` .. ``high`` whose key is at least ``key``, checking
        every row it compares (a corrupt key must not steer the search): for when
        ``_decide`` could not."""
        start, end = low, high
        while low < high:
            middle = (low + high) // 2
            row = self._row(middle)
            if row is None:
                return self._lower_bound_around_damage(key, start, end)
            if row[0] < key:
                low = middle + 1
            else:
                high = middle
        return low

    def _lower_bound_around_damage(self, key: bytes, low: int, high: int) -> int:
        """``_lower_bound`` over rows some of which fail their checksum: an answer only
        when no damaged row lies where ``key`` would be."""
        damaged: int | None = None
        for index in range(low, high):
            row = self._row(index)
            if row is None:
                damaged = index if damaged is None else damaged
            elif row[0] == key:
                return index  # what is damaged before it lies below the key
            elif row[0] > key:
                break
            else:
                damaged = None  # a sound row below the key: what was damaged lies before it
        else:
            index = high
        if damaged is not None:  # the key may be a damaged row's
            raise self._read_error(ROW_MISMATCH, self._row_offset(damaged))
        return index

    def find(self, key: bytes, key_hash: int | None = None) -> Found:
        """What this run holds for ``key``: its value, ``REMOVED``, or None."""
        if self._reader is not None:
            try:
                return self._reader.find(key, key_hash)
            except RunCorrupt as error:
                if error.args[0] != ROW_MISMATCH:
                    raise self.corruption_error(error) from None
                # a damaged row: the search around it is Python's
        if not self.count or key < self.first_key or key > self.last_key:
            return None
        if not self.may_contain(crc32(key) if key_hash is None else key_hash):
            return None
        if self.dense_step:
            decided = self._decide(key, self._guess_row(key))
            if decided is not UNDECIDED:
                return decided  # type: ignore[return-value]
        low, high = self._rows_of_fence(self._fence_of(key))
        decided = self._decide(key, bisect_left(self._row_keys, key, low, high))
        if decided is not UNDECIDED:
            return decided  # type: ignore[return-value]
        index = self._lower_bound(key, low, high)
        if index == high:
            return None
        found, value = self._checked_row(index)
        return value if found == key else None

    def seek(self, key: bytes | None) -> int:
        """The index of the first row whose key is at least ``key`` (None: 0)."""
        if self._reader is not None and key is not None:
            try:
                return self._reader.seek(key)
            except RunCorrupt as error:
                if error.args[0] != ROW_MISMATCH:
                    raise self.corruption_error(error) from None
        if key is None or not self.count or key <= self.first_key:
            return 0
        if key > self.last_key:
            return self.count
        if self.dense_step:
            index = self._guess_row(key)
            if self._bound_proven(key, index):
                return index
        low, high = self._rows_of_fence(self._fence_of(key))
        index = bisect_left(self._row_keys, key, low, high)
        if self._bound_proven(key, index):
            return index
        return self._lower_bound(key, low, high)

    def _guess_row(self, key: bytes) -> int:
        """In a dense run, the row ``key`` (first key <= key <= last key) would have,
        or the first one above it."""
        offset: int = _normalized(key, self._prefix) - self._base
        return min(-(-offset // self.dense_step), self.count - 1)

    def _bound_proven(self, key: bytes, index: int) -> bool:
        """Whether rows ``index - 1`` and ``index``, both sound, prove ``index`` the first
        row whose key is at least ``key`` (a row past either end needs no proof)."""
        if index < self.count:
            row = self._row(index)
            if row is None or row[0] < key:
                return False
        if index == 0:
            return True
        before = self._row(index - 1)
        return before is not None and before[0] < key

    def rows(
        self, start: bytes | None = None, stop: bytes | None = None, *, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes | Removed]]:
        """Rows with ``start <= key < stop`` (None: open), removals included, in key order."""
        low = self.seek(start)
        high = self.count if stop is None else self.seek(stop)
        indices = range(high - 1, low - 1, -1) if reverse else range(low, high)
        for index in indices:
            yield self._checked_row(index)

    def close(self) -> None:
        """Let go of the mapping (at once if no view of it is still in use)."""
        if self._reader is not None:
            self._reader.release()
        self._view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a scan still holds a slice
                self._map.close()


class RunWriter:
    """Writes a run from bindings given in ascending key order, in one pass.

    With the C run builder (``_runs.RunBuilder``, see ``accel.py``) the byte
    work (rows, filter, fences, radix, page checksums) is C's, through this
    writer's file descriptor, and runs can be merged into it without the GIL
    (``merge``); without it, or not ``accelerated``, the Python code below
    does it through a shared mapping of the file. Both write the same bytes.
    The file, the headers, fsync and abort are this class's either way.
    """

    def __init__(
        self,
        path: str,
        expected: Expected,
        lo: int,
        hi: int,
        capacity: int,
        tag: int = 0,
        *,
        accelerated: bool = True,
        map_index_from: int | None = None,
        live: int | None = None,
        parts: int = 0,
    ) -> None:
        """A writer of the run ``lo``..``hi`` at ``path`` (created; it must not exist).

        ``live``: the store's live keys as of ``hi``, recorded in the header
        (a run from generation 0 counts its own, whatever is given);
        ``parts``: the store's batch parts as of ``hi``.

        With the C builder, index sections (filter, fences, radix) of at least
        ``map_index_from`` bytes (None: the builder's default, 1 MiB) are written
        through a shared mapping of the file where that is safe, not kept in
        private memory.
        """
        if not 0 <= lo <= hi:
            raise ValueError(f"run generations {lo}..{hi}")
        self.path = path
        self._expected = expected
        self._lo, self._hi, self._tag = lo, hi, tag
        self._live = live
        self._parts = parts
        self._geometry = Geometry(expected, capacity, 0)
        g = self._geometry
        self._done = False  # finished or aborted
        self._fd = filesystem.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        self._map: mmap.mmap | None = None
        self._view = memoryview(b"")
        self._builder: RunBuilder | None = None
        try:
            if accelerated and AcceleratedRunBuilder is not None:
                self._builder = AcceleratedRunBuilder(
                    self._fd,
                    REMOVED,
                    g.key_size,
                    g.value_size,
                    capacity,
                    g.filter_blocks,
                    g.fence_rows,
                    g.radix_bits,
                    g.fence,
                    g.radix,
                    g.rows,
                    *(() if map_index_from is None else (map_index_from,)),
                )
            else:
                # allocated, not a hole: a store into the map must not meet a full disk
                # (SIGBUS); posix_fallocate writes zeros where it cannot allocate
                os.posix_fallocate(self._fd, 0, g.rows)
                self._map = mmap.mmap(self._fd, g.rows)
                self._view = memoryview(self._map)
        except BaseException:
            self.abort()
            raise
        self._count = 0
        self._removals = 0
        self._last: bytes | None = None
        self._first = b""
        self._pending = bytearray()
        self._written = g.rows

    @property
    def mapped(self) -> bool:
        """Whether the C builder writes the index sections through a map of the file."""
        return self._builder is not None and self._builder.mapped

    @property
    def accelerated(self) -> bool:
        """Whether the C run builder writes the bytes (and ``merge`` may be used)."""
        return self._builder is not None

    def add(self, key: bytes, value: bytes | Removed) -> None:
        """Append the row of ``key`` (a key greater than every earlier one)."""
        if self._builder is not None:
            self._builder.add([(key, value)])
            return
        g = self._geometry
        mapped = self._view
        if len(key) != g.key_size:
            raise ValueError(f"key of {len(key)} bytes in a run of {g.key_size}-byte keys")
        if self._last is not None and key <= self._last:
            raise ValueError(f"run keys out of order: {key.hex()} after {self._last.hex()}")
        if self._count >= g.capacity:
            raise ValueError(f"run of capacity {g.capacity} is full")
        if isinstance(value, Removed):
            body = key + bytes(self._expected.value_size)
            crc = crc32(body) ^ REMOVAL_MASK
            self._removals += 1
        else:
            if len(value) != self._expected.value_size:
                raise ValueError(
                    f"value of {len(value)} bytes in a run of "
                    f"{self._expected.value_size}-byte values"
                )
            body = key + value
            crc = crc32(body)
        if self._count % g.fence_rows == 0:
            fence = g.fence + (self._count // g.fence_rows) * g.key_size
            mapped[fence : fence + g.key_size] = key
        if self._last is None:
            self._first = key
        self._last = key
        filter.add(mapped[g.filter : g.fence], crc32(key), g.filter_blocks)
        self._pending += body
        self._pending += crc.to_bytes(CRC_SIZE, "little")
        self._count += 1
        if len(self._pending) >= WRITE_CHUNK:
            self._write_pending()

    def add_rows(self, rows: list[tuple[bytes, bytes | Removed]]) -> None:
        """``add`` each of ``rows`` (in one C call with the C builder)."""
        if self._builder is not None:
            self._builder.add(rows)  # type: ignore[arg-type]
            return
        for key, value in rows:
            self.add(key, value)

    def add_bindings(self, bindings: dict[bytes, bytes | None], *, drop_removals: bool) -> None:
        """Add the rows of ``bindings`` (None: a removal, left out with ``drop_removals``)
        in key order, to a writer nothing was added to; with the C builder, sorted and
        written without the GIL."""
        if self._builder is not None:
            self._builder.add_bindings(bindings, drop_removals)
            return
        if self._count:
            raise ValueError("add_bindings: rows were added already")
        for key in sorted_in_steps(list(bindings)):
            value = bindings[key]
            if value is not None:
                self.add(key, value)
            elif not drop_removals:
                self.add(key, REMOVED)

    def merge(
        self,
        readers: tuple[RunReader[Removed], ...],
        *,
        drop_removals: bool,
        cancel: bytearray | None = None,
    ) -> bool:
        """Append the rows of the runs of ``readers`` (newest first), each key once from
        the newest run that has it, removals left out with ``drop_removals``; in C,
        without the GIL. False when ``cancel[0]`` became nonzero meanwhile (the run
        is then incomplete: abort it). Raises ``RunCorrupt`` (its ``index`` the
        reader's place) when an input row fails its checksum. C builder only."""
        if self._builder is None:
            raise RuntimeError("RunWriter.merge needs the C run builder")
        return self._builder.merge(readers, drop_removals, cancel)

    def _write_pending(self) -> None:
        if self._pending:
            pwrite_all(self._fd, memoryview(self._pending), self._written)
            self._written += len(self._pending)
            self._pending.clear()

    def finish(self, *, fsync: bool = True) -> None:
        """Write the radix, checksums and headers; then fsync (unless not ``fsync``) and close.

        On failure the file is closed and deleted (as by ``abort``) before the error goes on.
        """
        try:
            self._finish(fsync)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _finish(self, fsync: bool) -> None:
        if self._builder is not None:
            count, removals, prefix, shift, base = self._builder.finish()
            self._count, self._removals = count, removals
            g = Geometry(self._expected, self._geometry.capacity, count)
            pwrite_all(self._fd, self._headers(g, prefix, shift, base), 0)
        else:
            self._finish_in_python()
        self._release()
        if fsync:
            filesystem.fsync(self._fd)
        fd, self._fd = self._fd, -1
        os.close(fd)

    def _finish_in_python(self) -> None:
        assert self._map is not None
        self._write_pending()
        g = Geometry(self._expected, self._geometry.capacity, self._count)
        prefix = shift = base = 0
        mapped = self._view
        if self._count:
            assert self._last is not None
            prefix = _common_prefix(self._first, self._last)
            base = _normalized(self._first, prefix)
            span = _normalized(self._last, prefix) - base
            shift = max(0, span.bit_length() - g.radix_bits)
            buckets = 1 << g.radix_bits
            radix = bytearray(((1 << g.radix_bits) + 1) * RADIX_ENTRY)
            fence_keys = _Keys(mapped, g.fence, g.key_size, g.key_size, g.fences)
            bucket = 0
            for fence in range(g.fences):
                fence_bucket = (_normalized(fence_keys[fence], prefix) - base) >> shift
                while bucket <= fence_bucket:
                    radix[bucket * RADIX_ENTRY : (bucket + 1) * RADIX_ENTRY] = fence.to_bytes(
                        RADIX_ENTRY, "little"
                    )
                    bucket += 1
            for rest in range(bucket, buckets + 1):
                radix[rest * RADIX_ENTRY : (rest + 1) * RADIX_ENTRY] = g.fences.to_bytes(
                    RADIX_ENTRY, "little"
                )
            mapped[g.radix : g.rows] = radix
        mapped[:FILTER_OFFSET] = self._headers(g, prefix, shift, base)
        crcs = bytearray()
        for page in range(g.pages):
            low, high = g.page_bounds(page)
            crcs += crc32(mapped[low:high]).to_bytes(CRC_SIZE, "little")
        pwrite_all(self._fd, memoryview(crcs), g.page_crcs)

    def _headers(self, g: Geometry, prefix: int, shift: int, base: int) -> bytes:
        """The file header and the run header (bytes 0 .. ``FILTER_OFFSET``)."""
        live = self._count - self._removals if self._lo == 0 else self._live
        run_header = RUN_HEADER.pack(
            self._lo,
            g.capacity,
            g.filter_blocks,
            g.fence_rows,
            self._removals,
            prefix,
            shift,
            base,
            0 if live is None else live + 1,
            self._parts.to_bytes(PARTS_BYTES, "little"),
            0,
        )[:-CRC_SIZE]
        file_header = FileHeader(
            MAGIC,
            self._expected.key_size,
            self._expected.value_size,
            self._expected.header_size,
            self._hi,
            self._count,
            g.radix_bits,
            tag=self._tag,
        )
        return file_header.encode() + run_header + crc32(run_header).to_bytes(CRC_SIZE, "little")

    def _release(self) -> None:
        """Let go of the mapping or the builder's memory."""
        self._view.release()
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._builder is not None:
            self._builder.close()

    @property
    def count(self) -> int:
        """Rows written so far."""
        return self._builder.count if self._builder is not None else self._count

    def abort(self) -> None:
        """Close and delete the unfinished file (nothing once finished or aborted)."""
        if self._done:
            return
        self._done = True
        try:
            self._release()
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(self.path)


MAX_FINDINGS = 20


def salvage_run(path: str, name: str, lost: list[Finding]) -> Iterator[tuple[bytes, bytes | None]]:
    """The rows of the run at ``path`` whose checksums verify, in key order (None: a
    removal), read without trusting more of the file than its headers; what cannot be
    read is added to ``lost``. For salvage: not a store's read path."""
    try:
        with open(path, "rb") as file:
            head = file.read(FILTER_OFFSET)
            header = parse_header(head[:HEADER_SIZE], MAGIC, path, name)
            if len(head) < FILTER_OFFSET or not crc_ok(head[HEADER_SIZE:FILTER_OFFSET]):
                raise CannotLoadStore("run header checksum mismatch", path=path, offset=HEADER_SIZE)
            capacity = RUN_HEADER.unpack(head[HEADER_SIZE:FILTER_OFFSET])[1]
            expected = Expected(name, header.key_size, header.value_size, header.header_size)
            g = Geometry(expected, capacity, header.count)
            file.seek(g.rows)
            rows = file.read(header.count * g.row_size)
    except (CannotLoadStore, ValueError, OSError) as error:
        offset = getattr(error, "offset", None) or 0
        lost.append(Finding(path, offset, f"run not read: {getattr(error, 'reason', error)}"))
        return
    for index in range(header.count):
        at = index * g.row_size
        row = rows[at : at + g.row_size]
        found = _decoded_row(row, g.key_size) if len(row) == g.row_size else None
        if found is None:
            lost.append(Finding(path, g.rows + at, "run row unreadable (checksum mismatch)"))
            continue
        key, value = found
        yield key, value if isinstance(value, bytes) else None


def check_run(path: str, name: str = "") -> Iterator[Finding]:
    """Every problem of the run at ``path``: checksums, order, fences, radix and filter."""
    try:
        with open(path, "rb") as file:
            header = parse_header(file.read(HEADER_SIZE), MAGIC, path, name)
        expected = Expected(name, header.key_size, header.value_size, header.header_size)
        run = Run(path, expected)
    except CannotLoadStore as error:
        yield Finding(path, error.offset or 0, error.reason)
        return
    except OSError as error:
        yield Finding(path, 0, f"cannot read: {error}")
        return
    try:
        yield from _check_open_run(run)
    finally:
        run.close()


def _check_open_run(run: Run) -> Iterator[Finding]:
    try:
        yield from _check_sections(run)
    except CannotReadFromStore as error:
        yield Finding(run.path, error.offset or 0, error.reason)


def _check_sections(run: Run) -> Iterator[Finding]:
    g = run.geometry
    for page in range(g.pages):
        run._check_pages(*g.page_bounds(page))
    previous: bytes | None = None
    removals = 0
    for index in range(run.count):
        key, value = run._checked_row(index)
        offset = g.rows + index * g.row_size
        if previous is not None and key <= previous:
            yield Finding(run.path, offset, "run rows out of order")
            return
        if index % g.fence_rows == 0 and run._fences[index // g.fence_rows] != key:
            yield Finding(run.path, g.fence + index // g.fence_rows * g.key_size, "fence differs")
            return
        if not run.may_contain(crc32(key)):
            yield Finding(run.path, g.filter, f"filter lacks the key of row {index}")
            return
        # (the radix itself: a dense run's seek guesses past it)
        if run._fence_of(key) != index // g.fence_rows or run.seek(key) != index:
            yield Finding(run.path, g.radix, f"index does not find row {index}")
            return
        removals += value is REMOVED
        previous = key
    if removals != run.removals:
        yield Finding(run.path, HEADER_SIZE, f"{removals} removals, {run.removals} recorded")
