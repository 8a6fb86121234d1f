"""Tests of l2_stores.idle_waiter: shared tasks, exclusive sections, fairness, reentrancy."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, ClassVar

import pytest

import l2_stores.idle_waiter as idle_waiter
from l2_stores.idle_waiter import IdleWaiter

IMPLEMENTATIONS: list[type[Any]] = [idle_waiter.PyIdleWaiter]
if idle_waiter.CIdleWaiter is not None:
    IMPLEMENTATIONS.append(idle_waiter.CIdleWaiter)

# Deadlock guard only: every wait below normally ends in milliseconds.
GUARD = 10.0


class Runner:
    """Runs ``fn`` in a daemon thread, keeping its result or exception."""

    def __init__(self, fn: Callable[[], Any], name: str = "runner") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:
            self.error = e

    def join(self) -> Any:
        self.thread.join(GUARD)
        assert not self.thread.is_alive(), f"{self.thread.name} deadlocked"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS, ids=lambda cls: cls.__name__)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test runs on the pure-Python waiter and on the C-state one (when built)."""
    monkeypatch.setitem(globals(), "IdleWaiter", request.param)
    return request.param


def test_the_stores_use_the_c_state_waiter_when_it_is_built() -> None:
    expected = idle_waiter.CIdleWaiter or idle_waiter.PyIdleWaiter
    assert idle_waiter.IdleWaiter is expected
    code = "import l2_stores; print(l2_stores.IdleWaiter.__name__)"
    env = dict(os.environ, L2_STORES_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PyIdleWaiter", out.stderr


@pytest.fixture
def fast_switch() -> Iterator[None]:
    """Preempt threads often, so that stress tests see many interleavings."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def wait_until(pred: Callable[[], bool], what: str) -> None:
    """Poll ``pred`` until true; fail (deadlock guard) if it never becomes true."""
    deadline = time.monotonic() + GUARD
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.0005)


def wait_event(ev: threading.Event, what: str) -> None:
    assert ev.wait(GUARD), f"timed out waiting for: {what}"


def pending_is(w: IdleWaiter, n: int) -> bool:
    return w.pending_exclusive == n


def hold_task(w: IdleWaiter, entered: threading.Event, release: threading.Event) -> Runner:
    """A thread holding a task until ``release`` is set."""

    def body() -> None:
        with w.task():
            entered.set()
            wait_event(release, "release of held task")

    r = Runner(body, "holder")
    wait_event(entered, "holder entered its task")
    return r


# -- basics ------------------------------------------------------------------


def test_fresh_waiter_is_idle() -> None:
    w = IdleWaiter()
    assert w.is_idle()
    assert w.running_tasks == 0
    assert w.pending_exclusive == 0
    assert w.waiting_tasks == 0
    assert not w.exclusive_running


def test_sections_update_introspection() -> None:
    w = IdleWaiter()
    with w.task():
        assert w.running_tasks == 1
        assert not w.is_idle()
        with w.task():
            assert w.running_tasks == 2
    assert w.is_idle()
    with w.force_idle():
        assert w.exclusive_running
        assert not w.is_idle()
    assert w.when_idle(lambda: w.exclusive_running) is True
    w.enter_task()
    try:
        assert w.running_tasks == 1
    finally:
        w.exit_task()
    w.enter_exclusive()
    try:
        assert w.exclusive_running
    finally:
        w.exit_exclusive()
    assert w.is_idle()


def test_tasks_overlap() -> None:
    n = 8
    w = IdleWaiter()
    barrier = threading.Barrier(n, timeout=GUARD)
    seen: list[int] = []

    def body() -> None:
        with w.task():
            # Only passes if all n tasks are inside at the same time.
            barrier.wait()
            seen.append(w.running_tasks)
            barrier.wait()

    runners = [Runner(body, f"task{i}") for i in range(n)]
    for r in runners:
        r.join()
    assert seen == [n] * n
    assert w.is_idle()


# -- exclusion ---------------------------------------------------------------


class Monitor:
    """Counts who is inside which section; records every violation of exclusion."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks = 0
        self.exclusives = 0
        self.violations: list[str] = []
        self.task_count = 0
        self.exclusive_count = 0

    def enter_task(self) -> None:
        with self.lock:
            if self.exclusives:
                self.violations.append(f"task started with {self.exclusives} exclusive(s)")
            self.tasks += 1
            self.task_count += 1

    def exit_task(self) -> None:
        with self.lock:
            if self.exclusives:
                self.violations.append(f"task ran with {self.exclusives} exclusive(s)")
            self.tasks -= 1

    def enter_exclusive(self) -> None:
        with self.lock:
            if self.tasks or self.exclusives:
                self.violations.append(
                    f"exclusive started with {self.tasks} task(s), {self.exclusives} exclusive(s)"
                )
            self.exclusives += 1
            self.exclusive_count += 1

    def exit_exclusive(self) -> None:
        with self.lock:
            if self.tasks or self.exclusives != 1:
                self.violations.append(
                    f"exclusive ran with {self.tasks} task(s), {self.exclusives} exclusive(s)"
                )
            self.exclusives -= 1


@pytest.mark.usefixtures("fast_switch")
def test_force_idle_runs_alone() -> None:
    w = IdleWaiter()
    m = Monitor()

    def reader() -> None:
        # A bounded number of tasks: a when_idle may wait for as long as
        # overlapping tasks keep coming (documented semantics).
        for _ in range(500):
            with w.task():
                m.enter_task()
                time.sleep(0)  # let other threads interleave inside the section
                m.exit_task()

    def writer(k: int) -> None:
        for i in range(300):
            if (i + k) % 3 == 0:

                def fn() -> None:
                    m.enter_exclusive()
                    time.sleep(0)
                    m.exit_exclusive()

                w.when_idle(fn)
            else:
                with w.force_idle():
                    m.enter_exclusive()
                    time.sleep(0)
                    m.exit_exclusive()

    readers = [Runner(reader, f"reader{i}") for i in range(6)]
    writers = [Runner(partial(writer, k), f"writer{k}") for k in range(3)]
    for r in writers + readers:
        r.join()
    assert m.violations == []
    assert m.exclusive_count == 900
    assert m.task_count == 3000
    assert w.is_idle()


def test_pending_force_idle_holds_back_new_tasks() -> None:
    w = IdleWaiter()
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)

    def exclusive() -> None:
        with w.force_idle():
            order.append("force_idle")

    def late_task() -> None:
        with w.task():
            order.append("late task")

    writer = Runner(exclusive, "writer")
    wait_until(lambda: w.pending_exclusive == 1, "force_idle pending")
    late = Runner(late_task, "late")
    wait_until(lambda: w.waiting_tasks == 1, "late task held back")
    assert order == []
    assert w.running_tasks == 1
    release.set()
    holder.join()
    writer.join()
    late.join()
    assert order == ["force_idle", "late task"]
    assert w.is_idle()


