"""Snapshots of several stores at one moment (API.md, "Atomic batches across stores").

``snapshot(*stores)`` holds back the commits of the stores' batch journals
(``batches.no_commit_running``) while it takes each store's snapshot: so no
batch shows in part. A store's snapshot copies nothing: an engine store's is
its engine's (``Index.snapshot``: the log dicts and run stack of the moment,
plus the values files an indexed file pins), a singleton's its value.
``READ_ONLY`` stores are first brought up to date together, at a batch
boundary (``batches.synced_together``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from . import batches
from .errors import StoreClosedError
from .mode import Mode


class Snapshot:
    """Read-only views of several stores, all at one moment (see :func:`snapshot`)."""

    def __init__(self, stores: Sequence[Any]) -> None:
        if not stores:
            raise ValueError("a snapshot needs at least one store")
        for store in stores:
            if not hasattr(store, "_snapshot_view"):
                raise TypeError(f"not a store: {store!r}")
            store._check_open()
        readers = [store for store in stores if store.mode is Mode.READ_ONLY]
        if readers:
            batches.synced_together(readers)
        self.closed = False
        self._lifetimes: list[Any] = []
        with batches.no_commit_running(stores):
            #: One read-only view per store, in the order given.
            self.views: tuple[Any, ...] = tuple(store._snapshot_view(self) for store in stores)

    def lifetime(self, store: Any) -> Any:
        """A lifetime that ends with the snapshot or with ``store`` (for the views' C reads)."""
        lifetime = store._lifetime.child()
        self._lifetimes.append(lifetime)
        return lifetime

    def check_open(self, store: Any) -> None:
        """Raise StoreClosedError once the snapshot (or ``store``) is closed."""
        if self.closed:
            raise StoreClosedError("snapshot closed", name=store.name, path=store.path)
        store._check_open()

    def close(self) -> None:
        """Let go of what the views hold; they raise StoreClosedError from now on."""
        self.closed = True
        self.views = ()
        for lifetime in self._lifetimes:
            lifetime.close()

    def __enter__(self) -> tuple[Any, ...]:
        return self.views

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def snapshot(*stores: Any) -> Snapshot:
    """Read-only views that all show ``stores`` at one moment, never part of a batch:
    ``with snapshot(a, b) as (a_view, b_view):``."""
    return Snapshot(stores)
