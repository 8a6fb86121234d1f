"""A store's runs as one immutable value: lookups newest first, ordered scans, run writing.

The engine keeps its runs in a :class:`RunStack` and replaces the whole
stack when a flush adds a run or a merge replaces some: a reader takes the
stack once and reads a consistent set of runs, however the engine switches
meanwhile. A run that leaves the stack is not closed: its mapping goes when
the last reader lets go of it (an unlinked file stays readable until then).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

from ..errors import CannotLoadStore, CannotReadFromStore
from . import filesystem
from .accel import (
    AcceleratedMergeCursor,
    AcceleratedRunBuilder,
    RunCorrupt,
    accelerated_count_changes,
    accelerated_find_first,
)
from .datafile import DataFile
from .framing import Expected, crc32
from .levels import Span
from .run import REMOVED, Found, Removed, Run, RunWriter

Row = tuple[bytes, bytes | Removed]
_CANCEL_CHECK = 256
CONVERT_CHUNK = 1 << 18
class Source(Protocol):
    """What a stack reads: a run, or a data file of the format before runs."""

    path: str
    span: Span
    tag: int
    count: int
    #: Live keys of the store as of the source's last generation, None when not known.
    live: int | None
    #: Batch parts the store had taken as of the source's last generation.
    parts: int

    @property
    def reader(self) -> Any:
        """Its C reader (for ``find_first``), or None."""

    def find(self, key: bytes, key_hash: int | None = None) -> Found:
        """Its value, ``REMOVED``, or None."""

    def rows(
        self, start: bytes | None = None, stop: bytes | None = None, *, reverse: bool = False
    ) -> Iterator[Row]:
        """Rows with ``start <= key < stop``, in key order."""

    def close(self) -> None:
        """Let go of the file."""


class OpenRun(Run):
    """A run with the span its name gives."""

    def __init__(self, path: str, expected: Expected, span: Span) -> None:
        super().__init__(path, expected)
        if (self.lo, self.hi) != (span.lo, span.hi):
            found = Span(self.lo, self.hi)
            self.close()
            raise CannotLoadStore(
                f"{path} holds generations {found.lo}..{found.hi}",
                name=expected.name,
                path=path,
                offset=0,
            )
        self.span = span


class LegacyData:
    """A data file of the format before runs, read as the run ``0..generation-1``.

    Only readers of a store no writer has loaded since see one: a writer
    converts it at its load. Its rows are in hash order, so an ordered scan
    sorts them in memory.
    """

    def __init__(self, data: DataFile) -> None:
        self._data = data
        self.path = data.path
        self.span = Span(0, data.generation - 1)
        self.tag = data.tag
        self.count = data.count
        self.live: int | None = data.count  # it holds no removals
        self.parts = 0
        self.reader = None

    def find(self, key: bytes, key_hash: int | None = None) -> Found:
        """Its value or None."""
        return self._data.find(key)

    def rows(
        self, start: bytes | None = None, stop: bytes | None = None, *, reverse: bool = False
    ) -> Iterator[Row]:
        """Rows with ``start <= key < stop``, in key order (sorted in memory)."""
        chosen = [
            (key, value)
            for key, value in self._data.items()
            if (start is None or key >= start) and (stop is None or key < stop)
        ]
        chosen.sort(reverse=reverse)
        return iter(chosen)

    def close(self) -> None:
        """Let go of the file."""
        self._data.close()


def merged_rows(sources: Sequence[Iterable[Row]], *, reverse: bool = False) -> Iterator[Row]:
    """The rows of ``sources`` (each in key order, newest source first) in key order,
    each key once, from the newest source that has it."""
    if len(sources) == 1:
        yield from sources[0]
        return
    decorated = [_aged(source, age) for age, source in enumerate(sources)]
    last: bytes | None = None
    ordered = (
        heapq.merge(*decorated, key=lambda row: (row[0], -row[1]), reverse=True)
        if reverse
        else heapq.merge(*decorated)
    )
    for key, _, value in ordered:
        if key != last:
            last = key
            yield key, value


def _log_rows(
    bindings: dict[bytes, bytes | None],
    keys: list[bytes],
    start: bytes | None,
    stop: bytes | None,
    reverse: bool,
) -> Iterator[Row]:
    """A log's rows (``REMOVED`` for a None) with ``start <= key < stop``, in key order."""
    low = 0 if start is None else bisect_left(keys, start)
    high = len(keys) if stop is None else bisect_left(keys, stop)
    for index in range(high - 1, low - 1, -1) if reverse else range(low, high):
        key = keys[index]
        value = bindings[key]
        yield key, REMOVED if value is None else value


