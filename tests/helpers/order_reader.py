"""Child process for tests/test_order.py: a READ_ONLY process iterating beside a writer.

Usage: order_reader.py PATH

Loads PATH (``order_levels``: Int32ub levels to Bytes(4)) READ_ONLY, prints
``ready``, then for each stdin line prints one JSON line:

    iter NAME [reverse]   a new iterator over items() now: {"ok": NAME}
    step NAME COUNT       its next COUNT pairs (fewer at its end): [[level, vhex], ...]
    sync                  sync(): {"ok": "sync"}
    len                   {"len": len(store)}
    quit                  closes the store and exits
"""

import json
import sys
from collections.abc import Iterator
from itertools import islice
from typing import Any

import construct as c

from l2_stores import Mode, make_indexable_removable

Levels = make_indexable_removable("order_levels", c.Int32ub, c.Bytes(4))


def main() -> None:
    store = Levels.load(sys.argv[1], Mode.READ_ONLY)
    iterators: dict[str, Iterator[tuple[Any, bytes]]] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        answer: Any
        if command == "iter":
            iterators[args[0]] = store.items(reverse=args[1:] == ["reverse"])
            answer = {"ok": args[0]}
        elif command == "step":
            pairs = islice(iterators[args[0]], int(args[1]))
            answer = [[level, value.hex()] for level, value in pairs]
        elif command == "sync":
            store.sync()
            answer = {"ok": "sync"}
        elif command == "len":
            answer = {"len": len(store)}
        else:
            break
        print(json.dumps(answer), flush=True)
    store.close()


if __name__ == "__main__":
    main()
