"""GC of the engine-backed stores: the walk, the thread, failures and close.

A GC runs in four steps; only the first, the switch inside the engine's
merge and the last take the store's exclusive section, each briefly:

1. *begin* (exclusive, in the caller's thread, so that every write made
   after ``gc`` returns is kept): the engine starts recording the keys
   written from now on and hands out a lookup frozen at this moment (an
   indexed file also moves its appends to a new values file);
2. *walk*: the spec is followed through that lookup, giving the retained
   bindings, while reads and writes go on;
3. *commit*: the kind prepares what it keeps (an indexed file copies the
   retained values into a new file) and the engine merges its bindings into
   a new data file keeping only the retained and the written keys;
4. *clean up* (exclusive): values files no longer referenced are deleted.

A failure at any step before the merge's rename leaves the store as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ..codecs import Codec
from ..errors import CodecError, GcFailed
from ..gc import Chain, Retain
from .base import EngineStore, K, R

logger = logging.getLogger("l2_stores.gc")

Lookup = Callable[[bytes], bytes | None]


class GcCancelled(Exception):
    """The store was closed while its GC ran; the GC stopped and left the store as it was."""


class _GcState:
    """GC state shared by a store and its read-only views."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        self.cancelled = False
        self.closing = False
        self.runner: int | None = None
        self.failure: BaseException | None = None
        #: GCs completed since the load, and their time.
        self.runs = 0
        self.seconds = 0.0


class _Plan:
    """A spec with its keys encoded, checked before any GC work starts."""

    def __init__(self, spec: Retain | Chain, keys: list[bytes]) -> None:
        self.spec = spec
        self.keys = keys


