"""Where each kind of store keeps its files, and what kind of store a path holds.

::

    singleton      <path>             the value (``singleton``)
                   <path>.lock        the writer lock
                   <path>.batch       the batch link, once in a batch
                   <path>.identity    the store's identity (``identity``)
    indexable      <path>/            an index directory (``engine.layout``)
                   <path>/identity
    indexed file   <path>/values.<n>  the values files (``engine.value_files``)
                   <path>/index/      the index directory
                   <path>/identity

Removable and plain indexable stores have the same files, as have simple and
plain indexed files: their identity tells them apart.
"""

from __future__ import annotations

import enum
import os

from ..engine.files import holds_index
from ..engine.journal import LINK
from ..engine.value_files import list_values

SINGLETON_MAGIC = b"L2SSING\0"
INDEX_DIRECTORY = "index"
IDENTITY = "identity"
#: Where ``migrate`` builds a store's successor (``<path>.migrate-tmp``), and the marker
#: of a singleton's switch under way beside it (see ``migration``).
MIGRATION_STAGING = ".migrate-tmp"
MIGRATION_SWITCHING = ".switching"


def migration_switching(path: str) -> str:
    """The marker that a migration's switch of the singleton at ``path`` is under way."""
    return path + MIGRATION_STAGING + MIGRATION_SWITCHING


class Kind(enum.Enum):
    """The kinds of store as told apart by their files."""

    SINGLETON = "singleton"
    INDEXABLE = "indexable"  # removable or not: the same files
    INDEXED_FILE = "indexed_file"  # simple or not: the same files

    @property
    def label(self) -> str:
        """The kind in words."""
        return self.value.replace("_", " ")


def identity_path(path: str, kind: Kind) -> str:
    """The identity file of the store of ``kind`` at ``path``."""
    return path + "." + IDENTITY if kind is Kind.SINGLETON else os.path.join(path, IDENTITY)


def link_path(path: str, kind: Kind) -> str:
    """The batch link of the store of ``kind`` at ``path`` (there once it is in a batch)."""
    if kind is Kind.SINGLETON:
        return path + "." + LINK
    if kind is Kind.INDEXED_FILE:
        return os.path.join(path, INDEX_DIRECTORY, LINK)
    return os.path.join(path, LINK)


def classify(path: str) -> Kind | None:
    """The kind of store at ``path`` (by its files), or None when it holds none."""
    if os.path.isfile(path):
        if path.endswith(".tmp"):
            return None  # a singleton's write in progress
        try:
            with open(path, "rb") as file:
                magic = file.read(len(SINGLETON_MAGIC))
        except OSError:
            return None
        if magic == SINGLETON_MAGIC or os.path.isfile(identity_path(path, Kind.SINGLETON)):
            return Kind.SINGLETON
        return None
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, INDEX_DIRECTORY)
    if (os.path.isdir(index) and holds_index(index)) or list_values(path)[0]:
        return Kind.INDEXED_FILE
    if holds_index(path):
        return Kind.INDEXABLE
    if os.path.isfile(os.path.join(path, IDENTITY)):
        return Kind.INDEXED_FILE if os.path.isdir(index) else Kind.INDEXABLE
    return None
