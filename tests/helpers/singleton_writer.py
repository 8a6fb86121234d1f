"""Child process for tests/test_crash.py: rewrite a singleton until killed.

Usage: singleton_writer.py PATH SEED N_OPS

The singleton holds GreedyBytes. Value number i is ``value_bytes(i)`` (also
computed by the test): a self-describing prefix and a seeded body of varying
length, so a mix of two values is recognisable. Prints, flushing each line:
    ready / begin write <i> / ack write <i> / begin delete / ack delete / done
"""

import random
import sys

import construct

from l2_stores import Mode, make_singleton


def value_bytes(number: int) -> bytes:
    body = random.Random(number).randbytes(random.Random(-number).randrange(0, 9000))
    return f"value {number} len {len(body)}|".encode() + body


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    path, seed, n_ops = sys.argv[1:4]
    rng = random.Random(seed)
    cls = make_singleton("crash_singleton", construct.GreedyBytes)
    store = cls.load(path, Mode.READ_WRITE)
    emit("ready")
    for _ in range(int(n_ops)):
        if rng.random() < 0.1:
            emit("begin delete")
            store.delete()
            emit("ack delete")
        else:
            number = rng.randrange(1, 1 << 30)
            emit(f"begin write {number}")
            store.write(value_bytes(number))
            emit(f"ack write {number}")
    emit("done")
    sys.stdin.read()


if __name__ == "__main__":
    main()
