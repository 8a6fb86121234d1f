"""Model-based tests of the asyncio face (``l2_stores.aio``), after ``test_model.py``
and ``test_gc_model.py``.

Random scenarios run against an asyncio store and against a witness (a plain
dict); every read must agree with the witness.

* sequential: one awaited call at a time (writes, removes, lookups, ``keys``,
  ``items``, ``flush``, writes through the sync face of the same open store),
  with merges (small ``index_buffer_size``), reloads (``close`` then
  ``aio.load`` again) and background GCs (``Retain`` of a subset, with writes
  and reads while the GC runs; afterwards the store holds the retained keys
  plus the keys written while it ran);
* parallel: groups of calls run at once through ``asyncio.gather`` (some
  writes through the sync face in threads), the writes of a group on distinct
  keys and the reads of keys the group does not write, so that the expected
  results are deterministic; a group may run beside a background GC;
* singletons: write / delete / read / reload sequences.

Each scenario ends with the store closed and loaded again, by the sync face
and by ``aio.load`` ``READ_ONLY``, and compared with the witness.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import (
    Mode,
    Retain,
    aio,
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)

KEY = construct.Bytes(32)
STRUCT_VALUE = construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))
SIMPLE_VALUE = construct.Struct("level" / construct.Int32ub, "payload" / construct.GreedyBytes)

BUFFER_SIZES = [1, 2, 3, 5, 17]
GUARD = 120.0  # deadlock guard only

keys32 = st.binary(min_size=32, max_size=32)
payloads = st.binary(min_size=0, max_size=200)

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
}


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, GUARD))


async def collect(iterator: AsyncIterator[Any]) -> list[Any]:
    """Everything an async iterator yields, in order."""
    return [x async for x in iterator]


def plain(found: Any) -> Any:
    """A decoded value as plain data: a Container becomes a dict of its fields."""
    if isinstance(found, dict):
        return {name: plain(field) for name, field in found.items() if not name.startswith("_")}
    return found


@contextmanager
def store_directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="l2_aio_model_") as directory:
        yield os.path.join(directory, "store")


# ----------------------------------------------------------------------
# Store kinds


@dataclass(frozen=True)
class Kind:
    """A store class and how model values map to its calls.

    Model values: ``bytes`` (removable), ``{"level", "hash"}`` (struct),
    ``(payload, header)`` (indexed file), ``(payload, level)`` (simple
    indexed file: the header is the level).
    """

    name: str
    cls: Any
    removable: bool = False
    indexed: bool = False
    simple: bool = False

    def values(self) -> st.SearchStrategy[Any]:
        if self.name == "removable":
            return keys32
        if self.name == "struct":
            return st.fixed_dictionaries({"level": st.integers(0, 2**32 - 1), "hash": keys32})
        return st.tuples(payloads, st.integers(0, 2**32 - 1))

    def load_options(self, buffer: int) -> dict[str, Any]:
        if self.indexed:
            return {"index_buffer_size": buffer, "cache_size": 3}
        return {"index_buffer_size": buffer}

    def to_model(self, found: Any) -> Any:
        """What ``find``/``read``/``items`` return, as a model value."""
        if not self.indexed:
            return plain(found)
        value, header = found
        if self.simple:
            assert value.level == header, "header is not header_of(value)"
            return (value.payload, header)
        return (value, header)

    # -- asyncio face

    async def write(self, store: Any, key: bytes, model: Any, flush: bool) -> None:
        if not self.indexed:
            await store.add(key, model, flush=flush)
        elif self.simple:
            await store.append(key, {"level": model[1], "payload": model[0]}, flush=flush)
        else:
            await store.append(key, model[0], model[1], flush=flush)

    async def observe(self, store: Any, key: bytes) -> tuple[Any, bool, Any]:
        """``(model value or None, mem, header)``: each call may see another moment."""
        found = await (store.read(key) if self.indexed else store.find(key))
        model = None if found is None else self.to_model(found)
        header = await store.header(key) if self.indexed else None
        return model, await store.mem(key), header

    def check_observed(
        self, observed: tuple[Any, bool, Any], allowed: list[Any], what: str
    ) -> None:
        """Each answer of ``observe`` is one of the ``allowed`` model values."""
        model, mem, header = observed
        assert model in allowed, what
        assert mem in [a is not None for a in allowed], f"mem: {what}"
        if self.indexed:
            assert header in [None if a is None else a[1] for a in allowed], f"header: {what}"

    async def items(self, store: Any) -> dict[bytes, Any]:
        items = [(k, v) async for k, v in store.items()]
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys)), "items() yielded a key twice"
        return {k: self.to_model(v) for k, v in items}

    # -- sync face (same open store)

    def sync_write(self, store: Any, key: bytes, model: Any, flush: bool) -> None:
        if not self.indexed:
            store.add(key, model, flush=flush)
        elif self.simple:
            store.append(key, {"level": model[1], "payload": model[0]}, flush=flush)
        else:
            store.append(key, model[0], model[1], flush=flush)

    def sync_items(self, store: Any) -> dict[bytes, Any]:
        items = list(store.items())
        assert len({k for k, _ in items}) == len(items), "items() yielded a key twice"
        return {k: self.to_model(v) for k, v in items}


KINDS = {
    "removable": Kind(
        "removable",
        make_indexable_removable("aio_model_removable", KEY, construct.Bytes(32)),
        removable=True,
    ),
    "struct": Kind("struct", make_indexable("aio_model_struct", KEY, STRUCT_VALUE)),
    "indexed": Kind(
        "indexed",
        make_indexed_file("aio_model_indexed", KEY, construct.GreedyBytes, construct.Int32ub),
        indexed=True,
    ),
    "simple": Kind(
        "simple",
        make_simple_indexed_file(
            "aio_model_simple", KEY, SIMPLE_VALUE, construct.Int32ub, lambda v: v["level"]
        ),
        indexed=True,
        simple=True,
    ),
}
KIND_IDS = list(KINDS)


async def check_store(
    kind: Kind, store: Any, witness: dict[bytes, Any], probes: list[bytes]
) -> None:
    """Every read of ``store`` agrees with ``witness``."""
    for k in probes:
        kind.check_observed(await kind.observe(store, k), [witness.get(k)], f"read {k.hex()[:8]}")
    listed = await collect(store.keys())
    assert len(listed) == len(set(listed)), "keys() yielded a key twice"
    assert set(listed) == set(witness)
    assert await kind.items(store) == witness


async def check_closed_store(
    kind: Kind, path: str, buffer: int, witness: dict[bytes, Any], probes: list[bytes]
) -> None:
    """The store at ``path``, loaded again by both faces, agrees with ``witness``."""
    with kind.cls.load(path, **kind.load_options(buffer)) as store:
        assert kind.sync_items(store) == witness
    reader = await aio.load(kind.cls, path, Mode.READ_ONLY)
    try:
        await check_store(kind, reader, witness, probes)
    finally:
        await reader.close()


def after_gc(
    witness: dict[bytes, Any], retained: set[bytes], touched: set[bytes]
) -> dict[bytes, Any]:
    """The content once a GC completes: retained (and present) or written since."""
    return {k: v for k, v in witness.items() if k in retained or k in touched}


# ----------------------------------------------------------------------
# Sequential scenarios


@st.composite
def write_action(draw: st.DrawFn, kind: Kind, count: int) -> tuple:
    index = draw(st.integers(0, count - 1))
    if kind.removable and draw(st.integers(0, 3)) == 0:
        return ("remove", index, draw(st.booleans()))
    face = draw(st.sampled_from(["async", "async", "async", "sync"]))
    return ("write", index, draw(kind.values()), draw(st.booleans()), face)


@st.composite
def sequential_scenarios(draw: st.DrawFn, kind: Kind) -> tuple[list[bytes], int, list[tuple]]:
    keys = draw(st.lists(keys32, min_size=2, max_size=10, unique=True))
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    index = st.integers(0, len(keys) - 1)
    names = ["write"] * 6 + ["read"] * 3 + ["flush", "keys", "items", "reload", "gc", "gc"]
    actions: list[tuple] = []
    for _ in range(draw(st.integers(5, 40))):
        name = draw(st.sampled_from(names))
        if name == "write":
            actions.append(draw(write_action(kind, len(keys))))
        elif name == "read":
            actions.append(("read", draw(index)))
        elif name == "reload":
            actions.append(("reload", draw(st.sampled_from([buffer, *BUFFER_SIZES]))))
        elif name == "gc":
            retained = draw(st.lists(index, unique=True, max_size=len(keys)))
            during: list[tuple] = []
            for _ in range(draw(st.integers(0, 6))):
                if draw(st.booleans()):
                    during.append(draw(write_action(kind, len(keys))))
                else:
                    during.append(draw(st.sampled_from([("read", draw(index)), ("items",)])))
            actions.append(("gc", retained, during, draw(st.booleans())))
        else:
            actions.append((name,))
    return keys, buffer, actions


class Sequential:
    """One sequential scenario: the asyncio store, its witness, and the actions."""

    def __init__(self, kind: Kind, path: str, keys: list[bytes], buffer: int) -> None:
        self.kind = kind
        self.path = path
        self.keys = keys
        self.buffer = buffer
        self.witness: dict[bytes, Any] = {}
        self.store: Any = None

    async def write(self, action: tuple) -> bytes:
        """Apply a write to the store and the witness; return its key."""
        kind, store = self.kind, self.store
        k = self.keys[action[1]]
        if action[0] == "remove":
            await store.remove(k, flush=action[2])
            self.witness.pop(k, None)
            return k
        _, _, value, flush, face = action
        if face == "sync":
            kind.sync_write(store.unwrap(), k, value, flush)
        else:
            await kind.write(store, k, value, flush)
        self.witness[k] = value
        return k

    async def run(self, actions: list[tuple]) -> None:
        kind = self.kind
        self.store = await aio.load(kind.cls, self.path, **kind.load_options(self.buffer))
        try:
            for action in actions:
                await self.step(action)
            await check_store(kind, self.store, self.witness, self.keys)
        finally:
            await self.store.close()
        await check_closed_store(kind, self.path, self.buffer, self.witness, self.keys)

    async def step(self, action: tuple) -> None:
        kind, store = self.kind, self.store
        name = action[0]
        if name in ("write", "remove"):
            await self.write(action)
        elif name == "read":
            k = self.keys[action[1]]
            kind.check_observed(await kind.observe(store, k), [self.witness.get(k)], "read")
        elif name == "flush":
            await store.flush()
        elif name == "keys":
            listed = await collect(store.keys())
            assert len(listed) == len(set(listed)) and set(listed) == set(self.witness)
        elif name == "items":
            assert await kind.items(store) == self.witness
        elif name == "reload":
            await store.close()
            self.buffer = action[1]
            self.store = await aio.load(kind.cls, self.path, **kind.load_options(self.buffer))
            await check_store(kind, self.store, self.witness, self.keys)
        elif name == "gc":
            await self.gc(*action[1:])
        else:  # pragma: no cover
            raise AssertionError(name)

    async def gc(self, retained_indices: list[int], during: list[tuple], reload: bool) -> None:
        """A background GC, with writes and reads while it may still run."""
        kind, store = self.kind, self.store
        at_call = dict(self.witness)
        retained = {self.keys[i] for i in retained_indices} & set(at_call)
        await store.gc(Retain([self.keys[i] for i in retained_indices]))
        touched: set[bytes] = set()
        for action in during:
            if action[0] in ("write", "remove"):
                touched.add(await self.write(action))
            elif action[0] == "read":
                k = self.keys[action[1]]
                allowed = [self.witness.get(k)]
                if k not in retained and k not in touched:
                    allowed.append(None)  # dropped once the GC completes
                kind.check_observed(await kind.observe(store, k), allowed, "read during GC")
            else:
                found = await kind.items(store)
                for k, v in self.witness.items():
                    if k in retained or k in touched:
                        assert found.get(k) == v, "items during GC: a kept binding"
                    else:
                        assert found.get(k) in (v, None), "items during GC: a droppable one"
                assert set(found) <= set(self.witness)
        assert await store.wait_gc_completion(GUARD)
        assert store.is_gc_finished()
        self.witness = after_gc(self.witness, retained, touched)
        await check_store(kind, store, self.witness, self.keys)
        if reload:
            await store.close()
            self.store = await aio.load(kind.cls, self.path, **kind.load_options(self.buffer))
            await check_store(kind, self.store, self.witness, self.keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sequential_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, actions = data.draw(sequential_scenarios(kind))
    with store_directory() as path:
        run(Sequential(kind, path, keys, buffer).run(actions))


def test_sequential_scenarios_really_merge_and_collect() -> None:
    """The scenarios' small buffers merge, and their GCs drop bindings."""
    kind = KINDS["removable"]
    keys = [bytes([i]) * 32 for i in range(6)]
    actions: list[tuple] = [("write", i, bytes([i + 1]) * 32, True, "async") for i in range(6)]
    actions.append(("gc", [0, 1], [("write", 5, b"\x09" * 32, False, "sync")], True))
    with store_directory() as path:
        scenario = Sequential(kind, path, keys, 2)
        run(scenario.run(actions))
        assert any(n.startswith("run.") for n in os.listdir(path))
        assert scenario.witness == {
            keys[0]: b"\x01" * 32,
            keys[1]: b"\x02" * 32,
            keys[5]: b"\x09" * 32,
        }


