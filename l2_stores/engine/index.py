"""The index engine: logs of recent bindings over immutable runs sorted by key.

State: the *active* log ``log.G`` that takes new bindings (and its dict);
during a flush, the *frozen* log ``log.G-1`` (and its dict); and the runs
``run.lo-hi``, which tile the generations below (see run.py for a run,
levels.py for which runs a store holds and which it merges).

Flush: when the active log holds ``buffer_size`` records and no flush runs,
the next log (prepared by the previous flush) is put in place, the active
one is sealed and frozen, and the next takes its place; a background
thread writes the frozen dict as the run ``G-1..G-1``, fsyncs it and
renames it into place; the switch, in the store's exclusive section, puts
it on the run stack, forgets the frozen dict, deletes the frozen log and
starts the run merges the policy asks for. Reads go on meanwhile (active
dict, frozen dict, runs newest first); so do writes, into the active log,
up to ``LOG_CAP_FACTOR`` times the buffer (from ``PACE_FACTOR`` times,
each write gives the flush a moment).
The code still calls a flush a *merge* (``_run_merge``, ``wait_merge``).

Run merges: a thread per group of runs writes their merge, renames it into
place and switches it in; ``close`` cancels the ones still writing.

GC: ``begin_gc`` (in the exclusive section) returns a lookup into the
bindings as they are and starts recording the keys written from then on;
``collect`` (from the GC's thread) freezes the log and writes one run of
everything kept (a ``Selection``: the retained keys and the touched ones),
which replaces every run: a crash before its rename leaves the old content,
one after it the new.

Recovery: the runs whose names tile the generations from 0 are the store
(a run that covers others supersedes them); the logs above them are
replayed in order, torn tails dropped; superseded files and ``.tmp``
leftovers are deleted; a frozen log left by a flush cut short is flushed
again. A data file of the format before runs is converted at a writer's
load (see runstack.convert_legacy).

The C read path (``Layers``) and the C put (``Writer``) get the state above
from ``_hand_over`` whenever it changes; they read no attribute of the index.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from _thread import start_new_thread as start_thread
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ..errors import CannotLoadStore, CannotReadFromStore, CannotWriteToStore
from . import filesystem, layout
from .accel import AcceleratedLayers, AcceleratedWriter
from .counters import Counters, EngineStats
from .datafile import DataFile
from .framing import CRC_SIZE, HEADER_SIZE, Expected
from .hooks import Hooks
from .interface import Prepared, ReferencedValues
from .levels import Span, TilingError, live_and_superseded, merged, merges
from .lock import WriterLock, loaded_writer
from .log import (
    OP_MASK,
    OP_SET,
    PARTS_VERSION,
    SEALED_VERSION,
    LogScan,
    LogWriter,
    SpareLog,
    part_spans,
    read_log,
    record_size,
)
from .runstack import (
    Cancelled,
    LegacyData,
    OpenRun,
    RunStack,
    Source,
    convert_legacy,
    merge_runs,
    write_bindings,
    write_run,
)
from .selection import Selection

if TYPE_CHECKING:
    from ._accel import Writer

logger = logging.getLogger("l2_stores.engine")

_MISSING = object()
_RELOAD_ATTEMPTS = 50


class GcMergeRenamed(CannotWriteToStore):
    """A GC's merged data file was renamed into place, then could not be opened.

    The next load sees the GC's result, so the files it points into must stay;
    in memory the store goes on with the old content, and its next ordinary
    merge supersedes the GC's file.
    """


#: While a merge runs, the active log may grow to this many times the buffer
#: size before a writer waits for the merge: writers are not stalled by a slow
#: merge, and memory stays bounded.
LOG_CAP_FACTOR = 3

#: Past this many times the buffer size while a merge runs, each write first
#: gives the merge up to ``PACE_SECONDS``: writers that outrun merges slow
#: down a little, early, rather than stall for a whole merge at the cap.
PACE_FACTOR = 2.75
PACE_SECONDS = 0.0002


class _GcMerge:
    """A GC's merge: its selection, then its outcome once the merge thread is done."""

    def __init__(self, selection: Selection, on_switch: Callable[[], None] | None) -> None:
        self.selection = selection
        self.on_switch = on_switch
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.renamed = False
        self.path = ""


def _no_spare() -> SpareLog | None:
    return None


def _delete(paths: list[str]) -> None:
    """Delete superseded engine files; leftovers of a failure go at the next writer load."""
    for path in paths:
        with contextlib.suppress(OSError):
            filesystem.unlink(path)


def _flushed_live(stack: RunStack, bindings: dict[bytes, bytes | None], name: str) -> int | None:
    """The live keys of ``stack`` with a flush's ``bindings`` on top, for its run; None
    when the stack's count is not known, or a damaged run below stops the lookups (a
    later count reads the runs again; the flush goes on)."""
    live = stack.live
    if live is None:
        return None
    try:
        return live + stack.count_changes(bindings)
    except CannotReadFromStore:
        logger.warning("%s: a damaged run: the flush's run records no count", name, exc_info=True)
        return None


class PreparedPart(Prepared):
    """A batch's part for an index's log (``Index.prepare_part``).

    ``ops`` may change until ``write`` (an indexed file's entries point at values it
    appends then)."""

    def __init__(self, index: Index, ops: list[tuple[bytes, bytes | None]]) -> None:
        self._index = index
        self.ops = ops
        self._log: LogWriter | None = None
        self._end_at = -1

    def make_room(self) -> None:
        """Make room in the log for the part: a full log (or one of an older version,
        which takes no part) is handed over to a merge."""
        self._log = self._index._log_for_part()

    def write(self) -> None:
        """Write the part without its end (``LogWriter.open_part``)."""
        assert self._log is not None
        self._end_at = self._log.open_part(self.ops)

    def end(self) -> None:
        """Write the part's end in the log (the batch committed): it binds there."""
        assert self._log is not None
        self._log.end_part(self._end_at)

    def take(self) -> None:
        """Bind the part here, after ``end``."""
        assert self._log is not None
        self._index._part_taken(self._log, self.ops)

    def cancel(self) -> None:
        """Take the part back (the batch gave up before its commit point)."""
        assert self._log is not None
        self._log.cancel_part()