def test_writer_does_not_starve() -> None:
    """Readers hand over so that a task is always running unless tasks are held back."""
    w = IdleWaiter()
    state = threading.Condition()
    inside = 0
    stop = threading.Event()
    done = 0

    def reader() -> None:
        nonlocal inside
        while not stop.is_set():
            with w.task(), state:
                inside += 1
                # Leave only once another reader is inside, or once a reader is
                # held back (a pending force_idle): without hold-back, readers
                # always overlap and the writer could never run.
                while not (inside >= 2 or w.waiting_tasks or stop.is_set()):
                    state.wait(0.0005)
                inside -= 1
                state.notify_all()

    def writer() -> None:
        nonlocal done
        for _ in range(50):
            with w.force_idle():
                done += 1

    readers = [Runner(reader, f"reader{i}") for i in range(4)]
    wait_until(lambda: w.running_tasks > 0, "readers running")
    wr = Runner(writer, "writer")
    try:
        wr.thread.join(GUARD)
        assert not wr.thread.is_alive(), f"writer starved after {done} force_idle"
    finally:
        stop.set()
        for r in readers:
            r.join()
        wr.join()
    assert done == 50
    assert w.is_idle()


def test_exclusive_callers_are_served_in_fifo_order() -> None:
    w = IdleWaiter()
    order: list[str] = []
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)

    def force(name: str) -> None:
        with w.force_idle():
            order.append(name)

    runners = []
    for i, name in enumerate(["a", "b", "c", "d"]):
        if name == "b":
            runners.append(Runner(lambda: w.when_idle(lambda: order.append("b")), name))
        else:
            runners.append(Runner(partial(force, name), name))
        wait_until(partial(pending_is, w, i + 1), f"{name} pending")
    release.set()
    holder.join()
    for r in runners:
        r.join()
    assert order == ["a", "b", "c", "d"]
    assert w.is_idle()


