"""Shared tasks and exclusive sections guarding a store (port of Octez's ``Lwt_idle_waiter``).

Reads run as shared *tasks*; writes run alone, in an *exclusive* section:

* :meth:`IdleWaiter.task` -- many tasks may run at once.  A new task waits while
  a :meth:`~IdleWaiter.force_idle` is pending or an exclusive section runs.
* :meth:`IdleWaiter.force_idle` -- waits until no task runs, holding back new
  tasks meanwhile (so writers never starve), then runs alone.
* :meth:`IdleWaiter.when_idle` -- waits until no task runs *without* holding back
  new tasks (as ``Lwt_idle_waiter.when_idle``: under a continuous flow of
  overlapping tasks it may wait indefinitely), then runs ``fn`` alone; tasks
  started during ``fn`` wait until it ends.

Fairness: exclusive callers are served one at a time, in FIFO order (a
``when_idle`` queued ahead of a ``force_idle`` runs first, once the tasks held
back by that ``force_idle`` have drained).  When an exclusive section ends, every
task that was waiting for it is admitted before the next exclusive caller runs
(as ``Lwt_idle_waiter`` wakes its pending tasks), so ``force_idle`` callers and
tasks never starve each other.

Hot paths may use the low-level pairs :meth:`~IdleWaiter.enter_task` /
:meth:`~IdleWaiter.exit_task` and :meth:`~IdleWaiter.enter_exclusive` /
:meth:`~IdleWaiter.exit_exclusive` in ``try``/``finally`` instead of ``with``.

Reentrancy: the thread holding the exclusive section may open tasks and nested
exclusive sections; they run immediately.  Two patterns deadlock and are NOT
detected (detecting them would slow down :meth:`~IdleWaiter.task`):

* calling ``force_idle``/``when_idle`` from inside a task of the same thread (the
  exclusive section waits for that task to end);
* opening a task nested in another task of the same thread while a
  ``force_idle`` is pending (the nested task waits for the ``force_idle``, which
  waits for the outer task) -- the same behaviour as ``Lwt_idle_waiter``.

Two implementations behave alike and pass the same tests: :class:`PyIdleWaiter`,
in pure Python on one lock, and :class:`CIdleWaiter`, whose counters live in a C
object (``_idle_core``) and change in single C calls that the GIL makes atomic,
so that an uncontended task or exclusive section costs two C calls (about 50 ns
against 800 ns).  ``IdleWaiter`` is the C one where it is built, which excludes
free-threaded interpreters and ``L2_STORES_PURE_PYTHON=1``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, TypeVar

from .engine.accel import load_extension

__all__ = ["CIdleWaiter", "IdleWaiter", "PyIdleWaiter"]

T = TypeVar("T")

_get_ident = threading.get_ident


class _ExclusiveSection:
    """The reusable context manager returned by :meth:`IdleWaiter.force_idle`."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, waiter: PyIdleWaiter) -> None:
        self._enter = waiter.enter_exclusive
        self._exit = waiter.exit_exclusive

    def __enter__(self) -> None:
        self._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()


