"""Model-based tests of the GC (``store.gc``), after ``test_model.py``.

Random scenarios of actions, GCs among them, run against a store and against a
witness (a plain dict). Values encode a "next key" (the predecessor of a
block), so ``Chain`` walks follow them: the witness walks the same chain and
keeps the same keys. The contract checked (API.md, "Garbage collection"):

* the reachable set is computed from the content at the moment ``gc()`` is
  called; a ``Chain`` walk stops at None, at an absent (or removed) key and at
  a key already kept; ``next`` is called once per kept key, in walk order,
  with ``(key, value)`` (``(key, (value, header))`` for indexed files);
* after completion the store holds exactly the reachable bindings (with their
  current values) plus every binding written after ``gc()`` returned (an add
  keeps its value, a remove stays a remove, even of a reachable key);
* a GC asked for while one runs is ignored; a GC whose ``next`` raises leaves
  the store as it was and raises ``GcFailed`` (at once, or from the next
  ``wait_gc_completion()``);
* a ``close()`` while a GC runs leaves either the old or the new content;
* the disk space of dropped values is given back (indexed files).

Scenarios:

* sequential: one action at a time, synchronous and background GCs (a
  background GC is followed by writes and reads while it runs, then
  ``wait_gc_completion()`` or a close); "held" background GCs block in their
  first ``next`` until the test releases them, so that reads during the GC
  have exact answers and a second ``gc()`` is known to be ignored;
* parallel: groups of actions run at once in many threads (as in
  ``test_model.py``), a background GC started at the beginning of a group,
  or (Retain only, writes chosen so the outcome is the same whichever comes
  first) by one of the group's threads; "filled" variants start from 20
  bindings;
* small ``index_buffer_size`` (1, 2, 3, 5, 17): ordinary merges interleave
  with the GC's merge.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import (
    Chain,
    GcFailed,
    Mode,
    Retain,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
)
from tests.helpers.runs import runs_tag

KEY = construct.Bytes(32)
ZERO = bytes(32)
STRUCT_VALUE = construct.Struct("level" / construct.Int32ub, "pred" / construct.Bytes(32))
SIMPLE_VALUE = construct.Struct("pred" / construct.Bytes(32), "payload" / construct.GreedyBytes)

BUFFER_SIZES = [1, 2, 3, 5, 17]
JOIN_TIMEOUT = 120.0  # deadlock guard only

FILE_HEADER = struct.Struct("<8sHHIIIQQBQ11xI")  # l2_stores/engine/framing.py
FILE_HEADER_SIZE = 64
RECORD_OVERHEAD = 12  # values-file record: n | key | value | n | crc32
GC_COPY = 1

keys32 = st.binary(min_size=32, max_size=32)
payloads = st.binary(min_size=0, max_size=300)

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
}


# ----------------------------------------------------------------------
# Store kinds


def plain(found: Any) -> Any:
    """A decoded value as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    return found


