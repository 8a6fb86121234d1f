"""``store.stats()``: a store's figures at one moment, as one typed record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StoreStats:
    """What ``store.stats()`` tells: counts since the store was loaded (in this process)
    and sizes now. ``mode`` is ``read_write`` or ``read_only``.

    ``disk_bytes`` splits the store's bytes on disk by kind of file: ``runs``
    (sorted runs), ``logs``, ``values`` (an indexed file's values files),
    ``value`` (a singleton's file) and ``other`` (identity, lock, links,
    leftovers). ``bytes_written`` over the bytes of the bindings written is
    the store's write amplification. ``pending_records`` counts the bindings
    in its logs not yet merged into a run.
    """

    name: str
    path: str
    kind: str
    mode: str
    bindings: int
    disk_bytes: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    merges: int = 0
    merge_seconds: float = 0.0
    bytes_written: int = 0
    gc_runs: int = 0
    gc_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    pending_records: int = 0

    def as_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)