class PyIdleWaiter:
    """Lets many tasks run together, or one exclusive section run alone (pure Python).

    For speed, :meth:`task` returns the waiter itself: ``with waiter:`` is the
    same as ``with waiter.task():`` (a shared task, not an exclusive section).
    """

    __slots__ = (
        "_acquire",
        "_blocked",
        "_depth",
        "_draining",
        "_excl_cv",
        "_exclusive_section",
        "_lock",
        "_next_ticket",
        "_owner",
        "_queue",
        "_release",
        "_task_cv",
        "_task_gen",
        "_tasks",
        "_tasks_in",
        "_tasks_waiting",
    )

    def __init__(self) -> None:
        lock = threading.Lock()
        self._lock = lock
        self._acquire = lock.acquire
        self._release = lock.release
        # Waiting tasks and waiting exclusive callers sleep on separate conditions.
        self._task_cv = threading.Condition(lock)
        self._excl_cv = threading.Condition(lock)
        # Running tasks (including admitted ones not yet awake).
        self._tasks = 0
        # Pending force_idle callers, + 1 while an exclusive section runs:
        # a new task starts at once only when it is 0.
        self._blocked = 0
        # Thread running the exclusive section, and its nesting depth.
        self._owner: int | None = None
        self._depth = 0
        # Tickets of the exclusive callers waiting for their turn, oldest first.
        self._queue: deque[int] = deque()
        self._next_ticket = 0
        # Tasks waiting for an exclusive section to end; bumping _task_gen admits them.
        self._tasks_waiting = 0
        self._task_gen = 0
        # The exclusive section lets tasks run beside it (let_tasks_in), and its
        # owner waits for them to end (keep_tasks_out).
        self._tasks_in = False
        self._draining = False
        self._exclusive_section = _ExclusiveSection(self)

    # -- public API ----------------------------------------------------------

    def task(self) -> AbstractContextManager[None]:
        """A shared section: runs alongside other tasks, never with an exclusive one."""
        return self

    def force_idle(self) -> AbstractContextManager[None]:
        """An exclusive section; new tasks are held back while it waits for running ones."""
        return self._exclusive_section

    def when_idle(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` alone once no task runs, without holding back tasks while waiting.

        Returns ``fn``'s result and propagates its exception.
        """
        self.enter_exclusive(force=False)
        try:
            return fn()
        finally:
            self.exit_exclusive()

    # -- low-level pairs (callers use try/finally) ---------------------------

    def enter_task(self) -> None:
        """Low-level: start a task; pair with :meth:`exit_task` in ``try``/``finally``."""
        self._acquire()
        try:
            if not self._blocked:
                self._tasks += 1
                return
        finally:
            self._release()
        self._enter_task_slow()

    def exit_task(self) -> None:
        """Low-level: end a task started by :meth:`enter_task`."""
        self._acquire()
        try:
            n = self._tasks - 1
            self._tasks = n
            if not n and (self._queue or self._draining):
                self._excl_cv.notify_all()
        finally:
            self._release()

    __enter__ = enter_task

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Same body as exit_task, inlined: this is the hot path of ``with task()``.
        self._acquire()
        try:
            n = self._tasks - 1
            self._tasks = n
            if not n and (self._queue or self._draining):
                self._excl_cv.notify_all()
        finally:
            self._release()

    def try_enter_task(self, owner: int | None = None) -> bool:
        """Low-level: start a task if that needs no wait; True when started.

        The holder of the exclusive section (this thread, or ``owner``) may
        always start one.
        """
        self._acquire()
        try:
            if self._blocked and self._owner != (_get_ident() if owner is None else owner):
                return False
            self._tasks += 1
            return True
        finally:
            self._release()

    def try_enter_exclusive(self, owner: int | None = None) -> bool:
        """Low-level: enter the exclusive section if that needs no wait; True when entered.

        ``owner`` as for :meth:`enter_exclusive`.
        """
        me = _get_ident() if owner is None else owner
        with self._lock:
            if self._owner == me:
                self._check_nestable()
                self._depth += 1
                return True
            if self._owner is not None or self._tasks or self._queue or self._blocked:
                return False
            self._blocked += 1
            self._owner = me
            self._depth = 1
            return True

    def enter_exclusive(self, *, force: bool = True, owner: int | None = None) -> None:
        """Low-level: enter the exclusive section; pair with :meth:`exit_exclusive`.

        With ``force`` (the default, as :meth:`force_idle`) new tasks are held back
        while waiting; without it (as :meth:`when_idle`) they are not. The
        section belongs to the calling thread, or to ``owner`` when given (an
        id that may leave the section from another thread; asyncio tasks use
        negative ids, so they never collide with thread ids).
        """
        me = _get_ident() if owner is None else owner
        with self._lock:
            if self._owner == me:
                self._check_nestable()
                self._depth += 1
                return
            if force:
                self._blocked += 1
            if self._owner is not None or self._tasks or self._queue:
                ticket = self._next_ticket
                self._next_ticket = ticket + 1
                queue = self._queue
                queue.append(ticket)
                try:
                    while queue[0] != ticket or self._owner is not None or self._tasks:
                        self._excl_cv.wait()
                except BaseException:
                    queue.remove(ticket)
                    if force:
                        self._blocked -= 1
                    if self._owner is None:
                        self._admit_waiting_tasks()
                    self._excl_cv.notify_all()
                    raise
                queue.popleft()
            if not force:
                self._blocked += 1
            self._owner = me
            self._depth = 1

    def exit_exclusive(self, owner: int | None = None) -> None:
        """Low-level: leave the exclusive section entered by :meth:`enter_exclusive`."""
        with self._lock:
            self._check_owner(_get_ident() if owner is None else owner, "exit_exclusive")
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            self._draining = False
            if self._tasks_in:
                self._tasks_in = False  # (tasks were let in: they were not held back)
            else:
                self._blocked -= 1
            if not self._admit_waiting_tasks() and self._queue and not self._tasks:
                self._excl_cv.notify_all()

    def let_tasks_in(self, owner: int | None = None) -> bool:
        """Low-level, by the holder of the exclusive section: let tasks run beside it,
        while other exclusive callers still wait; pair with :meth:`keep_tasks_out`, or
        leave the section. False (nothing changed) when the owner entered the section
        more than once: an outer level of it counts on running alone."""
        with self._lock:
            self._check_owner(_get_ident() if owner is None else owner, "let_tasks_in")
            if self._tasks_in:
                raise RuntimeError("let_tasks_in() twice")
            if self._depth != 1:
                return False
            self._tasks_in = True
            self._blocked -= 1
            self._admit_waiting_tasks()
            return True

    def keep_tasks_out(self, owner: int | None = None) -> None:
        """Low-level, after :meth:`let_tasks_in`: hold new tasks back again and wait
        until the running ones end; the section is exclusive once this returns."""
        with self._lock:
            self._check_owner(_get_ident() if owner is None else owner, "keep_tasks_out")
            if not self._tasks_in:
                raise RuntimeError("keep_tasks_out() without let_tasks_in()")
            self._tasks_in = False
            self._blocked += 1
            self._draining = True
            try:
                while self._tasks:
                    self._excl_cv.wait()
            except BaseException:
                self._blocked -= 1  # tasks in again; the caller leaves the section
                self._tasks_in = True
                self._admit_waiting_tasks()
                raise
            finally:
                self._draining = False

    def _check_owner(self, me: int, what: str) -> None:
        if self._owner != me:
            raise RuntimeError(f"{what}() by a thread not holding the exclusive section")

    def _check_nestable(self) -> None:
        if self._tasks_in:
            raise RuntimeError("the exclusive section lets tasks in: it cannot be nested now")

    # -- introspection -------------------------------------------------------

    @property
    def running_tasks(self) -> int:
        """Number of tasks currently running."""
        return self._tasks

    @property
    def waiting_tasks(self) -> int:
        """Number of tasks waiting for an exclusive section to end."""
        return self._tasks_waiting

    @property
    def pending_exclusive(self) -> int:
        """Number of force_idle/when_idle callers waiting for their turn."""
        return len(self._queue)

    @property
    def exclusive_running(self) -> bool:
        """Whether an exclusive section is running."""
        return self._owner is not None

    def is_idle(self) -> bool:
        """Whether nothing runs or waits: no task, no exclusive section."""
        with self._lock:
            return (
                not self._tasks
                and self._owner is None
                and not self._queue
                and not self._tasks_waiting
            )

    # -- internals -----------------------------------------------------------

    def _enter_task_slow(self) -> None:
        with self._lock:
            if not self._blocked or self._owner == _get_ident():
                self._tasks += 1
                return
            gen = self._task_gen
            self._tasks_waiting += 1
            try:
                while self._task_gen == gen:
                    self._task_cv.wait()
            except BaseException:
                if self._task_gen == gen:
                    self._tasks_waiting -= 1
                else:
                    # Already admitted and counted as running: give the slot back.
                    self._tasks -= 1
                    if not self._tasks and (self._queue or self._draining):
                        self._excl_cv.notify_all()
                raise
            # Admitted by _admit_waiting_tasks, which already counted us in _tasks.

    def _admit_waiting_tasks(self) -> bool:
        """Start every waiting task (lock held, no exclusive running); True if any."""
        n = self._tasks_waiting
        if not n:
            return False
        self._tasks += n
        self._tasks_waiting = 0
        self._task_gen += 1
        self._task_cv.notify_all()
        return True


def _import_core() -> ModuleType:
    from . import _idle_core

    return _idle_core


def _core_is_built() -> bool:
    return load_extension("_idle_core", _import_core) is not None


#: PyIdleWaiter's behaviour with the state in C, or None when not built.
CIdleWaiter: type[Core] | None = None

if _core_is_built():
    from ._idle_core import Core, Section

    class CIdleWaiter(Core):  # type: ignore[no-redef]
        """:class:`PyIdleWaiter`'s behaviour, with the state and its transitions in C.

        Uncontended tasks and exclusive sections are two C calls. Waits and
        wake-ups go through the methods below, on one lock and two conditions.
        """

        __slots__ = ("_excl_cv", "_exclusive_section", "_lock", "_task_cv")

        def __init__(self) -> None:
            lock = threading.Lock()
            self._lock = lock
            self._task_cv = threading.Condition(lock)
            self._excl_cv = threading.Condition(lock)
            self._exclusive_section = Section(self)

        def task(self) -> AbstractContextManager[None]:
            """A shared section: runs alongside other tasks, never with an exclusive one."""
            return self

        def force_idle(self) -> AbstractContextManager[None]:
            """An exclusive section; new tasks are held back while it waits for running ones."""
            return self._exclusive_section

        def when_idle(self, fn: Callable[[], T]) -> T:
            """Run ``fn`` alone once no task runs, without holding back tasks while waiting."""
            self.enter_exclusive(force=False)
            try:
                return fn()
            finally:
                self.exit_exclusive()

        # -- called by the core: waits and wake-ups

        def _enter_task_slow(self) -> None:
            pending: list[int] = []  # the generation, recorded by the transition itself
            with self._lock:
                try:
                    if self._register_task(pending):
                        return
                    gen = pending[0]
                    while self._task_gen == gen:
                        self._task_cv.wait()
                except BaseException:
                    if pending and self._abandon_task_wait(pending[0]):
                        self._excl_cv.notify_all()
                    raise

        def _wait_exclusive(self, force: bool, owner: int) -> None:
            pending: list[int] = []  # the ticket, recorded by the transition itself
            with self._lock:
                try:
                    if self._enqueue_exclusive(force, owner, pending):
                        return
                    ticket = pending[0]
                    while not self._take_exclusive(ticket, force, owner):
                        self._excl_cv.wait()
                except BaseException:
                    if pending and self._cancel_exclusive(pending[0], force, owner):
                        self._task_cv.notify_all()
                    self._excl_cv.notify_all()
                    raise

        def _drain_tasks(self) -> None:
            with self._lock:
                try:
                    while self.running_tasks:
                        self._excl_cv.wait()
                except BaseException:
                    if self._undo_keep_out():  # tasks in again; the caller leaves the section
                        self._task_cv.notify_all()
                    raise

        def _notify_tasks(self) -> None:
            with self._lock:
                self._task_cv.notify_all()

        def _notify_exclusive(self) -> None:
            with self._lock:
                self._excl_cv.notify_all()


def task_read(
    waiter: object,
    lifetime: object,
    read: Callable[[bytes], bytes | None],
    key_size: int,
    decode: Callable[[bytes], object] | None,
    fallback: Callable[..., object],
) -> Callable[..., object] | None:
    """``fallback``'s fast path in C: ``read(key)`` as a task of ``waiter``; None without C.

    It serves a bytes key of ``key_size`` while ``lifetime.closed`` is false
    and no exclusive section runs or waits, then returns ``decode(raw)`` (or
    the raw bytes when ``decode`` is None). Every other call, and any error,
    is ``fallback``'s, which must do the same the long way and raise the
    right error.
    """
    if CIdleWaiter is None or not isinstance(waiter, CIdleWaiter):
        return None
    from ._idle_core import TaskRead

    return TaskRead(waiter, lifetime, read, key_size, decode, fallback)


def exclusive_write(
    waiter: object,
    lifetime: object,
    pacer: object,
    write: Callable[..., object],
    sizes: tuple[int, ...],
    fallback: Callable[..., object],
) -> Callable[..., object] | None:
    """``fallback``'s fast path in C: ``write(*args)`` as the exclusive section; None without C.

    It serves bytes arguments of ``sizes`` (-1: any length), with no keyword
    but ``flush=True``, while the section is free at once, ``pacer.pacing``
    is false and ``lifetime.closed`` is false. Every other call is
    ``fallback``'s, which must do the same the long way and raise the right
    error; an error of ``write`` propagates, the section left.
    """
    if CIdleWaiter is None or not isinstance(waiter, CIdleWaiter):
        return None
    from ._idle_core import ExclusiveWrite

    return ExclusiveWrite(waiter, lifetime, pacer, write, sizes, fallback)


if TYPE_CHECKING:
    IdleWaiter = PyIdleWaiter
else:
    #: The idle-waiter of every store: the C-state one when built, else pure Python.
    IdleWaiter = CIdleWaiter if CIdleWaiter is not None else PyIdleWaiter