class Collectable(EngineStore[K, R]):
    """An engine-backed store that can be garbage-collected (``gc``)."""

    _gc: _GcState
    _key: ClassVar[Codec]
    _value: ClassVar[Codec]

    def __init__(self, path: str, mode: Any) -> None:
        super().__init__(path, mode)
        self._gc = _GcState()

    # -- the public surface

    def gc(self, spec: Retain | Chain, *, background: bool = True) -> None:
        """Keep only what ``spec`` reaches, plus what is written while the GC runs.

        With ``background`` (the default) the GC runs in a thread and this
        returns at once; otherwise it returns when the GC is done and raises
        ``GcFailed`` if it failed. A GC asked for while one runs is ignored.
        """
        self._check_open()
        self._check_writable("gc")
        plan = self._plan(spec)
        state = self._gc
        with state.lock:
            if state.closing:
                self._raise_closed()
            if not state.idle.is_set():
                logger.warning("%s: a GC is already running; this one is ignored", self.name)
                return
            state.idle.clear()
            state.cancelled = False
        try:
            lookup = self._begin()
        except GcCancelled:
            state.idle.set()
            self._raise_closed()
        except Exception as error:
            state.idle.set()
            raise GcFailed(f"GC failed: {error}", name=self.name, path=self.path) from error
        except BaseException:
            state.idle.set()
            raise
        if not background:
            state.runner = threading.get_ident()
            try:
                self._run(plan, lookup)
            except GcCancelled:
                self._raise_closed()
            except Exception as error:
                raise GcFailed(f"GC failed: {error}", name=self.name, path=self.path) from error
            finally:
                state.runner = None
                state.idle.set()
            return
        thread = threading.Thread(
            target=self._run_in_background, args=(plan, lookup), name=f"l2_stores gc {self.name}"
        )
        thread.daemon = True
        try:
            thread.start()
        except RuntimeError as error:
            self._abandon()
            state.idle.set()
            raise GcFailed(
                f"cannot start the GC thread: {error}", name=self.name, path=self.path
            ) from error

    def _more_stats(self) -> dict[str, Any]:
        with self._gc.lock:
            return {"gc_runs": self._gc.runs, "gc_seconds": self._gc.seconds}

    def wait_gc_completion(self, timeout: float | None = None) -> bool:
        """Wait for the running GC; True when none runs any more.

        Raises ``GcFailed`` if a background GC failed since the last call.
        Called from the GC's own ``next``, it does not wait (it would wait
        for itself) and returns False.
        """
        self._check_open()
        state = self._gc
        if state.runner == threading.get_ident():
            return False
        finished = state.idle.wait(timeout)
        with state.lock:
            failure, state.failure = state.failure, None
        if failure is not None:
            raise GcFailed(
                f"background GC failed: {failure}", name=self.name, path=self.path
            ) from failure
        return finished

    def is_gc_finished(self) -> bool:
        """True when no GC runs."""
        self._check_open()
        return self._gc.idle.is_set()

    # -- running

    def _plan(self, spec: Retain | Chain) -> _Plan:
        if isinstance(spec, Retain):
            return _Plan(spec, [self._encode(self._key, key) for key in spec.keys])
        if isinstance(spec, Chain):
            return _Plan(spec, [self._encode(self._key, spec.first)])
        raise TypeError(f"{self.name}: gc expects Retain(...) or Chain(...), got {spec!r}")

    def _begin(self) -> Lookup:
        """Step 1, in the caller's thread: every write after ``gc`` returns is kept."""
        with self._waiter.force_idle():
            if self._lifetime.closed:
                raise GcCancelled
            return self._gc_begin()

    def _abandon(self) -> None:
        with self._waiter.force_idle():
            if not self._lifetime.closed:
                self._gc_abandon()

    def _run_in_background(self, plan: _Plan, lookup: Lookup) -> None:
        state = self._gc
        state.runner = threading.get_ident()
        try:
            self._run(plan, lookup)
        except GcCancelled:
            logger.info("%s: GC stopped by close(); the store is as it was", self.name)
        except BaseException as error:
            logger.error(
                "%s: background GC failed; the store is as it was", self.name, exc_info=error
            )
            with state.lock:
                state.failure = error
        finally:
            state.runner = None
            state.idle.set()

    def _run(self, plan: _Plan, lookup: Lookup) -> None:
        """Steps 2 to 4; on failure the GC's traces are undone."""
        started = time.monotonic()
        try:
            retained = self._walk(plan, lookup)
            self._gc_commit(retained, self._check_cancelled)
        except BaseException:
            self._abandon()
            raise
        seconds = time.monotonic() - started
        with self._gc.lock:
            self._gc.runs += 1
            self._gc.seconds += seconds
        logger.info("%s: GC kept %d bindings in %.3f s", self.name, len(retained), seconds)

    def _check_cancelled(self) -> None:
        if self._gc.cancelled:
            raise GcCancelled

    def _walk(self, plan: _Plan, lookup: Lookup) -> dict[bytes, bytes]:
        """The retained bindings: key to engine entry, as they were at the GC's start."""
        retained: dict[bytes, bytes] = {}
        state = self._gc
        if isinstance(plan.spec, Retain):
            absent = 0
            for named in plan.keys:
                if state.cancelled:
                    raise GcCancelled
                entry = lookup(named)
                if entry is None:
                    absent += 1
                    logger.debug("%s: GC: key %s has no binding, skipped", self.name, named.hex())
                else:
                    retained[named] = entry
            if absent:
                logger.info("%s: GC: %d keys to retain have no binding, skipped", self.name, absent)
            return retained
        follow = plan.spec.next
        key: bytes | None = plan.keys[0]
        while key is not None and key not in retained:
            if state.cancelled:
                raise GcCancelled
            entry = lookup(key)
            if entry is None:
                if not retained:
                    logger.info("%s: GC: chain start %s has no binding", self.name, key.hex())
                break
            retained[key] = entry
            following = follow(self._decode(self._key, key), self._gc_value(key, entry))
            if following is None:
                break
            try:
                key = self._key.encode(following)
            except CodecError as error:
                raise self._codec_error(error) from error
        return retained

    # -- closing

    def _before_close(self) -> None:
        """Stop a running GC and wait until it has put the store back as it was."""
        state = self._gc
        with state.lock:  # no gc() starts from now on
            state.closing = True
            state.cancelled = True
        if state.runner != threading.get_ident():
            state.idle.wait()

    # -- what each kind provides

    def _gc_begin(self) -> Lookup:
        """Start the GC in the engine; return the frozen lookup (exclusive section)."""
        return self._engine.begin_gc()

    def _gc_value(self, key: bytes, entry: bytes) -> Any:
        """What ``Chain.next`` receives for an engine entry."""
        return self._decode(self._value, entry)

    def _gc_commit(self, retained: dict[bytes, bytes], check: Callable[[], None]) -> None:
        """Merge the engine's bindings, keeping ``retained`` and the written keys."""
        check()
        # The entries as the walk read them: a key not written since keeps that
        # value, so the engine need not look it up again; a written key keeps
        # its new value whatever this says.
        self._engine.collect(retained)

    def _gc_abandon(self) -> None:
        """Undo what ``_gc_begin`` started (exclusive section)."""
        self._engine.end_gc()
