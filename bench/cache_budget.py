"""Workload B's append against the indexed file's cache budget.

    python bench/cache_budget.py [BYTES ...]

Appends workload B's 100,000 values (100 B to 8 KiB, a 16-byte header) to a
fresh store per run, with ``cache_bytes`` set to each BYTES in turn (default:
0, 256 KiB, 512 KiB, 1 MiB, 2 MiB and no limit), five rounds in alternation,
and prints the microseconds per append of each run. Not a test.
"""

from __future__ import annotations

import array
import random
import shutil
import sys
import tempfile
import time

import construct

from l2_stores import make_indexed_file

N = 100_000
ROUNDS = 5
DEFAULT_BUDGETS = [0, 256 << 10, 512 << 10, 1 << 20, 2 << 20, sys.maxsize]


def main() -> None:
    budgets = [int(arg) for arg in sys.argv[1:]] or DEFAULT_BUDGETS
    rng = random.Random(7)
    keys = rng.randbytes(32 * N)
    source = rng.randbytes(2 * 8192)
    sizes = array.array("I", (rng.randint(100, 8192) for _ in range(N)))
    starts = array.array("I", (rng.randrange(8192) for _ in range(N)))
    cls = make_indexed_file(
        "bench_b", construct.Bytes(32), construct.GreedyBytes, construct.Bytes(16)
    )

    def run(budget: int) -> float:
        directory = tempfile.mkdtemp(prefix="l2-cache-budget-")
        try:
            with cls.load(directory, cache_bytes=budget) as store:
                append = store.append
                started = time.perf_counter()
                for i in range(N):
                    key = keys[i * 32 : (i + 1) * 32]
                    append(key, source[starts[i] : starts[i] + sizes[i]], key[:16])
                return (time.perf_counter() - started) / N * 1e6
        finally:
            shutil.rmtree(directory)

    results: dict[int, list[float]] = {budget: [] for budget in budgets}
    for _ in range(ROUNDS):
        for budget in budgets:
            results[budget].append(run(budget))
    for budget, runs in results.items():
        label = "no limit" if budget == sys.maxsize else f"{budget:,} B"
        print(f"{label:>14}  " + " ".join(f"{us:.2f}" for us in runs) + "  µs per append")


if __name__ == "__main__":
    main()