def test_tasks_waiting_for_an_exclusive_run_before_the_next_one() -> None:
    w = IdleWaiter()
    order: list[str] = []
    in_first, release_first = threading.Event(), threading.Event()

    def first() -> None:
        with w.force_idle():
            in_first.set()
            wait_event(release_first, "release of first exclusive")
            order.append("first")

    def reader() -> None:
        with w.task():
            order.append("task")

    def second() -> None:
        with w.force_idle():
            order.append("second")

    r1 = Runner(first, "first")
    wait_event(in_first, "first exclusive running")
    rt = Runner(reader, "reader")
    wait_until(lambda: w.waiting_tasks == 1, "task waiting")
    r2 = Runner(second, "second")
    wait_until(lambda: w.pending_exclusive == 1, "second pending")
    release_first.set()
    for r in (r1, rt, r2):
        r.join()
    assert order == ["first", "task", "second"]
    assert w.is_idle()


# -- when_idle ---------------------------------------------------------------


def test_when_idle_returns_fn_result() -> None:
    w = IdleWaiter()
    assert w.when_idle(lambda: 42) == 42
    assert w.is_idle()


def test_when_idle_waits_for_running_tasks() -> None:
    w = IdleWaiter()
    ran: list[int] = []
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)

    def fn() -> str:
        ran.append(w.running_tasks)
        return "done"

    r = Runner(lambda: w.when_idle(fn), "when_idle")
    wait_until(lambda: w.pending_exclusive == 1, "when_idle pending")
    assert ran == []
    release.set()
    holder.join()
    assert r.join() == "done"
    assert ran == [0]
    assert w.is_idle()


def test_pending_when_idle_does_not_hold_back_tasks() -> None:
    w = IdleWaiter()
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)
    r = Runner(lambda: w.when_idle(lambda: "done"), "when_idle")
    wait_until(lambda: w.pending_exclusive == 1, "when_idle pending")
    # A new task starts at once, even though when_idle is waiting.
    entered2, release2 = threading.Event(), threading.Event()
    holder2 = hold_task(w, entered2, release2)
    assert w.running_tasks == 2
    assert w.pending_exclusive == 1
    release.set()
    holder.join()
    assert w.pending_exclusive == 1  # still one task running
    release2.set()
    holder2.join()
    assert r.join() == "done"
    assert w.is_idle()


def test_tasks_started_during_when_idle_fn_wait_for_it() -> None:
    w = IdleWaiter()
    order: list[str] = []
    in_fn, release_fn = threading.Event(), threading.Event()

    def fn() -> int:
        in_fn.set()
        wait_event(release_fn, "release of fn")
        order.append("fn")
        return 7

    r = Runner(lambda: w.when_idle(fn), "when_idle")
    wait_event(in_fn, "fn running")

    def reader() -> None:
        with w.task():
            order.append("task")

    rt = Runner(reader, "reader")
    wait_until(lambda: w.waiting_tasks == 1, "task held back")
    assert order == []
    release_fn.set()
    assert r.join() == 7
    rt.join()
    assert order == ["fn", "task"]
    assert w.is_idle()


# -- exceptions --------------------------------------------------------------


class Boom(Exception):
    pass


def assert_usable(w: IdleWaiter) -> None:
    assert w.is_idle()
    assert w.running_tasks == 0

    def force() -> str:
        with w.force_idle(), w.task():
            pass
        return "ok"

    assert Runner(force, "force").join() == "ok"
    assert Runner(lambda: w.when_idle(lambda: "ok"), "when").join() == "ok"
    assert w.is_idle()


def test_exception_in_task_propagates_and_releases() -> None:
    w = IdleWaiter()
    with pytest.raises(Boom), w.task():
        raise Boom
    assert_usable(w)


