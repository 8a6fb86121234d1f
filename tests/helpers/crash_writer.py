"""Child process for tests/test_crash.py: write to an indexable store until killed.

Usage: crash_writer.py DIR SEED KIND BUFFER N_OPS FLUSH [fsync]

KIND is ``plain`` (make_indexable) or ``removable`` (make_indexable_removable),
both Bytes(32) -> Bytes(32). FLUSH is ``each`` (every op with flush=True) or
``batch:N`` (flush=False, then an explicit flush() every N ops). A last
argument ``fsync`` loads the store with fsync=True.

Prints, flushing stdout after each line:
    ready                        after the store is loaded
    begin add <khex> <vhex>      just before calling add
    ack add <khex> <vhex>        after add returned
    begin remove <khex> / ack remove <khex>
    begin flush / ack flush      around an explicit flush() (batch mode)
    done                         after N_OPS ops; then waits for stdin EOF
"""

import random
import sys

import construct

from l2_stores import Mode, make_indexable, make_indexable_removable

KEY = construct.Bytes(32)
VALUE = construct.Bytes(32)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    directory, seed, kind, buffer, n_ops, flush_mode = sys.argv[1:7]
    rng = random.Random(seed)
    if kind == "removable":
        cls = make_indexable_removable("crash_removable", KEY, VALUE)
    else:
        cls = make_indexable("crash_plain", KEY, VALUE)
    batch = 0
    if flush_mode.startswith("batch:"):
        batch = int(flush_mode.split(":", 1)[1])
    fsync = sys.argv[7:8] == ["fsync"]
    store = cls.load(directory, Mode.READ_WRITE, index_buffer_size=int(buffer), fsync=fsync)
    emit("ready")
    known = sorted(store.keys())
    for number in range(1, int(n_ops) + 1):
        roll = rng.random()
        if kind == "removable" and known and roll < 0.15:
            key = known.pop(rng.randrange(len(known)))
            emit(f"begin remove {key.hex()}")
            store.remove(key, flush=not batch)
            emit(f"ack remove {key.hex()}")
        else:
            if known and roll < 0.35:
                key = known[rng.randrange(len(known))]
            else:
                key = rng.randbytes(32)
                known.append(key)
            value = rng.randbytes(32)
            emit(f"begin add {key.hex()} {value.hex()}")
            store.add(key, value, flush=not batch)
            emit(f"ack add {key.hex()} {value.hex()}")
        if batch and number % batch == 0:
            emit("begin flush")
            store.flush()
            emit("ack flush")
    if batch:
        emit("begin flush")
        store.flush()
        emit("ack flush")
    emit("done")
    sys.stdin.read()  # wait to be killed


if __name__ == "__main__":
    main()
