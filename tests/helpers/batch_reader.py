"""Child process for tests/test_batches.py: READ_ONLY snapshots beside a writer.

Usage: batch_reader.py DIR SECONDS

Loads batch_writer's four stores READ_ONLY and, for SECONDS, takes snapshots of
them and checks that each shows whole batches: the head's level is the number of
levels and of blocks, the last three messages are there. Prints ``ok N H`` (N
snapshots, H distinct heads seen) or ``wrong ...`` and exits.
"""

import os
import sys
import time

import l2_stores
from l2_stores import Mode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batch_writer


def main() -> None:
    directory, seconds = sys.argv[1], float(sys.argv[2])
    classes = (batch_writer.Levels, batch_writer.Blocks, batch_writer.Messages, batch_writer.Head)
    names = ("levels", "blocks", "messages", "head")
    stores = [
        cls.load(os.path.join(directory, name), Mode.READ_ONLY)
        for cls, name in zip(classes, names, strict=True)
    ]
    count, heads = 0, set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with l2_stores.snapshot(*stores) as (levels, blocks, messages, head):
            written = head.read()
            top = written.level if written is not None else 0
            shown = (len(levels), len(blocks), sorted(messages.keys()))
            expected = (top, top, list(range(max(1, top - 2), top + 1)))
            if shown != expected:
                print(f"wrong: head {top}, shown {shown}", flush=True)
                return
            if top and blocks.header(batch_writer.level_hash(top)) != top:
                print(f"wrong: block {top} missing", flush=True)
                return
        count += 1
        heads.add(top)
    print(f"ok {count} {len(heads)}", flush=True)


if __name__ == "__main__":
    main()
