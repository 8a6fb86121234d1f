"""Child process for the power-loss tests: load a store as a fresh process would, report it.

Usage: power_check.py ROOT KIND BUFFER fsync|no-fsync

Loads the workload's store of KIND under ROOT READ_ONLY, then READ_WRITE,
reads every binding back, runs ``l2-stores verify`` over it, closes it, and
prints one JSON line: ``{"read_only": {key hex: value hex}, "read_write":
{...}, "problems": [...]}``, or ``{"error": "..."}`` when a load or a read
fails.
"""

import json
import os
import sys
import traceback

from power_workload import load, store_content, store_path

from l2_stores import CannotLoadStore, Mode, StoreError
from l2_stores.tools.on_disk import find_stores
from l2_stores.tools.verify import verify


def main() -> None:
    root, kind, buffer, fsync_word = sys.argv[1:5]
    path = store_path(root, kind)
    options = {} if kind == "singleton" else {"index_buffer_size": int(buffer)}
    report: dict[str, object] = {}
    try:
        with load(kind, path, Mode.READ_ONLY, **options) as store:
            report["read_only"] = {k.hex(): v.hex() for k, v in store_content(store, kind).items()}
        options["fsync"] = fsync_word == "fsync"
        with load(kind, path, **options) as store:
            report["read_write"] = {
                k.hex(): v.hex() for k, v in store_content(store, kind).items()
            }
        try:
            stores = find_stores(root)
        except CannotLoadStore:
            stores = []
        report["problems"] = [str(finding) for finding in verify(stores).problems]
    except StoreError as error:
        report = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "files": sorted(
                os.path.relpath(os.path.join(top, name), root)
                for top, _, names in os.walk(root)
                for name in names
            ),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
