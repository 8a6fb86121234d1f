"""Where the time of N adds goes: the adds, and the merges' plan, fsync and waits.

    python bench/profile_add.py [N]                          # with the C accelerator if built
    L2_STORES_PURE_PYTHON=1 python bench/profile_add.py [N]  # the pure-Python paths

Wraps the engine's functions in timers (the merges run in their own
thread, so their times overlap the adds'); not part of the tests.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import construct

from l2_stores import make_indexable
from l2_stores.engine import accel, index, merge

totals: dict[str, float] = {"plan (Python merges)": 0.0, "fsync": 0.0, "writer waits": 0.0}
counts = {"merges": 0}


def timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return wrapper


def counted(function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts["merges"] += 1
        return function(*args, **kwargs)

    return wrapper


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    merge._plan = timed("plan (Python merges)", merge._plan)  # type: ignore[assignment]
    os.fsync = timed("fsync", os.fsync)
    index.merge = counted(index.merge)  # type: ignore[assignment]
    index.Index.reserve = timed("writer waits", index.Index.reserve)  # type: ignore[method-assign]
    index.Index._make_room = timed("writer waits", index.Index._make_room)  # type: ignore[method-assign]
    store_class = make_indexable("profile", construct.Bytes(32), construct.Bytes(32))
    rng = random.Random(1)
    keys = [rng.randbytes(32) for _ in range(n)]
    directory = tempfile.mkdtemp(prefix="l2-profile-")
    try:
        store = store_class.load(directory)
        start = time.perf_counter()
        for key in keys:
            store.add(key, key)
        elapsed = time.perf_counter() - start
        store.close()
    finally:
        shutil.rmtree(directory)
    print(f"accelerator: {'yes' if accel.AcceleratedMerge else 'no'}")
    print(f"{n:,} adds: {elapsed:.2f} s, {1e6 * elapsed / n:.2f} µs per add")
    print(f"merges: {counts['merges']}")
    for label, total in totals.items():
        print(f"{label}: {total:.3f} s")


if __name__ == "__main__":
    main()
