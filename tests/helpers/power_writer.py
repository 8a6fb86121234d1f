"""Child process for tests/test_power_loss.py: run a workload over the power-loss layer.

Usage: power_writer.py ROOT STATE KIND SEED COUNT BUFFER fsync|no-fsync KILL_AT

Installs ``PowerLossFileSystem(ROOT, STATE)``, loads the store of KIND under
ROOT, runs ``operations(KIND, SEED, COUNT)``, printing ``begin i`` and ``ack
i`` (flushed at once) around each, and kills itself with SIGKILL just before
the layer's call number KILL_AT. If the workload ends first, the store is
closed and the child exits normally.
"""

import os
import signal
import sys

from power_loss import PowerLossFileSystem
from power_workload import Progress, load, operations, run, store_path

from l2_stores.engine import filesystem


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    root, state, kind, seed, count, buffer, fsync_word, kill_at = sys.argv[1:9]
    fsync = fsync_word == "fsync"

    def hook(call: str, number: int) -> None:
        if number >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    fs = PowerLossFileSystem(root, state, hook)
    options = {} if kind == "singleton" else {"index_buffer_size": int(buffer), "fsync": fsync}
    with filesystem.installed(fs):
        store = load(kind, store_path(root, kind), **options)
        run(store, operations(kind, int(seed), int(count)), Progress(kind, fsync), report)
        store.close()


if __name__ == "__main__":
    main()
