"""The interface through which stores reach an engine, by capability.

Keys and values are encoded bytes of fixed sizes. Writes and ``sync`` are
called by the store under its idle-waiter's exclusive section; reads under a
shared task. ``KeyValue`` is the core; ``Paced`` lets writers wait outside
their exclusive section; ``Iteration`` lists bindings; ``Collection`` is the
GC's; ``Batched`` takes batches' parts; ``Measured`` tells its figures.
``ReferencedValues`` is what an engine is told of values kept outside it (an
indexed file's values files).
A second engine (SQLite, say) implements these and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

from .counters import EngineStats


class ReferencedValues(Protocol):
    """What an engine's values point at outside the engine (an indexed file's values files).

    The engine makes them durable before it makes durable the values that
    point at them, and, loading after a power loss, keeps the writes of a
    point in time whose values all read back.
    """

    def sync(self) -> None:
        """Make durable everything written so far."""

    def readable(self, key: bytes, value: bytes) -> bool:
        """Whether what the engine value ``value`` of ``key`` points at reads back whole."""

    def release(self) -> None:
        """Let go of what :meth:`readable` opened."""


class KeyValue(Protocol):
    """The core: fixed-size byte keys to fixed-size byte values, durable on flush."""

    def get(self, key: bytes) -> bytes | None:
        """The value bound to ``key``, or None."""

    def put(self, key: bytes, value: bytes, flush: bool) -> None:
        """Bind ``key`` to ``value``; durable on return when ``flush``."""

    def remove(self, key: bytes, *, flush: bool) -> None:
        """Unbind ``key``; durable on return when ``flush``."""

    def flush(self) -> None:
        """Make every earlier write durable."""

    def sync(self) -> None:
        """Read-only engines: pick up what the writer flushed since."""

    def close(self, *, durable: bool = True) -> None:
        """Flush, make durable (unless not ``durable``) and release everything; idempotent."""


class Paced(Protocol):
    """How a writer learns, before its exclusive section, whether a write may wait."""

    #: True when ``reserve`` may have to wait; False lets a writer skip the call.
    pacing: bool

    def reserve(self) -> None:
        """Wait, before the exclusive section, until a write need not wait inside it."""

    def can_put_at_once(self) -> bool:
        """Whether a put now takes no flush step and no fsync."""


class Iteration(Protocol):
    """Every live binding, as of one moment."""

    def items(
        self,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
        closed: bytearray | None = None,
        on_closed: Callable[[], BaseException] | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """A snapshot, taken when called, of the live bindings with ``start <= key < stop``
        (None: open), in key order (``reverse``: descending); once ``closed[0]`` is set,
        each step raises what ``on_closed()`` returns."""

    def live_count(self) -> int:
        """The exact number of live bindings, without reading them all."""

    def snapshot(self) -> Snapshot:
        """The bindings of this moment, held without a copy."""


class Snapshot(Protocol):
    """An engine's bindings at one moment (``Iteration.snapshot``)."""

    def get(self, key: bytes) -> bytes | None:
        """The value bound to ``key`` then, or None."""

    def items(
        self,
        start: bytes | None = None,
        stop: bytes | None = None,
        reverse: bool = False,
        closed: bytearray | None = None,
        on_closed: Callable[[], BaseException] | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """The bindings then, as ``Iteration.items``."""

    def live_count(self) -> int:
        """The number of live bindings then."""


class Collection(Protocol):
    """Garbage collection: keep a selection and what is written meanwhile."""

    @property
    def generation(self) -> int:
        """A number that changes whenever the engine's stored data is replaced."""

    @property
    def tag(self) -> int:
        """The word the store keeps with the engine's data (0 until set by a GC)."""

    def begin_gc(self) -> Callable[[bytes], bytes | None]:
        """Start recording written keys; return a lookup frozen at this moment."""

    def end_gc(self) -> None:
        """Stop recording written keys (a GC given up)."""

    def collect(
        self,
        retained: Mapping[bytes, bytes | None],
        tag: int | None = None,
        on_switch: Callable[[], None] | None = None,
    ) -> None:
        """Keep only ``retained`` (with new values where given) and the written keys."""


class Batched(Protocol):
    """Batch parts (see ``batches``): a committed batch's writes to this engine, whole."""

    #: Called before the engine makes parts durable: the journal's records first.
    before_durable: Callable[[], None] | None

    @property
    def parts(self) -> int:
        """The parts taken, ever."""

    @property
    def durable_parts(self) -> int:
        """The parts a power loss can no longer take."""

    def apply_part(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Take one part: ``(key, value)`` writes (None: a removal), at once."""

    def prepare_part(self, ops: Sequence[tuple[bytes, bytes | None]]) -> EnginePart:
        """One part, touching nothing yet (see ``Prepared``)."""

    def limit_parts(self, parts: int) -> bool:
        """Read-only: show only the first ``parts`` parts; False when it cannot."""

    def refuse_writes(self, reason: str) -> None:
        """Raise CannotWriteToStore(``reason``) at every write from now on (flushes and
        the close go on)."""

    def check_writable(self) -> None:
        """Raise CannotWriteToStore if a write would (refused, or read-only)."""


class Prepared(Protocol):
    """A batch's part, for one store: ``make_room`` and ``take`` run with the store's
    readers out, ``write`` and ``end`` may run beside them (they write files only);
    ``finish`` does all four, in order, once the batch committed; ``cancel`` takes back
    what ``write`` wrote."""

    def make_room(self) -> None:
        """Make room for the part (what readers read may change: a full log handed over)."""

    def write(self) -> None:
        """Write the part without what makes it bind (no state a reader reads changes:
        readers may run meanwhile). If this raises, nothing of it binds, ever."""

    def end(self) -> None:
        """Write what makes the part bind in the files (no state a reader reads changes:
        readers may run meanwhile)."""

    def take(self) -> None:
        """Bind the part in memory, after ``end`` (in the exclusive section)."""

    def finish(self) -> None:
        """``make_room``, ``write``, ``end`` then ``take`` (the implementations subclass
        this protocol for it)."""
        self.make_room()
        self.write()
        self.end()
        self.take()

    def cancel(self) -> None:
        """Take back the part ``write`` wrote."""


class EnginePart(Prepared, Protocol):
    """An engine's part: its ``(key, value)`` writes (None: a removal), which may change
    until ``write``."""

    ops: list[tuple[bytes, bytes | None]]


class Measured(Protocol):
    """An engine's figures, for ``store.stats()``."""

    def stats(self) -> EngineStats:
        """Its runs, merges and bytes written since the load, and its pending bindings."""
        ...


class Engine(KeyValue, Paced, Iteration, Collection, Batched, Measured, Protocol):
    """What the stores use: every capability. Tools use ``engine.files`` instead."""