# ----------------------------------------------------------------------
# Parallel scenarios


@st.composite
def parallel_group(draw: st.DrawFn, kind: Kind, pool: int) -> tuple[list[tuple], Any, bool]:
    """4 to 14 calls run at once: writes on distinct keys, reads only of keys not
    written in the group; maybe a background GC (Retain) started just before;
    and whether to reload afterwards."""
    size = draw(st.integers(4, 14))
    written = draw(
        st.lists(st.integers(0, pool - 1), unique=True, min_size=1, max_size=min(size, pool))
    )
    actions: list[tuple] = []
    for i in written:
        if kind.removable and draw(st.integers(0, 3)) == 0:
            actions.append(("remove", i, draw(st.booleans())))
        else:
            face = draw(st.sampled_from(["async", "async", "sync"]))
            actions.append(("write", i, draw(kind.values()), draw(st.booleans()), face))
    unwritten = [i for i in range(pool) if i not in set(written)]
    others = [st.just(("flush",)), st.just(("items",)), st.just(("keys",))]
    if unwritten:
        read = st.tuples(st.just("read"), st.sampled_from(unwritten))
        others = [read, read, read, *others]
    for _ in range(size - len(written)):
        actions.append(draw(st.one_of(others)))
    gc = None
    if draw(st.integers(0, 3)) == 0:
        gc = draw(st.lists(st.integers(0, pool - 1), unique=True, max_size=pool))
    reload = draw(st.integers(0, 5)) == 0
    return draw(st.permutations(actions)), gc, reload


