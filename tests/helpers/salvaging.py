"""A child that salvages ``argv[1]`` into ``argv[2]``, saying each rename, slowly enough
for a kill to land anywhere (tests/test_salvage.py)."""

from __future__ import annotations

import os
import sys
import time

from l2_stores import salvage
from l2_stores.engine import filesystem


class Slow(filesystem.OsFileSystem):
    """Widens the window of the kills, and says each rename."""

    def fsync(self, fd: int) -> None:
        time.sleep(0.01)
        super().fsync(fd)

    def rename(self, source: str, target: str) -> None:
        time.sleep(0.05)
        super().rename(source, target)
        print("renamed", os.path.basename(target), flush=True)


if __name__ == "__main__":
    print("salvaging", flush=True)
    with filesystem.installed(Slow()):
        salvage(sys.argv[1], sys.argv[2])
    print("done", flush=True)