@dataclass(frozen=True)
class Kind:
    """A store class under test and how its values encode the "next key".

    Model values: ``bytes`` (removable: the value is the predecessor key),
    ``{"level", "pred"}`` (struct: level 0 ends the chain), ``(payload, pred)``
    (indexed and simple indexed files: the header is the predecessor key).
    A predecessor ``ZERO`` ends the chain.
    """

    name: str
    cls: Any
    removable: bool
    indexed: bool
    simple: bool = False

    # -- values

    def values(self, preds: list[bytes]) -> st.SearchStrategy[Any]:
        pred = st.sampled_from(preds)
        if self.name == "removable":
            return pred
        if self.name == "struct":
            return st.fixed_dictionaries({"level": st.integers(0, 3), "pred": pred})
        return st.tuples(payloads, pred)

    def pred(self, model: Any) -> bytes | None:
        """The next key the witness follows from a model value."""
        if self.name == "removable":
            return None if model == ZERO else model
        if self.name == "struct":
            return None if model["level"] == 0 else model["pred"]
        return None if model[1] == ZERO else model[1]

    def next_of(self, key: bytes, value: Any) -> bytes | None:
        """``Chain.next`` on what the store passes (decoded independently of ``pred``)."""
        if self.name == "removable":
            assert isinstance(value, bytes) and len(value) == 32
            return None if value == ZERO else value
        if self.name == "struct":
            return None if value.level == 0 else value.pred
        stored, header = value
        if self.simple:
            assert stored.pred == header, "header is not header_of(value)"
        else:
            assert isinstance(stored, bytes)
        return None if header == ZERO else header

    def to_model(self, value: Any) -> Any:
        """What ``find``/``read``/``items``/``next`` return, as a model value."""
        if not self.indexed:
            return plain(value)
        stored, header = value
        if self.simple:
            assert stored.pred == header
            return (stored.payload, header)
        return (stored, header)

    def encoded_size(self, model: Any) -> int:
        """Bytes of the encoded value (indexed files)."""
        return len(model[0]) + (32 if self.simple else 0)

    # -- store calls

    def write(self, store: Any, key: bytes, model: Any, flush: bool) -> None:
        if not self.indexed:
            store.add(key, model, flush=flush)
        elif self.simple:
            store.append(key, {"pred": model[1], "payload": model[0]}, flush=flush)
        else:
            store.append(key, model[0], model[1], flush=flush)

    def read(self, store: Any, key: bytes) -> Any | None:
        """The model value of ``key`` (checking ``mem`` and ``header`` agree)."""
        found = store.read(key) if self.indexed else store.find(key)
        model = None if found is None else self.to_model(found)
        assert store.mem(key) == (model is not None), f"mem({key.hex()[:8]})"
        if self.indexed:
            header = store.header(key)
            assert header == (None if model is None else model[1]), f"header({key.hex()[:8]})"
        return model

    def observe(self, store: Any, key: bytes) -> tuple[Any, bool, Any]:
        """``(model value or None, mem, header)``: three calls, each may see another moment."""
        found = store.read(key) if self.indexed else store.find(key)
        model = None if found is None else self.to_model(found)
        header = store.header(key) if self.indexed else None
        return model, store.mem(key), header

    def check_observed(
        self, observed: tuple[Any, bool, Any], allowed: list[Any], what: str
    ) -> None:
        """Each of the three answers of ``observe`` is one of the ``allowed`` model values."""
        model, mem, header = observed
        assert model in allowed, what
        assert mem in [a is not None for a in allowed], f"mem: {what}"
        if self.indexed:
            assert header in [None if a is None else a[1] for a in allowed], f"header: {what}"

    def items(self, store: Any) -> dict[bytes, Any]:
        items = list(store.items())
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys)), "items() yielded a key twice"
        return {k: self.to_model(v) for k, v in items}

    def load(self, path: str, buffer: int, mode: Mode = Mode.READ_WRITE) -> Any:
        if self.indexed:
            return self.cls.load(path, mode, index_buffer_size=buffer, cache_size=3)
        return self.cls.load(path, mode, index_buffer_size=buffer)


KINDS = {
    "removable": Kind(
        "removable",
        make_indexable_removable("gc_model_removable", KEY, construct.Bytes(32)),
        removable=True,
        indexed=False,
    ),
    "struct": Kind("struct", make_indexable("gc_model_struct", KEY, STRUCT_VALUE), False, False),
    "indexed": Kind(
        "indexed",
        make_indexed_file("gc_model_indexed", KEY, construct.GreedyBytes, construct.Bytes(32)),
        removable=False,
        indexed=True,
    ),
    "simple": Kind(
        "simple",
        make_simple_indexed_file(
            "gc_model_simple", KEY, SIMPLE_VALUE, construct.Bytes(32), lambda v: v["pred"]
        ),
        removable=False,
        indexed=True,
        simple=True,
    ),
}
KIND_IDS = list(KINDS)


# ----------------------------------------------------------------------
# The witness: what a GC keeps


Spec = tuple[str, Any]  # ("retain", [keys]) or ("chain", first)


def walk(kind: Kind, state: dict[bytes, Any], first: bytes) -> list[bytes]:
    """The keys a Chain walk from ``first`` keeps, in order."""
    kept: list[bytes] = []
    key: bytes | None = first
    while key is not None and key not in kept and key in state:
        kept.append(key)
        key = kind.pred(state[key])
    return kept


def reach(kind: Kind, state: dict[bytes, Any], spec: Spec) -> set[bytes]:
    if spec[0] == "retain":
        return {k for k in spec[1] if k in state}
    return set(walk(kind, state, spec[1]))


class Boom(Exception):
    """Raised by a failing ``next``."""


class Next:
    """``Chain.next``: records its calls; may hold (block) or fail."""

    def __init__(
        self, kind: Kind, hold: threading.Event | None = None, fail_at: int | None = None
    ) -> None:
        self.kind = kind
        self.hold = hold
        self.fail_at = fail_at
        self.calls: list[tuple[bytes, Any]] = []

    def __call__(self, key: bytes, value: Any) -> bytes | None:
        if self.hold is not None and not self.calls:
            assert self.hold.wait(JOIN_TIMEOUT), "a held GC was never released"
        self.calls.append((key, self.kind.to_model(value)))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            raise Boom(f"next fails at call {len(self.calls)}")
        return self.kind.next_of(key, value)

    def check_calls(self, state: dict[bytes, Any], first: bytes) -> None:
        """``next`` was called once per kept key, in order, with the value at the GC's start."""
        expected = [(k, state[k]) for k in walk(self.kind, state, first)]
        assert self.calls == expected, "next() calls differ from the expected walk"