def _without_removals(rows: Iterator[Row]) -> Iterator[tuple[bytes, bytes]]:
    for key, value in rows:
        if not isinstance(value, Removed):
            yield key, value


def _until_closed(
    rows: Iterator[tuple[bytes, bytes]], closed: bytearray, on_closed: Callable[[], BaseException]
) -> Iterator[tuple[bytes, bytes]]:
    """``rows``, each step raising ``on_closed()`` once ``closed[0]`` is set."""
    while True:
        if closed[0]:
            raise on_closed() from None
        try:
            row = next(rows)
        except StopIteration:
            return
        except ValueError:  # a run unmapped by a close between the check and the read
            if closed[0]:
                raise on_closed() from None
            raise
        yield row


def _aged(source: Iterable[Row], age: int) -> Iterator[tuple[bytes, int, bytes | Removed]]:
    for key, value in source:
        yield key, age, value


def _corruption_error_of(newest_first: Sequence[Source], error: RunCorrupt) -> CannotReadFromStore:
    """The error of the run whose C reader (``error.index`` in ``newest_first``) met damage."""
    run = newest_first[error.index]
    assert isinstance(run, Run)  # every run has a C reader
    return run.corruption_error(error)


class RunStack:
    """The runs of a store, oldest first."""

    def __init__(self, runs: Sequence[Source] = ()) -> None:
        self.runs: tuple[Source, ...] = tuple(runs)
        self._counted: int | None = None  # count_live's count, when the runs record none
        self._newest_first = self.runs[::-1]
        readers = [run.reader for run in self._newest_first]
        #: The runs' C readers, newest first, when every run has one (the C read path
        #: of the index searches them itself).
        self.readers: tuple[Any, ...] | None = None
        if accelerated_find_first is not None and readers and None not in readers:
            self.readers = tuple(readers)
        #: The C merge cursor's readers and damage handler, when it serves these runs
        #: (bound once: a seek is a few microseconds).
        self._cursor_readers: tuple[Any, ...] | None = None
        if AcceleratedMergeCursor is not None and (self.readers is not None or not self.runs):
            self._cursor_readers = self.readers or ()
            self._on_cursor_corrupt = partial(_corruption_error_of, self._newest_first)

    def find(self, key: bytes) -> bytes | None:
        """The value the newest run that knows ``key`` holds, or None."""
        if self.readers is not None:
            assert accelerated_find_first is not None
            try:
                found = accelerated_find_first(self.readers, key)
            except RunCorrupt:  # each run again: Python's handling of damage
                return self._find_in_each(key)
            return None if found is REMOVED else found
        return self._find_in_each(key)

    def _find_in_each(self, key: bytes) -> bytes | None:
        if not self._newest_first:
            return None
        key_hash = crc32(key)
        for run in self._newest_first:
            found = run.find(key, key_hash)
            if found is not None:
                return None if found is REMOVED else found  # type: ignore[return-value]
        return None

    def rows(
        self, start: bytes | None = None, stop: bytes | None = None, *, reverse: bool = False
    ) -> Iterator[Row]:
        """Every key's newest row (removals included) with ``start <= key < stop``, in order."""
        return merged_rows(
            [run.rows(start, stop, reverse=reverse) for run in self._newest_first],
            reverse=reverse,
        )

    def live_rows(
        self,
        logs: tuple[tuple[dict[bytes, bytes | None], list[bytes]], ...],
        key_size: int,
        start: bytes | None,
        stop: bytes | None,
        reverse: bool,
        closed: bytearray | None = None,
        on_closed: Callable[[], BaseException] | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """The live bindings with ``start <= key < stop`` in key order (``reverse``:
        descending) of ``logs`` over the runs: each log a dict (None: a removal) with its
        keys in order, newest first, none of them changed while iterated. Once
        ``closed[0]`` is set, each step raises ``on_closed()``.

        The C merge cursor when every run has a C reader; else a merge of each
        source's rows. A damaged row raises its run's ``CannotReadFromStore``.
        """
        if self._cursor_readers is not None:
            try:
                return AcceleratedMergeCursor(  # type: ignore[misc]
                    logs,
                    self._cursor_readers,
                    key_size,
                    start,
                    stop,
                    reverse,
                    self._on_cursor_corrupt,
                    closed,
                    on_closed,
                )
            except RunCorrupt:
                pass  # a seek met damage: Python's merge, which reads around it
        sources = [
            *(_log_rows(bindings, keys, start, stop, reverse) for bindings, keys in logs),
            self.rows(start, stop, reverse=reverse),
        ]
        rows = _without_removals(merged_rows(sources, reverse=reverse))
        if closed is None or on_closed is None:
            return rows
        return _until_closed(rows, closed, on_closed)

    @property
    def parts(self) -> int:
        """Batch parts the store had taken as of the runs (the newest run's count)."""
        return self.runs[-1].parts if self.runs else 0

    @property
    def live(self) -> int | None:
        """Live keys in the runs together (the newest run's count), None when not known."""
        if not self.runs:
            return 0
        recorded = self.runs[-1].live
        return self._counted if recorded is None else recorded

    def count_changes(self, bindings: dict[bytes, bytes | None]) -> int:
        """How many more live keys there are with ``bindings`` (None: a removal) on top of
        the runs (one lookup a key: in C without the GIL when every run has a reader)."""
        if self.readers is not None:
            assert accelerated_count_changes is not None
            with contextlib.suppress(RunCorrupt):  # each key again: Python's handling of damage
                return accelerated_count_changes(self.readers, bindings)
        changes = 0
        for key, value in bindings.items():
            changes += (value is not None) - (self._find_in_each(key) is not None)
        return changes

    def count_live(self) -> int:
        """:attr:`live`, counted by reading every row once when no run records it."""
        live = self.live
        if live is None:
            live = self._counted = sum(
                not isinstance(value, Removed) for _, value in self.rows()
            )
        return live

    @property
    def spans(self) -> list[Span]:
        """The runs' spans, oldest first."""
        return [run.span for run in self.runs]

    @property
    def generation(self) -> int:
        """The first generation no run holds (0 without runs)."""
        return self.runs[-1].span.hi + 1 if self.runs else 0

    @property
    def tag(self) -> int:
        """The word the store keeps with its runs (the highest of them; 0 without runs)."""
        return max((run.tag for run in self.runs), default=0)

    def with_run(self, run: Source) -> RunStack:
        """This stack with ``run`` (the next generations) on top."""
        return RunStack((*self.runs, run))

    def replaced(self, group: Sequence[Span], run: Source) -> RunStack:
        """This stack with the adjacent runs of ``group`` replaced by ``run``."""
        spans = self.spans
        at = spans.index(group[0])
        if spans[at : at + len(group)] != list(group):
            raise ValueError(f"runs {group} are not adjacent in {spans}")
        return RunStack((*self.runs[:at], run, *self.runs[at + len(group) :]))

    def select(self, group: Sequence[Span]) -> list[Source]:
        """The runs of ``group``."""
        by_span = {run.span: run for run in self.runs}
        return [by_span[span] for span in group]

    def close(self) -> None:
        """Close every run (the stack is no longer read)."""
        for run in self.runs:
            run.close()


def write_run(
    path: str,
    expected: Expected,
    span: Span,
    rows: Iterable[Row],
    capacity: int,
    *,
    tag: int = 0,
    drop_removals: bool = False,
    cancelled: Callable[[], bool] | None = None,
    fsync: bool = True,
    live: int | None = None,
    parts: int = 0,
) -> int:
    """Write the run of ``span`` at ``path`` from ``rows`` (in key order); return its row count.

    ``live`` and ``parts`` are recorded as the store's live keys and batch
    parts as of the run (see run.py).

    Removals are left out with ``drop_removals`` (nothing older remains for
    them to hide). The rows go to the writer a batch at a time (one C call
    each with the C run builder); ``cancelled`` is asked before each batch;
    when it says so the file is deleted and :class:`Cancelled` raised.
    """
    writer = RunWriter(path, expected, span.lo, span.hi, capacity, tag, live=live, parts=parts)
    try:
        iterator = iter(rows)
        while batch := list(itertools.islice(iterator, _CANCEL_CHECK)):
            if cancelled is not None and cancelled():
                raise Cancelled(path)
            # (no explicit yield: each batch is one short C call, so the interpreter's
            # switch interval lets other threads in; a time.sleep(0) here cost up to a
            # switch interval per batch whenever another thread was busy)
            if drop_removals:
                batch = [row for row in batch if row[1] is not REMOVED]
            writer.add_rows(batch)
        writer.finish(fsync=fsync)
    except BaseException:
        writer.abort()
        raise
    return writer.count


def write_bindings(
    path: str,
    expected: Expected,
    span: Span,
    bindings: dict[bytes, bytes | None],
    *,
    tag: int = 0,
    drop_removals: bool = False,
    live: int | None = None,
    parts: int = 0,
) -> int:
    """Write the run of ``span`` at ``path`` from a log's ``bindings`` (None: a removal,
    left out with ``drop_removals``); return its row count. With the C run builder
    the sort and the writing run without the GIL. ``live`` and ``parts`` as for
    ``write_run``."""
    writer = RunWriter(
        path, expected, span.lo, span.hi, len(bindings), tag, live=live, parts=parts
    )
    try:
        writer.add_bindings(bindings, drop_removals=drop_removals)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.count


def merge_runs(
    path: str,
    expected: Expected,
    span: Span,
    sources: Sequence[Source | Run],
    *,
    tag: int = 0,
    drop_removals: bool = False,
    cancel: bytearray | None = None,
    fsync: bool = True,
) -> int:
    """Write the run of ``span`` at ``path`` merging ``sources`` (newest first, each key
    from the newest source that has it); return its row count.

    In C without the GIL when every source is a run with a C reader and the C
    run builder is there; else ``write_run`` of ``merged_rows``. Either way
    removals are left out with ``drop_removals``, a source's damaged row
    raises its ``CannotReadFromStore``, and a nonzero ``cancel[0]`` gives the
    merge up (the file deleted, :class:`Cancelled` raised).
    """
    capacity = sum(source.count for source in sources)
    live = sources[0].live if sources else 0  # the store as of the newest source
    parts = sources[0].parts if sources else 0
    runs = [source for source in sources if isinstance(source, Run)]
    readers = tuple(run.reader for run in runs if run.reader is not None)
    if AcceleratedRunBuilder is None or len(readers) != len(sources):
        return write_run(
            path,
            expected,
            span,
            merged_rows([source.rows() for source in sources]),
            capacity,
            tag=tag,
            drop_removals=drop_removals,
            cancelled=None if cancel is None else lambda: bool(cancel[0]),
            fsync=fsync,
            live=live,
            parts=parts,
        )
    writer = RunWriter(path, expected, span.lo, span.hi, capacity, tag, live=live, parts=parts)
    try:
        try:
            done = writer.merge(
                readers,
                drop_removals=drop_removals,
                cancel=cancel,
            )
        except RunCorrupt as error:
            raise runs[error.index].corruption_error(error) from None
        if not done:
            raise Cancelled(path)
        writer.finish(fsync=fsync)
    except BaseException:
        writer.abort()
        raise
    return writer.count


class Cancelled(Exception):
    """A run's writing was given up (the store is closing)."""


def convert_legacy(
    data: DataFile,
    directory: str,
    target: str,
    expected: Expected,
    chunk: int = CONVERT_CHUNK,
) -> None:
    """Write the run of ``data`` (a data file of the format before runs) at ``target``.

    Its rows are in hash order: they are sorted ``chunk`` at a time into
    temporary runs, which are then merged, so memory stays bounded.
    """
    span = Span(0, data.generation - 1)
    rows = data.items()
    pieces: list[str] = []
    try:
        while True:
            batch = [row for _, row in zip(range(chunk), rows, strict=False)]
            if not batch and pieces:
                break
            batch.sort()
            if not pieces and len(batch) < chunk:  # it all fits in one piece
                write_run(target, expected, span, batch, len(batch), tag=data.tag)
                return
            piece = os.path.join(directory, f"run.convert-{len(pieces)}.tmp")
            write_run(piece, expected, span, batch, len(batch), fsync=False)
            pieces.append(piece)
        opened = [Run(piece, expected) for piece in pieces]
        try:
            merge_runs(target, expected, span, opened, tag=data.tag)
        finally:
            for run in opened:
                run.close()
    finally:
        for piece in pieces:
            filesystem.unlink(piece)
