"""Child process for tests/test_cli.py: keep writing while snapshots are exported.

Usage: cli_concurrent_writer.py DIR [BATCH] [MAX]

Loads, READ_WRITE, under DIR: ``chain`` (indexable, Bytes(32) -> Bytes(32),
index_buffer_size 16, so merges keep happening), ``blocks`` (indexed file,
Bytes(32) -> GreedyBytes with an Int32ub header, index_buffer_size 16) and
``head`` (singleton Int64ub). Binding number i has key ``key(i)``, value
``value(key)`` in ``chain`` and ``payload(key)`` / ``header(key)`` in
``blocks``: everything derives from the counter, so a reader can tell a
binding that was written from one that never was.

Loop: add a batch of BATCH bindings to both stores with flush=False, flush
both, then write ``head`` = the number of bindings written so far. So when
``head`` reads h, bindings 0..h-1 are flushed in both stores. Stops after MAX
bindings (then idles) or at stdin EOF; then closes the stores.

Prints, flushing stdout: ``ready`` after the first batch is flushed and its
head written, ``stopped <count>`` after closing.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import construct

from l2_stores import Mode, make_indexable, make_indexed_file, make_singleton

BUFFER = 16

Chain = make_indexable("chain", construct.Bytes(32), construct.Bytes(32))
Blocks = make_indexed_file("blocks", construct.Bytes(32), construct.GreedyBytes, construct.Int32ub)
Head = make_singleton("head", construct.Int64ub)
STORES = {"chain": Chain, "blocks": Blocks, "head": Head}


def key(i: int) -> bytes:
    return hashlib.sha256(b"concurrent key %d" % i).digest()


def value(k: bytes) -> bytes:
    return hashlib.sha256(b"value of " + k).digest()


def payload(k: bytes) -> bytes:
    return k * (1 + k[0] % 5)


def header(k: bytes) -> int:
    return int.from_bytes(k[:4], "big")


def main() -> None:
    root = Path(sys.argv[1])
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    chain = Chain.load(root / "chain", Mode.READ_WRITE, index_buffer_size=BUFFER)
    blocks = Blocks.load(root / "blocks", Mode.READ_WRITE, index_buffer_size=BUFFER)
    head = Head.load(root / "head", Mode.READ_WRITE)
    count = 0
    while not stop.is_set():
        if count >= limit:
            stop.wait()
            break
        for i in range(count, count + batch):
            k = key(i)
            chain.add(k, value(k), flush=False)
            blocks.append(k, payload(k), header(k), flush=False)
        chain.flush()
        blocks.flush()
        count += batch
        head.write(count)
        if count == batch:
            print("ready", flush=True)
        time.sleep(0.002)  # leave the exports some room; not a timing assumption
    chain.close()
    blocks.close()
    head.close()
    print(f"stopped {count}", flush=True)


if __name__ == "__main__":
    main()
