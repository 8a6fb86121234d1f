"""Open modes of a store."""

from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(enum.Enum):
    """How a store is opened."""

    READ_ONLY = "read_only"
    READ_WRITE = "read_write"
