"""Where 1M adds spend their time: a histogram of single-add latencies.

    python bench/add_latency.py [N] [--switch-interval S] [--merge-policy nice|batch]
                                [--log-cap-factor F]

Shows how much of the mean comes from slow adds (merges, waits), and lets
one change what might cause them: the GIL's switch interval, the merge
thread's scheduling, the log cap. Not a test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import construct

from l2_stores import make_indexable
from l2_stores.engine import index

EDGES_US = [0, 5, 10, 20, 50, 100, 1_000, 10_000, 1_000_000]


def schedule_merges(policy: str) -> None:
    """Run every merge thread under ``policy`` (nice 10, or SCHED_BATCH)."""
    worker = index.Index._run_merge

    def scheduled(self: index.Index, *args: Any, **kwargs: Any) -> None:
        if policy == "nice":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        else:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        worker(self, *args, **kwargs)

    index.Index._run_merge = scheduled  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--switch-interval", type=float, default=None)
    parser.add_argument("--merge-policy", choices=["nice", "batch"], default=None)
    parser.add_argument("--log-cap-factor", type=int, default=None)
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.merge_policy is not None:
        schedule_merges(args.merge_policy)
    if args.log_cap_factor is not None:
        index.LOG_CAP_FACTOR = args.log_cap_factor
    n = args.n
    rng = random.Random(1)
    keys = [rng.randbytes(32) for _ in range(n)]
    directory = tempfile.mkdtemp(prefix="add-latency-")
    store = make_indexable("latency", construct.Bytes(32), construct.Bytes(32)).load(directory)
    clock = time.perf_counter
    latencies = []
    try:
        started = clock()
        for key in keys:
            before = clock()
            store.add(key, key)
            latencies.append(clock() - before)
        total = clock() - started
    finally:
        store.close()
        shutil.rmtree(directory)
    latencies.sort()
    print(
        f"{n:,} adds: {total:.2f} s, mean {total / n * 1e6:.2f} µs, "
        f"median {latencies[n // 2] * 1e6:.2f} µs"
    )
    for low, high in itertools.pairwise(EDGES_US):
        chosen = [x for x in latencies if low <= x * 1e6 < high]
        print(f"  [{low:>9,} µs, {high:>9,} µs): {len(chosen):8d} adds, {sum(chosen):7.3f} s")


if __name__ == "__main__":
    main()
