"""What an engine has done since it was loaded: merges, their time, the bytes it wrote."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """An engine's figures at one moment (``Index.stats``)."""

    runs: int
    merges: int
    merge_seconds: float
    bytes_written: int
    pending_records: int


class Counters:
    """Merges done and bytes written, counted by the writer and the merge threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.merges = 0
        self.merge_seconds = 0.0
        self.bytes_written = 0

    def merged(self, started: float, run: str) -> None:
        """Count a merge begun at ``started`` (``time.perf_counter``) that wrote ``run``."""
        seconds, size = time.perf_counter() - started, os.path.getsize(run)
        with self._lock:
            self.merges += 1
            self.merge_seconds += seconds
            self.bytes_written += size

    def wrote(self, size: int) -> None:
        """Count ``size`` bytes written."""
        with self._lock:
            self.bytes_written += size
