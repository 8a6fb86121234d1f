"""Child process for tests/test_processes.py: hold a store open for writing.

Usage: holder.py KIND PATH   (KIND: ``indexable`` or ``singleton``)

Loads PATH READ_WRITE, prints ``ready``, then on the stdin line ``close``
closes the store, prints ``closed`` and exits; on EOF it exits.
"""

import sys

import construct

from l2_stores import Mode, make_indexable, make_singleton


def main() -> None:
    kind, path = sys.argv[1:3]
    if kind == "singleton":
        cls = make_singleton("held_singleton", construct.Bytes(32))
    else:
        cls = make_indexable("held_indexable", construct.Bytes(32), construct.Bytes(32))
    store = cls.load(path, Mode.READ_WRITE)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "close":
            store.close()
            print("closed", flush=True)
            return


if __name__ == "__main__":
    main()