def test_exception_in_force_idle_propagates_and_releases() -> None:
    w = IdleWaiter()
    with pytest.raises(Boom), w.force_idle():
        raise Boom
    assert not w.exclusive_running
    assert_usable(w)


def test_exception_in_when_idle_propagates_and_releases() -> None:
    w = IdleWaiter()

    def fn() -> None:
        raise Boom

    with pytest.raises(Boom):
        w.when_idle(fn)
    assert_usable(w)


def test_exception_in_nested_sections_releases_all() -> None:
    w = IdleWaiter()

    def fn() -> None:
        with w.force_idle(), w.task():
            raise Boom

    def body() -> None:
        with w.force_idle():
            w.when_idle(fn)

    with pytest.raises(Boom):
        Runner(body, "owner").join()
    assert_usable(w)


def test_exception_in_force_idle_wakes_held_back_tasks() -> None:
    w = IdleWaiter()
    in_force, release = threading.Event(), threading.Event()

    def failing() -> None:
        with w.force_idle():
            in_force.set()
            wait_event(release, "release of force_idle")
            raise Boom

    def reader() -> str:
        with w.task():
            return "read"

    rf = Runner(failing, "failing")
    wait_event(in_force, "force_idle running")
    rt = Runner(reader, "reader")
    wait_until(lambda: w.waiting_tasks == 1, "task held back")
    release.set()
    with pytest.raises(Boom):
        rf.join()
    assert rt.join() == "read"
    assert_usable(w)


def test_exit_exclusive_by_another_thread_is_an_error() -> None:
    w = IdleWaiter()
    w.enter_exclusive()
    try:
        with pytest.raises(RuntimeError):
            Runner(w.exit_exclusive, "intruder").join()
        assert w.exclusive_running
    finally:
        w.exit_exclusive()
    assert w.is_idle()


# -- reentrancy --------------------------------------------------------------


def test_task_inside_force_idle_runs() -> None:
    w = IdleWaiter()

    def body() -> int:
        with w.force_idle():
            with w.task():
                n = w.running_tasks
            w.enter_task()
            w.exit_task()
        return n

    assert Runner(body, "owner").join() == 1
    assert w.is_idle()


def test_task_inside_when_idle_fn_runs() -> None:
    w = IdleWaiter()

    def fn() -> str:
        with w.task():
            return "nested"

    assert Runner(lambda: w.when_idle(fn), "owner").join() == "nested"
    assert w.is_idle()


def test_nested_exclusive_sections_run() -> None:
    w = IdleWaiter()

    def body() -> str:
        with w.force_idle(), w.force_idle():
            r = w.when_idle(lambda: w.when_idle(lambda: "deep"))
            with w.task(), w.force_idle():
                pass
        return r

    assert Runner(body, "owner").join() == "deep"
    assert w.is_idle()


def test_owner_nested_task_does_not_let_other_tasks_in() -> None:
    w = IdleWaiter()
    order: list[str] = []
    in_nested, release = threading.Event(), threading.Event()

    def owner() -> None:
        with w.force_idle():
            with w.task():
                in_nested.set()
                wait_event(release, "release of owner")
                order.append("owner task")
            order.append("owner")

    def reader() -> None:
        with w.task():
            order.append("reader")

    ro = Runner(owner, "owner")
    wait_event(in_nested, "owner's nested task")
    rr = Runner(reader, "reader")
    wait_until(lambda: w.waiting_tasks == 1, "reader held back")
    release.set()
    ro.join()
    rr.join()
    assert order == ["owner task", "owner", "reader"]
    assert w.is_idle()


# -- randomized stress -------------------------------------------------------


