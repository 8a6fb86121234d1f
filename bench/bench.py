"""Benchmark of l2_stores beside its peers, in one run (not part of the tests).

    pip install -e .[bench]
    python bench/bench.py [--workload A|B|GC|AIO|all] [--n N] [--stores a,b] [--json]
                          [--keys random|sequential]

Peers (see ``peers.py``): LMDB, rocksdict, sqlite3, diskcache, the
interpreter's dbm, a dict (the in-memory limit) and a raw file (the file
limit). Each store runs in its own subprocess, so that its memory is measured
from a clean base; tables print each figure, then the ratios to the targets
of issue 5. Workload A: N random 32-byte keys (or, with ``--keys
sequential``, a 32-byte big-endian counter added in order, as Int32ub
levels sort) to random 32-byte values, added one by one with ``flush=True``
(handed to the OS before the call returns, no fsync), then close, reopen,
N random finds of present keys, N finds of absent keys. Reported:
microseconds per operation, single-add latency percentiles (merges
included), reopen time, peak process-private memory over
the base (RssAnon, sampled every 10 ms: pages of mmap'd store files are page
cache and do not count), bytes on disk, and write amplification: the bytes
the process sent to storage while adding and closing (``write_bytes`` of
``/proc/self/io``, background threads included) over the bytes stored.

Workload B: N values of 100 B to 8 KiB with a 16-byte header, in an indexed
file. Workload GC: N blocks chained by predecessor hash; a background Chain
GC keeps the last 10 % while one thread does random finds: GC time, find
latency (median, 99th percentile, max) before and during the GC, disk before
and after. Workload AIO: A's add and finds, and N/4 appends of 1 KiB values
with header and value reads, through the synchronous store and through
``l2_stores.aio`` (one coroutine awaiting each operation in turn).
"""

from __future__ import annotations

import argparse
import array
import heapq
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import PEERS

KEY_SIZE = VALUE_SIZE = 32


