"""Merge: the frozen log and the current data file make the next data file.

The log's bindings are sorted by (key hash, key) and placed in the old data
file by bisection. The new file is then the old file's rows, copied in runs
between those places, with the log's rows inserted, replaced or (for
removals) left out. Old rows are copied as bytes with their checksums, never
decoded one by one, so a merge costs one bisection per logged binding plus a
copy of the file; the old hash column is checked bucket by bucket first, so
that no corruption is carried over under a fresh checksum.

With the C accelerator (see ``accel``), an ordinary merge is one
``MergePlan``: it sorts the log's bindings, frames their rows, then walks the
old file and the new rows together, writing both columns and computing the
fan-out with the GIL released; it writes the very bytes the Python path
writes (the tests compare them).

A GC merge is given a :class:`Selection`: only the retained and the touched
keys are kept, from the old file and the log alike, and retained keys may get
a new value (an indexed file's entry pointing at the value's new place). Its
plan is made from one bisection per kept key, so it costs what is kept, not
what is dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .accel import AcceleratedMerge, CorruptRow
from .datafile import HASH_SIZE, DataFile, DataFileWriter, key_hash
from .framing import Expected, with_crc

if TYPE_CHECKING:
    from ._accel import MergePlan

_SORT_CHUNK = 4096


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


@dataclass(frozen=True)
class Selection:
    """What a GC merge keeps.

    ``retained`` maps each key reachable at the GC's start to a new value, or
    to None to keep its value; every ``touched`` key (written since the GC
    started) keeps its value whatever ``retained`` says; other keys are
    dropped. ``tag`` is the new file's tag.
    """

    retained: Mapping[bytes, bytes | None]
    touched: Set[bytes]
    tag: int


class _Parts:
    """The new file as two lists of buffers: hash column and rows, in the same order."""

    def __init__(self, old: DataFile | None) -> None:
        self.old = old
        self.hashes: list[bytes | memoryview] = []
        self.rows: list[bytes | memoryview] = []
        self.count = 0

    def copy(self, low: int, high: int) -> None:
        """Old rows ``low`` to ``high``."""
        assert self.old is not None
        self.hashes.append(self.old.hash_slice(low, high))
        self.rows.append(self.old.row_slice(low, high))
        self.count += high - low

    def insert(self, hashed: int, row: bytes) -> None:
        """A new row (checksum included)."""
        self.hashes.append(hashed.to_bytes(HASH_SIZE, "little"))
        self.rows.append(row)
        self.count += 1


def _plan(old: DataFile | None, updates: Mapping[bytes, bytes | None]) -> _Parts:
    # The hot loop of every merge, one pass per logged binding: copy and
    # insert of _Parts, inlined.
    parts = _Parts(old)
    hashes, rows = parts.hashes, parts.rows
    ordered = sorted(zip(map(key_hash, updates), updates, strict=True))
    if old is None:
        for hashed, key in ordered:
            value = updates[key]
            if value is not None:
                hashes.append(hashed.to_bytes(HASH_SIZE, "little"))
                rows.append(with_crc(key + value))
        parts.count = len(rows)
        return parts
    place = old.place
    hash_column, row_column = old.hash_slice(0, old.count), old.row_slice(0, old.count)
    row = old.row_size
    position = count = 0
    for hashed, key in ordered:
        index, found = place(hashed, key, position)
        if index > position:
            hashes.append(hash_column[position * HASH_SIZE : index * HASH_SIZE])
            rows.append(row_column[position * row : index * row])
            count += index - position
        value = updates[key]
        if value is not None:
            hashes.append(hashed.to_bytes(HASH_SIZE, "little"))
            rows.append(with_crc(key + value))
            count += 1
        position = index + 1 if found else index
    if old.count > position:
        hashes.append(hash_column[position * HASH_SIZE :])
        rows.append(row_column[position * row :])
        count += old.count - position
    parts.count = count
    return parts


def _selected_plan(
    old: DataFile | None, updates: Mapping[bytes, bytes | None], selection: Selection
) -> _Parts:
    retained, touched = selection.retained, selection.touched
    entries: list[tuple[int, bytes, int | bytes]] = []
    for key, value in updates.items():
        if value is None:
            continue
        if key not in touched:
            if key not in retained:
                continue
            replacement = retained[key]
            if replacement is not None:
                value = replacement
        entries.append((key_hash(key), key, with_crc(key + value)))
    if old is not None:
        for key in (retained.keys() | touched) - updates.keys():
            hashed = key_hash(key)
            index, found = old.locate(hashed, key)
            if not found:
                continue
            new_value = None if key in touched else retained[key]
            row = index if new_value is None else with_crc(key + new_value)
            entries.append((hashed, key, row))
    parts = _Parts(old)
    low = high = -1
    for hashed, _, row in sorted_in_steps(entries):
        if isinstance(row, int):
            if row != high:
                if high > low:
                    parts.copy(low, high)
                low = row
            high = row + 1
        else:
            if high > low:
                parts.copy(low, high)
            low = high = -1
            parts.insert(hashed, row)
    if high > low:
        parts.copy(low, high)
    return parts


def merge(
    old: DataFile | None,
    updates: Mapping[bytes, bytes | None],
    path: str,
    expected: Expected,
    generation: int,
    fsync: bool = True,
    selection: Selection | None = None,
) -> None:
    """Write at ``path`` the data file of ``old`` updated by ``updates``.

    A ``None`` value removes the key; a ``selection`` keeps only what it
    selects. The new file carries the selection's tag, else the old file's.
    The file is complete (and fsynced when ``fsync``) when this returns; on
    error nothing is left at ``path``.
    """
    if old is not None:
        old.verify_hash_column()
    if (
        selection is None
        and AcceleratedMerge is not None
        and (old is None or old.lookup is not None)
    ):
        _merge_in_c(AcceleratedMerge, old, updates, path, expected, generation, fsync)
        return
    if selection is None:
        parts = _plan(old, updates)
        tag = old.tag if old is not None else 0
    else:
        parts = _selected_plan(old, updates, selection)
        tag = selection.tag
    writer = DataFileWriter(path, expected, generation, parts.count, tag)
    try:
        writer.write_hashes(parts.hashes)
        writer.write_rows(parts.rows)
        writer.finish(fsync)
    except BaseException:
        writer.abort()
        raise


def _merge_in_c(
    plan_type: type[MergePlan],
    old: DataFile | None,
    updates: Mapping[bytes, bytes | None],
    path: str,
    expected: Expected,
    generation: int,
    fsync: bool,
) -> None:
    try:
        plan = plan_type(
            old.lookup if old is not None else None,
            list(updates),
            list(updates.values()),
            expected.key_size,
            expected.value_size,
        )
        writer = DataFileWriter(path, expected, generation, plan.count, old.tag if old else 0)
        try:
            writer.write_plan(plan, fsync)
        except BaseException:
            writer.abort()
            raise
    except CorruptRow as error:  # an old row compared by key failed its checksum
        assert old is not None
        raise old.row_error(error.args[0]) from None