@pytest.mark.usefixtures("fast_switch")
@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_keep_exclusion(seed: int) -> None:
    w = IdleWaiter()
    m = Monitor()
    n_threads, n_ops = 6, 250
    expected = {"task": 0, "exclusive": 0}
    plans: list[list[str]] = []
    rng = random.Random(seed)
    kinds = ["task", "task", "task", "low_task", "force", "when", "force_task", "low_force"]
    for _ in range(n_threads):
        plan = [rng.choice(kinds) for _ in range(n_ops)]
        plans.append(plan)
        for op in plan:
            expected["task" if op in ("task", "low_task") else "exclusive"] += 1

    def run(plan: list[str], yields: list[bool]) -> None:
        for op, yld in zip(plan, yields, strict=True):
            if op == "task":
                with w.task():
                    m.enter_task()
                    if yld:
                        time.sleep(0)
                    m.exit_task()
            elif op == "low_task":
                w.enter_task()
                try:
                    m.enter_task()
                    m.exit_task()
                finally:
                    w.exit_task()
            elif op in ("force", "force_task", "low_force"):
                if op == "low_force":
                    w.enter_exclusive()
                else:
                    w.force_idle().__enter__()
                try:
                    m.enter_exclusive()
                    if yld:
                        time.sleep(0)
                    if op == "force_task":
                        # The owner's own task is allowed inside its exclusive section.
                        with w.task():
                            pass
                    m.exit_exclusive()
                finally:
                    w.exit_exclusive()
            else:

                def fn(yld: bool = yld) -> None:
                    m.enter_exclusive()
                    if yld:
                        time.sleep(0)
                    m.exit_exclusive()

                w.when_idle(fn)

    runners = []
    for i, plan in enumerate(plans):
        yields = [rng.random() < 0.5 for _ in plan]
        runners.append(Runner(partial(run, plan, yields), f"t{i}"))
    for r in runners:
        r.join()
    assert m.violations == []
    assert m.task_count == expected["task"]
    assert m.exclusive_count == expected["exclusive"]
    assert w.is_idle()


# -- interrupted waits ---------------------------------------------------------


class Interrupted(Exception):
    pass


class InterruptOnce:
    """Stands in for a condition: the first wait raises, as a signal handler would."""

    def __init__(self, condition: threading.Condition) -> None:
        self.condition = condition
        self.fired = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if not self.fired.is_set():
            self.fired.set()
            raise Interrupted
        return self.condition.wait(timeout)

    def notify_all(self) -> None:
        self.condition.notify_all()


def test_an_exclusive_caller_interrupted_while_waiting_leaves_the_line() -> None:
    w = IdleWaiter()
    w._excl_cv = InterruptOnce(w._excl_cv)  # type: ignore[assignment]
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)

    def writer() -> None:
        with w.force_idle():
            pass

    interrupted = Runner(writer, "interrupted writer")
    with pytest.raises(Interrupted):
        interrupted.join()
    assert w.pending_exclusive == 0
    # Its hold on new tasks is gone: a task starts at once, and the next writer gets in.
    assert w.try_enter_task()
    w.exit_task()
    release.set()
    holder.join()
    Runner(writer, "next writer").join()
    assert w.is_idle()


def test_a_task_interrupted_while_waiting_gives_its_place_back() -> None:
    w = IdleWaiter()
    w._task_cv = InterruptOnce(w._task_cv)  # type: ignore[assignment]
    in_section, release = threading.Event(), threading.Event()

    def writer() -> None:
        with w.force_idle():
            in_section.set()
            wait_event(release, "release of the writer")

    held = Runner(writer, "writer")
    wait_event(in_section, "writer in its section")

    def reader() -> None:
        with w.task():
            pass

    interrupted = Runner(reader, "interrupted reader")
    with pytest.raises(Interrupted):
        interrupted.join()
    assert w.waiting_tasks == 0
    release.set()
    held.join()
    assert w.is_idle()
    Runner(reader, "next reader").join()
    assert w.is_idle()


C_ONLY = pytest.mark.skipif(idle_waiter.CIdleWaiter is None, reason="the C core is not built")


