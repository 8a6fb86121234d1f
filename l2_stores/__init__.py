"""l2_stores: crash-safe embedded stores for layer-2 rollup nodes.

A Python port of the store functors of the Octez layer-2 store library
(``Indexed_store``). The factories take a store name and ``construct`` codecs
and return store classes; see ``shared/API.md`` and the guide in ``doc/``.
"""

import logging as _logging

from .batches import Batch, batch
from .codecs import fixed
from .engine import accel as _accel
from .errors import (
    CannotLoadStore,
    CannotReadFromStore,
    CannotWriteToStore,
    CodecError,
    DecodingError,
    GcFailed,
    ReadOnlyError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)
from .factories import (
    make_indexable,
    make_indexable_removable,
    make_indexed_file,
    make_simple_indexed_file,
    make_singleton,
)
from .gc import Chain, Retain
from .idle_waiter import IdleWaiter
from .migration import MigrationSummary, migrate
from .mode import Mode
from .snapshots import Snapshot, snapshot
from .stores.base import Store
from .stores.indexable import IndexableRemovableStore, IndexableStore
from .stores.indexed_file import IndexedFile, SimpleIndexedFile
from .stores.singleton import SingletonStore
from .stores.stats import StoreStats
from .tools.salvage import SalvageReport, StoreSalvage, salvage
from .tools.snapshot import ArchiveSummary, export_archive, import_archive

__version__ = "0.1.0"

#: Whether the C accelerator is in use (built, imported, not turned off by
#: ``L2_STORES_PURE_PYTHON``); without it every path is pure Python, several times slower.
accelerated: bool = _accel.in_use()
if not accelerated and not _accel.pure_python_requested():
    _logging.getLogger("l2_stores").warning(
        "the C accelerator is not in use (%s): stores run on their pure-Python paths, "
        "several times slower; install a wheel, or build with a C compiler",
        ", ".join(_accel.missing.values()),
    )

__all__ = [
    "accelerated",
    "ArchiveSummary",
    "Batch",
    "CannotLoadStore",
    "CannotReadFromStore",
    "CannotWriteToStore",
    "Chain",
    "CodecError",
    "DecodingError",
    "GcFailed",
    "IdleWaiter",
    "IndexableRemovableStore",
    "IndexableStore",
    "IndexedFile",
    "MigrationSummary",
    "Mode",
    "ReadOnlyError",
    "Retain",
    "SalvageReport",
    "SimpleIndexedFile",
    "SingletonStore",
    "Snapshot",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreLockedError",
    "StoreSalvage",
    "StoreStats",
    "batch",
    "export_archive",
    "fixed",
    "import_archive",
    "make_indexable",
    "make_indexable_removable",
    "make_indexed_file",
    "make_simple_indexed_file",
    "make_singleton",
    "migrate",
    "salvage",
    "snapshot",
]
