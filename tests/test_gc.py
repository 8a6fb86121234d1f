"""Garbage collection of the GC-capable stores: ``gc(Retain(...) | Chain(...))``.

Every behaviour of the "Garbage collection" section of ``shared/API.md``, on
the four kinds that have ``gc``: ``make_indexable``,
``make_indexable_removable``, ``make_indexed_file`` and
``make_simple_indexed_file``.

* what a GC keeps: ``Retain`` (absent keys skipped and logged), ``Chain``
  (stops at None, at an absent key, at a removed key, at a cycle);
* foreground and background GCs, ``wait_gc_completion``, ``is_gc_finished``,
  a GC asked for while one runs;
* reads and writes while a GC runs: a GC is held in the middle of its walk by
  a ``Chain.next`` that waits on a ``threading.Event`` (a ``Gate``), so that
  "during the GC" is a fact, never a matter of timing;
* failures (``GcFailed`` chained to the cause, the store left as it was),
  errors, ``close()`` during and after a GC;
* disk space given back, persistence, a ``READ_ONLY`` store beside the writer;
* a Chain GC over 10,000 linked blocks with concurrent writers and readers.

Small ``index_buffer_size`` values make merges happen during the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import construct
import pytest

from l2_stores import (
    Chain,
    CodecError,
    GcFailed,
    Mode,
    ReadOnlyError,
    Retain,
    StoreClosedError,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
)

KEY = construct.Bytes(32)
NULL = bytes(32)  # "no link": the end of a chain
LINK_VALUE = construct.Struct("link" / construct.Bytes(32), "tag" / construct.Int32ub)
LINK_HEADER = construct.Struct("tag" / construct.Int32ub, "link" / construct.Bytes(32))
SIMPLE_VALUE = construct.Struct(
    "link" / construct.Bytes(32), "tag" / construct.Int32ub, "payload" / construct.GreedyBytes
)
DIGEST = construct.Bytes(16)

TIMEOUT = 60.0  # deadlock guard only: nothing waits this long when the code is right
GC_LOGGER = "l2_stores.gc"


# --------------------------------------------------------------------------
# data


def key(prefix: str, i: int) -> bytes:
    """A 32-byte key, never NULL."""
    return hashlib.sha256(f"{prefix}/{i}".encode()).digest()


def payload(k: bytes, tag: int, size: int | None) -> bytes:
    """A value payload that depends on the key and the tag (so mix-ups show)."""
    if size is None:
        size = 3 + k[-1] % 29  # variable sizes, 3 to 31 bytes
    return hashlib.shake_256(k + tag.to_bytes(4, "big")).digest(size)


def simple_header_of(value: Any) -> bytes:
    """Header of a simple indexed file: a digest of the whole value."""
    raw = value["link"] + value["tag"].to_bytes(4, "big") + value["payload"]
    return hashlib.sha256(raw).digest()[:16]


def plain(found: Any) -> Any:
    """Decoded data as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    if isinstance(found, tuple):
        return tuple(plain(part) for part in found)
    return found


# --------------------------------------------------------------------------
# store kinds


@dataclass(frozen=True)
class Kind:
    """A GC-capable store class and how to write to it, read it and follow its links.

    Every binding carries a ``link`` (the key ``Chain.next`` goes to, NULL for
    none) and a ``tag`` (to tell an overwritten value from the original).
    """

    name: str
    cls: Any
    indexed: bool
    simple: bool = False
    removable: bool = False

    def want(self, k: bytes, link: bytes, tag: int = 0, size: int | None = None) -> Any:
        """The plain binding ``items()`` must give after ``write(k, link, tag, size)``."""
        if not self.indexed:
            return {"link": link, "tag": tag}
        data = payload(k, tag, size)
        if self.simple:
            value = {"link": link, "tag": tag, "payload": data}
            return (value, simple_header_of(value))
        return (data, {"tag": tag, "link": link})

    def write(
        self,
        store: Any,
        k: bytes,
        link: bytes,
        tag: int = 0,
        size: int | None = None,
        flush: bool = True,
    ) -> Any:
        """Bind ``k``; return the plain binding it must read back as."""
        if not self.indexed:
            store.add(k, {"link": link, "tag": tag}, flush=flush)
        elif self.simple:
            value = {"link": link, "tag": tag, "payload": payload(k, tag, size)}
            store.append(k, value, flush=flush)
        else:
            header = {"tag": tag, "link": link}
            store.append(k, payload(k, tag, size), header, flush=flush)
        return self.want(k, link, tag, size)

    def link_of(self, value: Any) -> bytes:
        """The link of a value as ``Chain.next`` receives it."""
        if not self.indexed:
            return bytes(value["link"])
        if self.simple:
            return bytes(value[0]["link"])
        return bytes(value[1]["link"])

    def get(self, store: Any, k: bytes) -> Any:
        """The plain binding of ``k`` read through the kind's lookup, or None."""
        found = store.read(k) if self.indexed else store.find(k)
        return None if found is None else plain(found)


KINDS = {
    "indexable": Kind("indexable", make_indexable("gc_indexable", KEY, LINK_VALUE), False),
    "removable": Kind(
        "removable",
        make_indexable_removable("gc_removable", KEY, LINK_VALUE),
        False,
        removable=True,
    ),
    "indexed": Kind(
        "indexed",
        make_indexed_file("gc_indexed", KEY, construct.GreedyBytes, LINK_HEADER),
        True,
    ),
    "simple": Kind(
        "simple",
        make_simple_indexed_file("gc_simple", KEY, SIMPLE_VALUE, DIGEST, simple_header_of),
        True,
        simple=True,
    ),
}
KIND_IDS = list(KINDS)
INDEXED_IDS = ["indexed", "simple"]