def flaky_c_waiter(where: str) -> Any:
    """A CIdleWaiter raising once at ``where`` in its slow paths, as Ctrl-C may."""
    assert idle_waiter.CIdleWaiter is not None

    class Flaky(idle_waiter.CIdleWaiter):  # type: ignore[misc,valid-type]
        armed: ClassVar[list[bool]] = [True]

        def _fire(self, here: str) -> None:
            if where == here and self.armed[0]:
                self.armed[0] = False
                raise Interrupted(here)

        def _wait_exclusive(self, force: bool, owner: int) -> None:
            self._fire("wait entry")
            super()._wait_exclusive(force, owner)

        def _enqueue_exclusive(self, force: bool, owner: int, pending: list[int]) -> bool:
            taken: bool = super()._enqueue_exclusive(force, owner, pending)
            self._fire("after enqueue")
            return taken

        def _enter_task_slow(self) -> None:
            self._fire("task entry")
            super()._enter_task_slow()

        def _register_task(self, pending: list[int]) -> bool:
            started: bool = super()._register_task(pending)
            self._fire("after register")
            return started

    return Flaky()


@C_ONLY
@pytest.mark.parametrize("where", ["wait entry", "after enqueue"])
def test_c_waiter_exclusive_caller_interrupted_around_queueing(where: str) -> None:
    w = flaky_c_waiter(where)
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)
    with pytest.raises(Interrupted):
        w.enter_exclusive()
    assert w.pending_exclusive == 0
    assert not w.exclusive_running
    assert w.try_enter_task()  # no hold on new tasks is left behind
    w.exit_task()
    release.set()
    holder.join()
    Runner(lambda: w.force_idle().__enter__() or w.exit_exclusive(), "next writer").join()
    assert w.is_idle()


@C_ONLY
def test_c_waiter_section_taken_at_once_then_interrupted_is_given_back() -> None:
    w = flaky_c_waiter("after enqueue")
    with pytest.raises(Interrupted):
        w._wait_exclusive(True, threading.get_ident())
    assert not w.exclusive_running
    assert w.is_idle()
    assert w.try_enter_task()
    w.exit_task()


@C_ONLY
@pytest.mark.parametrize("where", ["task entry", "after register"])
def test_c_waiter_task_interrupted_around_registering(where: str) -> None:
    w = flaky_c_waiter(where)
    in_section, release = threading.Event(), threading.Event()

    def writer() -> None:
        with w.force_idle():
            in_section.set()
            wait_event(release, "release of the writer")

    held = Runner(writer, "writer")
    wait_event(in_section, "writer in its section")
    with pytest.raises(Interrupted):
        w.enter_task()
    assert w.waiting_tasks == 0
    release.set()
    held.join()
    assert w.is_idle()  # no task slot was left counted


@C_ONLY
def test_c_waiter_task_started_at_once_then_interrupted_is_given_back() -> None:
    w = flaky_c_waiter("after register")
    with pytest.raises(Interrupted):
        w._enter_task_slow()
    assert w.running_tasks == 0
    assert w.is_idle()


# -- an exclusive section that lets tasks in (a batch's commit writing its files) --


def test_a_section_that_lets_tasks_in_keeps_other_writers_out() -> None:
    w = IdleWaiter()
    w.enter_exclusive()
    w.let_tasks_in()
    assert w.exclusive_running
    assert w.try_enter_task()  # a task starts at once beside the section
    w.exit_task()
    assert not w.try_enter_exclusive(owner=-7)  # another writer does not
    writer_in = threading.Event()

    def writer() -> None:
        with w.force_idle():
            writer_in.set()

    queued = Runner(writer, "queued writer")
    wait_until(lambda: pending_is(w, 1), "the writer in line")
    assert not writer_in.is_set()
    w.keep_tasks_out()
    w.exit_exclusive()
    queued.join()
    assert writer_in.is_set()
    assert w.is_idle()


def test_keep_tasks_out_waits_for_the_running_tasks_and_holds_new_ones_back() -> None:
    w = IdleWaiter()
    w.enter_exclusive()
    w.let_tasks_in()
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)  # a task running beside the section
    kept_out = threading.Event()

    def owner_side() -> None:
        w.keep_tasks_out(owner=owner)
        kept_out.set()

    owner = threading.get_ident()
    keeper = Runner(owner_side, "keeper")

    def held_back() -> bool:
        if w.try_enter_task(owner=-99):  # (not the owner's: it would always start)
            w.exit_task()
            return False
        return True

    wait_until(held_back, "tasks held back")
    assert not kept_out.is_set()  # the running task has not ended
    late = Runner(lambda: w.task().__enter__(), "late task")  # waits: tasks are held back
    wait_until(lambda: w.waiting_tasks == 1, "the late task waiting")
    release.set()
    holder.join()
    keeper.join()
    assert kept_out.is_set() and w.running_tasks == 0
    w.exit_exclusive()
    late.join()  # admitted once the section ended
    assert w.running_tasks == 1
    w.exit_task()
    assert w.is_idle()


