"""File systems for tests, installed with ``l2_stores.engine.filesystem.installed``.

- :class:`RecordingFileSystem` records the calls the stores make.
- :class:`FailingFileSystem` makes named calls fail, as a full disk would.
- ``power_loss`` (see ``power_loss.py`` beside this module) models what a
  power loss leaves.
"""

from __future__ import annotations

import errno
import os
import threading

from l2_stores.engine.filesystem import OsFileSystem


class RecordingFileSystem(OsFileSystem):
    """The real file system, recording ``(call, path or file name)`` for each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.threads: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _record(self, call: str, what: str) -> None:
        with self._lock:
            self.calls.append((call, what))
            self.threads.append((call, threading.current_thread().name))

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        self._record("open", os.path.basename(path))
        return super().open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        self._record("fsync", "")
        super().fsync(fd)

    def fsync_directory(self, path: str) -> None:
        self._record("fsync_directory", os.path.basename(path))
        super().fsync_directory(path)

    def rename(self, source: str, target: str) -> None:
        self._record("rename", os.path.basename(target))
        super().rename(source, target)

    def unlink(self, path: str) -> None:
        self._record("unlink", os.path.basename(path))
        super().unlink(path)

    def named(self, call: str) -> list[str]:
        """What each call of that name was given, in order."""
        with self._lock:
            return [what for name, what in self.calls if name == call]


class FailingFileSystem(OsFileSystem):
    """The real file system whose named calls raise ENOSPC while ``failures`` is positive,
    after letting ``passes`` of them through."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.failures = 0
        self.passes = 0

    def _maybe_fail(self, name: str) -> None:
        if name in self.names and self.failures > 0:
            if self.passes > 0:
                self.passes -= 1
                return
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        self._maybe_fail("open")
        return super().open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def fsync_directory(self, path: str) -> None:
        self._maybe_fail("fsync_directory")
        super().fsync_directory(path)

    def rename(self, source: str, target: str) -> None:
        self._maybe_fail("rename")
        super().rename(source, target)

    def unlink(self, path: str) -> None:
        self._maybe_fail("unlink")
        super().unlink(path)