@pytest.fixture(params=KIND_IDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[request.param]


@pytest.fixture(params=INDEXED_IDS)
def indexed_kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[request.param]


# --------------------------------------------------------------------------
# helpers


def load(
    kind: Kind, path: Path, mode: Mode = Mode.READ_WRITE, *, buffer: int = 3, **kw: Any
) -> Any:
    return kind.cls.load(path, mode, index_buffer_size=buffer, **kw)


def content(store: Any) -> dict[bytes, Any]:
    """``items()`` as a dict of plain bindings, checking keys come once and agree with keys()."""
    items = list(store.items())
    keys = [k for k, _ in items]
    assert len(keys) == len(set(keys)), "items() yielded a key twice"
    listed = list(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(keys), "keys() and items() disagree"
    return {k: plain(v) for k, v in items}


def reloaded(kind: Kind, path: Path, mode: Mode = Mode.READ_WRITE) -> dict[bytes, Any]:
    with load(kind, path, mode) as store:
        return content(store)


def check_lookups(
    store: Any, kind: Kind, want: dict[bytes, Any], absent: Iterable[bytes] = ()
) -> None:
    """Every key of ``want`` reads back as its binding; every ``absent`` key is unbound."""
    for k, binding in want.items():
        assert store.mem(k), f"mem({k.hex()[:8]}) is False"
        assert kind.get(store, k) == binding, f"lookup of {k.hex()[:8]}"
        if kind.indexed:
            assert plain(store.header(k)) == binding[1], f"header({k.hex()[:8]})"
    for k in absent:
        assert not store.mem(k), f"mem({k.hex()[:8]}) of a dropped key is True"
        assert kind.get(store, k) is None, f"lookup of the dropped key {k.hex()[:8]}"
        if kind.indexed:
            assert store.header(k) is None, f"header({k.hex()[:8]}) of a dropped key"


def build_chain(
    store: Any,
    kind: Kind,
    prefix: str,
    n: int,
    *,
    tag: int = 0,
    size: int | None = None,
    flush: bool = True,
) -> tuple[list[bytes], dict[bytes, Any]]:
    """Bind ``n`` keys, each linking to the one before (the first to NULL).

    Returns the keys in writing order (the head, last, reaches all of them)
    and their bindings.
    """
    keys = [key(prefix, i) for i in range(n)]
    want: dict[bytes, Any] = {}
    link = NULL
    for k in keys:
        want[k] = kind.write(store, k, link, tag, size=size, flush=flush)
        link = k
    return keys, want


def build_loose(
    store: Any, kind: Kind, prefix: str, n: int, *, tag: int = 0, size: int | None = None
) -> dict[bytes, Any]:
    """Bind ``n`` keys that link to nothing."""
    return {key(prefix, i): kind.write(store, key(prefix, i), NULL, tag, size) for i in range(n)}


class Gate:
    """Holds a GC inside ``Chain.next`` until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.thread: threading.Thread | None = None

    def hold(self) -> None:
        self.thread = threading.current_thread()
        self.entered.set()
        if not self.opened.wait(TIMEOUT):
            raise AssertionError("the gate was never opened")

    def wait_entered(self) -> None:
        assert self.entered.wait(TIMEOUT), "the GC never reached the gate"

    def open(self) -> None:
        self.opened.set()


class Walk:
    """A ``Chain.next``: follows the links, recording each call.

    ``limit``: return None on the ``limit``-th call (keep ``limit`` bindings).
    ``gate``: hold the GC on the ``gate_at``-th call. ``error``: raise it on
    the ``fail_at``-th call. ``action``: called (in the GC's thread) on the
    ``gate_at``-th call, before the gate.
    """

    def __init__(
        self,
        kind: Kind,
        *,
        limit: int | None = None,
        gate: Gate | None = None,
        gate_at: int = 1,
        error: BaseException | None = None,
        fail_at: int = 1,
        action: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.limit = limit
        self.gate = gate
        self.gate_at = gate_at
        self.error = error
        self.fail_at = fail_at
        self.action = action
        self.calls: list[tuple[Any, Any]] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, k: Any, value: Any) -> Any:
        self.calls.append((k, plain(value)))
        self.threads.append(threading.current_thread())
        n = len(self.calls)
        if n == self.gate_at:
            if self.action is not None:
                self.action()
            if self.gate is not None:
                self.gate.hold()
        if self.error is not None and n == self.fail_at:
            raise self.error
        if self.limit is not None and n >= self.limit:
            return None
        link = self.kind.link_of(value)
        return None if link == NULL else link

    @property
    def called_keys(self) -> list[Any]:
        return [k for k, _ in self.calls]


def count_mentioned(records: list[logging.LogRecord], number: int) -> list[logging.LogRecord]:
    """Records of the GC logger at INFO that mention ``number`` as a whole number."""
    pattern = re.compile(rf"(?<![\d.]){number}(?![\d.])")
    return [
        r
        for r in records
        if r.name == GC_LOGGER and r.levelno == logging.INFO and pattern.search(r.getMessage())
    ]


def directory_size(path: Path) -> int:
    """Bytes of the files under ``path``; a background merge may rename one meanwhile."""
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if file.is_file():
                total += file.stat().st_size
    return total


def values_numbers(path: Path) -> list[int]:
    """Numbers of the values files of an indexed file directory."""
    found = []
    for name in os.listdir(path):
        match = re.fullmatch(r"values\.(\d+)", name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def join_all(threads: Iterable[threading.Thread]) -> None:
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"{thread.name} did not finish (deadlock?)"


# --------------------------------------------------------------------------
# 1. Retain


@pytest.mark.parametrize("background", [False, True], ids=["fg", "bg"])
def test_retain_keeps_exactly_the_named_bindings(
    tmp_path: Path, kind: Kind, background: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GC_LOGGER)
    path = tmp_path / "store"
    with load(kind, path) as store:
        want = build_loose(store, kind, "a", 30)
        # overwritten keys: the retained binding is the last one
        for i in range(0, 30, 4):
            k = key("a", i)
            want[k] = kind.write(store, k, key("a", i + 1), tag=9)
        kept_keys = [key("a", i) for i in range(0, 30, 3)]  # 10 keys
        absent = [key("never", i) for i in range(7)]
        named = kept_keys + absent + kept_keys[:2]  # duplicates too
        store.gc(Retain(k for k in named), background=background)  # any iterable
        assert store.wait_gc_completion() is True
        assert store.is_gc_finished()
        kept = {k: want[k] for k in kept_keys}
        assert content(store) == kept
        dropped = [k for k in want if k not in kept] + absent
        check_lookups(store, kind, kept, dropped)
    assert reloaded(kind, path) == kept
    assert count_mentioned(caplog.records, len(absent)), (
        "the 7 absent keys of Retain were not logged at INFO on l2_stores.gc: "
        f"{[r.getMessage() for r in caplog.records]}"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_retain_of_no_key_empties_the_store(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        want = build_loose(store, kind, "a", 10)
        store.gc(Retain([]), background=False)
        assert content(store) == {}
        check_lookups(store, kind, {}, want)
        # still writable, and a GC of an empty store is fine
        again = kind.write(store, key("b", 0), NULL, 3)
        assert content(store) == {key("b", 0): again}
        store.gc(Retain([]), background=False)
        assert content(store) == {}
    assert reloaded(kind, path) == {}


# --------------------------------------------------------------------------
# 2. Chain


@pytest.mark.parametrize("limit", [None, 8], ids=["whole", "limit8"])
def test_chain_keeps_what_the_walk_reaches(tmp_path: Path, kind: Kind, limit: int | None) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 20)
        loose = build_loose(store, kind, "x", 15)
        walk = Walk(kind, limit=limit)
        store.gc(Chain(keys[-1], walk), background=False)
        reached = keys[::-1] if limit is None else keys[::-1][:limit]
        kept = {k: want[k] for k in reached}
        assert content(store) == kept
        check_lookups(store, kind, kept, [k for k in [*want, *loose] if k not in kept])
        # next was called once with each kept binding, in walk order, with the
        # decoded value ((value, header) for indexed files)
        assert walk.calls == [(k, want[k]) for k in reached]
    assert reloaded(kind, path) == kept


def test_chain_stops_at_an_absent_key(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 10)
        missing = key("missing", 0)
        # keys[6] now links to a key that has no binding
        want[keys[6]] = kind.write(store, keys[6], missing, tag=1)
        walk = Walk(kind)
        store.gc(Chain(keys[-1], walk), background=False)
        kept = {k: want[k] for k in keys[6:]}
        assert content(store) == kept
        assert walk.called_keys == keys[6:][::-1]
        check_lookups(store, kind, kept, keys[:6])
    assert reloaded(kind, path) == kept


def test_chain_stops_at_a_removed_key(tmp_path: Path) -> None:
    kind = KINDS["removable"]
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 12)
        store.remove(keys[5])
        walk = Walk(kind)
        store.gc(Chain(keys[-1], walk), background=False)
        kept = {k: want[k] for k in keys[6:]}
        assert content(store) == kept
        assert walk.called_keys == keys[6:][::-1]
        check_lookups(store, kind, kept, keys[:6])
    assert reloaded(kind, path) == kept


def test_chain_stops_at_a_key_already_kept(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 10)
        # a cycle: keys[3] -> keys[2] -> keys[1] -> keys[0] -> keys[3]
        want[keys[0]] = kind.write(store, keys[0], keys[3], tag=1)
        walk = Walk(kind)
        store.gc(Chain(keys[3], walk), background=False)
        kept = {k: want[k] for k in keys[:4]}
        assert content(store) == kept
        assert walk.called_keys == [keys[3], keys[2], keys[1], keys[0]]
        check_lookups(store, kind, kept, keys[4:])
        # a self-loop
        want[keys[2]] = kind.write(store, keys[2], keys[2], tag=2)
        walk = Walk(kind)
        store.gc(Chain(keys[2], walk), background=False)
        assert walk.called_keys == [keys[2]]
        assert content(store) == {keys[2]: want[keys[2]]}


def test_chain_from_an_absent_key_keeps_only_what_is_written_during_the_gc(
    tmp_path: Path, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GC_LOGGER)
    path = tmp_path / "store"
    with load(kind, path) as store:
        _, old = build_chain(store, kind, "c", 10)
        walk = Walk(kind)
        store.gc(Chain(key("absent", 0), walk), background=True)
        # written after gc() returned: kept whether the GC has ended or not
        new = build_loose(store, kind, "new", 5, tag=4)
        assert store.wait_gc_completion(TIMEOUT) is True
        assert walk.calls == []
        assert content(store) == new
        check_lookups(store, kind, new, old)
    assert reloaded(kind, path) == new


# --------------------------------------------------------------------------
# 3. foreground, background, wait, ignored GCs


def test_no_gc_running_means_finished(tmp_path: Path, kind: Kind) -> None:
    with load(kind, tmp_path / "store") as store:
        assert store.is_gc_finished() is True
        assert store.wait_gc_completion() is True
        assert store.wait_gc_completion(timeout=None) is True
        assert store.wait_gc_completion(timeout=0) is True
        store.gc(Retain([]), background=False)
        assert store.is_gc_finished() is True
        assert store.wait_gc_completion() is True


def test_foreground_gc_returns_when_done(tmp_path: Path, kind: Kind) -> None:
    with load(kind, tmp_path / "store") as store:
        keys, want = build_chain(store, kind, "c", 10)
        walk = Walk(kind, limit=4)
        store.gc(Chain(keys[-1], walk), background=False)
        # done on return: no wait needed
        assert store.is_gc_finished()
        assert len(walk.calls) == 4
        assert content(store) == {k: want[k] for k in keys[-4:]}


def test_background_gc_returns_at_once(tmp_path: Path, kind: Kind) -> None:
    with load(kind, tmp_path / "store") as store:
        keys, want = build_chain(store, kind, "c", 10)
        gate = Gate()
        walk = Walk(kind, limit=4, gate=gate, gate_at=2)
        try:
            # if gc() waited for the walk, this would hang until the gate's timeout
            store.gc(Chain(keys[-1], walk), background=True)
            gate.wait_entered()
            assert gate.thread is not threading.current_thread()
            assert store.is_gc_finished() is False
            assert store.wait_gc_completion(timeout=0) is False
            view = store.readonly()
            assert view.is_gc_finished() is False
            # nothing dropped yet
            assert content(store) == want
        finally:
            gate.open()
        assert store.wait_gc_completion(timeout=None) is True
        assert store.is_gc_finished() is True
        assert view.is_gc_finished() is True
        assert content(store) == {k: want[k] for k in keys[-4:]}


@pytest.mark.parametrize("second_background", [False, True], ids=["fg", "bg"])
def test_gc_asked_for_while_one_runs_is_ignored(
    tmp_path: Path, kind: Kind, second_background: bool
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 10)
        loose = build_loose(store, kind, "x", 5)
        gate = Gate()
        walk = Walk(kind, limit=6, gate=gate, gate_at=3)
        try:
            store.gc(Chain(keys[-1], walk), background=True)
            gate.wait_entered()
            # ignored: returns at once even with background=False (a wait here
            # would hang until the gate's timeout and fail the first GC)
            second = Walk(kind)
            store.gc(Chain(key("x", 0), second), background=second_background)
            store.gc(Retain([]), background=second_background)
            assert store.is_gc_finished() is False
        finally:
            gate.open()
        assert store.wait_gc_completion(TIMEOUT) is True
        assert second.calls == []
        kept = {k: want[k] for k in keys[-6:]}
        # neither Retain([]) nor the second chain had any effect
        assert content(store) == kept
        check_lookups(store, kind, kept, [*keys[:-6], *loose])
        # the ignored requests left no failure behind
        assert store.wait_gc_completion() is True
        # and a later GC runs
        store.gc(Retain(keys[-2:]), background=False)
        assert content(store) == {k: want[k] for k in keys[-2:]}
    assert reloaded(kind, path) == {k: want[k] for k in keys[-2:]}


# --------------------------------------------------------------------------
# 4. writes during a GC


@pytest.mark.parametrize("buffer", [1, 3, 16])
def test_writes_during_the_gc_are_kept(tmp_path: Path, kind: Kind, buffer: int) -> None:
    path = tmp_path / "store"
    with load(kind, path, buffer=buffer) as store:
        keys, want = build_chain(store, kind, "c", 10)  # head keys[9], reaches all
        loose = build_loose(store, kind, "x", 10)
        gate = Gate()
        walk = Walk(kind, gate=gate, gate_at=3)  # held while at keys[7]
        expected = dict(want)
        try:
            store.gc(Chain(keys[-1], walk), background=True)
            gate.wait_entered()
            # new, unreachable bindings
            for i in range(20):  # enough to fill the write buffer: merges during the GC
                k = key("new", i)
                expected[k] = kind.write(store, k, NULL, tag=5, flush=i % 2 == 0)
            store.flush()
            # a reachable key not yet walked, and one already walked, overwritten;
            # keys[4] now links nowhere, but the walk follows the links of the
            # GC's start, so keys[3] to keys[0] are kept all the same
            expected[keys[4]] = kind.write(store, keys[4], NULL, tag=6, size=40)
            expected[keys[8]] = kind.write(store, keys[8], keys[7], tag=6, size=0)
            # an unreachable key overwritten: kept with its new value
            expected[key("x", 3)] = kind.write(store, key("x", 3), NULL, tag=7)
            if kind.removable:
                # a reachable key removed: stays removed
                store.remove(keys[2])
                del expected[keys[2]]
                # an unreachable key removed, a new key added then removed,
                # an absent key removed (no-op)
                store.remove(key("x", 5))
                store.remove(key("new", 0))
                del expected[key("new", 0)]
                store.remove(key("never", 0))
            # the walk goes on through the bindings of the GC's start
            assert store.is_gc_finished() is False
        finally:
            gate.open()
        assert store.wait_gc_completion(TIMEOUT) is True
        # the walk saw the values of the GC's start, the whole chain
        assert walk.calls == [(k, want[k]) for k in keys[::-1]]
        assert content(store) == expected
        dropped = [k for k in [*want, *loose, key("new", 0)] if k not in expected]
        check_lookups(store, kind, expected, dropped)
    assert reloaded(kind, path) == expected


def test_writes_from_inside_next_are_kept_and_a_nested_gc_is_ignored(
    tmp_path: Path, kind: Kind
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 10)
        build_loose(store, kind, "x", 5)
        inside: dict[bytes, Any] = {}

        def write_and_gc() -> None:
            # in the GC's thread, while it walks
            inside[key("inside", 0)] = kind.write(store, key("inside", 0), NULL, tag=3)
            store.gc(Retain([]), background=False)  # ignored, and must not wait for itself
            store.gc(Retain([]), background=True)  # ignored

        walk = Walk(kind, limit=4, gate_at=2, action=write_and_gc)
        store.gc(Chain(keys[-1], walk), background=True)
        assert store.wait_gc_completion(TIMEOUT) is True
        expected = {**{k: want[k] for k in keys[-4:]}, **inside}
        assert content(store) == expected
    assert reloaded(kind, path) == expected


def test_writes_right_after_gc_returns_are_kept(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, tmp_path / "store") as store:
        old = build_loose(store, kind, "old", 40)
        store.gc(Retain([]), background=True)
        # whether the GC is still running or not, these must all be kept
        new = build_loose(store, kind, "new", 40, tag=1)
        overwritten = key("old", 7)
        new[overwritten] = kind.write(store, overwritten, NULL, tag=2)
        assert store.wait_gc_completion(TIMEOUT) is True
        assert content(store) == new
        check_lookups(store, kind, new, [k for k in old if k not in new])
    assert reloaded(kind, path) == new


# --------------------------------------------------------------------------
# 5. reads during a background GC


def test_reads_during_a_background_gc(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 12)
        loose = build_loose(store, kind, "x", 12)
        old = {**want, **loose}
        gate = Gate()
        walk = Walk(kind, limit=5, gate=gate, gate_at=2)
        try:
            store.gc(Chain(keys[-1], walk), background=True)
            gate.wait_entered()
            new = build_loose(store, kind, "new", 6, tag=3)
            # every old binding until the GC ends, every new one
            check_lookups(store, kind, {**old, **new})
            assert content(store) == {**old, **new}
            view = store.readonly()
            check_lookups(view, kind, {**old, **new})
            # a reader thread sees the same
            seen: dict[bytes, Any] = {}
            reader = threading.Thread(target=lambda: seen.update(content(store)))
            reader.start()
            join_all([reader])
            assert seen == {**old, **new}
        finally:
            gate.open()
        assert store.wait_gc_completion(TIMEOUT) is True
        kept = {**{k: want[k] for k in keys[-5:]}, **new}
        assert content(store) == kept
        check_lookups(store, kind, kept, [k for k in old if k not in kept])


# --------------------------------------------------------------------------
# 6. failures


class Boom(Exception):
    pass


def test_failing_next_in_a_foreground_gc(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, _ = build_chain(store, kind, "c", 15)
        build_loose(store, kind, "x", 5)
        before = content(store)
        error = Boom("next failed")
        walk = Walk(kind, error=error, fail_at=4)
        with pytest.raises(GcFailed) as caught:
            store.gc(Chain(keys[-1], walk), background=False)
        assert caught.value.__cause__ is error
        assert kind.cls.name in str(caught.value)
        assert store.is_gc_finished()
        assert store.wait_gc_completion() is True  # a foreground failure is not reported twice
        assert content(store) == before
        check_lookups(store, kind, before)
    assert reloaded(kind, path) == before
    assert reloaded(kind, path, Mode.READ_ONLY) == before
    # fully usable afterwards: writes and a GC that succeeds
    with load(kind, path) as store:
        assert content(store) == before
        extra = kind.write(store, key("y", 0), NULL, tag=8)
        store.gc(Chain(keys[-1], Walk(kind, limit=3)), background=False)
        kept = {k: before[k] for k in keys[-3:]}
        assert content(store) == kept
        kept[key("y", 0)] = kind.write(store, key("y", 0), NULL, tag=8)
        assert kept[key("y", 0)] == extra
        assert content(store) == kept
    assert reloaded(kind, path) == kept


def test_failing_next_in_a_background_gc(
    tmp_path: Path, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=GC_LOGGER)
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, _ = build_chain(store, kind, "c", 15)
        build_loose(store, kind, "x", 5)
        before = content(store)
        error = Boom("next failed in the background")
        gate = Gate()
        walk = Walk(kind, gate=gate, gate_at=3, error=error, fail_at=3)
        try:
            store.gc(Chain(keys[-1], walk), background=True)
            gate.wait_entered()
            # written during the failing GC: kept
            during = build_loose(store, kind, "during", 4, tag=2)
        finally:
            gate.open()
        with pytest.raises(GcFailed) as caught:
            store.wait_gc_completion(TIMEOUT)
        assert caught.value.__cause__ is error
        assert kind.cls.name in str(caught.value)
        errors = [r for r in caplog.records if r.name == GC_LOGGER and r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
        assert errors[0].exc_info is not None and errors[0].exc_info[1] is error
        # reported once
        assert store.wait_gc_completion() is True
        assert store.is_gc_finished()
        after = {**before, **during}
        assert content(store) == after
        check_lookups(store, kind, after)
        # usable: another GC succeeds
        store.gc(Retain(keys[:2]), background=True)
        assert store.wait_gc_completion(TIMEOUT) is True
        kept = {k: before[k] for k in keys[:2]}
        assert content(store) == kept
    assert reloaded(kind, path) == kept


def test_failed_background_gc_leaves_the_store_as_it_was_on_disk(
    tmp_path: Path, kind: Kind
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, _ = build_chain(store, kind, "c", 15)
        build_loose(store, kind, "x", 5)
        before = content(store)
        store.gc(Chain(keys[-1], Walk(kind, error=Boom("late"), fail_at=9)), background=True)
        with pytest.raises(GcFailed):
            store.wait_gc_completion(TIMEOUT)
    assert reloaded(kind, path) == before
    assert reloaded(kind, path, Mode.READ_ONLY) == before


@pytest.mark.parametrize("background", [False, True], ids=["fg", "bg"])
def test_next_returning_a_key_of_the_wrong_size(
    tmp_path: Path, kind: Kind, background: bool
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, _ = build_chain(store, kind, "c", 8)
        before = content(store)
        calls: list[Any] = []

        def bad_next(k: Any, value: Any) -> Any:
            calls.append(k)
            return b"short" if len(calls) == 2 else kind.link_of(value)

        if background:
            store.gc(Chain(keys[-1], bad_next), background=True)
            with pytest.raises(GcFailed) as caught:
                store.wait_gc_completion(TIMEOUT)
        else:
            with pytest.raises(GcFailed) as caught:
                store.gc(Chain(keys[-1], bad_next), background=False)
        assert isinstance(caught.value.__cause__, CodecError)
        assert len(calls) == 2
        assert store.wait_gc_completion() is True
        assert content(store) == before
        store.gc(Retain([keys[0]]), background=False)
        assert content(store) == {keys[0]: before[keys[0]]}
    assert reloaded(kind, path) == {keys[0]: before[keys[0]]}


# --------------------------------------------------------------------------
# 7. errors


def test_gc_on_a_read_only_store_or_view_is_refused(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 5)
        view = store.readonly()
        with pytest.raises(ReadOnlyError):
            view.gc(Retain([]), background=False)
        with pytest.raises(ReadOnlyError):
            view.gc(Chain(keys[-1], Walk(kind)))
        assert view.is_gc_finished() is True
        assert view.wait_gc_completion() is True
        assert content(store) == want
        with load(kind, path, Mode.READ_ONLY) as reader:
            with pytest.raises(ReadOnlyError):
                reader.gc(Retain([]), background=False)
            with pytest.raises(ReadOnlyError):
                reader.gc(Retain([]), background=True)
            assert reader.is_gc_finished() is True
            assert reader.wait_gc_completion() is True
            assert content(reader) == want
        assert content(store) == want
    assert reloaded(kind, path) == want


def test_gc_calls_after_close_raise_store_closed(tmp_path: Path, kind: Kind) -> None:
    store = load(kind, tmp_path / "store")
    build_loose(store, kind, "x", 3)
    store.close()
    with pytest.raises(StoreClosedError):
        store.gc(Retain([]), background=False)
    with pytest.raises(StoreClosedError):
        store.gc(Retain([]), background=True)
    with pytest.raises(StoreClosedError):
        store.wait_gc_completion()
    with pytest.raises(StoreClosedError):
        store.is_gc_finished()


@pytest.mark.parametrize(
    "spec",
    [None, [b"k" * 32], {b"k" * 32}, "Retain", Retain, Chain, b"k" * 32],
    ids=["None", "list", "set", "str", "Retain-class", "Chain-class", "key"],
)
def test_gc_of_something_else_than_a_spec_is_a_type_error(
    tmp_path: Path, kind: Kind, spec: Any
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        want = build_loose(store, kind, "x", 4)
        with pytest.raises(TypeError):
            store.gc(spec, background=False)
        with pytest.raises(TypeError):
            store.gc(spec, background=True)
        assert store.is_gc_finished()
        assert store.wait_gc_completion() is True
        assert content(store) == want


@pytest.mark.parametrize("bad", [b"short", b"x" * 33, 42], ids=["short", "long", "int"])
def test_retain_with_a_key_of_the_wrong_size_is_a_codec_error(
    tmp_path: Path, kind: Kind, bad: Any
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        want = build_loose(store, kind, "x", 6)
        good = list(want)[:2]
        for background in (False, True):
            with pytest.raises(CodecError):
                store.gc(Retain([*good, bad]), background=background)
            # nothing happened: no GC runs, nothing was dropped
            assert store.is_gc_finished()
            assert store.wait_gc_completion(timeout=0) is True
            assert content(store) == want
        # and the next GC is not ignored
        store.gc(Retain(good), background=False)
        assert content(store) == {k: want[k] for k in good}


def test_chain_with_a_first_key_of_the_wrong_size_is_a_codec_error(
    tmp_path: Path, kind: Kind
) -> None:
    with load(kind, tmp_path / "store") as store:
        want = build_loose(store, kind, "x", 4)
        walk = Walk(kind)
        with pytest.raises(CodecError):
            store.gc(Chain(b"short", walk), background=True)
        assert walk.calls == []
        assert store.is_gc_finished()
        assert content(store) == want


@pytest.mark.parametrize("not_callable", [None, 42, b"k" * 32, "next"])
def test_chain_with_a_non_callable_next_is_a_type_error(not_callable: Any) -> None:
    with pytest.raises(TypeError):
        Chain(b"k" * 32, not_callable)


# --------------------------------------------------------------------------
# 8. close during and after a GC


def test_close_inside_next_stops_the_gc_and_keeps_the_old_content(
    tmp_path: Path, kind: Kind
) -> None:
    path = tmp_path / "store"
    store = load(kind, path)
    keys, _ = build_chain(store, kind, "c", 12)
    build_loose(store, kind, "x", 6)
    before = content(store)
    closed = threading.Event()

    def close_store() -> None:
        store.close()
        closed.set()

    walk = Walk(kind, limit=3, gate_at=2, action=close_store)
    store.gc(Chain(keys[-1], walk), background=True)
    assert closed.wait(TIMEOUT), "close() called inside next did not return"
    join_all(walk.threads[-1:])  # the GC's thread ends
    assert store.closed
    with pytest.raises(StoreClosedError):
        store.wait_gc_completion()
    assert reloaded(kind, path) == before
    assert reloaded(kind, path, Mode.READ_ONLY) == before
    # and the reloaded store can be collected
    with load(kind, path) as store:
        store.gc(Retain(keys[:1]), background=False)
        assert content(store) == {keys[0]: before[keys[0]]}


def test_close_inside_next_of_a_foreground_gc(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    store = load(kind, path)
    keys, _ = build_chain(store, kind, "c", 12)
    before = content(store)
    walk = Walk(kind, limit=3, gate_at=2, action=store.close)
    # The GC cannot complete on a closed store: it reports that, either way.
    with pytest.raises((StoreClosedError, GcFailed)):
        store.gc(Chain(keys[-1], walk), background=False)
    assert store.closed
    assert reloaded(kind, path) == before


def test_close_from_another_thread_while_a_gc_is_held(tmp_path: Path, kind: Kind) -> None:
    """close() returns once the GC is released; the store is the old one or the new one."""
    path = tmp_path / "store"
    store = load(kind, path)
    keys, want = build_chain(store, kind, "c", 12)
    build_loose(store, kind, "x", 6)
    before = content(store)
    gate = Gate()
    walk = Walk(kind, limit=4, gate=gate, gate_at=2)
    try:
        store.gc(Chain(keys[-1], walk), background=True)
        gate.wait_entered()
        during = build_loose(store, kind, "during", 3, tag=1)
        closer = threading.Thread(target=store.close)
        closer.start()
    finally:
        gate.open()
    join_all([closer])
    assert store.closed
    after = reloaded(kind, path)
    old = {**before, **during}
    new = {**{k: want[k] for k in keys[-4:]}, **during}
    assert after in (old, new), "a GC stopped by close() left a mix"


@pytest.mark.parametrize("background", [False, True], ids=["fg", "bg"])
def test_close_right_after_a_gc_completes(tmp_path: Path, kind: Kind, background: bool) -> None:
    path = tmp_path / "store"
    store = load(kind, path)
    keys, want = build_chain(store, kind, "c", 20)
    build_loose(store, kind, "x", 10)
    store.gc(Chain(keys[-1], Walk(kind, limit=7)), background=background)
    assert store.wait_gc_completion(TIMEOUT) is True
    store.close()
    kept = {k: want[k] for k in keys[-7:]}
    assert reloaded(kind, path) == kept
    assert reloaded(kind, path, Mode.READ_ONLY) == kept


def test_close_right_after_a_background_gc_starts(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    store = load(kind, path)
    keys, want = build_chain(store, kind, "c", 20)
    build_loose(store, kind, "x", 10)
    before = content(store)
    store.gc(Chain(keys[-1], Walk(kind, limit=7)), background=True)
    during = build_loose(store, kind, "during", 3, tag=1)
    store.close()  # must not hang, whatever the GC is doing
    kept = {**{k: want[k] for k in keys[-7:]}, **during}
    assert reloaded(kind, path) in ({**before, **during}, kept)


# --------------------------------------------------------------------------
# 9. disk space


def test_gc_gives_disk_space_back(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    n, size = (2_000, 1024) if kind.indexed else (4_000, None)
    buffer = 64 if kind.indexed else 256
    with load(kind, path, buffer=buffer) as store:
        want = {}
        for i in range(n):
            k = key("d", i)
            want[k] = kind.write(store, k, NULL, tag=i, size=size, flush=False)
        store.flush()
        kept_keys = [key("d", i) for i in range(0, n, 10)]
        old_files = values_numbers(path) if kind.indexed else []
        before = directory_size(path)
        store.gc(Retain(kept_keys), background=False)
        after = directory_size(path)
        assert after < 0.5 * before, f"{before} bytes before the GC, {after} after"
        kept = {k: want[k] for k in kept_keys}
        assert content(store) == kept
        if kind.indexed:
            # every values file of before the GC is gone
            new_files = values_numbers(path)
            assert new_files, os.listdir(path)
            assert min(new_files) > max(old_files), (old_files, os.listdir(path))
            assert sorted(os.listdir(path)) == sorted(
                ["identity", "index", *[f"values.{i:08d}" for i in new_files]]
            )
    assert reloaded(kind, path) == kept
    assert directory_size(path) < 0.5 * before
    if kind.indexed:
        assert values_numbers(path) == new_files


# --------------------------------------------------------------------------
# 10. persistence and READ_ONLY stores


def test_gc_result_persists(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 25)
        build_loose(store, kind, "x", 25)
        store.gc(Chain(keys[-1], Walk(kind, limit=10)), background=True)
        assert store.wait_gc_completion(TIMEOUT) is True
        kept = {k: want[k] for k in keys[-10:]}
        assert content(store) == kept
    for mode in (Mode.READ_WRITE, Mode.READ_ONLY, Mode.READ_WRITE):
        with load(kind, path, mode) as store:
            assert content(store) == kept
            check_lookups(store, kind, kept, keys[:-10])


def test_read_only_store_opened_before_the_gc_sees_it_after_sync(
    tmp_path: Path, kind: Kind
) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        keys, want = build_chain(store, kind, "c", 30, size=None)
        loose = build_loose(store, kind, "x", 30)
        reader = load(kind, path, Mode.READ_ONLY)
        try:
            assert content(reader) == {**want, **loose}
            for k in keys[:5]:  # fill the reader's cache with values that will be dropped
                kind.get(reader, k)
            store.gc(Chain(keys[-1], Walk(kind, limit=12)), background=False)
            new = build_loose(store, kind, "new", 3, tag=1)
            kept = {**{k: want[k] for k in keys[-12:]}, **new}
            reader.sync()
            assert content(reader) == kept
            # every value can be read (indexed files: from the GC's new file)
            check_lookups(reader, kind, kept, [*keys[:-12], *loose])
            for k in keys[:5]:
                assert kind.get(reader, k) is None
        finally:
            reader.close()


def test_read_only_store_syncing_during_a_gc_sees_old_or_new(tmp_path: Path, kind: Kind) -> None:
    """A reader that syncs in a loop while the writer collects: never a mix, never an error."""
    path = tmp_path / "store"
    with load(kind, path, buffer=16) as store:
        keys, want = build_chain(store, kind, "c", 150, flush=False)
        loose = build_loose(store, kind, "x", 50)
        store.flush()
        old = {**want, **loose}
        new = {k: want[k] for k in keys[-40:]}
        seen: list[str] = []
        failures: list[str] = []
        stop = threading.Event()
        first_read = threading.Event()
        with load(kind, path, Mode.READ_ONLY) as reader:

            def read_loop() -> None:
                try:
                    while not stop.is_set() or not seen:
                        reader.sync()
                        found = content(reader)
                        if found == old:
                            seen.append("old")
                            first_read.set()
                        elif found == new:
                            seen.append("new")
                        else:
                            failures.append(f"a mix of {len(found)} bindings")
                            return
                except Exception as error:
                    failures.append(repr(error))
                finally:
                    first_read.set()

            thread = threading.Thread(target=read_loop)
            gate = Gate()
            try:
                store.gc(Chain(keys[-1], Walk(kind, limit=40, gate=gate, gate_at=2)))
                thread.start()
                gate.wait_entered()
                assert first_read.wait(TIMEOUT), "the reader read nothing"
            finally:
                gate.open()
            try:
                assert store.wait_gc_completion(TIMEOUT) is True
            finally:
                stop.set()
                join_all([thread])
            assert failures == []
            assert seen[0] == "old"  # read while the GC was held
            assert seen == sorted(seen, key=["old", "new"].index), "new, then old again"
            reader.sync()
            assert content(reader) == new
            check_lookups(reader, kind, new, [k for k in old if k not in new])


def test_read_only_store_not_synced_keeps_reading_its_view(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    with load(kind, path) as store:
        _, want = build_chain(store, kind, "c", 20)
        with load(kind, path, Mode.READ_ONLY) as r:
            store.gc(Retain([]), background=False)
            assert content(store) == {}
            # no sync: the reader still reads what was flushed when it loaded
            check_lookups(r, kind, want)
            r.sync()
            assert content(r) == {}


def test_repeated_gcs_with_reloads(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    expected: dict[bytes, Any] = {}
    for round_ in range(4):
        with load(kind, path) as store:
            assert content(store) == expected
            keys, want = build_chain(store, kind, f"r{round_}", 15, tag=round_)
            build_loose(store, kind, f"x{round_}", 10, tag=round_)
            # keep the newest 5 of this chain and one of the earlier survivors
            survivors = list(expected)[:1]
            store.gc(Retain([*keys[-5:], *survivors]), background=round_ % 2 == 1)
            assert store.wait_gc_completion(TIMEOUT) is True
            expected = {**{k: expected[k] for k in survivors}, **{k: want[k] for k in keys[-5:]}}
            assert content(store) == expected
        if kind.indexed:
            # only the files of the last GC are left
            assert len(values_numbers(path)) <= 2, os.listdir(path)
    assert reloaded(kind, path, Mode.READ_ONLY) == expected


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_items_iteration_started_before_a_gc_yields_its_snapshot(
    tmp_path: Path, kind_id: str
) -> None:
    """items() "sees the store as it was when called", a GC meanwhile or not."""
    kind = KINDS[kind_id]
    with load(kind, tmp_path / "store") as store:
        want = build_loose(store, kind, "x", 20)
        iterator = store.items()
        first_key, first_value = next(iterator)
        store.gc(Retain([]), background=False)
        assert content(store) == {}
        found = {first_key: plain(first_value), **{k: plain(v) for k, v in iterator}}
        assert found == want


# --------------------------------------------------------------------------
# the values cache of indexed files


@pytest.mark.parametrize("cache_size", [0, 1_000], ids=["no-cache", "cache"])
def test_read_of_a_dropped_key_after_gc_is_none(
    tmp_path: Path, indexed_kind: Kind, cache_size: int
) -> None:
    """A value in the LRU cache (appended or read) is not served once a GC dropped its key."""
    kind = indexed_kind
    with load(kind, tmp_path / "store", cache_size=cache_size) as store:
        keys, want = build_chain(store, kind, "c", 6)
        for k in keys:
            assert kind.get(store, k) == want[k]  # read once: cached, if there is a cache
        store.gc(Retain(keys[-1:]), background=False)
        assert not store.mem(keys[0])
        assert store.header(keys[0]) is None
        assert content(store) == {keys[-1]: want[keys[-1]]}
        assert [k for k in keys[:-1] if store.read(k) is not None] == []


# --------------------------------------------------------------------------
# 11. a chain of blocks, with writers and readers during the GC

BLOCK_HEADER = construct.Struct("level" / construct.Int32ub, "predecessor" / construct.Bytes(32))
BlockIndexable = make_indexable("gc_blocks", KEY, KEY)
BlockFile = make_indexed_file("gc_block_file", KEY, construct.GreedyBytes, BLOCK_HEADER)

BLOCKS = 10_000
KEEP = 1_000
WRITER_BLOCKS = 150  # per writer
PROGRESS = 50  # blocks per writer / reads per reader the GC waits for mid-walk


def block_hash(level: int, predecessor: bytes, fork: bytes = b"") -> bytes:
    return hashlib.sha256(fork + level.to_bytes(4, "big") + predecessor).digest()


def block_payload(level: int) -> bytes:
    return (b"block %d;" % level) * (level % 5)  # 0 to 4 repeats: empty values too


class Progress:
    """Set ``done`` once every participant has reported ``goal`` steps."""

    def __init__(self, participants: list[str], goal: int) -> None:
        self.counts = dict.fromkeys(participants, 0)
        self.goal = goal
        self.lock = threading.Lock()
        self.done = threading.Event()

    def step(self, who: str) -> None:
        with self.lock:
            self.counts[who] += 1
            if all(c >= self.goal for c in self.counts.values()):
                self.done.set()


@pytest.mark.parametrize("variant", ["indexable", "indexed"])
def test_chain_gc_of_linked_blocks_with_concurrent_writers_and_readers(
    tmp_path: Path, variant: str
) -> None:
    indexed = variant == "indexed"
    cls = BlockFile if indexed else BlockIndexable
    path = tmp_path / "blocks"

    def expected(level: int, predecessor: bytes) -> Any:
        if indexed:
            return (block_payload(level), {"level": level, "predecessor": predecessor})
        return predecessor

    def write(store: Any, h: bytes, level: int, predecessor: bytes, flush: bool) -> None:
        if indexed:
            header = {"level": level, "predecessor": predecessor}
            store.append(h, block_payload(level), header, flush=flush)
        else:
            store.add(h, predecessor, flush=flush)

    def lookup(store: Any, h: bytes) -> Any:
        found = store.read(h) if indexed else store.find(h)
        return None if found is None else plain(found)

    store = cls.load(path, index_buffer_size=512)
    try:
        # the chain: level 0 (genesis, predecessor NULL) to BLOCKS - 1 (the head)
        blocks: dict[bytes, tuple[int, bytes]] = {}
        order: list[bytes] = []
        predecessor = NULL
        for level in range(BLOCKS):
            h = block_hash(level, predecessor)
            write(store, h, level, predecessor, flush=False)
            blocks[h] = (level, predecessor)
            order.append(h)
            predecessor = h
        store.flush()
        head, head_level = order[-1], BLOCKS - 1
        kept = set(order[-KEEP:])

        progress = Progress(["w0", "w1", "r0", "r1"], PROGRESS)
        failures: list[str] = []
        walked: list[bytes] = []

        def walk(k: bytes, value: Any) -> bytes | None:
            walked.append(k)
            level, predecessor = blocks[k]
            if plain(value) != expected(level, predecessor):
                failures.append(f"next got a wrong value for level {level}")
            if len(walked) == KEEP // 2 and not progress.done.wait(TIMEOUT):
                raise AssertionError("writers and readers made no progress during the GC")
            if indexed:
                if head_level - value[1].level >= KEEP - 1:
                    return None
                return value[1].predecessor
            return None if len(walked) >= KEEP else value

        published: dict[bytes, tuple[int, bytes]] = {}
        published_keys: list[bytes] = []
        published_lock = threading.Lock()

        def writer(fork: int) -> None:
            name = f"w{fork}"
            try:
                predecessor, level = head, head_level
                for _ in range(WRITER_BLOCKS):
                    level += 1
                    h = block_hash(level, predecessor, name.encode())
                    write(store, h, level, predecessor, flush=True)
                    with published_lock:
                        published[h] = (level, predecessor)
                        published_keys.append(h)
                    progress.step(name)
                    predecessor = h
            except BaseException as error:
                failures.append(f"{name}: {error!r}")
                raise

        stop = threading.Event()
        reads = {"r0": 0, "r1": 0}

        def reader(index: int) -> None:
            name = f"r{index}"
            rng = random.Random(index)
            saw_drop = False  # once a dropped block is gone, it stays gone
            try:
                while not stop.is_set():
                    if rng.random() < 0.25:
                        with published_lock:
                            if not published_keys:
                                continue
                            h = rng.choice(published_keys)
                            level, predecessor = published[h]
                        if lookup(store, h) != expected(level, predecessor):
                            failures.append(f"{name}: new block {level} misread")
                    else:
                        h = order[rng.randrange(BLOCKS)]
                        level, predecessor = blocks[h]
                        found = lookup(store, h)
                        if h in kept:
                            if found != expected(level, predecessor):
                                failures.append(f"{name}: kept block {level} misread: {found!r}")
                        else:
                            if found is not None and found != expected(level, predecessor):
                                failures.append(f"{name}: old block {level} misread: {found!r}")
                            present = store.mem(h)
                            if (present or found is not None) and saw_drop:
                                failures.append(f"{name}: dropped block {level} came back")
                            saw_drop = saw_drop or not present or found is None
                    reads[name] += 1
                    progress.step(name)
            except BaseException as error:
                failures.append(f"{name}: {error!r}")
                raise

        store.gc(Chain(head, walk), background=True)
        writers = [threading.Thread(target=writer, args=(i,), name=f"w{i}") for i in range(2)]
        readers = [threading.Thread(target=reader, args=(i,), name=f"r{i}") for i in range(2)]
        for thread in [*writers, *readers]:
            thread.start()
        try:
            join_all(writers)
            assert store.wait_gc_completion(TIMEOUT) is True
        finally:
            stop.set()
            join_all(readers)
        assert failures == []
        assert all(count >= PROGRESS for count in reads.values()), reads
        assert len(walked) == KEEP
        assert len(published) == 2 * WRITER_BLOCKS

        want = {h: expected(*blocks[h]) for h in kept}
        want.update({h: expected(*published[h]) for h in published})
        # for the indexable store the value is the predecessor: bytes either way
        assert {k: plain(v) for k, v in store.items()} == want
        assert sorted(store.keys()) == sorted(want)
        for h in order[:-KEEP:97]:
            assert not store.mem(h)
    finally:
        store.close()

    for mode in (Mode.READ_WRITE, Mode.READ_ONLY):
        with cls.load(path, mode, index_buffer_size=512) as store:
            assert {k: plain(v) for k, v in store.items()} == want
            for h in order[-KEEP:][::50]:
                assert lookup(store, h) == want[h]
            for h in order[:-KEEP:97]:
                assert not store.mem(h)


def test_wait_gc_completion_from_inside_next_does_not_wait_for_itself(tmp_path: Path) -> None:
    cls = make_indexable("gc_self_wait", construct.Bytes(4), construct.Bytes(4))
    answers: list[bool] = []
    with cls.load(tmp_path / "store") as store:
        store.add(b"aaaa", b"bbbb")
        store.add(b"bbbb", b"aaaa")

        def follow(key: bytes, value: bytes) -> bytes:
            answers.append(store.wait_gc_completion())
            return value

        store.gc(Chain(b"aaaa", follow), background=True)
        assert store.wait_gc_completion(timeout=60)
        assert answers == [False, False]
        assert dict(store.items()) == {b"aaaa": b"bbbb", b"bbbb": b"aaaa"}


def test_gc_merge_failing_after_its_rename_leaves_the_store_as_it_was(
    tmp_path: Path, kind: Kind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GC's run is renamed into place, then cannot be opened (EMFILE, say).

    The GC fails, the store keeps its content, the GC's run is deleted and
    the frozen log written again, and a reload gives the content as it was.
    """
    from l2_stores.engine import index as index_module

    path = tmp_path / "store"
    armed = threading.Event()

    def cannot_open() -> None:
        if armed.is_set():
            armed.clear()
            raise OSError(24, "Too many open files")

    with load(kind, path, buffer=1000) as store:
        want = build_loose(store, kind, "r", 20)
        store._engine.hooks.add("flush_renamed", cannot_open)
        armed.set()
        with pytest.raises(GcFailed) as raised:
            store.gc(Retain([key("r", 0)]), background=False)
        assert isinstance(raised.value.__cause__, index_module.GcMergeRenamed)
        assert content(store) == want
        store._engine.wait_merge()
        assert reloaded(kind, path, Mode.READ_ONLY) == want
        kind.write(store, key("r", 99), NULL)
        want[key("r", 99)] = kind.want(key("r", 99), NULL)
    assert reloaded(kind, path) == want
    if kind.indexed:  # the GC's copy, an uncommitted file above the floor, is gone
        assert len(values_numbers(path)) <= 2, os.listdir(path)


def test_gc_asked_for_while_close_waits_raises_store_closed(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "store"
    gate = Gate()
    store = load(kind, path)
    first = key("c", 0)
    kind.write(store, first, NULL)

    def follow(k: Any, v: Any) -> None:
        gate.hold()
        return None

    store.gc(Chain(first, follow), background=True)
    gate.wait_entered()
    closer = threading.Thread(target=store.close)
    closer.start()
    for _ in range(int(TIMEOUT * 100)):
        if store._gc.closing:
            break
        threading.Event().wait(0.01)
    assert store._gc.closing
    with pytest.raises(StoreClosedError):
        store.gc(Retain([first]))
    gate.open()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("l2_stores gc")]
