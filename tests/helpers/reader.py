"""Child process for tests/test_processes.py: a READ_ONLY reader beside a writer.

Usage: reader.py KIND PATH   (KIND: ``plain``, ``removable`` or ``singleton``)

Loads PATH READ_ONLY and prints one JSON line of what it sees: for an
indexable store ``{"items": [[khex, vhex], ...]}`` sorted, for a singleton
``{"value": hex-or-null}``. Then for each stdin line: ``sync`` calls sync()
and prints again, ``show`` prints again without syncing, ``quit`` closes the
store and exits.
"""

import json
import sys

import construct

from l2_stores import Mode, make_indexable, make_indexable_removable, make_singleton


def main() -> None:
    kind, path = sys.argv[1:3]
    if kind == "singleton":
        cls = make_singleton("reader_singleton", construct.Bytes(32))
    elif kind == "removable":
        cls = make_indexable_removable("reader", construct.Bytes(32), construct.Bytes(32))
    else:
        cls = make_indexable("reader", construct.Bytes(32), construct.Bytes(32))
    store = cls.load(path, Mode.READ_ONLY)

    def show() -> None:
        if kind == "singleton":
            value = store.read()
            print(json.dumps({"value": None if value is None else value.hex()}), flush=True)
            return
        items = sorted([k.hex(), v.hex()] for k, v in store.items())
        # every key found through find() too, not only through items()
        for khex, vhex in items:
            found = store.find(bytes.fromhex(khex))
            if found is None or found.hex() != vhex:
                print(json.dumps({"error": f"find({khex}) gave {found!r}"}), flush=True)
                return
        print(json.dumps({"items": items}), flush=True)

    show()
    for line in sys.stdin:
        command = line.strip()
        if command == "sync":
            store.sync()
            show()
        elif command == "show":
            show()
        elif command == "quit":
            break
    store.close()


if __name__ == "__main__":
    main()