@st.composite
def parallel_scenarios(
    draw: st.DrawFn, kind: Kind, filled: bool
) -> tuple[list[bytes], int, dict[bytes, Any], list[tuple[list[tuple], Any, bool]]]:
    count = draw(st.integers(2, 10))
    fill = 20 if filled else 0
    keys = draw(st.lists(keys32, min_size=count + fill, max_size=count + fill, unique=True))
    initial = {k: draw(kind.values()) for k in keys[:fill]}
    buffer = draw(st.sampled_from(BUFFER_SIZES))
    groups = draw(st.lists(parallel_group(kind, len(keys)), min_size=2, max_size=6))
    return keys, buffer, initial, groups


async def group_call(kind: Kind, store: Any, keys: list[bytes], action: tuple) -> Any:
    name = action[0]
    if name == "write":
        _, i, value, flush, face = action
        if face == "sync":  # the sync face of the same open store, in a thread
            return await asyncio.to_thread(kind.sync_write, store.unwrap(), keys[i], value, flush)
        return await kind.write(store, keys[i], value, flush)
    if name == "remove":
        return await store.remove(keys[action[1]], flush=action[2])
    if name == "read":
        return await kind.observe(store, keys[action[1]])
    if name == "flush":
        return await store.flush()
    if name == "items":
        return await kind.items(store)
    if name == "keys":
        listed = await collect(store.keys())
        assert len(listed) == len(set(listed)), "keys() yielded a key twice"
        return set(listed)
    raise AssertionError(name)  # pragma: no cover


