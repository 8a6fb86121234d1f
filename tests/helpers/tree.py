"""A directory's whole contents, to compare before and after an operation."""

from __future__ import annotations

import os
from pathlib import Path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file and directory under ``root`` with its bytes (None: a directory)."""
    found: dict[str, bytes | None] = {}
    for folder, directories, files in os.walk(root):
        for name in directories:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            full = os.path.join(folder, name)
            found[os.path.relpath(full, root)] = Path(full).read_bytes()
    return found