def test_a_section_may_end_while_tasks_are_in() -> None:
    w = IdleWaiter()
    w.enter_exclusive()
    w.let_tasks_in()
    assert w.try_enter_task()
    w.exit_exclusive()  # (a commit giving up before its end)
    assert not w.exclusive_running and w.running_tasks == 1
    w.exit_task()
    assert w.is_idle()
    with w.force_idle():  # the counts are whole: the next section runs alone
        assert not w.try_enter_task(owner=-99)
    assert w.is_idle()


def test_letting_tasks_in_is_refused_out_of_turn() -> None:
    w = IdleWaiter()
    with pytest.raises(RuntimeError, match="not holding"):
        w.let_tasks_in()
    with pytest.raises(RuntimeError, match="not holding"):
        w.keep_tasks_out()
    w.enter_exclusive()
    with pytest.raises(RuntimeError, match="without let_tasks_in"):
        w.keep_tasks_out()
    w.enter_exclusive()  # nested: the outer level counts on running alone
    assert w.let_tasks_in() is False
    assert not w.try_enter_task(owner=-99)
    w.exit_exclusive()
    assert w.let_tasks_in() is True
    with pytest.raises(RuntimeError, match="twice"):
        w.let_tasks_in()
    with pytest.raises(RuntimeError, match="cannot be nested"):
        w.enter_exclusive()  # tasks run beside it: entering again would not be alone
    with pytest.raises(RuntimeError, match="cannot be nested"):
        w.try_enter_exclusive()
    with pytest.raises(RuntimeError, match="not holding"):
        w.let_tasks_in(owner=-3)
    w.keep_tasks_out()
    w.exit_exclusive()
    assert w.is_idle()


def test_keep_tasks_out_interrupted_lets_the_tasks_in_again() -> None:
    w = IdleWaiter()
    w._excl_cv = InterruptOnce(w._excl_cv)  # type: ignore[assignment]
    w.enter_exclusive()
    w.let_tasks_in()
    entered, release = threading.Event(), threading.Event()
    holder = hold_task(w, entered, release)
    with pytest.raises(Interrupted):
        w.keep_tasks_out()
    assert w.try_enter_task()  # tasks in again, as before the call
    w.exit_task()
    w.exit_exclusive()
    release.set()
    holder.join()
    assert w.is_idle()
    with w.force_idle():
        pass
    assert w.is_idle()


def test_sections_letting_tasks_in_against_a_model(fast_switch: None) -> None:
    """Readers never overlap the section's closed parts; writers never overlap it at all."""
    w = IdleWaiter()
    state = {"closed": 0, "open": 0, "writers": 0, "readers": 0}
    lock = threading.Lock()
    errors: list[str] = []
    stop = threading.Event()

    def note(key: str, delta: int) -> None:
        with lock:
            state[key] += delta
            if state["readers"] and state["closed"]:
                errors.append(f"a reader beside a closed section: {state}")
            if state["writers"] and (state["closed"] or state["open"] or state["writers"] > 1):
                errors.append(f"a writer not alone: {state}")

    def committer() -> None:
        for _ in range(200):
            with w.force_idle():
                note("closed", 1)
                note("closed", -1)
                w.let_tasks_in()
                note("open", 1)
                time.sleep(0)
                note("open", -1)
                w.keep_tasks_out()
                note("closed", 1)
                note("closed", -1)

    def writer() -> None:
        while not stop.is_set():
            with w.force_idle():
                note("writers", 1)
                note("writers", -1)

    def reader() -> None:
        while not stop.is_set():
            with w.task():
                note("readers", 1)
                note("readers", -1)

    others = [Runner(writer, "writer")] + [Runner(reader, f"reader {i}") for i in range(3)]
    Runner(committer, "committer").join()
    stop.set()
    for runner in others:
        runner.join()
    assert not errors, errors[:3]
    assert w.is_idle()
