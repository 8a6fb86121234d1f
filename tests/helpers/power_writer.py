"""Child process for the power-loss tests: run a workload, over the power-loss layer or not.

Usage: power_writer.py ROOT STATE KIND SEED COUNT BUFFER fsync|no-fsync KILL_AT

With a STATE directory, installs ``PowerLossFileSystem(ROOT, STATE)`` and
kills itself with SIGKILL just before the layer's call number KILL_AT; with
STATE ``-``, runs on the file system as it is (LazyFS, say) until the parent
kills it. Loads the store of KIND under ROOT, prints ``ready``, then runs
``operations(KIND, SEED, COUNT)``, printing ``begin i`` and ``ack i``
(flushed at once) around each. If the workload ends first, the store is
closed, ``done`` printed, and the child exits normally.
"""

import contextlib
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
            # when no other thread is half-way through a recorded operation
            assert power_loss is not None  # (the hook is the layer's)
            with power_loss.still():
                os.kill(os.getpid(), signal.SIGKILL)

    power_loss = PowerLossFileSystem(root, state, hook) if state != "-" else None
    layer = contextlib.nullcontext() if power_loss is None else filesystem.installed(power_loss)
    options: dict[str, object] = {"fsync": fsync}
    if kind != "singleton":
        options["index_buffer_size"] = int(buffer)
    with layer:
        store = load(kind, store_path(root, kind), **options)
        report("ready")
        store = run(
            store,
            operations(kind, int(seed), int(count)),
            Progress(kind, fsync),
            report,
            lambda: load(kind, store_path(root, kind), **options),
        )
        store.close()
    report("done")


if __name__ == "__main__":
    main()
