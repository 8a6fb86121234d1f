"""A helper script run as a child process, its stdout read line by line in a thread."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

#: Seconds a test waits for a child before it calls it stuck.
DEADLOCK_GUARD = 60.0


class Child:
    """A helper script run with ``sys.executable``; its stdout is read in a thread."""

    def __init__(self, script: Path, args: list[object], stderr_path: Path) -> None:
        self.lines: list[str] = []
        self.acks = 0
        self.eof = False
        self._cond = threading.Condition()
        self.stderr_path = stderr_path
        with open(stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.proc.stdout is not None
        # A one-page pipe: the child cannot run far ahead of what the parent
        # has read, so kills land close to the line that triggered them.
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # a line cut by the kill: the op it reports never happened
            with self._cond:
                self.lines.append(line[:-1])
                if line.startswith("ack "):
                    self.acks += 1
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLOCK_GUARD) -> bool:
        """Wait until ``predicate()`` holds or the child's output ends; whether either did."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate() or self.eof, timeout)

    def seen(self, line: str) -> bool:
        """Whether the child printed ``line``."""
        return line in self.lines

    def kill(self) -> int:
        """SIGKILL the child, reap it, and read everything it printed."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=DEADLOCK_GUARD)
        self._thread.join(DEADLOCK_GUARD)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]