class EngineSnapshot:
    """An index's bindings at one moment: its log dicts then (never changed afterwards:
    the index copies a shared dict before writing to it) over its run stack then."""

    def __init__(
        self,
        index: Index,
        active: dict[bytes, bytes | None],
        frozen: dict[bytes, bytes | None] | None,
        stack: RunStack,
    ) -> None:
        self._index = index
        self._logs = (active,) if frozen is None else (active, frozen)
        self._stack = stack
        if AcceleratedLayers is not None:  # the index's C read path, on these dicts and runs
            layers = AcceleratedLayers()
            layers.set(active, frozen, stack.readers, stack.find if stack.runs else None)
            self.get = layers.get  # type: ignore[method-assign,assignment]

    def get(self, key: bytes) -> bytes | None:
        """The value bound to ``key`` then, or None (the C read path replaces it)."""
        for bindings in self._logs:
            value = bindings.get(key, _MISSING)
            if value is not _MISSING:
                return value  # type: ignore[return-value]
        return self._stack.find(key)

    def items(
        self,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
        closed: bytearray | None = None,
        on_closed: Callable[[], BaseException] | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """The bindings then with ``start <= key < stop``, as ``Index.items``."""
        logs = tuple((bindings, self._index._sorted_keys(bindings)) for bindings in self._logs)
        return self._stack.live_rows(
            logs, self._index._expected.key_size, start, stop, reverse, closed, on_closed
        )

    def live_count(self) -> int:
        """The number of live bindings then."""
        logged: dict[bytes, bytes | None] = {}
        for bindings in reversed(self._logs):
            logged.update(bindings)
        return self._stack.count_live() + self._stack.count_changes(logged)


class Index:
    """The engine of indexable stores (see the module docstring)."""

    def __init__(
        self,
        directory: str,
        expected: Expected,
        *,
        readonly: bool,
        buffer_size: int = 10_000,
        fsync: bool = False,
        exclusive: Callable[[], AbstractContextManager[None]] | None = None,
        referenced: ReferencedValues | None = None,
        committed: Callable[[int], bool] | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"index_buffer_size must be at least 1, got {buffer_size}")
        self.directory = directory
        #: Named points where tests step in (see hooks.py).
        self.hooks = Hooks()
        #: Merges done and bytes written since the load (see ``stats``).
        self.counters = Counters()
        #: The records the active log held when this index took it (a load's reopened log).
        self._log_records_from = 0
        self._expected = expected
        self._key_size = expected.key_size
        self._name = expected.name
        self._readonly = readonly
        self._buffer_size = buffer_size
        self._log_cap = LOG_CAP_FACTOR * buffer_size
        self._pace_from = int(PACE_FACTOR * buffer_size)
        self._fsync = fsync
        self._exclusive = exclusive or contextlib.nullcontext
        self._referenced = referenced
        #: The batch journal's word on a part (by ordinal) a power loss may
        #: have left without its journal record (see ``_committed_parts``).
        self._committed = committed
        #: Batch parts taken (see ``log``): the runs' and the logs' together;
        #: those of the frozen log and before, for its run.
        self._parts = 0
        self._frozen_parts = 0
        self._marked_parts = 0  # the parts a close's mark made durable
        #: A part was taken since the referenced values were last synced: its values
        #: were appended without an fsync (with fsync, every other append syncs them).
        self._unsynced_values = False
        #: Called before the engine makes its logs durable (a merge, a close's
        #: mark): the batch journal makes the parts they hold durable first.
        self.before_durable: Callable[[], None] | None = None
        self._active: dict[bytes, bytes | None] = {}
        self._frozen: dict[bytes, bytes | None] | None = None
        #: Whether an iterator holds the active dict: the next write copies it first
        #: (the C put declines meanwhile), so the iterator's dict never changes.
        self._shared = False
        #: The sorted keys of the log dicts last iterated, of those the index still
        #: holds: (dict, keys, how many of the dict's keys the list holds).
        self._key_orders: tuple[tuple[dict[bytes, bytes | None], list[bytes], int], ...] = ()
        #: The log dicts with their keys in order as ``items`` last gave them, newest
        #: first (until ``_hand_over``).
        self._logs_in_order: tuple[tuple[dict[bytes, bytes | None], list[bytes]], ...] | None = None
        self._stack = RunStack()
        self._log: LogWriter | None = None
        #: Bytes of records a new log allocates ahead, for the C put to write
        #: through a map: only where that put runs (no fsync, the accelerator).
        self._log_ahead = 0
        if AcceleratedWriter is not None and not fsync:
            self._log_ahead = self._log_cap * record_size(expected)
        self._lock: WriterLock | None = None
        self._closed = False
        #: Nonzero once closed: the run merges poll it (in C, without the GIL).
        self._cancel_merges = bytearray(1)
        # merge state
        #: Whether a merge runs (on a thread of its own). ``pacing`` tells the
        #: stores when ``reserve`` may wait: a merge runs and the active log
        #: holds ``_pace_from`` records or more (set by the Python put, which
        #: takes every put from there on; cleared by the switch).
        self._merging = False
        self.pacing = False
        self._merge_ready = threading.Event()
        self._merge_outcome: OpenRun | BaseException | None = None
        self._merge_ticket = 0
        self._merge_gc: _GcMerge | None = None
        # The next log, prepared by the last merge, and the one its successor prepares.
        self._spare: SpareLog | None = None
        self._merge_spare: SpareLog | None = None
        self._switch_lock = threading.Lock()
        #: Files superseded by a switch, not deleted yet (see _delete_superseded).
        self._superseded: list[str] = []
        self._delete_lock = threading.Lock()
        # run merges: the runs being merged (under _switch_lock), how many merge
        # threads are writing, and what finished threads left to switch in
        self._busy: set[Span] = set()
        self._hold_merges = False
        self._run_merges = 0
        self._merged: list[tuple[list[Span], OpenRun | None, list[str]]] = []
        self._run_merges_changed = threading.Condition()
        # GC state: keys written since begin_gc(), until collect() freezes the log
        self._touched: set[bytes] | None = None
        #: Why writes are refused (``refuse_writes``); None: they are not.
        self._refusal: str | None = None
        # The C read path and the C put, handed the state above by _hand_over
        # whenever it changes (the log, the dicts, the runs, merging, touched).
        self._layers = AcceleratedLayers() if AcceleratedLayers is not None else None
        if self._layers is not None:
            self.get = self._layers.get  # type: ignore[method-assign,assignment]
        self._writer: Writer | None = None
        if AcceleratedWriter is not None:  # the common put in C, the rest in _put_in_python
            self._writer = AcceleratedWriter(
                weakref.WeakMethod(self._put_in_python),
                buffer_size,
                self._pace_from,
                expected.key_size,
                expected.value_size,
            )
            self.put = self._writer.put  # type: ignore[method-assign]
        self._hand_over()
        # read-only state: the listing and scans seen at the last (re)load
        self._seen: tuple[int, tuple[int, ...]] | None = None
        self._scans: list[LogScan] = []
        try:
            if readonly:
                self._load_readonly()
            else:
                self._open_writer()
        except OSError as error:
            raise CannotLoadStore(
                f"cannot load: {error}", name=self._name, path=directory
            ) from error

    # ---------------------------------------------------------------- reads

    def get(self, key: bytes) -> bytes | None:
        """The value bound to ``key``, or None (the C layers replace it per instance)."""
        value = self._active.get(key, _MISSING)
        if value is _MISSING:
            frozen = self._frozen
            if frozen is not None:
                value = frozen.get(key, _MISSING)
            if value is _MISSING:
                return self._stack.find(key)
        return value  # type: ignore[return-value]

    def items(
        self,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
        closed: bytearray | None = None,
        on_closed: Callable[[], BaseException] | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """A snapshot, taken now and iterated lazily, of the live bindings with
        ``start <= key < stop`` (None: open) in key order (``reverse``: descending);
        once ``closed[0]`` is set (the caller closed), each step raises ``on_closed()``.

        Nothing is copied: the iterator holds the log dicts of this moment (the
        frozen one never changes; the active one is copied by the next write, see
        ``_shared``), their keys in order, and the run stack.
        """
        logs = self._logs_in_order
        if logs is None or not self._shared or len(logs[0][1]) != len(self._active):
            logs = self._logs_to_iterate()
        return self._stack.live_rows(logs, self._key_size, start, stop, reverse, closed, on_closed)

    def _logs_to_iterate(self) -> tuple[tuple[dict[bytes, bytes | None], list[bytes]], ...]:
        """The log dicts with their keys in order, newest first, shared from now on."""
        if not self._shared:
            self._shared = True
            self._hand_over()
        active, frozen = self._active, self._frozen
        logs = (
            ((active, self._sorted_keys(active)),)
            if frozen is None
            else ((active, self._sorted_keys(active)), (frozen, self._sorted_keys(frozen)))
        )
        # (the same dicts until _hand_over: a shared one only grows, see _sorted_keys)
        self._logs_in_order = logs
        return logs

    def stats(self) -> EngineStats:
        """The runs, merges and bytes written since the load, and the bindings not yet in a run."""
        log = self._log
        logged = 0 if log is None else log.records - self._log_records_from
        counters = self.counters
        return EngineStats(
            runs=len(self._stack.runs),
            merges=counters.merges,
            merge_seconds=counters.merge_seconds,
            bytes_written=counters.bytes_written + logged * record_size(self._expected),
            pending_records=len(self._active) + len(self._frozen or ()),
        )

    def _count_log_bytes(self, log: LogWriter) -> None:
        """Count the bytes this index appended to ``log``, which takes no more."""
        self.counters.wrote((log.records - self._log_records_from) * record_size(self._expected))
        self._log_records_from = 0

    def snapshot(self) -> EngineSnapshot:
        """The bindings of this moment, held without a copy (see ``items``)."""
        if not self._shared:
            self._shared = True
            self._hand_over()
        return EngineSnapshot(self, self._active, self._frozen, self._stack)

    def _sorted_keys(self, bindings: dict[bytes, bytes | None]) -> list[bytes]:
        """The keys of a log dict in order, from the cache when it is there.

        A log dict never loses a key (a removal binds None), and keeps its keys
        in the order they came: those a cached list lacks are its last ones.
        A list once returned is never changed (iterators hold it).
        """
        orders = self._key_orders
        for cached, keys, covered in orders:
            if cached is bindings:
                if covered == len(bindings):
                    return keys  # complete: as it was
                added = list(itertools.islice(reversed(bindings), len(bindings) - covered))
                keys = keys + added
                keys.sort()  # two sorted runs after sorting the added ones: linear
                break
        else:
            keys = sorted(bindings)
        # only the dicts the index holds now: a dict an iterator alone holds goes with it
        live = (self._active, self._frozen)
        rest = tuple(e for e in orders if e[0] is not bindings and any(e[0] is d for d in live))
        self._key_orders = ((bindings, keys, len(keys)), *rest)
        return keys

    def _unshare(self) -> None:
        """Before a write into the active dict that an iterator holds: copy it."""
        held = self._active
        self._active = dict(held)
        self._shared = False
        # the copy has the same keys, in the same order: it takes over their cached order
        self._key_orders = tuple(
            (self._active, keys, covered) if cached is held else (cached, keys, covered)
            for cached, keys, covered in self._key_orders
        )
        self._hand_over()

    def live_count(self) -> int:
        """The exact number of live bindings: the runs' recorded count and what the
        logs change (a lookup of each logged key)."""
        logged = dict(self._frozen) if self._frozen is not None else {}
        logged.update(self._active)
        return self._stack.count_live() + self._stack.count_changes(logged)

    def _hand_over(self) -> None:
        """Hand the C read path and the C put the current state (after any change of
        the log, the dicts, the runs, ``_merging`` or ``_touched``)."""
        self._logs_in_order = None
        if self._layers is not None:
            stack = self._stack
            self._layers.set(
                self._active, self._frozen, stack.readers, stack.find if stack.runs else None
            )
        self._hand_over_to_writer()

    def _hand_over_to_writer(self) -> None:
        if self._writer is not None:  # (no log: every put goes to _put_in_python)
            self._writer.set(
                self._log if self._refusal is None else None,
                self._active,
                self._merging,
                self._touched is not None or self._shared,
            )

    @property
    def generation(self) -> int:
        """The first generation no run holds (0 before the first flush)."""
        return self._stack.generation

    @property
    def tag(self) -> int:
        """The word kept with the runs (0 until a GC sets it)."""
        return self._stack.tag

    # --------------------------------------------------------------- writes

    def reserve(self) -> None:
        """If the active log is full and a merge runs, wait for its file (pace before).

        Called before the writer's exclusive section, so that readers are not
        held up while the writer waits; the switch then takes no time.
        """
        log = self._log
        if log is not None and self._merging:
            if log.records >= self._log_cap:
                self._merge_ready.wait()
            elif log.records >= self._pace_from:
                self._merge_ready.wait(PACE_SECONDS)

    def can_put_at_once(self) -> bool:
        """Whether a put now takes no merge step and no fsync (asyncio's inline path)."""
        log = self._log
        return log is not None and not self._fsync and log.records + 1 < self._buffer_size

    def put(self, key: bytes, value: bytes, flush: bool) -> None:
        """Bind ``key`` to ``value`` (the C writer replaces it per instance)."""
        # The hot path of every add: _writable_log and _after_append only when needed.
        log = self._log
        if log is None or log.records >= self._buffer_size or self._refusal is not None:
            log = self._writable_log()
        log.append_set(key, value, flush)
        if self._shared:
            self._unshare()
        self._active[key] = value
        if self._touched is not None:
            self._touched.add(key)
        if log.records >= self._buffer_size:
            self._after_append(log)

    #: What the C writer calls for every put it does not do itself.
    _put_in_python = put

    def remove(self, key: bytes, *, flush: bool) -> None:
        """Unbind ``key`` (a record is logged even if it looks absent)."""
        log = self._writable_log()
        log.append_remove(key, flush)
        if self._shared:
            self._unshare()
        self._active[key] = None
        if self._touched is not None:
            self._touched.add(key)
        self._after_append(log)

    def flush(self) -> None:
        """Hand every pending record to the OS (and the disk with fsync)."""
        if self._log is not None:
            try:
                self._values_first()
            except OSError as error:
                raise CannotWriteToStore(
                    f"cannot fsync the values: {error}", name=self._name, path=self.directory
                ) from error
            self._log.flush()

    def _values_first(self) -> None:
        """Before the log is fsynced: the values it points at (a batch's are not yet)."""
        if self._fsync and self._referenced is not None and self._unsynced_values:
            self._referenced.sync()
            self._unsynced_values = False

    # ------------------------------------------------------- batch parts

    @property
    def parts(self) -> int:
        """The batch parts this store has taken (see ``log``), ever."""
        return self._parts

    @property
    def durable_parts(self) -> int:
        """The parts a power loss cannot take any more: those the runs hold, or all of
        them once a close marked the log durable."""
        return max(self._stack.parts, self._marked_parts)

    def apply_part(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Take a committed batch's writes to this store (a None value: a removal) as one
        part: written at once, flushed but not fsynced (the journal holds it durably)."""
        self.prepare_part(ops).finish()

    def prepare_part(self, ops: Sequence[tuple[bytes, bytes | None]]) -> PreparedPart:
        """A batch's part, touching nothing yet: its steps (``Prepared``) run in the
        exclusive section, which the caller holds from ``make_room`` to ``take`` or
        ``cancel``. A part the disk refuses fails at ``write``, before the batch's commit
        point, where the batch can still give up."""
        return PreparedPart(self, list(ops))

    def _log_for_part(self) -> LogWriter:
        log = self._writable_log()
        if log.version < PARTS_VERSION:  # a log of an older version takes no part
            self._make_room()
            log = self._writable_log()
        return log

    def _part_taken(self, log: LogWriter, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        if self._shared:
            self._unshare()
        if self._touched is not None:
            self._touched.update(key for key, _ in ops)
        self._active.update(ops)  # one call: an interrupt leaves all of the part or none
        self._parts += 1
        self._unsynced_values = True
        self._after_append(log)

    def _journal_first(self) -> None:
        """Before the logs' parts are made durable, the journal's records of them."""
        if self.before_durable is not None and self._parts > self._stack.parts:
            self.before_durable()

    def limit_parts(self, parts: int) -> bool:
        """Read-only: show the store as of its last sync with its logs ending before the
        part after ``parts`` (a snapshot's cut at a batch); False when a run holds that
        part, or the writer merged the log meanwhile (it cannot be cut)."""
        assert self._readonly
        if self._parts <= parts:
            return True
        if self._stack.parts > parts or not self._scans:
            return False
        try:  # the logs of the last sync, read again up to the part
            scans, _ = self._cut_parts(self._scans, lambda ordinal, _: ordinal <= parts, False)
        except FileNotFoundError:
            return False  # merged into a run meanwhile
        self._active = scans[-1].bindings if scans else {}
        self._frozen = scans[0].bindings if len(scans) == 2 else None
        self._parts = self._stack.parts + sum(scan.parts for scan in scans)
        self._shared = False
        self._key_orders = ()
        self._hand_over()
        self._scans = []  # cut: the next sync loads whole again
        return True

    def _committed_parts(self, scans: list[LogScan]) -> list[LogScan]:
        """The logs without the first part a power loss may have left without its journal
        record (and everything after it): it was never committed."""
        committed = self._committed
        if committed is None:
            return scans
        kept, cut = self._cut_parts(scans, lambda ordinal, durable: durable or committed(ordinal))
        if cut is not None:
            logger.warning(
                "%s: part %d of a batch, which the journal does not hold, is in the logs: "
                "a power loss took its commit; the logs end before it",
                self._name,
                cut,
            )
        return kept

    def _cut_parts(
        self, scans: list[LogScan], keep: Callable[[int, bool], bool], whole: bool = True
    ) -> tuple[list[LogScan], int | None]:
        """The logs ending before the first part ``keep(ordinal, durable)`` refuses, and
        that part's ordinal (None: every part kept). ``whole`` as for ``read_log``."""
        ordinal = self._stack.parts
        for position, scan in enumerate(scans):
            path = os.path.join(self.directory, layout.log_name(scan.generation))
            durable_end = scan.synced_at if scan.synced_at is not None else HEADER_SIZE
            for begin, end in part_spans(path, self._expected, scan.end):
                ordinal += 1
                if not keep(ordinal, end <= durable_end):
                    cut = read_log(path, self._expected, whole=whole, limit=begin)
                    return [*scans[:position], cut], ordinal
        return scans, None

    def refuse_writes(self, reason: str) -> None:
        """Raise CannotWriteToStore(``reason``) at every write from now on."""
        self._refusal = reason
        self._hand_over_to_writer()

    def check_writable(self) -> None:
        """Raise CannotWriteToStore if a write would (refused, or read-only)."""
        if self._refusal is not None:
            raise CannotWriteToStore(self._refusal, name=self._name, path=self.directory)
        if self._log is None:
            raise CannotWriteToStore("store is read-only", name=self._name, path=self.directory)

    def _writable_log(self) -> LogWriter:
        log = self._log
        if log is None or self._refusal is not None:
            self.check_writable()
        assert log is not None
        records = log.records
        if records >= self._buffer_size and (not self._merging or records >= self._log_cap):
            self._make_room()
            log = self._log
            assert log is not None
        return log

    def _after_append(self, log: LogWriter) -> None:
        """Start a merge if the log is full, or pace writers if one runs and the log is
        near its cap; the write itself is done, so errors only log."""
        if self._merging and log.records >= self._pace_from:
            self.pacing = True
        if log.records >= self._buffer_size and not self._merging and self._frozen is None:
            try:
                self._freeze_and_merge()
            except Exception:
                logger.exception("%s: cannot start a merge; the next write tries again", self._name)

    def _make_room(self) -> None:
        """The active log is full: finish the running merge, then start the next."""
        try:
            if self._merging:
                self._finish_merge()
            if self._frozen is not None:  # the last merge failed: try it again first
                self._start_merge()
                self._finish_merge()
            self._freeze_and_merge()
        except OSError as error:
            raise CannotWriteToStore(
                f"cannot start a merge: {error}", name=self._name, path=self.directory
            ) from error

    # ---------------------------------------------------------------- merge

    def _freeze_and_merge(self, gc: _GcMerge | None = None) -> None:
        log = self._log
        assert log is not None and self._frozen is None
        self._journal_first()
        self._values_first()  # the seal is fsynced with fsync
        # The next log first: once sealed, the log takes no more records, so a
        # seal without a next log would leave the store unable to write.
        next_log = self._next_log(log.generation + 1)  # on error nothing has changed
        try:
            log.seal()
        except BaseException:
            next_log.abandon()
            with contextlib.suppress(OSError):  # a leftover: empty, dropped at the next load
                filesystem.unlink(next_log.path)
            raise
        log.abandon()  # flushed by the seal
        self._count_log_bytes(log)
        self._frozen, self._active = self._active, {}
        self._frozen_parts = self._parts
        self._shared = False  # (an iterator may hold the frozen one: it never changes)
        self._log = next_log
        self._hand_over()
        self._start_merge(gc)

    def _next_log(self, generation: int) -> LogWriter:
        """The log of ``generation``: the spare a merge prepared, else a new one.

        A spare is renamed into place without a directory sync (unless
        ``fsync``): the merge now starting syncs the directory before its
        data file supersedes the frozen log.
        """
        spare, self._spare = self._spare, None
        if spare is not None and spare.generation == generation:
            return LogWriter.install(spare, self._expected, self._fsync, False)
        if spare is not None:
            spare.discard()
        self.hooks.run("create_log")
        path = os.path.join(self.directory, layout.log_name(generation))
        return LogWriter.create(path, generation, self._expected, self._fsync, self._log_ahead)

    def _start_merge(self, gc: _GcMerge | None = None) -> None:
        assert self._frozen is not None and self._log is not None
        self._merge_ticket += 1
        self._merge_ready.clear()
        self._merge_outcome = None
        # The inputs in a list the merge empties: the thread's arguments would
        # otherwise keep the frozen dict alive until the thread ends.
        inputs = [self._stack, self._frozen, self._frozen_parts]
        args = (self._merge_ticket, inputs, self._log.generation, gc)
        self._merging = True
        self.pacing = self._log.records >= self._pace_from
        self._merge_gc = gc
        self._hand_over()
        try:
            # Not threading.Thread: its start() waits until the new thread
            # runs, about a millisecond per merge on a busy machine, in the
            # writer's exclusive section. Nothing joins merge threads: the
            # merge's outcome comes through _merge_ready.
            start_thread(self._run_merge, args)
        except RuntimeError as error:  # no thread to be had: the frozen log waits
            self._merging = False
            self.pacing = False
            self._hand_over()
            raise CannotWriteToStore(
                f"cannot start the merge thread: {error}", name=self._name, path=self.directory
            ) from error

    def _run_merge(
        self,
        ticket: int,
        inputs: list[Any],
        generation: int,
        gc: _GcMerge | None,
    ) -> None:
        stack: RunStack
        frozen: dict[bytes, bytes | None]
        parts: int
        stack, frozen, parts = inputs
        inputs.clear()
        frozen_log = generation - 1
        first = stack.runs[0].span.lo if stack.runs and gc is not None else frozen_log
        span = Span(first, frozen_log)
        final = os.path.join(self.directory, layout.run_name(span))
        temporary = os.path.join(self.directory, layout.temporary_run_name(span))
        if gc is not None:
            gc.path = final
        outcome: OpenRun | BaseException
        renamed = False
        started = time.perf_counter()
        take_spare: Callable[[], SpareLog | None] = _no_spare
        try:
            take_spare = self._prepare_spare_aside(generation + 1)
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(temporary)
            if gc is None:
                self.hooks.run("flush_write")
                write_bindings(
                    temporary,
                    self._expected,
                    span,
                    frozen,
                    tag=stack.tag,
                    drop_removals=not stack.runs,
                    live=_flushed_live(stack, frozen, self._name),
                    parts=parts,
                )
            else:
                kept = gc.selection.kept(frozen, stack.find)
                write_run(
                    temporary,
                    self._expected,
                    span,
                    kept,
                    len(kept),
                    tag=gc.selection.tag,
                    parts=parts,
                )
            del stack, frozen  # the index's own references go at the switch
            if self._referenced is not None:  # what the new run's values point at first
                self._referenced.sync()
            # The active log's name may not be durable yet (see _next_log); it
            # must be before the new run supersedes the frozen log.
            filesystem.fsync_directory(self.directory)
            filesystem.rename(temporary, final)
            renamed = True  # from here on, a load sees the new file
            # Before anything it supersedes is deleted (by the switch, or a GC's
            # values files below its floor): if this fails, the merge failed.
            filesystem.fsync_directory(self.directory)
            self.hooks.run("flush_renamed")
            outcome = OpenRun(final, self._expected, span)
            self.counters.merged(started, final)
        except BaseException as error:  # reported to the writer
            logger.exception("merge of %s into %s failed", self._name, final)
            outcome = error
        spare = take_spare()
        if spare is not None and isinstance(outcome, BaseException):
            spare.discard()
            spare = None
        self._merge_spare = spare
        self._merge_outcome = outcome
        self._merge_ready.set()
        try:
            with self._exclusive():
                if self._merge_ticket == ticket and self._merging:
                    with self._switch_lock:
                        self._switch_unlocked()
            # Outside the section: a log's unlink takes about half a millisecond.
            self._delete_superseded()
        finally:
            if gc is not None:
                gc.error = outcome if isinstance(outcome, BaseException) else None
                gc.renamed = renamed
                gc.done.set()

    def _prepare_spare_aside(self, generation: int) -> Callable[[], SpareLog | None]:
        """Start preparing the spare log of ``generation`` beside the merge; call to wait for it.

        On a thread of its own, so that the spare's header fsync overlaps the
        merge's writes instead of delaying them (a writer that outruns the
        merges waits for the whole chain).
        """
        made: list[SpareLog | None] = []
        done = threading.Lock()
        done.acquire()

        def prepare() -> None:
            try:
                made.append(self._prepare_spare(generation))
            finally:
                done.release()

        try:
            start_thread(prepare, ())
        except RuntimeError:  # no thread to be had: prepare it here
            spare = self._prepare_spare(generation)
            return lambda: spare

        def take() -> SpareLog | None:
            with done:
                return made[0] if made else None

        return take

    def _prepare_spare(self, generation: int) -> SpareLog | None:
        """The log the next freeze will need, made now, off the writer's path.

        Made during the merge, so that a writer waiting for the merge does
        not wait for this file too; a failure only costs the writer the work.
        """
        path = os.path.join(self.directory, layout.log_name(generation))
        try:
            self.hooks.run("prepare_spare")
            return SpareLog.prepare(path, generation, self._expected, self._log_ahead)
        except Exception:
            logger.exception(
                "%s: cannot prepare the next log; the writer will create it", self._name
            )
            return None

    def _finish_merge(self) -> None:
        """Wait for the running merge and switch to its result (exclusive section)."""
        self._merge_ready.wait()
        self._switch()
        error = self._merge_outcome
        if isinstance(error, BaseException):
            raise CannotWriteToStore(
                f"merge into the data file failed: {error}", name=self._name, path=self.directory
            ) from error

    def _switch(self) -> None:
        """Swap in the merged data file; called with the store's exclusive section held."""
        with self._switch_lock:
            self._switch_unlocked()
        self._delete_superseded()

    def _delete_superseded(self) -> None:
        """Delete the files the switches so far superseded; once it returns, they are gone.

        A merge thread calls it after leaving the exclusive section; the
        writer's switches, ``wait_merge`` and ``close`` call it too, so that
        no deletion is left running or pending when they return.
        """
        with self._delete_lock:
            paths, self._superseded = self._superseded, []
            if paths:
                self.hooks.run("delete")
            _delete(paths)

    def _switch_unlocked(self) -> None:
        if not self._merging or not self._merge_ready.is_set():
            return
        self._merging = False
        self.pacing = False
        self._hand_over()
        outcome = self._merge_outcome
        gc, self._merge_gc = self._merge_gc, None
        spare, self._merge_spare = self._merge_spare, None
        if not isinstance(outcome, OpenRun):
            return  # failed: the frozen log stays and is merged again later (without GC)
        if spare is not None:
            if self._spare is not None:
                self._spare.discard()
            self._spare = spare
        old, frozen_log = self._stack, outcome.span.hi
        self._stack = RunStack([outcome]) if gc is not None else old.with_run(outcome)
        self._frozen = None
        self._key_orders = tuple(e for e in self._key_orders if e[0] is self._active)
        self._hand_over()
        self._merge_outcome = None
        # Deleted by _delete_superseded; leftovers of a failure, or of a
        # kill, go at the next writer load.
        self._superseded.append(os.path.join(self.directory, layout.log_name(frozen_log)))
        if gc is not None:
            self._superseded.extend(run.path for run in old.runs)
        self._schedule_merges()
        if gc is not None and gc.on_switch is not None:
            try:
                gc.on_switch()
            except Exception:
                logger.exception("%s: the GC's switch hook failed", self._name)

    # ----------------------------------------------------------- run merges

    def _schedule_merges(self) -> None:
        """Start a thread for each group of runs the policy merges now (``_switch_lock`` held)."""
        if self._closed or self._log is None or self._hold_merges:
            return
        stack = self._stack
        for group in merges(stack.spans, self._busy):
            runs = stack.select(group)
            drop_removals = stack.spans[0] == group[0]
            self._busy.update(group)
            with self._run_merges_changed:
                self._run_merges += 1
            try:
                start_thread(self._merge_runs, (group, runs, drop_removals))
            except RuntimeError:
                logger.exception("%s: cannot start a run merge; later switches retry", self._name)
                self._busy.difference_update(group)
                with self._run_merges_changed:
                    self._run_merges -= 1
                return

    def _merge_runs(self, group: list[Span], runs: list[Source], drop_removals: bool) -> None:
        """Merge the adjacent runs of ``group`` into one (on a thread of its own)."""
        span = merged(group)
        final = os.path.join(self.directory, layout.run_name(span))
        temporary = os.path.join(self.directory, layout.temporary_run_name(span))
        outcome: OpenRun | None = None
        started = time.perf_counter()
        try:
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(temporary)
            self.hooks.run("merge_write")
            merge_runs(
                temporary,
                self._expected,
                span,
                runs[::-1],
                tag=max(run.tag for run in runs),
                drop_removals=drop_removals,
                cancel=self._cancel_merges,
            )
            filesystem.rename(temporary, final)
            # Before the runs it supersedes are deleted: if this fails, the merge failed.
            filesystem.fsync_directory(self.directory)
            outcome = OpenRun(final, self._expected, span)
            self.counters.merged(started, final)
        except Cancelled:
            pass
        except BaseException:
            logger.exception("%s: merge of runs into %s failed", self._name, final)
        paths = [run.path for run in runs]
        del runs
        with self._run_merges_changed:
            self._merged.append((group, outcome, paths))
            self._run_merges -= 1
            self._run_merges_changed.notify_all()
        if not self._closed:
            with self._exclusive(), self._switch_lock:
                self._switch_merged_runs()
        self._delete_superseded()

    def _switch_merged_runs(self) -> None:
        """Swap in the runs merges wrote (``_switch_lock`` and the exclusive section held)."""
        with self._run_merges_changed:
            done, self._merged = self._merged, []
        switched = False
        for group, run, paths in done:
            self._busy.difference_update(group)
            if run is None:
                continue  # failed or given up: the runs stay, a later switch tries again
            self._stack = self._stack.replaced(group, run)
            self._superseded.extend(paths)
            switched = True
        if switched:
            self._hand_over()
            self._schedule_merges()

    def _wait_run_merges(self) -> None:
        """Block until no run merge is writing (they stop early once the index is closed)."""
        with self._run_merges_changed:
            while self._run_merges:
                self._run_merges_changed.wait()

    # ------------------------------------------------------------------- GC

    def begin_gc(self) -> Callable[[bytes], bytes | None]:
        """Record the keys written from now on; return a lookup of the bindings as they are.

        Called in the exclusive section. The lookup never changes afterwards:
        it holds a copy of the active log's bindings and the frozen log and
        data file of this moment.
        """
        self.check_writable()  # (a GC is a write: refused when writes are)
        self._touched = set()
        self._hand_over()
        active = dict(self._active)
        frozen = self._frozen
        stack = self._stack

        def lookup(key: bytes) -> bytes | None:
            value = active.get(key, _MISSING)
            if value is _MISSING and frozen is not None:
                value = frozen.get(key, _MISSING)
            if value is _MISSING:
                return stack.find(key)
            return value  # type: ignore[return-value]

        return lookup

    def end_gc(self) -> None:
        """Stop recording written keys (a GC given up; exclusive section)."""
        self._touched = None
        self._hand_over()

    def collect(
        self,
        retained: Mapping[bytes, bytes | None],
        tag: int | None = None,
        on_switch: Callable[[], None] | None = None,
    ) -> None:
        """Merge every binding into a data file keeping only ``retained`` and the touched keys.

        Called from the GC's thread after ``begin_gc``; returns once the new
        data file is in place, and raises if the merge failed, leaving the
        store as it was. ``tag`` (default: the current one) tags the new file;
        ``on_switch`` runs in the exclusive section that switches to it.
        """
        # The GC's run replaces every run: no run merge may be running when it switches.
        self._hold_merges = True
        try:
            self._collect(retained, tag, on_switch)
        finally:
            self._hold_merges = False
            with self._exclusive(), self._switch_lock:
                self._schedule_merges()

    def _collect(
        self,
        retained: Mapping[bytes, bytes | None],
        tag: int | None,
        on_switch: Callable[[], None] | None,
    ) -> None:
        self._wait_run_merges()
        retried = False
        while True:
            if self._merging:
                self._merge_ready.wait()
            with self._exclusive():
                if self._merging and not self._merge_ready.is_set():
                    continue  # another merge started meanwhile
                self._switch()
                with self._switch_lock:
                    self._switch_merged_runs()
                if self._closed or self._log is None:
                    raise CannotWriteToStore("store closed", name=self._name, path=self.directory)
                if self._touched is None:
                    raise CannotWriteToStore(
                        "no GC begun, or it was ended", name=self._name, path=self.directory
                    )
                if self._frozen is not None:  # an earlier merge failed: run it again first
                    if retried:
                        raise CannotWriteToStore(
                            "an earlier merge failed again", name=self._name, path=self.directory
                        )
                    retried = True
                    self._start_merge()
                    continue
                touched, self._touched = self._touched, None
                self._hand_over()
                selection = Selection(retained, touched, self.tag if tag is None else tag)
                gc = _GcMerge(selection, on_switch)
                try:
                    self._freeze_and_merge(gc)
                except OSError as error:
                    raise CannotWriteToStore(
                        f"cannot start the GC merge: {error}", name=self._name, path=self.directory
                    ) from error
                break
        gc.done.wait()
        if gc.error is None:
            return
        if not gc.renamed:
            raise CannotWriteToStore(
                f"GC merge failed: {gc.error}", name=self._name, path=self.directory
            ) from gc.error
        with self._exclusive():  # the old content again in place of the GC's run, now
            if self._frozen is not None and not self._merging and not self._closed:
                try:
                    filesystem.unlink(gc.path)
                    filesystem.fsync_directory(self.directory)
                except OSError:  # a load may see the GC's content: new rather than old
                    logger.exception("%s: cannot delete the failed GC's run", self._name)
                with contextlib.suppress(CannotWriteToStore):
                    self._start_merge()
        raise GcMergeRenamed(
            f"GC merge failed after its rename: {gc.error}", name=self._name, path=self.directory
        ) from gc.error

    def wait_merge(self) -> None:
        """Block until no merge runs, of a log or of runs (tests and tools)."""
        while True:
            if self._merging:
                self._merge_ready.wait()
            self._wait_run_merges()
            with self._exclusive():
                self._switch()
                with self._switch_lock:
                    self._switch_merged_runs()
                if not self._merging and not self._run_merges:
                    return

    # ------------------------------------------------------------- load

    def _open_writer(self) -> None:
        directory = self.directory
        try:
            filesystem.make_directories(directory)
        except OSError as error:
            raise CannotLoadStore(
                f"cannot create directory: {error}", name=self._name, path=directory
            ) from error
        self._lock = WriterLock(os.path.join(directory, layout.LOCK), self._name, directory)
        try:
            self._recover()
            with self._switch_lock:
                self._schedule_merges()
            self._lock.loaded()
        except BaseException:
            self._lock.release()
            self._lock = None
            raise

    def _recover(self) -> None:
        directory = self.directory
        listing = layout.scan(directory)
        live, superseded, legacy = self._sources(listing)
        generation = live[-1].hi + 1 if live else legacy
        logs = [g for g in listing.logs if g >= generation]
        self._check_logs(logs, generation)
        legacy_data = self._open_data(legacy) if legacy and not live else None
        self._stack = RunStack([LegacyData(legacy_data)]) if legacy_data else self._open_runs(live)
        self._hand_over()
        scans = self._point_in_time([self._read_log(g, whole=True) for g in logs], True)
        if len(scans) == 2 and scans[1].sealed:
            raise CannotLoadStore(
                "two logs frozen for a merge", name=self._name, path=self.directory
            )
        scans = self._committed_parts(scans)
        self._parts = self._stack.parts + sum(scan.parts for scan in scans)
        self._frozen_parts = self._stack.parts + (scans[0].parts if scans else 0)
        # Only now is anything changed on disk. Leftovers first: an earlier
        # conversion's pieces among them.
        for name in listing.temporaries:
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(os.path.join(directory, name))
        if legacy_data is not None:
            self._convert(legacy_data)
        dropped = [layout.log_name(g) for g in logs[len(scans) :]]
        stale = [layout.data_name(g) for g in listing.data]
        stale += [layout.run_name(span) for span in superseded]
        stale += [layout.log_name(g) for g in listing.logs if g < generation]
        if stale:  # superseded: what supersedes it must be durably named first
            filesystem.fsync_directory(directory)
        for name in stale + dropped:
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(os.path.join(directory, name))
        if dropped:  # they must not come back beside the logs that replace them
            filesystem.fsync_directory(directory)
        if self._fsync:
            self._sync_recovered(scans)
        if not scans:
            self._log = self._new_log(generation)
            self._hand_over()
            return
        last = scans[-1]
        if last.sealed:  # frozen for a merge, but its next log never appeared
            self._frozen = last.bindings
            self._frozen_parts = self._parts
            self._log = self._new_log(last.generation + 1)
            self._hand_over()
            self._start_merge()
            return
        path = os.path.join(directory, layout.log_name(last.generation))
        self._log = LogWriter.reopen(path, last, self._expected, self._fsync, self._log_ahead)
        self._log_records_from = self._log.records
        self._active = last.bindings
        self._frozen = scans[0].bindings if len(scans) == 2 else None
        self._hand_over()
        if self._frozen is not None:  # a merge was cut short: run it again
            self._start_merge()

    def _sync_recovered(self, scans: list[LogScan]) -> None:
        """Make what a load recovered durable, as the SYNCED records ``fsync=True`` writes claim.

        An earlier writer may have run without fsync.
        """
        if self._referenced is not None:
            self._referenced.sync()
        filesystem.fsync_directory(self.directory)  # the logs' names: a spare's rename
        for scan in scans:
            path = os.path.join(self.directory, layout.log_name(scan.generation))
            fd = os.open(path, os.O_RDONLY)
            try:
                filesystem.fsync(fd)
            finally:
                os.close(fd)

    def _new_log(self, generation: int) -> LogWriter:
        path = os.path.join(self.directory, layout.log_name(generation))
        return LogWriter.create(path, generation, self._expected, self._fsync, self._log_ahead)

    def _point_in_time(self, scans: list[LogScan], check_values: bool) -> list[LogScan]:
        """The logs' records as of one moment: what a power loss left whole, in order.

        A frozen log that lost its seal lost records at its end, so the log
        after it (later writes) goes. Then, with values kept outside the
        engine, every record from the last SYNCED one on must point at a
        value that reads back whole; the logs end before the first that does
        not (``check_values``: a reader beside a live writer skips this, since
        the writer did it at its load and everything it wrote since is in the
        page cache). Returns the scans kept, the last one perhaps cut short.
        """
        for position, scan in enumerate(scans[:-1]):
            if scan.version >= SEALED_VERSION and not scan.sealed:
                # Empty later logs are the next log made before the seal: nothing lost.
                if any(later.records for later in scans[position + 1 :]):
                    logger.warning(
                        "%s: %s lost its end to a power loss; the %d later log(s) go with it",
                        self._name,
                        layout.log_name(scan.generation),
                        len(scans) - position - 1,
                    )
                scans = scans[: position + 1]
                break
        if self._referenced is None or not scans or not check_values:
            return scans
        try:
            cut = self._first_unreadable(scans)
        finally:
            self._referenced.release()
        if cut is None:
            return scans
        position, offset = cut
        path = os.path.join(self.directory, layout.log_name(scans[position].generation))
        logger.warning(
            "%s: %s points at a value a power loss did not leave whole (offset %d): "
            "the logs end there",
            self._name,
            path,
            offset,
        )
        return [*scans[:position], read_log(path, self._expected, whole=True, limit=offset)]

    def _first_unreadable(self, scans: list[LogScan]) -> tuple[int, int] | None:
        """``(log position, offset)`` of the first record from the last SYNCED one on whose
        value does not read back, or None."""
        assert self._referenced is not None
        first = 0
        for position, scan in enumerate(scans):
            if scan.synced_at is not None:
                first = position
        size = record_size(self._expected)
        key_end = 1 + self._expected.key_size
        for position in range(first, len(scans)):
            scan = scans[position]
            start = scan.synced_at if position == first and scan.synced_at is not None else None
            offset = start if start is not None else HEADER_SIZE
            path = os.path.join(self.directory, layout.log_name(scan.generation))
            with open(path, "rb") as file:
                records = os.pread(file.fileno(), scan.end - offset, offset)
            for at in range(0, len(records), size):
                record = records[at : at + size]
                if record[0] & OP_MASK == OP_SET and not self._referenced.readable(
                    record[1:key_end], record[key_end : size - CRC_SIZE]
                ):
                    return position, offset + at
        return None

    def _check_logs(self, logs: list[int], generation: int) -> None:
        """The logs beside ``data.<generation>`` must be its own, and perhaps the next.

        No crash leaves anything else: a missing data file or log means lost
        bindings, so the load is refused rather than answering wrongly.
        """
        if logs == [] and generation == 0:
            return  # a new store
        if logs[:1] != [generation] or len(logs) > 2 or logs[-1] != logs[0] + len(logs) - 1:
            data = layout.data_name(generation) if generation else "no data file"
            raise CannotLoadStore(
                f"files missing: logs {[layout.log_name(g) for g in logs]} beside {data}",
                name=self._name,
                path=self.directory,
            )

    def _sources(self, listing: layout.Listing) -> tuple[list[Span], list[Span], int]:
        """The live runs, the superseded ones, and the generation of the newest data
        file of the format before runs if no run holds it yet (else 0)."""
        try:
            live, superseded = live_and_superseded(listing.runs)
        except TilingError as error:
            raise CannotLoadStore(str(error), name=self._name, path=self.directory) from None
        if live and live[0].lo != 0:
            raise CannotLoadStore(
                f"files missing: the runs start at generation {live[0].lo}",
                name=self._name,
                path=self.directory,
            )
        legacy = max(listing.data, default=0)
        if live and legacy > live[-1].hi + 1:
            raise CannotLoadStore(
                f"{layout.data_name(legacy)} is newer than the runs beside it",
                name=self._name,
                path=self.directory,
            )
        return live, superseded, 0 if live else legacy

    def _open_runs(self, spans: list[Span]) -> RunStack:
        runs: list[Source] = []
        try:
            for span in spans:
                path = os.path.join(self.directory, layout.run_name(span))
                runs.append(OpenRun(path, self._expected, span))
        except BaseException:
            for run in runs:
                run.close()
            raise
        return RunStack(runs)

    def _convert(self, data: DataFile) -> None:
        """Write the run of a data file of the format before runs, in its place."""
        span = Span(0, data.generation - 1)
        final = os.path.join(self.directory, layout.run_name(span))
        temporary = os.path.join(self.directory, layout.temporary_run_name(span))
        convert_legacy(data, self.directory, temporary, self._expected)
        filesystem.rename(temporary, final)
        filesystem.fsync_directory(self.directory)
        self._stack = RunStack([OpenRun(final, self._expected, span)])
        self._hand_over()
        data.close()

    def _open_data(self, generation: int) -> DataFile | None:
        if not generation:
            return None
        data = DataFile(os.path.join(self.directory, layout.data_name(generation)), self._expected)
        if data.generation != generation:
            data.close()
            raise CannotLoadStore(
                f"{data.path} says generation {data.generation}", name=self._name, path=data.path
            )
        return data

    def _read_log(self, generation: int, whole: bool = False) -> LogScan:
        """Read log ``generation``; ``whole`` under the writer's lock (see ``read_log``)."""
        path = os.path.join(self.directory, layout.log_name(generation))
        scan = read_log(path, self._expected, whole=whole)
        if scan.generation != generation:
            raise CannotLoadStore(
                f"log {path} says generation {scan.generation}", name=self._name, path=path
            )
        if scan.damaged:
            logger.warning(
                "%s: %s: %d bytes from offset %d on were never fsynced and a power loss "
                "damaged them; the log ends there",
                self._name,
                path,
                scan.torn_bytes,
                scan.end,
            )
        elif scan.torn_bytes:
            logger.warning(
                "%s: dropping a torn tail of %d bytes in %s", self._name, scan.torn_bytes, path
            )
        return scan

    def _load_readonly(self) -> None:
        """Read the files as they are now, touching nothing."""
        if not os.path.isdir(self.directory):
            self._seen = (0, ())
            return
        for _ in range(_RELOAD_ATTEMPTS):
            try:
                self._read_state()
                return
            except FileNotFoundError:
                continue  # the writer switched files meanwhile: read again
        raise CannotLoadStore(
            "files kept changing while loading", name=self._name, path=self.directory
        )

    def _read_state(self) -> None:
        listing = layout.scan(self.directory)
        live, _, legacy = self._sources(listing)
        generation = live[-1].hi + 1 if live else legacy
        logs = tuple(g for g in listing.logs if g >= generation)
        self._check_logs(list(logs), generation)
        legacy_data = self._open_data(legacy)
        stack = RunStack([LegacyData(legacy_data)]) if legacy_data else self._open_runs(live)
        read = [self._read_log(g) for g in logs]
        lock = os.path.join(self.directory, layout.LOCK)
        check_values = self._referenced is not None and not loaded_writer(lock)
        if len(read) == 2 and read[1].sealed:  # read across a switch and a freeze: again
            raise FileNotFoundError(f"{self.directory}: files switched while read")
        scans = self._point_in_time(read, check_values)
        cut = len(scans) < len(read) or any(a is not b for a, b in zip(scans, read, strict=False))
        self._stack = stack
        self._frozen = scans[0].bindings if len(scans) == 2 else None
        self._active = scans[-1].bindings if scans else {}
        self._parts = stack.parts + sum(scan.parts for scan in scans)
        self._shared = False  # new dicts: no iterator holds them
        self._key_orders = ()
        self._hand_over()
        self._scans = [] if cut else scans  # cut at a point in time: load whole again
        self._seen = (generation, logs)

    def sync(self) -> None:
        """Read-only: pick up what the writer flushed since the last load."""
        if not self._readonly:
            return
        try:
            self._sync()
        except OSError as error:
            raise CannotReadFromStore(
                f"cannot read: {error}", name=self._name, path=self.directory
            ) from error

    def _sync(self) -> None:
        if not os.path.isdir(self.directory):
            return
        listing = layout.scan(self.directory)
        generation = listing.data_generation
        logs = tuple(g for g in listing.logs if g >= generation)
        if (generation, logs) == self._seen and self._scans:
            last = self._scans[-1]
            if self._shared:  # an iterator holds the dict that reading on would change
                self._unshare()
                last.bindings = self._active
            path = os.path.join(self.directory, layout.log_name(last.generation))
            try:
                read_log(path, self._expected, scan=last)
                self._parts = self._stack.parts + sum(scan.parts for scan in self._scans)
                return
            except FileNotFoundError:
                pass
        self._load_readonly()

    # ------------------------------------------------------------ closing

    def _retry_failed_merge(self) -> None:
        if self._frozen is None or self._log is None:
            return
        try:
            self._start_merge()
            self._merge_ready.wait()
            self._switch()
        except Exception:  # nothing is lost: the frozen log is merged at the next load
            logger.exception("%s: merge at close failed", self._name)

    def _merge_overgrown_log(self) -> None:
        log = self._log
        if log is None or log.records <= self._buffer_size or self._frozen is not None:
            return
        try:
            self._freeze_and_merge()
            self._merge_ready.wait()
            self._switch()
        except Exception:  # nothing is lost: a frozen log is merged at the next load
            logger.exception("%s: merge at close failed", self._name)

    def _mark_durable(self) -> None:
        """Flush, fsync the values the log points at and the log, and end the log with a mark.

        Only the flush must succeed: the mark spares the next load some
        checks, and is left out when a frozen log (a merge that failed) is
        not durable, or when the values cannot be fsynced.
        """
        log = self._log
        assert log is not None
        if self._frozen is not None:
            log.flush()
            return
        try:
            if self._referenced is not None:
                self._referenced.sync()
            self._journal_first()
        except OSError:
            logger.warning("%s: cannot fsync the values at close", self._name, exc_info=True)
            log.flush()
            return
        if log.mark():
            self._marked_parts = self._parts

    def close(self, *, durable: bool = True) -> None:
        """Finish any merge, make everything durable and close everything; idempotent.

        A log that has grown past the buffer size while a merge ran is merged
        too, so that the next load replays at most one buffer's worth. The
        log then ends with a mark (after the values it points at and the log
        are fsynced), so the next load has nothing to check; not with
        ``durable=False`` (a store whose load failed adds nothing).
        """
        if self._closed:
            return
        self._closed = True
        self._cancel_merges[0] = 1  # the run merges give up at their next step
        try:
            if self._merging:
                self._merge_ready.wait()
                self._switch()
            self._wait_run_merges()  # given up at their next step
            with self._switch_lock:
                self._switch_merged_runs()
            self._retry_failed_merge()
            self._merge_overgrown_log()
            if self._log is not None:
                if durable:
                    self._mark_durable()
                self._log.close()
        finally:
            if self._referenced is not None:
                self._referenced.release()
            if self._log is not None:
                self._log.abandon()
            for spare in (self._spare, self._merge_spare):
                if spare is not None:
                    spare.discard()
            self._spare = self._merge_spare = None
            self._delete_superseded()  # one a merge thread is running included
            self._stack.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