def rss_anon_bytes() -> int:
    """Process-private resident memory (RssAnon) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Samples RssAnon in a thread; ``peak`` is the highest sample."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
        return self.peak


def random_bytes(rng: random.Random, size: int) -> bytes:
    """``size`` random bytes (``randbytes`` takes at most 2**31 bits at a time)."""
    step = 1 << 26
    return b"".join(rng.randbytes(min(step, size - at)) for at in range(0, size, step))


def written_bytes() -> int:
    """Bytes this process (all its threads) caused to be sent to storage so far.

    ``write_bytes`` of ``/proc/self/io``: counted when a page is dirtied, by a
    write or through a shared map; 0 where the kernel does not account it.
    """
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def disk_usage(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def sequential_keys(start: int, n: int) -> bytes:
    """``n`` keys counting up from ``start``, big-endian (as ``Int32ub`` levels sort)."""
    return b"".join(i.to_bytes(KEY_SIZE, "big") for i in range(start, start + n))


def run_a(
    slug: str, directory: str, n: int, seed: int, keys: str = "random", finds: int | None = None
) -> dict[str, Any]:
    """Workload A (and A' for the Struct-valued l2_stores): add, close, reopen, hits, misses.

    ``keys``: ``random`` 32-byte keys, or ``sequential`` ones (a counter, big-endian,
    added in order; the misses are the next values of the counter). ``finds``: how many
    hits and how many misses (default n; the hits a random sample of the keys).
    """
    peer = PEERS[slug]
    struct_value = slug == "l2_stores_struct"
    rng = random.Random(seed)
    finds = n if finds is None else min(n, finds)
    if keys == "sequential":
        blob, misses = sequential_keys(0, n), sequential_keys(n, finds)
    else:
        blob = random_bytes(rng, KEY_SIZE * n)
        misses = random_bytes(rng, KEY_SIZE * finds)
    # Values of their own: a value equal to its key would let a compressing peer
    # (RocksDB's Snappy) store each binding in about half its bytes.
    values = random_bytes(rng, VALUE_SIZE * n)
    if finds == n:
        order = list(range(n))
        rng.shuffle(order)
    else:
        order = rng.sample(range(n), finds)
    # The finds' keys made before any timing, and before the memory base: a key
    # sliced from the blob inside the loop cost both stores the same ~0.8 us (a
    # random read of a blob of n keys, an allocation), nearly half of each find.
    hits = [blob[i * KEY_SIZE : (i + 1) * KEY_SIZE] for i in order]
    absent = [misses[i : i + KEY_SIZE] for i in range(0, finds * KEY_SIZE, KEY_SIZE)]
    del order, misses
    path = os.path.join(directory, "store")
    latencies = array.array("d", bytes(8 * n))  # allocated before the base is taken
    base = rss_anon_bytes()
    memory = PeakMemory()
    result: dict[str, Any] = {"store": peer.name, "n": n, "setting": peer.setting, "keys": keys}

    written = written_bytes()
    store = peer.open_a(path)
    add = store.add
    clock = time.perf_counter
    started = clock()
    if struct_value:
        for j, i in enumerate(range(0, n * KEY_SIZE, KEY_SIZE)):
            key = blob[i : i + KEY_SIZE]
            before = clock()
            add(key, {"level": j, "hash": key})
            latencies[j] = clock() - before
    else:
        for j, i in enumerate(range(0, n * KEY_SIZE, KEY_SIZE)):
            key = blob[i : i + KEY_SIZE]
            value = values[i : i + VALUE_SIZE]
            before = clock()
            add(key, value)
            latencies[j] = clock() - before
    result["add_us"] = (clock() - started) / n * 1e6
    started = clock()
    store.close()
    result["close_ms"] = (clock() - started) * 1e3
    # Bytes sent to storage by the adds, the merges and the close, over the bytes stored.
    result["write_amplification"] = (written_bytes() - written) / (n * (KEY_SIZE + VALUE_SIZE))
    slowest = heapq.nlargest(max(1, n // 1000), latencies)  # the slowest 0.1 %
    result["add_p999_us"] = slowest[-1] * 1e6
    result["add_max_ms"] = slowest[0] * 1e3
    del slowest

    started = clock()
    store = peer.open_a(path)
    result["reopen_ms"] = (clock() - started) * 1e3
    find = store.reader()
    started = clock()
    for key in hits:
        if find(key) is None:
            raise AssertionError(f"{peer.name}: a key was lost")
    result["find_hit_us"] = (clock() - started) / finds * 1e6
    find = store.reader()
    started = clock()
    for key in absent:
        if find(key) is not None:
            raise AssertionError(f"{peer.name}: found an absent key")
    result["find_miss_us"] = (clock() - started) / finds * 1e6
    del find
    store.close()
    result["peak_rss_over_base_mb"] = (memory.stop() - base) / 1e6
    result["disk_bytes"] = disk_usage(path)
    result["disk_over_raw"] = result["disk_bytes"] / (n * (KEY_SIZE + VALUE_SIZE))
    return result


HEADER_SIZE = 16
VALUE_SIZES = (100, 8192)


def run_b(slug: str, directory: str, n: int, seed: int) -> dict[str, Any]:
    """Workload B: n values of 100 B to 8 KiB with a 16-byte header."""
    peer = PEERS[slug]
    rng = random.Random(seed)
    keys = random_bytes(rng, KEY_SIZE * n)
    source = rng.randbytes(2 * VALUE_SIZES[1])
    sizes = array.array("I", (rng.randint(*VALUE_SIZES) for _ in range(n)))
    starts = array.array("I", (rng.randrange(VALUE_SIZES[1]) for _ in range(n)))
    order = list(range(n))
    rng.shuffle(order)
    path = os.path.join(directory, "store")
    base = rss_anon_bytes()
    memory = PeakMemory()
    result: dict[str, Any] = {"store": peer.name, "n": n, "setting": peer.setting}
    clock = time.perf_counter

    written = written_bytes()
    store = peer.open_b(path)
    append = store.append
    started = clock()
    for i in range(n):
        key = keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]
        append(key, source[starts[i] : starts[i] + sizes[i]], key[:HEADER_SIZE])
    result["append_us"] = (clock() - started) / n * 1e6
    started = clock()
    store.close()
    result["close_ms"] = (clock() - started) * 1e3
    raw = n * (KEY_SIZE + HEADER_SIZE) + sum(sizes)
    result["write_amplification"] = (written_bytes() - written) / raw

    started = clock()
    store = peer.open_b(path)
    result["reopen_ms"] = (clock() - started) * 1e3
    read = store.value_reader()
    started = clock()
    for i in order:
        pair = read(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE])
        if pair is None or len(pair[0]) != sizes[i]:  # type: ignore[index]
            raise AssertionError(f"{peer.name}: a value was lost")
    result["read_value_us"] = (clock() - started) / n * 1e6
    rng.shuffle(order)
    header = store.header_reader()
    started = clock()
    for i in order:
        key = keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]
        if header(key) != key[:HEADER_SIZE]:
            raise AssertionError(f"{peer.name}: a header was lost")
    result["read_header_us"] = (clock() - started) / n * 1e6
    del read, header
    store.close()
    result["peak_rss_over_base_mb"] = (memory.stop() - base) / 1e6
    result["disk_bytes"] = disk_usage(path)
    result["disk_over_raw"] = result["disk_bytes"] / raw
    return result


GC_KEEP = 0.10


def percentile(samples: array.array[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_gc(slug: str, directory: str, n: int, seed: int) -> dict[str, Any]:
    """GC: n blocks chained by predecessor hash; a background Chain GC keeps the last 10 %."""
    import construct as c

    from l2_stores import Chain, make_indexable

    store_class = make_indexable("bench_gc", c.Bytes(KEY_SIZE), c.Bytes(KEY_SIZE))
    rng = random.Random(seed)
    blob = random_bytes(rng, KEY_SIZE * n)
    keys = [blob[i : i + KEY_SIZE] for i in range(0, n * KEY_SIZE, KEY_SIZE)]
    path = os.path.join(directory, "store")
    result: dict[str, Any] = {"store": "l2_stores", "n": n, "setting": "Chain GC, background"}
    store = store_class.load(path)
    previous = bytes(KEY_SIZE)
    for key in keys:
        store.add(key, previous, flush=False)
        previous = key
    store.close()
    result["disk_before_bytes"] = disk_usage(path)
    kept = max(1, int(n * GC_KEEP))
    stop = keys[n - kept]

    store = store_class.load(path)
    find = store.find
    clock = time.perf_counter
    probes = [keys[rng.randrange(n)] for _ in range(200_000)]

    def find_latencies(until: Callable[[], bool], limit: int = 1 << 62) -> array.array[float]:
        samples: array.array[float] = array.array("d")
        while len(samples) < limit:
            for key in probes:
                before = clock()
                find(key)
                samples.append(clock() - before)
                if until():
                    return samples
        return samples

    quiet = find_latencies(lambda: False, limit=len(probes))
    result["find_median_idle_us"] = percentile(quiet, 0.5) * 1e6
    result["find_p99_idle_us"] = percentile(quiet, 0.99) * 1e6

    during: array.array[float] = array.array("d")
    gc_started = threading.Event()

    def reader() -> None:
        gc_started.wait()
        during.extend(find_latencies(store.is_gc_finished))

    thread = threading.Thread(target=reader)
    thread.start()
    started = clock()
    store.gc(Chain(keys[-1], lambda key, value: None if key == stop else value))
    gc_started.set()
    store.wait_gc_completion()
    result["gc_s"] = clock() - started
    thread.join()
    result["finds_during_gc"] = len(during)
    result["find_median_gc_us"] = percentile(during, 0.5) * 1e6
    result["find_p99_gc_us"] = percentile(during, 0.99) * 1e6
    result["find_max_gc_ms"] = max(during, default=0.0) * 1e3
    if sum(1 for _ in store.items()) != kept:
        raise AssertionError("the GC kept the wrong number of bindings")
    store.close()
    result["disk_after_bytes"] = disk_usage(path)
    return result


AIO_VALUE_SIZE = 1024


def run_aio(slug: str, directory: str, n: int, seed: int) -> dict[str, Any]:
    """Workload AIO: the same operations through the synchronous and the asyncio faces."""
    import asyncio

    import construct as c

    from l2_stores import aio, make_indexable, make_indexed_file

    peer = PEERS[slug]
    rng = random.Random(seed)
    keys = [rng.randbytes(KEY_SIZE) for _ in range(n)]
    misses = [rng.randbytes(KEY_SIZE) for _ in range(n)]
    files = n // 4
    value = rng.randbytes(AIO_VALUE_SIZE)
    header = bytes(HEADER_SIZE)
    indexable = make_indexable("bench_aio", c.Bytes(KEY_SIZE), c.Bytes(VALUE_SIZE))
    indexed = make_indexed_file("bench_aio_b", c.Bytes(KEY_SIZE), c.GreedyBytes, c.Bytes(16))
    result: dict[str, Any] = {"store": peer.name, "n": n, "setting": peer.setting}
    clock = time.perf_counter

    def per_op(started: float, count: int) -> float:
        return (clock() - started) / count * 1e6

    if slug == "l2_stores":
        with indexable.load(os.path.join(directory, "a")) as store:
            started = clock()
            for key in keys:
                store.add(key, key)
            result["add_us"] = per_op(started, n)
            started = clock()
            for key in keys:
                store.find(key)
            result["find_hit_us"] = per_op(started, n)
            started = clock()
            for key in misses:
                store.find(key)
            result["find_miss_us"] = per_op(started, n)
        with indexed.load(os.path.join(directory, "b")) as file:
            started = clock()
            for key in keys[:files]:
                file.append(key, value, header)
            result["append_us"] = per_op(started, files)
            started = clock()
            for key in keys[:files]:
                file.header(key)
            result["read_header_us"] = per_op(started, files)
            started = clock()
            for key in keys[:files]:
                file.read(key)
            result["read_value_us"] = per_op(started, files)
        return result

    async def run() -> None:
        async with aio.open(indexable, os.path.join(directory, "a")) as store:
            started = clock()
            for key in keys:
                await store.add(key, key)
            result["add_us"] = per_op(started, n)
            started = clock()
            for key in keys:
                await store.find(key)
            result["find_hit_us"] = per_op(started, n)
            started = clock()
            for key in misses:
                await store.find(key)
            result["find_miss_us"] = per_op(started, n)
        async with aio.open(indexed, os.path.join(directory, "b")) as file:
            started = clock()
            for key in keys[:files]:
                await file.append(key, value, header)
            result["append_us"] = per_op(started, files)
            started = clock()
            for key in keys[:files]:
                await file.header(key)
            result["read_header_us"] = per_op(started, files)
            started = clock()
            for key in keys[:files]:
                await file.read(key)
            result["read_value_us"] = per_op(started, files)

    asyncio.run(run())
    return result


def run_o(slug: str, directory: str, n: int, seed: int, keys: str = "sequential") -> dict[str, Any]:
    """Workload O (order): N bindings loaded, closed and reopened; then a full ordered
    scan, seeks to random keys, the last 100 bindings, and the exact count.

    ``keys``: ``sequential`` (a big-endian counter, as levels) or ``random``.
    """
    peer = PEERS[slug]
    rng = random.Random(seed)
    blob = sequential_keys(0, n) if keys == "sequential" else random_bytes(rng, KEY_SIZE * n)
    path = os.path.join(directory, "store")
    result: dict[str, Any] = {"store": peer.name, "n": n, "setting": peer.setting, "keys": keys}
    store = peer.open_o(path)
    step = 1_000_000
    for at in range(0, n, step):
        chunk = blob[at * KEY_SIZE : min(n, at + step) * KEY_SIZE]
        values = random_bytes(rng, len(chunk))  # not the keys again (see run_a)
        pairs = [
            (chunk[i : i + KEY_SIZE], values[i : i + VALUE_SIZE])
            for i in range(0, len(chunk), KEY_SIZE)
        ]
        if keys == "random":
            rng.shuffle(pairs)
        store.load(pairs)
        del pairs
    store.close()
    clock = time.perf_counter
    store = peer.open_o(path)
    base = rss_anon_bytes()
    memory = PeakMemory()
    started = clock()
    seen = sum(1 for _ in store.scan())
    result["scan_us"] = (clock() - started) / n * 1e6
    result["scan_rss_mb"] = (memory.stop() - base) / 1e6
    if seen != n:
        raise AssertionError(f"{peer.name}: the scan saw {seen} of {n} bindings")
    seeks = min(n, 100_000)
    starts = [blob[i * KEY_SIZE : (i + 1) * KEY_SIZE] for i in rng.sample(range(n), seeks)]
    seek = store.seek
    started = clock()
    for key in starts:
        if seek(key) is None:
            raise AssertionError(f"{peer.name}: a seek found nothing")
    result["seek_us"] = (clock() - started) / seeks * 1e6
    rounds = 100
    started = clock()
    for _ in range(rounds):
        found = store.last(100)
    result["last_100_us"] = (clock() - started) / rounds * 1e6
    if len(found) != min(n, 100) or found[0][0] != max(found)[0]:
        raise AssertionError(f"{peer.name}: the last 100 are not the highest keys, descending")
    started = clock()
    counted = store.count()
    result["count_ms"] = None if counted is None else (clock() - started) * 1e3
    if counted is not None and counted != n:
        raise AssertionError(f"{peer.name}: counted {counted} of {n}")
    store.close()
    return result


RUNNERS: dict[str, Callable[[str, str, int, int], dict[str, Any]]] = {
    "A": run_a,
    "B": run_b,
    "GC": run_gc,
    "AIO": run_aio,
    "O": run_o,
}
WORKLOADS = {
    "A": [
        "l2_stores",
        "l2_stores_struct",
        "lmdb",
        "rocksdict",
        "sqlite3",
        "diskcache",
        "dbm",
        "dict",
        "raw",
    ],
    "B": ["l2_stores", "lmdb", "rocksdict", "sqlite3", "diskcache", "dbm", "dict", "raw"],
    "GC": ["l2_stores"],
    "AIO": ["l2_stores", "l2_stores_aio"],
    "O": ["l2_stores", "lmdb", "rocksdict"],
}
DEFAULT_N = {"A": 1_000_000, "B": 100_000, "GC": 1_000_000, "AIO": 400_000, "O": 1_000_000}
TITLES = {
    "A": "random 32-byte keys -> 32-byte values (A' = the l2_stores (Struct) row)",
    "B": "32-byte keys -> values of 100 B to 8 KiB with a 16-byte header",
    "GC": "blocks chained by predecessor hash, a background Chain GC keeping the last 10 %",
    "AIO": "A's operations (and N/4 1 KiB appends) through the sync and the asyncio faces",
    "O": "32-byte keys (a counter, or random with --keys random): scan, seek, last 100, count",
}

COLUMNS_A = [
    ("add_us", "add µs", "{:.2f}"),
    ("add_p999_us", "add p99.9 µs", "{:.0f}"),
    ("add_max_ms", "add max ms", "{:.1f}"),
    ("close_ms", "close ms", "{:.1f}"),
    ("reopen_ms", "reopen ms", "{:.1f}"),
    ("find_hit_us", "hit µs", "{:.2f}"),
    ("find_miss_us", "miss µs", "{:.2f}"),
    ("peak_rss_over_base_mb", "RSS+ MB", "{:.1f}"),
    ("disk_bytes", "disk MB", "{:.1f}"),
    ("disk_over_raw", "disk/raw", "{:.2f}"),
    ("write_amplification", "write amp", "{:.1f}"),
]
COLUMNS_B = [
    ("append_us", "append µs", "{:.2f}"),
    ("close_ms", "close ms", "{:.1f}"),
    ("reopen_ms", "reopen ms", "{:.1f}"),
    ("read_value_us", "read value µs", "{:.2f}"),
    ("read_header_us", "read header µs", "{:.2f}"),
    ("peak_rss_over_base_mb", "RSS+ MB", "{:.1f}"),
    ("disk_bytes", "disk MB", "{:.1f}"),
    ("disk_over_raw", "disk/raw", "{:.2f}"),
    ("write_amplification", "write amp", "{:.1f}"),
]
COLUMNS_GC = [
    ("gc_s", "GC s", "{:.2f}"),
    ("find_median_idle_us", "find med idle µs", "{:.2f}"),
    ("find_p99_idle_us", "find p99 idle µs", "{:.2f}"),
    ("finds_during_gc", "finds in GC", "{}"),
    ("find_median_gc_us", "find med GC µs", "{:.2f}"),
    ("find_p99_gc_us", "find p99 GC µs", "{:.1f}"),
    ("find_max_gc_ms", "find max GC ms", "{:.1f}"),
    ("disk_before_bytes", "disk before MB", "{:.1f}"),
    ("disk_after_bytes", "disk after MB", "{:.1f}"),
]
COLUMNS_AIO = [
    ("add_us", "add µs", "{:.2f}"),
    ("find_hit_us", "hit µs", "{:.2f}"),
    ("find_miss_us", "miss µs", "{:.2f}"),
    ("append_us", "append µs", "{:.2f}"),
    ("read_header_us", "read header µs", "{:.2f}"),
    ("read_value_us", "read value µs", "{:.2f}"),
]
COLUMNS_O = [
    ("scan_us", "scan µs/binding", "{:.3f}"),
    ("scan_rss_mb", "scan RSS+ MB", "{:.1f}"),
    ("seek_us", "seek µs", "{:.2f}"),
    ("last_100_us", "last 100 µs", "{:.0f}"),
    ("count_ms", "count ms", "{:.2f}"),
]
COLUMNS = {"A": COLUMNS_A, "B": COLUMNS_B, "GC": COLUMNS_GC, "AIO": COLUMNS_AIO, "O": COLUMNS_O}

# The targets of issue 5: (workload, l2_stores row, figure, peer row or None, bound).
# With a peer, the bound is on the ratio l2_stores / peer; without, on the figure.
TARGETS: list[tuple[str, str, str, str | None, float]] = [
    ("A", "l2_stores", "add_us", "rocksdict", 0.5),
    ("A", "l2_stores", "add_us", "lmdb", 0.3),
    ("A", "l2_stores", "add_us", "sqlite3", 0.15),
    ("A", "l2_stores", "find_hit_us", "lmdb", 1.5),
    ("A", "l2_stores", "find_hit_us", "rocksdict", 0.3),
    ("A", "l2_stores", "find_hit_us", "sqlite3", 0.15),
    ("A", "l2_stores", "find_miss_us", "lmdb", 1.5),
    ("A", "l2_stores", "find_miss_us", "rocksdict", 0.3),
    ("A", "l2_stores", "find_miss_us", "sqlite3", 0.15),
    ("A", "l2_stores", "add_p999_us", None, 1000.0),
    ("A", "l2_stores", "add_max_ms", None, 50.0),
    ("A", "l2_stores", "reopen_ms", None, 10.0),
    ("A", "l2_stores", "peak_rss_over_base_mb", None, 32.0),
    ("A", "l2_stores", "disk_over_raw", None, 1.3),
    ("A", "l2_stores_struct", "add_us", "l2_stores", 1.3),
    ("A", "l2_stores_struct", "find_hit_us", "l2_stores", 1.3),
    ("B", "l2_stores", "append_us", "lmdb", 0.5),
    ("B", "l2_stores", "append_us", "rocksdict", 0.5),
    ("B", "l2_stores", "read_value_us", "lmdb", 1.5),
    ("B", "l2_stores", "read_header_us", "lmdb", 1.5),
    ("B", "l2_stores", "reopen_ms", None, 10.0),
    ("GC", "l2_stores", "find_p99_gc_us", None, 2000.0),
    # issue 7: asyncio / sync, for operations that complete on the loop
    *[("AIO", "l2_stores_aio", figure, "l2_stores", 2.0) for figure, _, _ in COLUMNS_AIO],
    # issue 24: order
    ("O", "l2_stores", "scan_us", "lmdb", 1.0),
    ("O", "l2_stores", "scan_us", "rocksdict", 0.5),
    ("O", "l2_stores", "seek_us", "lmdb", 1.0),
    ("O", "l2_stores", "last_100_us", None, 100.0),
    ("O", "l2_stores", "count_ms", None, 10.0),
    ("O", "l2_stores", "scan_rss_mb", None, 32.0),
]


# The targets of issue 23 (the engine at 10M bindings and more), printed from 10M on.
TARGETS_LARGE: list[tuple[str, str, str, str | None, float]] = [
    ("A", "l2_stores", "add_us", "rocksdict", 0.5),
    ("A", "l2_stores", "find_hit_us", "lmdb", 0.5),
    ("A", "l2_stores", "find_miss_us", "lmdb", 0.5),
    ("A", "l2_stores", "write_amplification", "rocksdict", 1.0),
    ("A", "l2_stores", "write_amplification", None, 10.0),
    ("A", "l2_stores", "peak_rss_over_base_mb", None, 32.0),
    ("A", "l2_stores", "reopen_ms", None, 10.0),
    ("A", "l2_stores", "add_p999_us", None, 1000.0),
    ("A", "l2_stores", "add_max_ms", None, 50.0),
]
LARGE = 10_000_000


def print_table(results: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    header = ["store", *[title for _, title, _ in columns]]
    rows = []
    for result in results:
        row = [result["store"]]
        for key, _, fmt in columns:
            in_megabytes = key.startswith("disk_") and key.endswith("bytes")
            value = result[key] / 1e6 if in_megabytes else result[key]
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))


def print_targets(workload: str, by_slug: dict[str, dict[str, Any]], n: int = 0) -> None:
    lines = []
    for name, slug, figure, peer, bound in (
        TARGETS_LARGE if n >= LARGE and workload == "A" else TARGETS
    ):
        if name != workload or slug not in by_slug or (peer is not None and peer not in by_slug):
            continue
        value = by_slug[slug][figure]
        if value is None or (peer is not None and by_slug[peer][figure] is None):
            continue
        if peer is None:
            measured, what = value, f"{figure} of {slug}"
        else:
            measured, what = value / by_slug[peer][figure], f"{figure}: {slug} / {peer}"
        verdict = "met" if measured <= bound else "NOT MET"
        lines.append(f"  {what:<44} {measured:10.3f}  (target <= {bound:g})  {verdict}")
    if lines:
        print("targets:")
        print("\n".join(lines))


def run_child(
    workload: str,
    slug: str,
    n: int,
    seed: int,
    parent: str | None,
    keys: str = "random",
    finds: int | None = None,
) -> dict[str, Any]:
    # Every store starts with no dirty pages left by the one before it.
    os.sync()
    scratch = tempfile.mkdtemp(prefix=f"bench-{workload}-{slug}-", dir=parent)
    try:
        completed = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                f"{workload}:{slug}",
                "--n",
                str(n),
                "--seed",
                str(seed),
                "--dir",
                scratch,
                "--keys",
                keys,
                *(["--finds", str(finds)] if finds is not None else []),
            ],
            capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if completed.returncode != 0:
        return {"store": PEERS[slug].name, "error": completed.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--n", type=int, default=None, help="bindings (default per workload)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--stores", default=None, help="comma-separated stores (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    parser.add_argument(
        "--keys",
        choices=["random", "sequential"],
        default=None,
        help="random keys, or a counter (A: added in order); default: A random, O a counter",
    )
    parser.add_argument(
        "--finds",
        type=int,
        default=None,
        help="workload A's hits and misses, each (default --n; fewer keep 30M+ runs short)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, slug = args.child.split(":", 1)
        if workload == "A":
            print(json.dumps(run_a(slug, args.dir, args.n, args.seed, args.keys, args.finds)))
        elif workload == "O":
            print(json.dumps(run_o(slug, args.dir, args.n, args.seed, args.keys)))
        else:
            print(json.dumps(RUNNERS[workload](slug, args.dir, args.n, args.seed)))
        return
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    default_keys = {"O": "sequential"}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {platform.platform()}")
    for workload in workloads:
        n = args.n or DEFAULT_N[workload]
        slugs = WORKLOADS[workload]
        if args.stores:
            slugs = [slug for slug in args.stores.split(",") if slug in slugs]
        keys = args.keys or default_keys.get(workload, "random")
        results = {
            slug: run_child(workload, slug, n, args.seed, args.dir, keys, args.finds)
            for slug in slugs
        }
        if args.json:
            for slug, result in results.items():
                print(json.dumps({"workload": workload, "slug": slug, **result}))
            continue
        title = TITLES[workload]
        if workload == "A" and keys == "sequential":
            title = title.replace("random", "sequential (a counter, in order)")
        if workload == "O":
            order = "a counter" if keys == "sequential" else "random"
            title = f"32-byte keys ({order}): scan, seek, last 100, count"
        print(f"\nworkload {workload}: {n:,} {title}")
        good = {slug: r for slug, r in results.items() if "error" not in r}
        print_table(list(good.values()), COLUMNS[workload])
        for slug, result in results.items():
            if "error" in result:
                print(f"  {slug}: failed: {result['error']}")
        print_targets(workload, good, n)
        print("settings:")
        for result in good.values():
            print(f"  {result['store']}: {result['setting']}")


if __name__ == "__main__":
    main()
