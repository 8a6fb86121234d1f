"""The indexed files' LRU cache: the C cache and the Python one against a model."""

from __future__ import annotations

import gc
import random
import sys
import threading
import weakref
from typing import Any

import construct as c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from l2_stores import make_indexed_file
from l2_stores.engine import accel
from l2_stores.stores.indexed_file import DEFAULT_CACHE_BYTES
from l2_stores.stores.lru import LruCache, lru_cache

KINDS: list[Any] = [pytest.param(LruCache, id="python")]
if accel.AcceleratedLruCache is not None:
    KINDS.append(pytest.param(accel.AcceleratedLruCache, id="c"))


class ModelLru:
    """The specification: a list of (key, entry), oldest first."""

    def __init__(self, capacity: int, max_bytes: int = sys.maxsize) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.items: list[tuple[bytes, Any]] = []

    @property
    def used_bytes(self) -> int:
        return sum(len(entry[0]) + len(entry[1]) for _, entry in self.items)

    def _take(self, key: bytes) -> Any:
        for index, (cached, entry) in enumerate(self.items):
            if cached == key:
                del self.items[index]
                return entry
        return None

    def get(self, key: bytes) -> Any:
        entry = self._take(key)
        if entry is not None:
            self.items.append((key, entry))
        return entry

    def put(self, key: bytes, entry: Any) -> None:
        self._take(key)
        if self.capacity == 0 or len(entry[0]) + len(entry[1]) > self.max_bytes:
            return
        self.items.append((key, entry))
        while len(self.items) > self.capacity or self.used_bytes > self.max_bytes:
            del self.items[0]

    def keys(self) -> list[bytes]:
        return [key for key, _ in self.items]


KEYS = st.sampled_from([bytes([i]) * 4 for i in range(12)])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("get"), KEYS),
        st.tuples(st.just("put"), KEYS, st.integers(0, 1000), st.integers(0, 40)),
        st.tuples(st.just("discard"), KEYS),
        st.tuples(st.just("clear")),
    ),
    max_size=80,
)


@pytest.mark.parametrize("kind", KINDS)
@given(
    capacity=st.integers(0, 6),
    max_bytes=st.one_of(st.integers(0, 120), st.just(sys.maxsize)),
    operations=OPERATIONS,
)
def test_cache_follows_the_model(
    kind: Any, capacity: int, max_bytes: int, operations: list[Any]
) -> None:
    cache, model = kind(capacity, max_bytes), ModelLru(capacity, max_bytes)
    for operation in operations:
        if operation[0] == "get":
            assert cache.get(operation[1]) == model.get(operation[1])
        elif operation[0] == "put":
            entry = (str(operation[2]).encode(), b"v" * operation[3])
            cache.put(operation[1], entry)
            model.put(operation[1], entry)
        elif operation[0] == "discard":
            cache.discard(operation[1])
            model._take(operation[1])
        else:
            cache.clear()
            model.items.clear()
        assert cache.keys() == model.keys()
        assert len(cache) == len(model.items)
        assert cache.used_bytes == model.used_bytes <= max_bytes
    assert (cache.capacity, cache.max_bytes) == (capacity, max_bytes)


@pytest.mark.parametrize("kind", KINDS)
def test_an_entry_too_heavy_to_keep_drops_the_stale_one(kind: Any) -> None:
    cache = kind(4, 10)
    cache.put(b"k", (b"small", b""))
    cache.put(b"j", (b"other", b""))
    cache.put(b"k", (b"far too large", b""))
    assert cache.get(b"k") is None
    assert cache.keys() == [b"j"] and cache.used_bytes == 5


@pytest.mark.parametrize("kind", KINDS)
def test_a_heavy_entry_pushes_out_the_oldest_until_it_fits(kind: Any) -> None:
    cache = kind(10, 10)
    for key in (b"a", b"b", b"c", b"d"):
        cache.put(key, (b"xx", b""))
    cache.put(b"e", (b"yyyyy", b"z"))
    assert cache.keys() == [b"c", b"d", b"e"] and cache.used_bytes == 10
    cache.put(b"d", (b"", b""))  # a lighter successor: nothing else goes
    assert cache.keys() == [b"c", b"e", b"d"] and cache.used_bytes == 8


@pytest.mark.parametrize("kind", KINDS)
def test_evictions_for_weight_free_their_slots_for_reuse(kind: Any) -> None:
    """Slots freed out of order (by weight) are reused; the entries stay right."""
    cache, model = kind(8, 64), ModelLru(8, 64)
    rng = random.Random(5)
    for step in range(5_000):
        key = bytes([rng.randrange(20)])
        entry = (b"%d" % step, b"w" * rng.choice([0, 1, 7, 30, 63, 70]))
        cache.put(key, entry)
        model.put(key, entry)
        probe = bytes([rng.randrange(20)])
        assert cache.get(probe) == model.get(probe)
    assert cache.keys() == model.keys() and cache.used_bytes == model.used_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_negative_capacity_is_refused(kind: Any) -> None:
    with pytest.raises(ValueError, match="at least 0"):
        kind(-1)
    with pytest.raises(ValueError, match="max_bytes must be at least 0"):
        kind(1, -1)


