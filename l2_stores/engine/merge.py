"""Merge: the frozen log and the current data file make the next data file.

The log's bindings are sorted by (key hash, key) and placed in the old data
file by bisection. The new file is then the old file's rows, copied in runs
between those places, with the log's rows inserted, replaced or (for
removals) left out. Old rows are copied as bytes with their checksums, never
decoded one by one, so a merge costs one bisection per logged binding plus a
copy of the file; the old hash column is checked bucket by bucket first, so
that no corruption is carried over under a fresh checksum.

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
from typing import Any

from .datafile import HASH_SIZE, DataFile, DataFileWriter, key_hash
from .framing import Expected, with_crc

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
    parts = _Parts(old)
    copy, insert = parts.copy, parts.insert
    position = 0
    for hashed, key, value in sorted([(key_hash(k), k, v) for k, v in updates.items()]):
        index, found = old.locate(hashed, key, position) if old is not None else (0, False)
        if index > position:
            copy(position, index)
        if value is not None:
            insert(hashed, with_crc(key + value))
        position = index + 1 if found else index
    if old is not None and old.count > position:
        copy(position, old.count)
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
