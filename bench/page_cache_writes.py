"""How much writing 4 KiB into the page cache costs here, file after file.

    python bench/page_cache_writes.py [files]

Writes the same 100,000 values of 100 B to 8 KiB (B's sizes) with one
``os.pwrite`` each into ``files`` new files in a row (``os.sync()`` before
each), and prints the µs per write of each: the floor under an indexed
file's append, and how much it moves with the state of the page cache.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    rng = random.Random(1)
    source = rng.randbytes(16384)
    values = []
    for _ in range(100_000):
        size, start = rng.randint(100, 8192), rng.randrange(8192)
        values.append(source[start : start + size])
    directory = tempfile.mkdtemp(prefix="page-cache-")
    try:
        for number in range(files):
            os.sync()
            fd = os.open(os.path.join(directory, f"f{number}"), os.O_RDWR | os.O_CREAT)
            try:
                started, offset = time.perf_counter(), 0
                for value in values:
                    offset += os.pwrite(fd, value, offset)
                elapsed = time.perf_counter() - started
            finally:
                os.close(fd)
            print(f"file {number}: {elapsed / len(values) * 1e6:.2f} µs per pwrite")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