def store_spec(kind: Kind, spec: Spec, follow: Next) -> Retain | Chain:
    if spec[0] == "retain":
        return Retain(spec[1])
    return Chain(spec[1], follow)


def after_gc(
    witness: dict[bytes, Any], reachable: set[bytes], touched: set[bytes]
) -> dict[bytes, Any]:
    """The content once the GC completes: reachable or written since (current values)."""
    return {k: v for k, v in witness.items() if k in reachable or k in touched}


# ----------------------------------------------------------------------
# Checks


@contextmanager
def store_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="l2_gc_model_") as directory:
        yield os.path.join(directory, "store")


def check_store(kind: Kind, store: Any, witness: dict[bytes, Any], keys: list[bytes]) -> None:
    """Every read of ``store`` agrees with ``witness``."""
    for k in keys:
        assert kind.read(store, k) == witness.get(k), f"read({k.hex()[:8]})"
    listed = list(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(witness)
    assert kind.items(store) == witness


def values_files(path: str) -> dict[str, int]:
    """Values files of an indexed file: name -> size (``.tmp`` included)."""
    return {
        name: os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.startswith("values.")
    }


def read_header(path: str) -> tuple[int, int, int]:
    """(flags, generation, tag) of an engine file (framing.py)."""
    with open(path, "rb") as file:
        fields = FILE_HEADER.unpack(file.read(FILE_HEADER_SIZE))
    return fields[2], fields[6], fields[9]


def floor_of(path: str) -> int:
    """The values-file floor: the tag of the index's newest data file (0 if none)."""
    index = os.path.join(path, "index")
    return runs_tag(index)


def check_files_at_rest(kind: Kind, path: str) -> None:
    """A closed indexed file: no temporaries, no dead or uncommitted values file."""
    if not kind.indexed:
        assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
        return
    files = values_files(path)
    assert not [n for n in files if n.endswith(".tmp")], files
    floor = floor_of(path)
    for name in files:
        number = int(name.split(".")[1])
        assert number >= floor, f"{name} is below the floor {floor}: dead file left"
        flags = read_header(os.path.join(path, name))[0]
        if number != floor:
            assert not flags & GC_COPY, f"{name}: an uncommitted GC copy left"


def check_space(kind: Kind, path: str, witness: dict[bytes, Any]) -> None:
    """Right after a synchronous GC, the values files hold little more than the live values."""
    if not kind.indexed:
        return
    live = sum(RECORD_OVERHEAD + 32 + kind.encoded_size(v) for v in witness.values())
    total = sum(values_files(path).values())
    assert total <= 2 * FILE_HEADER_SIZE + live, (
        f"values files hold {total} bytes for {live} bytes of live records: {values_files(path)}"
    )


# ----------------------------------------------------------------------
# Sequential scenarios


@st.composite
def gc_specs(draw: st.DrawFn, keys: list[bytes], outside: list[bytes]) -> Spec:
    if draw(st.integers(0, 2)) == 0:
        return ("retain", draw(st.lists(st.sampled_from(keys + outside), max_size=len(keys) + 1)))
    first = draw(st.sampled_from(keys + keys + outside[:1]))
    return ("chain", first)


@st.composite
def write_actions(draw: st.DrawFn, kind: Kind, keys: list[bytes], preds: list[bytes]) -> tuple:
    index = st.integers(0, len(keys) - 1)
    if kind.removable and draw(st.integers(0, 3)) == 0:
        return ("remove", draw(index), draw(st.booleans()))
    return ("write", draw(index), draw(kind.values(preds)), draw(st.booleans()))


@st.composite
def sequential_scenarios(
    draw: st.DrawFn, kind: Kind
) -> tuple[list[bytes], list[bytes], int, list[tuple]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    outside = draw(st.lists(keys32.filter(lambda k: k not in keys), min_size=2, max_size=2))
    preds = keys + keys + [ZERO, outside[0]]
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    index = st.integers(0, len(keys) - 1)
    names = ["write"] * 6 + ["read"] * 2 + ["flush", "items", "reload"]
    names += ["gc"] * 3 + ["background"] * 3 + ["fail"]
    if kind.removable:
        names += ["remove"] * 2
    actions: list[tuple] = []
    for _ in range(draw(st.integers(5, 40))):
        name = draw(st.sampled_from(names))
        if name in ("write", "remove"):
            actions.append(draw(write_actions(kind, keys, preds)))
        elif name == "read":
            actions.append(("read", draw(index)))
        elif name == "reload":
            actions.append(("reload", draw(st.sampled_from([buffer, *BUFFER_SIZES]))))
        elif name == "gc":
            actions.append(("gc", draw(gc_specs(keys, outside))))
        elif name == "background":
            spec = draw(gc_specs(keys, outside))
            held = spec[0] == "chain" and draw(st.booleans())
            during: list[tuple] = []
            for _ in range(draw(st.integers(0, 6))):
                roll = draw(st.integers(0, 9))
                if roll < 5:
                    during.append(draw(write_actions(kind, keys, preds)))
                elif roll < 7:
                    during.append(("read", draw(index)))
                elif roll == 7:
                    during.append(("flush",))
                elif roll == 8:
                    during.append(("items",))
                else:
                    during.append(("second gc",))
            finish = "reload" if draw(st.integers(0, 4)) == 0 else "wait"
            actions.append(("background", spec, held, during, finish))
        elif name == "fail":
            first = draw(st.sampled_from(keys))
            fail_at = draw(st.integers(0, 3))
            during = draw(st.lists(write_actions(kind, keys, preds), max_size=3))
            actions.append(("fail", first, fail_at, draw(st.booleans()), during))
        else:
            actions.append((name,))
    return keys, outside, buffer, actions


class Sequential:
    """One sequential scenario: the store, its witness, and the actions."""

    def __init__(self, kind: Kind, path: str, keys: list[bytes], buffer: int) -> None:
        self.kind = kind
        self.path = path
        self.keys = keys
        self.probes = list(keys)
        self.buffer = buffer
        self.witness: dict[bytes, Any] = {}
        self.store = kind.load(path, buffer)

    def write(self, action: tuple) -> bytes:
        """Apply a write to the store and the witness; return its key."""
        kind, store = self.kind, self.store
        if action[0] == "write":
            _, i, value, flush = action
            kind.write(store, self.keys[i], value, flush)
            self.witness[self.keys[i]] = value
        else:
            _, i, flush = action
            store.remove(self.keys[i], flush=flush)
            self.witness.pop(self.keys[i], None)
        return self.keys[action[1]]

    def reload(self, buffer: int) -> None:
        self.store.close()
        check_files_at_rest(self.kind, self.path)
        self.buffer = buffer
        self.store = self.kind.load(self.path, buffer)
        check_store(self.kind, self.store, self.witness, self.probes)

    def run(self, actions: list[tuple]) -> None:
        kind = self.kind
        for action in actions:
            name = action[0]
            if name in ("write", "remove"):
                self.write(action)
            elif name == "read":
                k = self.keys[action[1]]
                assert kind.read(self.store, k) == self.witness.get(k)
            elif name == "flush":
                self.store.flush()
            elif name == "items":
                assert kind.items(self.store) == self.witness
            elif name == "reload":
                self.reload(action[1])
            elif name == "gc":
                self.synchronous_gc(action[1])
            elif name == "background":
                self.background_gc(*action[1:])
            elif name == "fail":
                self.failing_gc(*action[1:])
            else:  # pragma: no cover
                raise AssertionError(name)
        check_store(kind, self.store, self.witness, self.probes)

    def synchronous_gc(self, spec: Spec) -> None:
        kind, store = self.kind, self.store
        at_call = dict(self.witness)
        follow = Next(kind)
        store.gc(store_spec(kind, spec, follow), background=False)
        assert store.is_gc_finished()
        if spec[0] == "chain":
            follow.check_calls(at_call, spec[1])
        self.witness = after_gc(at_call, reach(kind, at_call, spec), set())
        check_store(kind, store, self.witness, self.probes)
        check_space(kind, self.path, self.witness)
        assert store.wait_gc_completion(JOIN_TIMEOUT)

    def background_gc(self, spec: Spec, held: bool, during: list[tuple], finish: str) -> None:
        kind, store = self.kind, self.store
        at_call = dict(self.witness)
        reachable = reach(kind, at_call, spec)
        # A held GC blocks in its first next(): only if the walk calls next.
        held = held and spec[0] == "chain" and spec[1] in at_call
        hold = threading.Event() if held else None
        follow = Next(kind, hold)
        touched: set[bytes] = set()
        try:
            store.gc(store_spec(kind, spec, follow))
            for action in during:
                name = action[0]
                if name in ("write", "remove"):
                    touched.add(self.write(action))
                elif name == "read":
                    k = self.keys[action[1]]
                    allowed = self.allowed_during(k, held, reachable, touched)
                    kind.check_observed(kind.observe(store, k), allowed, f"read {k.hex()[:8]}")
                elif name == "flush":
                    store.flush()
                elif name == "items":
                    found = kind.items(store)
                    for k in set(found) | set(self.witness):
                        allowed = self.allowed_during(k, held, reachable, touched)
                        assert found.get(k) in allowed, f"items() during a GC: {k.hex()[:8]}"
                elif name == "second gc":
                    if held:  # known to be running: this one is ignored
                        store.gc(Retain([]))
                        assert not store.is_gc_finished()
                else:  # pragma: no cover
                    raise AssertionError(name)
        finally:
            if hold is not None:
                hold.set()
        new = after_gc(self.witness, reachable, touched)
        if finish == "wait":
            assert store.wait_gc_completion(JOIN_TIMEOUT)
            assert store.is_gc_finished()
            if spec[0] == "chain":
                follow.check_calls(at_call, spec[1])
            self.witness = new
            check_store(kind, store, self.witness, self.probes)
        else:
            # closed while the GC may run: the old content or the new one, never a mix
            old = dict(self.witness)
            store.close()
            check_files_at_rest(kind, self.path)
            self.store = kind.load(self.path, self.buffer)
            found = kind.items(self.store)
            assert found in (old, new), "after a close during a GC: neither old nor new content"
            self.witness = found
            check_store(kind, self.store, self.witness, self.probes)

    def allowed_during(
        self, k: bytes, held: bool, reachable: set[bytes], touched: set[bytes]
    ) -> list[Any]:
        """What a read of ``k`` may give while a background GC runs.

        Exact, except for a key the GC drops (unreachable, not written since
        its start), which may already be gone unless the GC is held in its walk.
        """
        current = self.witness.get(k)
        if held or k in reachable or k in touched:
            return [current]
        return [current, None]

    def failing_gc(self, first: bytes, fail_at: int, background: bool, during: list[tuple]) -> None:
        kind, store = self.kind, self.store
        at_call = dict(self.witness)
        follow = Next(kind, fail_at=fail_at)
        fails = len(walk(kind, at_call, first)) > fail_at
        touched: set[bytes] = set()
        if not background:
            if fails:
                with pytest.raises(GcFailed) as caught:
                    store.gc(Chain(first, follow), background=False)
                assert isinstance(caught.value.__cause__, Boom), caught.value.__cause__
                assert kind.cls.name in str(caught.value)
            else:
                store.gc(Chain(first, follow), background=False)
        else:
            store.gc(Chain(first, follow))
            for action in during:
                touched.add(self.write(action))
            if fails:
                with pytest.raises(GcFailed) as caught:
                    store.wait_gc_completion(JOIN_TIMEOUT)
                assert isinstance(caught.value.__cause__, Boom), caught.value.__cause__
            # reported once; then no GC runs
            assert store.wait_gc_completion(JOIN_TIMEOUT)
        if not fails:
            self.witness = after_gc(self.witness, reach(kind, at_call, ("chain", first)), touched)
        # a failed GC leaves the store as it was (plus the writes made meanwhile)
        check_store(kind, store, self.witness, self.probes)


def run_sequential(kind: Kind, keys: list[bytes], buffer: int, actions: list[tuple]) -> None:
    with store_directory() as path:
        scenario = Sequential(kind, path, keys, buffer)
        try:
            scenario.run(actions)
        finally:
            scenario.store.close()
        witness = scenario.witness
        check_files_at_rest(kind, path)
        with kind.load(path, scenario.buffer) as again:
            check_store(kind, again, witness, scenario.probes)
            # one more GC on the reloaded store, keeping everything
            again.gc(Retain(list(witness)), background=False)
            check_store(kind, again, witness, scenario.probes)
        check_files_at_rest(kind, path)
        with kind.load(path, scenario.buffer, Mode.READ_ONLY) as reader:
            check_store(kind, reader, witness, scenario.probes)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sequential_gc_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, outside, buffer, actions = data.draw(sequential_scenarios(kind))
    run_sequential(kind, keys + outside, buffer, actions)


# ----------------------------------------------------------------------
# Fixed scenarios


def linked(kind: Kind, pred: bytes, tag: int) -> Any:
    """A model value whose next key is ``pred`` (ZERO: none); ``tag`` varies the rest."""
    if kind.name == "removable":
        return pred
    if kind.name == "struct":
        return {"level": 0 if pred == ZERO else 1 + tag % 3, "pred": pred}
    return (bytes([tag % 256]) * (tag * 7 % 300), pred)


def chain_state(kind: Kind, keys: list[bytes]) -> dict[bytes, Any]:
    """``keys`` as a chain: each key's next key is the one before it."""
    return {k: linked(kind, keys[i - 1] if i else ZERO, i) for i, k in enumerate(keys)}


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_chain_stops_at_none_a_cycle_and_a_missing_key(kind_id: str) -> None:
    kind = KINDS[kind_id]
    keys = [bytes([i]) * 32 for i in range(1, 13)]
    absent = b"\xee" * 32
    state = chain_state(kind, keys[:8])  # keys[7] -> ... -> keys[0] -> None
    # a cycle: keys[9] -> keys[8] -> keys[10] -> keys[9]
    state[keys[8]] = linked(kind, keys[10], 8)
    state[keys[9]] = linked(kind, keys[8], 9)
    state[keys[10]] = linked(kind, keys[9], 10)
    state[keys[11]] = linked(kind, absent, 11)  # keys[11] -> a key never written
    state[keys[7]] = linked(kind, keys[7], 7) if kind.name != "struct" else state[keys[7]]
    cases = [
        (keys[11], {keys[11]}),
        (keys[9], {keys[8], keys[9], keys[10]}),
        (keys[5], set(keys[:6])),
        (keys[2], set(keys[:3])),
        (absent, set()),
    ]
    if kind.name != "struct":
        cases.append((keys[7], {keys[7]}))  # a key whose next is itself
    with store_directory() as path, kind.load(path, 3) as store:
        for first, kept in cases:
            for k, v in state.items():  # every binding back, for each case
                kind.write(store, k, v, False)
            follow = Next(kind)
            store.gc(Chain(first, follow), background=False)
            follow.check_calls(state, first)
            assert set(walk(kind, state, first)) == kept  # the witness agrees
            check_store(kind, store, {k: state[k] for k in kept}, [*keys, absent])


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_held_gc_keeps_writes_made_while_it_runs(kind_id: str) -> None:
    """A fixed background scenario, every kind of write while the GC is held in its walk."""
    kind = KINDS[kind_id]
    keys = [bytes([i]) * 32 for i in range(1, 21)]
    state = chain_state(kind, keys[:10])
    others = chain_state(kind, keys[10:])
    state.update(others)
    with store_directory() as path:
        store = kind.load(path, 2)
        try:
            for k, v in state.items():
                kind.write(store, k, v, True)
            hold = threading.Event()
            follow = Next(kind, hold)
            witness = dict(state)
            store.gc(Chain(keys[9], follow))  # keeps keys[:10]
            store.gc(Retain([]))  # ignored: a GC runs
            new_value = linked(kind, keys[0], 99)
            kind.write(store, keys[15], new_value, True)  # unreachable, rewritten: kept
            witness[keys[15]] = new_value
            extra = b"\xab" * 32
            kind.write(store, extra, state[keys[3]], False)  # new key: kept
            witness[extra] = state[keys[3]]
            if kind.removable:
                store.remove(keys[4])  # reachable, removed: stays removed
                store.remove(keys[12])  # unreachable, removed
                del witness[keys[4]], witness[keys[12]]
            assert not store.is_gc_finished()
            check_store(kind, store, witness, [*keys, extra])
            hold.set()
            assert store.wait_gc_completion(JOIN_TIMEOUT)
            follow.check_calls(state, keys[9])
            expected = {k: v for k, v in witness.items() if k in keys[:10]}
            expected[keys[15]] = new_value
            expected[extra] = state[keys[3]]
            check_store(kind, store, expected, [*keys, extra])
        finally:
            hold.set()
            store.close()
        check_files_at_rest(kind, path)
        with kind.load(path, 5) as again:
            check_store(kind, again, expected, [*keys, extra])


@pytest.mark.parametrize("kind_id", KIND_IDS)
def test_items_snapshot_survives_a_gc_commit(kind_id: str) -> None:
    """items() lists the bindings at its call even when a GC commits meanwhile.

    (API.md: reads go on while a background GC runs; items() yields every
    binding at the time of the call.)
    """
    kind = KINDS[kind_id]
    keys = [bytes([i]) * 32 for i in range(1, 6)]
    state = chain_state(kind, keys)
    with store_directory() as path, kind.load(path, 17) as store:
        for k, v in state.items():
            kind.write(store, k, v, True)
        iterator = store.items()
        first_key, first_value = next(iterator)
        store.gc(Retain([keys[0]]))  # background: commits while the iterator is open
        assert store.wait_gc_completion(JOIN_TIMEOUT)
        rest = {k: kind.to_model(v) for k, v in iterator}
        assert {first_key: kind.to_model(first_value), **rest} == state
        check_store(kind, store, {keys[0]: state[keys[0]]}, keys)


# ----------------------------------------------------------------------
# Parallel scenarios


def run_in_threads(functions: list[Callable[[], Any]]) -> list[Any]:
    """Run each function in its own thread, all released at once; return the results.

    An exception in a thread is re-raised here; a thread still running after
    ``JOIN_TIMEOUT`` fails the test (deadlock guard).
    """
    barrier = threading.Barrier(len(functions), timeout=JOIN_TIMEOUT)
    results: list[Any] = [None] * len(functions)
    errors: list[BaseException] = []

    def run(index: int, function: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results[index] = function()
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(functions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    if errors:
        raise errors[0]
    return results


@dataclass(frozen=True)
class Group:
    """Actions run at once. ``gc``: None, or (spec, how) with how one of
    ``before`` (started before the threads), ``held`` (started before, held in
    its walk until the group is done) or ``thread`` (a Retain started by one of
    the threads, racing the writes)."""

    actions: list[tuple]
    gc: tuple[Spec, str] | None
    reload: bool


@st.composite
def parallel_group(
    draw: st.DrawFn, kind: Kind, keys: list[bytes], preds: list[bytes], outside: list[bytes]
) -> Group:
    pool = len(keys)
    threads = draw(st.integers(4, 12))
    gc: tuple[Spec, str] | None = None
    if draw(st.integers(0, 3)) != 0:
        how = draw(st.sampled_from(["before", "before", "held", "thread"]))
        if how == "thread":
            spec: Spec = ("retain", draw(st.lists(st.sampled_from(keys + outside), max_size=pool)))
        elif how == "held":
            spec = ("chain", draw(st.sampled_from(keys)))
        else:
            spec = draw(gc_specs(keys, outside))
        gc = (spec, how)
    written = draw(
        st.lists(st.integers(0, pool - 1), unique=True, min_size=1, max_size=min(threads, pool))
    )
    if gc is not None and gc[1] == "thread":
        # writes whose outcome does not depend on their order with the GC's start:
        # adds of retained keys, removes of any key
        retained = set(gc[0][1])
        if not kind.removable:
            written = [i for i in written if keys[i] in retained]
    actions: list[tuple] = []
    for i in written:
        add_allowed = gc is None or gc[1] != "thread" or keys[i] in set(gc[0][1])
        if kind.removable and (not add_allowed or draw(st.integers(0, 3)) == 0):
            actions.append(("remove", i, draw(st.booleans())))
        else:
            actions.append(("write", i, draw(kind.values(preds)), draw(st.booleans())))
    unwritten = [i for i in range(pool) if i not in set(written)]
    others = [st.tuples(st.just("flush")), st.tuples(st.just("items"))]
    if unwritten:
        read = st.tuples(st.just("read"), st.sampled_from(unwritten))
        others = [read, read, read, *others]
    for _ in range(max(0, threads - len(actions))):
        actions.append(draw(st.one_of(others)))
    if gc is not None and gc[1] == "held":
        actions.append(("second gc",))
    if gc is not None and gc[1] == "thread":
        actions.append(("gc",))
    return Group(draw(st.permutations(actions)), gc, draw(st.integers(0, 5)) == 0)


@st.composite
def parallel_scenarios(
    draw: st.DrawFn, kind: Kind, filled: bool
) -> tuple[list[bytes], int, dict[bytes, Any], list[Group]]:
    count = draw(st.integers(2, 10))
    fill = 20 if filled else 0
    keys = draw(st.lists(keys32, min_size=count + fill + 1, max_size=count + fill + 1, unique=True))
    keys, outside = keys[:-1], keys[-1:]
    preds = [*keys, ZERO, outside[0]]
    initial: dict[bytes, Any] = {}
    for k in keys[:fill]:
        initial[k] = draw(kind.values(preds))
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    groups = draw(st.lists(parallel_group(kind, keys, preds, outside), min_size=2, max_size=6))
    return keys + outside, buffer, initial, groups


class Parallel:
    def __init__(self, kind: Kind, path: str, keys: list[bytes], buffer: int) -> None:
        self.kind = kind
        self.path = path
        self.keys = keys
        self.buffer = buffer
        self.store = kind.load(path, buffer)

    def function(self, action: tuple, spec: Retain | Chain | None) -> Callable[[], Any]:
        kind, store, keys = self.kind, self.store, self.keys
        name = action[0]
        if name == "write":
            _, i, value, flush = action
            return lambda: kind.write(store, keys[i], value, flush)
        if name == "remove":
            _, i, flush = action
            return lambda: store.remove(keys[i], flush=flush)
        if name == "read":
            return lambda: kind.observe(store, keys[action[1]])
        if name == "flush":
            return store.flush
        if name == "items":
            return lambda: kind.items(store)
        if name == "second gc":
            # the group's GC is held in its walk: this one is ignored
            return lambda: store.gc(Retain([]))
        if name == "gc":
            assert spec is not None
            return lambda: store.gc(spec)
        raise AssertionError(name)  # pragma: no cover

    def run_group(self, group: Group, witness: dict[bytes, Any]) -> dict[bytes, Any]:
        kind, store, keys = self.kind, self.store, self.keys
        before = dict(witness)
        after = dict(witness)
        written: set[bytes] = set()
        for action in group.actions:
            if action[0] == "write":
                after[keys[action[1]]] = action[2]
                written.add(keys[action[1]])
            elif action[0] == "remove":
                after.pop(keys[action[1]], None)
                written.add(keys[action[1]])
        hold: threading.Event | None = None
        follow: Next | None = None
        spec: Retain | Chain | None = None
        reachable: set[bytes] | None = None
        how = None
        if group.gc is not None:
            model_spec, how = group.gc
            reachable = reach(kind, before, model_spec)
            held = how == "held" and model_spec[1] in before
            hold = threading.Event() if held else None
            follow = Next(kind, hold)
            spec = store_spec(kind, model_spec, follow)
            if how == "held" and not held:
                how = "before"  # next is never called: nothing holds the GC
        # a second gc() is only known to be ignored while the group's GC is held
        actions = [a if a[0] != "second gc" or hold else ("flush",) for a in group.actions]
        try:
            if how in ("before", "held"):
                store.gc(spec)
            functions = [self.function(a, spec) for a in actions]
            results = run_in_threads(functions)
        finally:
            if hold is not None:
                hold.set()
        if group.gc is not None:
            assert store.wait_gc_completion(JOIN_TIMEOUT)
            assert reachable is not None and follow is not None
            if how == "thread":
                # the GC's start raced the writes (adds of retained keys, removes):
                # whichever came first, the retained keys stay as written, no other
                retained = set(group.gc[0][1])
                expected = {k: v for k, v in after.items() if k in retained}
            else:
                expected = after_gc(after, reachable, written)
                if group.gc[0][0] == "chain":
                    follow.check_calls(before, group.gc[0][1])
        else:
            expected = after
        self.check_results(actions, results, before, after, written, reachable, how)
        check_store(kind, store, expected, keys)
        if group.reload:
            store.close()
            check_files_at_rest(kind, self.path)
            self.store = kind.load(self.path, self.buffer)
            check_store(kind, self.store, expected, keys)
        return expected

    def check_results(
        self,
        actions: list[tuple],
        results: list[Any],
        before: dict[bytes, Any],
        after: dict[bytes, Any],
        written: set[bytes],
        reachable: set[bytes] | None,
        how: str | None,
    ) -> None:
        keys = self.keys

        def may_be_dropped(k: bytes) -> bool:
            return how in ("before", "thread") and reachable is not None and k not in reachable

        for action, result in zip(actions, results, strict=True):
            name = action[0]
            if name == "read":
                k = keys[action[1]]
                allowed = [before.get(k), None] if may_be_dropped(k) else [before.get(k)]
                self.kind.check_observed(result, allowed, f"read {k.hex()[:8]} in a group")
            elif name == "items":
                found = result
                for k in set(before) | set(after) | set(found):
                    allowed = [before.get(k)] if k not in written else [before.get(k), after.get(k)]
                    if may_be_dropped(k):  # a written one too, if listed before its write
                        allowed.append(None)
                    assert found.get(k) in allowed, f"items() during the group: {k.hex()[:8]}"
            elif name in ("second gc", "gc", "write", "remove"):
                assert result is None


def run_parallel(
    kind: Kind,
    keys: list[bytes],
    buffer: int,
    initial: dict[bytes, Any],
    groups: list[Group],
) -> None:
    with store_directory() as path:
        witness = dict(initial)
        scenario = Parallel(kind, path, keys, buffer)
        try:
            for k, v in initial.items():
                kind.write(scenario.store, k, v, False)
            for group in groups:
                witness = scenario.run_group(group, witness)
        finally:
            scenario.store.close()
        check_files_at_rest(kind, path)
        with kind.load(path, buffer) as again:
            check_store(kind, again, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_parallel_gc_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=False))
    run_parallel(kind, keys, buffer, initial, groups)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_parallel_gc_scenarios_filled(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=True))
    run_parallel(kind, keys, min(buffer, 5), initial, groups)