@pytest.mark.skipif(accel.AcceleratedLruCache is None, reason="the C accelerator is not built")
def test_c_cache_refuses_keys_that_are_not_bytes() -> None:
    cache = lru_cache(2)
    with pytest.raises(TypeError, match="bytes"):
        cache.put(bytearray(b"k"), (b"v", b"h"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        cache.get("k")  # type: ignore[arg-type]
    assert len(cache) == 0


class Tracked:
    """An entry whose death is observable (tuples cannot be weakly referenced)."""


@pytest.mark.parametrize("kind", KINDS)
def test_cache_releases_what_it_drops(kind: Any) -> None:
    cache = kind(2)
    entries = [Tracked() for _ in range(5)]
    alive = [weakref.ref(entry) for entry in entries]
    for index, entry in enumerate(entries):
        cache.put(bytes([index]), entry)
    cache.put(bytes([4]), Tracked())  # replaces entries[4]
    del entries, entry
    gc.collect()
    assert [ref() is not None for ref in alive] == [False, False, False, True, False]
    cache.clear()
    assert alive[3]() is None
    survivor = Tracked()
    cache.put(b"x", survivor)
    before = sys.getrefcount(survivor)
    del cache
    gc.collect()
    assert sys.getrefcount(survivor) == before - 1


@pytest.mark.parametrize("kind", KINDS)
def test_cache_in_a_cycle_is_collected(kind: Any) -> None:
    cache = kind(4)
    holder = Tracked()
    holder.cache = cache  # type: ignore[attr-defined]
    cache.put(b"k", holder)
    seen = weakref.ref(holder)
    del cache, holder
    gc.collect()
    assert seen() is None


@pytest.mark.parametrize("kind", KINDS)
def test_threads_see_only_entries_put_for_their_key(kind: Any) -> None:
    """Eight threads get and put at once; the cache stays bounded, ordered and right."""
    capacity = 16
    cache = kind(capacity)
    keys = [bytes([i]) * 8 for i in range(40)]
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20_000):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                cache.put(key, (key, b"%d" % seed))
            else:
                entry = cache.get(key)
                if entry is not None and entry[0] != key:
                    errors.append(f"{key!r} -> {entry!r}")
            if rng.random() < 0.001:
                cache.clear()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert errors == []
    cached = cache.keys()
    assert len(cached) == len(set(cached)) == len(cache) <= capacity
    for key in cached:
        entry = cache.get(key)
        assert entry is not None and entry[0] == key


def test_store_refuses_a_negative_cache_size_before_touching_the_disk(tmp_path: Any) -> None:
    cls = make_indexed_file("lru_store", c.Bytes(4), c.GreedyBytes, c.Bytes(2))
    path = tmp_path / "store"
    with pytest.raises(ValueError, match="cache_size must be at least 0, got -1"):
        cls.load(path, cache_size=-1)
    assert not path.exists()
    with cls.load(path, cache_size=0) as store:
        store.append(b"abcd", b"value", b"hh")
        assert store.read(b"abcd") == (b"value", b"hh")
        assert len(store._cache) == 0
    with cls.load(path, cache_size=1) as store:
        assert store.read(b"abcd") == (b"value", b"hh")
        assert store._cache.keys() == [b"abcd"]


def test_store_cache_holds_at_most_cache_bytes(tmp_path: Any) -> None:
    cls = make_indexed_file("lru_bytes", c.Bytes(4), c.GreedyBytes, c.Bytes(2))
    path = tmp_path / "store"
    with pytest.raises(ValueError, match="cache_bytes must be at least 0, got -1"):
        cls.load(path, cache_bytes=-1)
    assert not path.exists()
    with cls.load(path) as store:
        assert store._cache.max_bytes == DEFAULT_CACHE_BYTES
    with cls.load(path, cache_bytes=100) as store:
        store.append(b"aaaa", b"a" * 60, b"ha")
        assert store._cache.keys() == [b"aaaa"]
        store.append(b"bbbb", b"b" * 30, b"hb")
        store.append(b"cccc", b"c" * 30, b"hc")  # 62 + 32 + 32 > 100: aaaa goes
        assert store._cache.keys() == [b"bbbb", b"cccc"]
        store.append(b"bbbb", b"B" * 200, b"hB")  # too large: not cached, the old one dropped
        assert store._cache.keys() == [b"cccc"]
        assert store.read(b"bbbb") == (b"B" * 200, b"hB")
        assert store.read(b"aaaa") == (b"a" * 60, b"ha")
        assert store._cache.keys() == [b"cccc", b"aaaa"] and store._cache.used_bytes == 94


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_capacity_costs_nothing_until_used(kind: Any) -> None:
    cache = kind(sys.maxsize)
    for index in range(1000):
        cache.put(index.to_bytes(4, "big"), (b"v", b"h"))
    assert len(cache) == 1000
    assert cache.get((0).to_bytes(4, "big")) == (b"v", b"h")
    cache.clear()
    assert len(cache) == 0 and cache.keys() == []
    cache.put(b"again", (b"v", b"h"))
    assert cache.keys() == [b"again"]
