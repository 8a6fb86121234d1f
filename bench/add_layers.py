"""The cost of one add, layer by layer, with no merge running.

    python bench/add_layers.py [N]

Times N adds through the store, then the same calls one layer down each
time (engine put, log append, the C framed write, a bare ``os.pwrite``),
best of three; the differences are what each layer adds. Not a test.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import construct

from l2_stores import make_indexable
from l2_stores.engine.framing import write_framed


def best_of_three(n: int, run: Callable[[], object]) -> float:
    """Microseconds per operation of the fastest of three runs of ``run``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rng = random.Random(1)
    keys = [rng.randbytes(32) for _ in range(n)]
    directory = tempfile.mkdtemp(prefix="add-layers-")
    cls = make_indexable("layers", construct.Bytes(32), construct.Bytes(32))
    store = cls.load(directory, index_buffer_size=10 * n)  # no merge
    engine = store._engine
    log = engine._log
    assert log is not None
    fd = os.open(os.path.join(directory, "raw"), os.O_RDWR | os.O_CREAT)
    record = bytes(1 + 32 + 32 + 4)

    def framed_writes() -> None:
        offset = 0
        for key in keys:
            offset += write_framed(fd, offset, b"\x01", key, key)

    def bare_pwrites() -> None:
        offset = 0
        for _ in keys:
            offset += os.pwrite(fd, record, offset)

    try:
        layers = [
            ("store.add", lambda: [store.add(key, key) for key in keys]),
            ("Index.put", lambda: [engine.put(key, key, flush=True) for key in keys]),
            ("LogWriter.append_set", lambda: [log.append_set(key, key, True) for key in keys]),
            ("write_framed", framed_writes),
            ("os.pwrite of 69 bytes", bare_pwrites),
            ("store.find (in the log)", lambda: [store.find(key) for key in keys]),
        ]
        for label, run in layers:
            print(f"{label:<26} {best_of_three(n, run):6.3f} µs")
    finally:
        os.close(fd)
        store.close()
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
