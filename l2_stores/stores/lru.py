"""The indexed files' LRU cache of recently read or appended (value, header) pairs.

:func:`lru_cache` gives the C cache of the accelerator when there is one,
else :class:`LruCache`, the same behaviour in Python. Keys are encoded keys
(bytes); entries are kept as given, so the cache holds encoded bytes, not
decoded objects a caller could change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from ..engine.accel import AcceleratedLruCache

Entry = tuple[bytes, bytes]


class Cache(Protocol):
    """What the indexed files use of a cache."""

    @property
    def capacity(self) -> int: ...
    def get(self, key: bytes, /) -> Entry | None: ...
    def put(self, key: bytes, entry: Entry, /) -> None: ...
    def clear(self) -> None: ...
    def keys(self) -> list[bytes]: ...
    def __len__(self) -> int: ...


class LruCache:
    """The last ``capacity`` entries put or got, by key (pure Python)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, /) -> Entry | None:
        """The entry of ``key``, now the newest; or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: Entry, /) -> None:
        """Cache ``entry`` as the newest; the oldest goes when full."""
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[bytes]:
        """The cached keys, oldest first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def lru_cache(capacity: int) -> Cache:
    """A cache of ``capacity`` entries: the C one when the accelerator is built."""
    if AcceleratedLruCache is not None:
        return AcceleratedLruCache(capacity)
    return LruCache(capacity)