def check_group_results(
    kind: Kind,
    keys: list[bytes],
    actions: list[tuple],
    results: list[Any],
    before: dict[bytes, Any],
    after: dict[bytes, Any],
    droppable: set[bytes],
) -> None:
    """Reads of unwritten keys see ``before``; iterations see each written key with
    its old binding or its new one; while a GC runs, a key it may drop may also be
    absent (for a written key: until the group's write)."""
    written = {keys[a[1]] for a in actions if a[0] in ("write", "remove")}

    def allowed(k: bytes) -> list[Any]:
        # A droppable key may be gone (the GC completed) until the group writes it.
        dropped = [None] if k in droppable else []
        if k in written:
            return [before.get(k), after.get(k), *dropped]
        return [before.get(k), *dropped]

    for action, result in zip(actions, results, strict=True):
        name = action[0]
        if name == "read":
            kind.check_observed(result, allowed(keys[action[1]]), f"read in group: {action}")
        elif name == "items":
            for k in set(before) | set(after):
                assert result.get(k) in allowed(k), f"items in group: {k.hex()[:8]}"
            assert set(result) <= set(before) | set(after)
        elif name == "keys":
            for k in set(before) | set(after):
                assert (k in result) in [a is not None for a in allowed(k)], "keys in group"
            assert result <= set(before) | set(after)


