"""The stores under benchmark, each behind the same small adapter.

Every adapter's ``add``/``append`` hands the write to the OS before it
returns and never fsyncs, so all run at the same durability; ``setting``
says how each gets there. Read phases call ``reader()`` once and then its
result per lookup (LMDB: one read transaction per phase).
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

KEY_SIZE = 32
HEADER_SIZE = 16


@dataclass
class OpenA:
    """An open store of workload A: add, a reader factory, close."""

    add: Callable[[bytes, Any], object]
    reader: Callable[[], Callable[[bytes], object]]
    close: Callable[[], None]


@dataclass
class OpenB:
    """An open store of workload B: append, reader factories, close."""

    append: Callable[[bytes, bytes, bytes], object]
    value_reader: Callable[[], Callable[[bytes], object]]
    header_reader: Callable[[], Callable[[bytes], object]]
    close: Callable[[], None]


@dataclass
class OpenO:
    """An open store of workload O (order): bulk load, ordered questions, close."""

    #: Add (key, value) pairs, given in any order; made durable by ``close``.
    load: Callable[[list[tuple[bytes, bytes]]], None]
    #: Every (key, value) in key order.
    scan: Callable[[], Iterator[tuple[bytes, bytes]]]
    #: The first (key, value) with a key at least the given one, or None.
    seek: Callable[[bytes], object]
    #: The last ``count`` pairs, highest key first.
    last: Callable[[int], list[tuple[bytes, bytes]]]
    #: The exact number of bindings (None: the store has no exact count).
    count: Callable[[], int | None]
    close: Callable[[], None]


class Peer:
    """A store kind under benchmark."""

    name = ""
    setting = ""

    def open_a(self, path: str) -> OpenA:
        raise NotImplementedError

    def open_b(self, path: str) -> OpenB:
        raise NotImplementedError

    def open_o(self, path: str) -> OpenO:
        raise NotImplementedError


def concatenated_b(
    put: Callable[[bytes, bytes], object], get: Callable[[bytes], Any], close: Callable[[], None]
) -> OpenB:
    """Workload B on a plain key-value store: header and value stored together."""

    def append(key: bytes, value: bytes, header: bytes) -> None:
        put(key, header + value)

    def read(key: bytes) -> object:
        raw = get(key)
        return None if raw is None else (raw[HEADER_SIZE:], raw[:HEADER_SIZE])

    def header(key: bytes) -> object:
        raw = get(key)
        return None if raw is None else raw[:HEADER_SIZE]

    return OpenB(append, lambda: read, lambda: header, close)


# ------------------------------------------------------------------ l2_stores


class L2Stores(Peer):
    name = "l2_stores"
    setting = "flush=True: each add/append handed to the OS (write), no fsync"

    def __init__(self, struct_value: bool = False) -> None:
        self.struct_value = struct_value
        if struct_value:
            self.name = "l2_stores (Struct)"

    def open_a(self, path: str) -> OpenA:
        import construct as c

        from l2_stores import make_indexable

        if self.struct_value:
            value = c.Struct("level" / c.Int32ub, "hash" / c.Bytes(32))
        else:
            value = c.Bytes(32)
        store = make_indexable("bench", c.Bytes(KEY_SIZE), value).load(path)
        return OpenA(store.add, lambda: store.find, store.close)

    def open_o(self, path: str) -> OpenO:
        import construct as c

        from l2_stores import make_indexable

        store = make_indexable("bench_o", c.Bytes(KEY_SIZE), c.Bytes(32)).load(path)

        def load(pairs: list[tuple[bytes, bytes]]) -> None:
            add = store.add
            for key, value in pairs:
                add(key, value, flush=False)

        def seek(key: bytes) -> object:
            return next(store.items(key), None)

        def last(count: int) -> list[tuple[bytes, bytes]]:
            return list(itertools.islice(store.items(reverse=True), count))

        return OpenO(load, store.items, seek, last, lambda: len(store), store.close)

    def open_b(self, path: str) -> OpenB:
        import construct as c

        from l2_stores import make_indexed_file

        cls = make_indexed_file("bench_b", c.Bytes(KEY_SIZE), c.GreedyBytes, c.Bytes(HEADER_SIZE))
        store = cls.load(path)
        return OpenB(store.append, lambda: store.read, lambda: store.header, store.close)


class L2StoresAsyncio(L2Stores):
    name = "l2_stores (asyncio)"
    setting = "as l2_stores, each operation awaited through l2_stores.aio"


# ------------------------------------------------------------------ peers


class Sqlite(Peer):
    name = "sqlite3"
    setting = "WAL, synchronous=OFF, one transaction per write"

    def _connect(self, path: str) -> Any:
        import sqlite3

        os.makedirs(path, exist_ok=True)
        connection = sqlite3.connect(os.path.join(path, "db.sqlite"), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=OFF")
        return connection

    def open_a(self, path: str) -> OpenA:
        db = self._connect(path)
        db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        execute = db.execute

        def add(key: bytes, value: bytes) -> None:
            execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))

        def find(key: bytes) -> object:
            row = execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
            return None if row is None else row[0]

        return OpenA(add, lambda: find, db.close)

    def open_b(self, path: str) -> OpenB:
        db = self._connect(path)
        db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, h BLOB, v BLOB)")
        execute = db.execute

        def append(key: bytes, value: bytes, header: bytes) -> None:
            execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, header, value))

        def read(key: bytes) -> object:
            return execute("SELECT v, h FROM kv WHERE k = ?", (key,)).fetchone()

        def header(key: bytes) -> object:
            row = execute("SELECT h FROM kv WHERE k = ?", (key,)).fetchone()
            return None if row is None else row[0]

        return OpenB(append, lambda: read, lambda: header, db.close)


class Lmdb(Peer):
    name = "lmdb"
    setting = "sync=False, metasync=False, one write transaction per put"

    def _env(self, path: str, dbs: int = 0) -> Any:
        import lmdb

        return lmdb.open(
            path, map_size=1 << 36, sync=False, metasync=False, max_dbs=dbs, readahead=False
        )

    def open_a(self, path: str) -> OpenA:
        env = self._env(path)
        begin = env.begin

        def add(key: bytes, value: bytes) -> None:
            with begin(write=True) as txn:
                txn.put(key, value)

        def reader() -> Callable[[bytes], object]:
            return begin(buffers=False).get

        return OpenA(add, reader, env.close)

    def open_o(self, path: str) -> OpenO:
        env = self._env(path)

        def load(pairs: list[tuple[bytes, bytes]]) -> None:
            for at in range(0, len(pairs), 10_000):
                with env.begin(write=True) as txn:
                    for key, value in pairs[at : at + 10_000]:
                        txn.put(key, value)

        def scan() -> Iterator[tuple[bytes, bytes]]:
            with env.begin() as txn:
                yield from txn.cursor()

        def seek(key: bytes) -> object:
            with env.begin() as txn:
                cursor = txn.cursor()
                return cursor.item() if cursor.set_range(key) else None

        def last(count: int) -> list[tuple[bytes, bytes]]:
            with env.begin() as txn:
                cursor = txn.cursor()
                cursor.last()
                return list(itertools.islice(cursor.iterprev(), count))

        def count() -> int:
            return int(env.stat()["entries"])

        return OpenO(load, scan, seek, last, count, env.close)

    def open_b(self, path: str) -> OpenB:
        env = self._env(path, dbs=2)
        values = env.open_db(b"values")
        headers = env.open_db(b"headers")
        begin = env.begin

        def append(key: bytes, value: bytes, header: bytes) -> None:
            with begin(write=True) as txn:
                txn.put(key, value, db=values)
                txn.put(key, header, db=headers)

        def value_reader() -> Callable[[bytes], object]:
            txn = begin()
            get = txn.get

            def read(key: bytes) -> object:
                value = get(key, db=values)
                return None if value is None else (value, get(key, db=headers))

            return read

        def header_reader() -> Callable[[bytes], object]:
            txn = begin()
            get = txn.get
            return lambda key: get(key, db=headers)

        return OpenB(append, value_reader, header_reader, env.close)


class RocksDict(Peer):
    name = "rocksdict"
    setting = "default put (WAL written per put, no sync), raw bytes mode"

    def _open(self, path: str) -> Any:
        from rocksdict import Options, Rdict

        return Rdict(path, options=Options(raw_mode=True))

    def open_a(self, path: str) -> OpenA:
        db = self._open(path)
        return OpenA(db.put, lambda: db.get, db.close)

    def open_b(self, path: str) -> OpenB:
        db = self._open(path)
        return concatenated_b(db.put, db.get, db.close)

    def open_o(self, path: str) -> OpenO:
        from rocksdict import WriteBatch

        db = self._open(path)

        def load(pairs: list[tuple[bytes, bytes]]) -> None:
            for at in range(0, len(pairs), 10_000):
                batch = WriteBatch(raw_mode=True)
                for key, value in pairs[at : at + 10_000]:
                    batch.put(key, value)
                db.write(batch)

        def scan() -> Iterator[tuple[bytes, bytes]]:
            return iter(db.items())

        def seek(key: bytes) -> object:
            iterator = db.iter()
            iterator.seek(key)
            return (iterator.key(), iterator.value()) if iterator.valid() else None

        def last(count: int) -> list[tuple[bytes, bytes]]:
            return list(itertools.islice(db.items(backwards=True), count))

        return OpenO(load, scan, seek, last, lambda: None, db.close)


class DumbDbm(Peer):
    name = "dbm.dumb"
    setting = "the interpreter's dbm (only dbm.dumb here): value written per set"

    def _open(self, path: str) -> Any:
        import dbm.dumb

        os.makedirs(path, exist_ok=True)
        return dbm.dumb.open(os.path.join(path, "db"), "c")

    def open_a(self, path: str) -> OpenA:
        db = self._open(path)
        return OpenA(db.__setitem__, lambda: db.get, db.close)

    def open_b(self, path: str) -> OpenB:
        db = self._open(path)
        return concatenated_b(db.__setitem__, db.get, db.close)


class DiskCache(Peer):
    name = "diskcache"
    setting = "Cache defaults (SQLite WAL, synchronous=NORMAL)"

    def open_a(self, path: str) -> OpenA:
        import diskcache

        cache = diskcache.Cache(path)
        return OpenA(cache.set, lambda: cache.get, cache.close)

    def open_b(self, path: str) -> OpenB:
        import diskcache

        cache = diskcache.Cache(path)
        return concatenated_b(cache.set, cache.get, cache.close)


class InMemoryDict(Peer):
    name = "dict"
    setting = "in memory: the limit, nothing on disk"
    _kept: dict[str, dict[bytes, Any]] = {}  # noqa: RUF012 - survives close/reopen in one run

    def open_a(self, path: str) -> OpenA:
        table = self._kept.setdefault(path, {})
        return OpenA(table.__setitem__, lambda: table.get, lambda: None)

    def open_b(self, path: str) -> OpenB:
        table = self._kept.setdefault(path, {})

        def append(key: bytes, value: bytes, header: bytes) -> None:
            table[key] = (value, header)

        def header(key: bytes) -> object:
            pair = table.get(key)
            return None if pair is None else pair[1]

        return OpenB(append, lambda: table.get, lambda: header, lambda: None)


class RawFile(Peer):
    """Fixed records, one ``os.write`` each; reads through mmap at an offset from a dict."""

    name = "raw file"
    setting = "one os.write per record; mmap reads via a dict of offsets built at open"

    def open_a(self, path: str) -> OpenA:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "records")
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        record = 2 * KEY_SIZE
        offsets: dict[bytes, int] = {}
        maps: list[mmap.mmap] = []
        if size:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            maps.append(mm)
            for offset in range(0, size, record):
                offsets[mm[offset : offset + KEY_SIZE]] = offset
        write = os.write

        def add(key: bytes, value: bytes) -> None:
            write(fd, key + value)

        def reader() -> Callable[[bytes], object]:
            mm = maps[0]
            get = offsets.get

            def find(key: bytes) -> object:
                offset = get(key)
                return None if offset is None else mm[offset + KEY_SIZE : offset + record]

            return find

        def close() -> None:
            for mm in maps:
                mm.close()
            os.close(fd)

        return OpenA(add, reader, close)

    def open_b(self, path: str) -> OpenB:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, "values"), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        head = KEY_SIZE + HEADER_SIZE + 4  # key | header | u32 length, then the value
        places: dict[bytes, tuple[int, int]] = {}  # key -> (record offset, value length)
        size = os.fstat(fd).st_size
        maps: list[mmap.mmap] = []
        if size:
            maps.append(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
            mm, offset = maps[0], 0
            while offset < size:
                length = int.from_bytes(mm[offset + head - 4 : offset + head], "little")
                places[mm[offset : offset + KEY_SIZE]] = (offset, length)
                offset += head + length
        end = [size]
        write = os.write

        def append(key: bytes, value: bytes, header: bytes) -> None:
            write(fd, b"".join((key, header, len(value).to_bytes(4, "little"), value)))
            places[key] = (end[0], len(value))
            end[0] += head + len(value)

        def value_reader() -> Callable[[bytes], object]:
            mm, get = maps[0], places.get

            def read(key: bytes) -> object:
                place = get(key)
                if place is None:
                    return None
                start = place[0] + head
                return mm[start : start + place[1]], mm[start - head + KEY_SIZE : start - 4]

            return read

        def header_reader() -> Callable[[bytes], object]:
            mm, get = maps[0], places.get

            def header(key: bytes) -> object:
                place = get(key)
                if place is None:
                    return None
                return mm[place[0] + KEY_SIZE : place[0] + KEY_SIZE + HEADER_SIZE]

            return header

        def close() -> None:
            for mm in maps:
                mm.close()
            os.close(fd)

        return OpenB(append, value_reader, header_reader, close)


#: Peers by the slug the command line uses.
PEERS: dict[str, Peer] = {
    "l2_stores": L2Stores(),
    "l2_stores_struct": L2Stores(struct_value=True),
    "l2_stores_aio": L2StoresAsyncio(),
    "lmdb": Lmdb(),
    "rocksdict": RocksDict(),
    "sqlite3": Sqlite(),
    "diskcache": DiskCache(),
    "dbm": DumbDbm(),
    "dict": InMemoryDict(),
    "raw": RawFile(),
}
