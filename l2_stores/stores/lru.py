"""The indexed files' LRU cache of recently read or appended (value, header) pairs.

:func:`lru_cache` gives the C cache of the accelerator when there is one,
else :class:`LruCache`, the same behaviour in Python. Keys are encoded keys
(bytes); entries are kept as given, so the cache holds encoded bytes, not
decoded objects a caller could change. A cache keeps at most ``capacity``
entries and at most ``max_bytes`` bytes in all: an entry weighs the length
of the bytes in it, and one heavier than ``max_bytes`` is not kept.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any, Protocol

from ..engine.accel import AcceleratedLruCache

Entry = tuple[bytes, bytes]


class Cache(Protocol):
    """What the indexed files use of a cache."""

    @property
    def capacity(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    def get(self, key: bytes, /) -> Entry | None: ...
    def put(self, key: bytes, entry: Entry, /) -> None: ...
    def discard(self, key: bytes, /) -> None: ...
    def clear(self) -> None: ...
    def keys(self) -> list[bytes]: ...
    def __len__(self) -> int: ...


def entry_weight(entry: Any) -> int:
    """The bytes an entry holds: its length if bytes, else the length of its bytes items."""
    if isinstance(entry, bytes):
        return len(entry)
    if isinstance(entry, tuple):
        return sum(len(item) for item in entry if isinstance(item, bytes))
    return 0


class LruCache:
    """The newest entries put or got, by key, within both limits (pure Python)."""

    def __init__(self, capacity: int, max_bytes: int = sys.maxsize) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be at least 0, got {capacity}")
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be at least 0, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[Entry, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, /) -> Entry | None:
        """The entry of ``key``, now the newest; or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: bytes, entry: Entry, /) -> None:
        """Cache ``entry`` as the newest; the oldest go past the limits."""
        weight = entry_weight(entry)
        with self._lock:
            stale = self._entries.pop(key, None)
            if stale is not None:
                self.used_bytes -= stale[1]
            if self.capacity == 0 or weight > self.max_bytes:
                return
            self._entries[key] = (entry, weight)
            self.used_bytes += weight
            while len(self._entries) > self.capacity or self.used_bytes > self.max_bytes:
                self.used_bytes -= self._entries.popitem(last=False)[1][1]

    def discard(self, key: bytes, /) -> None:
        """Drop the entry of ``key``, if cached."""
        with self._lock:
            stale = self._entries.pop(key, None)
            if stale is not None:
                self.used_bytes -= stale[1]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0

    def keys(self) -> list[bytes]:
        """The cached keys, oldest first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def lru_cache(capacity: int, max_bytes: int = sys.maxsize) -> Cache:
    """A cache within ``capacity`` and ``max_bytes``: the C one when the accelerator is built."""
    if AcceleratedLruCache is not None:
        return AcceleratedLruCache(capacity, max_bytes)
    return LruCache(capacity, max_bytes)