async def run_parallel(
    kind: Kind,
    path: str,
    keys: list[bytes],
    buffer: int,
    initial: dict[bytes, Any],
    groups: list[tuple[list[tuple], Any, bool]],
) -> None:
    witness = dict(initial)
    store = await aio.load(kind.cls, path, **kind.load_options(buffer))
    try:
        await asyncio.gather(*(kind.write(store, k, v, False) for k, v in initial.items()))
        await check_store(kind, store, witness, keys)
        for actions, gc, reload in groups:
            before = dict(witness)
            for action in actions:
                if action[0] == "write":
                    witness[keys[action[1]]] = action[2]
                elif action[0] == "remove":
                    witness.pop(keys[action[1]], None)
            droppable: set[bytes] = set()
            if gc is not None:
                retained = {keys[i] for i in gc}
                droppable = set(before) - retained
                await store.gc(Retain([keys[i] for i in gc]))
            calls = [group_call(kind, store, keys, a) for a in actions]
            results = await asyncio.gather(*calls)
            check_group_results(kind, keys, actions, results, before, witness, droppable)
            if gc is not None:
                assert await store.wait_gc_completion(GUARD)
                touched = {keys[a[1]] for a in actions if a[0] in ("write", "remove")}
                witness = after_gc(witness, retained, touched)
            await check_store(kind, store, witness, keys)
            if reload:
                await store.close()
                store = await aio.load(kind.cls, path, **kind.load_options(buffer))
                await check_store(kind, store, witness, keys)
    finally:
        await store.close()
    await check_closed_store(kind, path, buffer, witness, keys)


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_parallel_scenarios(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=False))
    with store_directory() as path:
        run(run_parallel(kind, path, keys, buffer, initial, groups))


@pytest.mark.parametrize("kind_id", KIND_IDS)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_parallel_scenarios_filled(kind_id: str, data: st.DataObject) -> None:
    kind = KINDS[kind_id]
    keys, buffer, initial, groups = data.draw(parallel_scenarios(kind, filled=True))
    with store_directory() as path:
        run(run_parallel(kind, path, keys, min(buffer, 5), initial, groups))


# ----------------------------------------------------------------------
# Singletons

Singleton = make_singleton("aio_model_singleton", construct.PascalString(construct.VarInt, "utf8"))


@st.composite
def singleton_actions(draw: st.DrawFn) -> list[tuple]:
    texts = st.text(max_size=50)
    steps = st.one_of(
        st.tuples(st.just("write"), texts),
        st.tuples(st.just("write"), texts),
        st.tuples(st.just("sync write"), texts),
        st.just(("delete",)),
        st.just(("read",)),
        st.just(("reload",)),
        st.just(("gather",)),
    )
    return draw(st.lists(steps, min_size=1, max_size=25))


async def run_singleton(path: str, actions: list[tuple]) -> None:
    witness: str | None = None
    store = await aio.load(Singleton, path)
    try:
        for action in actions:
            name = action[0]
            if name == "write":
                await store.write(action[1])
                witness = action[1]
            elif name == "sync write":
                store.unwrap().write(action[1])
                witness = action[1]
            elif name == "delete":
                await store.delete()
                witness = None
            elif name == "reload":
                await store.close()
                store = await aio.load(Singleton, path)
            elif name == "gather":  # reads at once with a write: the old or the new value
                old, new = witness, witness or ""
                results = await asyncio.gather(
                    store.read(), store.write(new), store.read(), store.read()
                )
                assert all(r in (old, new) for r in (results[0], *results[2:])), results
                witness = new
            assert await store.read() == witness
            assert store.unwrap().read() == witness
    finally:
        await store.close()
    with Singleton.load(path, Mode.READ_ONLY) as reader:
        assert reader.read() == witness
    async with aio.open(Singleton, path, Mode.READ_ONLY) as areader:
        assert await areader.read() == witness


@settings(max_examples=30, **SETTINGS)
@given(actions=singleton_actions())
def test_singleton_scenarios(actions: list[tuple]) -> None:
    with tempfile.TemporaryDirectory(prefix="l2_aio_model_") as directory:
        run(run_singleton(os.path.join(directory, "single"), actions))
