"""Makes ``format1.tar.gz``: small stores written by the engine of one data file
(format of the eleventh session, commit 414519c), for the conversion tests.

Run with that version installed: ``python tests/data/make_format1.py``. The
contents follow from ``tests/helpers/format1.py``; the archive is kept as it
was made.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.helpers.format1 import make_stores


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        make_stores(scratch)
        target = os.path.join(os.path.dirname(__file__), "format1.tar.gz")
        with tarfile.open(target, "w:gz") as archive:
            for name in sorted(os.listdir(scratch)):
                archive.add(os.path.join(scratch, name), arcname=name)


if __name__ == "__main__":
    main()
