"""The ``l2-stores`` command-line tool (also ``python -m l2_stores``).

Exit codes: 0 done, 1 a problem was found (or an error stopped the work),
2 bad usage. Errors go to stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from . import __version__, accelerated, demo, migration
from .engine.accel import ENV_PURE_PYTHON, missing, pure_python_requested
from .errors import CannotReadFromStore, StoreError
from .progress import Progress
from .tools import dump, info, salvage, snapshot, verify
from .tools.on_disk import find_stores

PROG = "l2-stores"


def _demo(args: argparse.Namespace) -> int:
    report = demo.run(args.dir, args.blocks, args.gc_every, args.keep, args.readers)
    print("\n".join(report.lines()))
    return 0 if report.verified else 1


def _info(args: argparse.Namespace) -> int:
    described = [info.describe(store) for store in find_stores(args.path)]
    if args.json:
        print(json.dumps([store.as_json() for store in described], indent=1))
    else:
        print("\n\n".join("\n".join(store.lines()) for store in described))
    damaged = [store.path for store in described if store.problem is not None]
    if damaged:
        _error(f"{len(damaged)} of {len(described)} stores damaged: {', '.join(damaged)}")
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    stores = find_stores(args.path)
    logging.getLogger("l2_stores").setLevel(logging.ERROR)  # torn tails are reported as notes
    with Progress("verify", unit="B") as bar:
        result = verify.verify(stores, on_file=bar.update)
    for finding in result.findings:
        print(finding)
    problems = len(result.problems)
    if problems:
        print(f"{problems} problem{'s' if problems != 1 else ''} in {result.stores} stores")
        return 1
    print(f"ok: {result.stores} stores, {result.files} files, {result.bytes:,} bytes checked")
    return 0


def _dump(args: argparse.Namespace) -> int:
    stores = find_stores(args.path)
    if len(stores) != 1 or os.path.normpath(stores[0].path) != os.path.normpath(args.path):
        _error(f"{args.path} is a directory of {len(stores)} stores; dump takes one store")
        return 1
    rows = dump.bindings(
        stores[0], args.limit, start=args.start, stop=args.stop, reverse=args.reverse
    )
    try:
        for row in rows:
            if args.json:
                print(json.dumps(row))
            elif args.decode and "decoded" in row:
                decoded = row["decoded"]  # a role whose codec cannot be rebuilt: in hex
                print(
                    " ".join(
                        f"{k}={json.dumps(decoded[k])}" if k in decoded else f"{k}={row[k]}"
                        for k in ("key", "header", "value")
                        if k in row
                    )
                )
            else:
                print(" ".join(row[k] for k in ("key", "header", "value") if k in row))
    except CannotReadFromStore as error:
        sys.stdout.flush()
        _error(f"{error} (l2-stores salvage copies every binding that can be read)")
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    with Progress("export", unit="B") as bar:
        done = snapshot.export_archive(args.dir, args.file, force=args.force, progress=bar.update)
    print(
        f"exported {done.stores} stores, {done.bindings} bindings, "
        f"{done.bytes:,} bytes to {args.file}"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    with Progress("import", unit="bindings") as bar:
        done = snapshot.import_archive(args.file, args.dir, force=args.force, progress=bar.update)
    print(f"imported {done.stores} stores, {done.bindings} bindings into {args.dir}")
    return 0


def _salvage(args: argparse.Namespace) -> int:
    def report(store: salvage.StoreSalvage) -> None:
        lost = f", {len(store.lost)} unreadable" if store.lost else ""
        print(f"{store.source} -> {store.target}: {store.bindings} bindings{lost}")
        for finding in store.lost:
            print(f"  {finding}")

    done = salvage.salvage(args.source, args.target, on_store=report)
    if done.complete:
        print(f"salvaged {len(done.stores)} stores: every record was read")
        return 0
    damaged = sum(1 for store in done.stores if store.lost)
    print(f"salvaged {len(done.stores)} stores; {damaged} had unreadable parts (listed above)")
    return 1


def _migrate(args: argparse.Namespace) -> int:
    old, new = _imported(args.old), _imported(args.new)
    convert = None if args.convert is None else _imported(args.convert)
    done = migration.migrate(old, new, args.path, convert)
    if not done.switched:
        print(f"{args.path} is already a {new.name!r} store of its codecs: nothing to do")
    else:
        print(f"migrated {args.path}: {done.read} bindings read, {done.written} written")
    return 0


def _imported(where: str) -> Any:
    """The object named ``module:attribute`` (the module importable from here)."""
    module_name, colon, attribute = where.partition(":")
    if not (colon and module_name and attribute):
        raise ValueError(f"{where!r}: expected MODULE:NAME, as my_node.stores:Levels")
    sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{where!r}: {error}") from error
    finally:
        sys.path.pop(0)
    return found


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def version_text() -> str:
    """The version, the Python, and whether the C accelerator is in use."""
    if accelerated:
        state = "in use"
    elif pure_python_requested():
        state = f"off ({ENV_PURE_PYTHON} is set)"
    else:
        state = "not in use: " + "; ".join(missing.values())
    return (
        f"{PROG} {__version__} (Python {platform.python_version()}, "
        f"{platform.python_implementation()}); C accelerator {state}"
    )


class _PrintVersion(argparse.Action):
    """``--version``: print :func:`version_text` as it is (argparse's would rewrap it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    """The argument parser of the tool."""
    top = argparse.ArgumentParser(
        prog=PROG,
        description="Crash-safe stores for layer-2 rollup nodes: run the demo node, "
        "inspect, check, dump and copy stores.",
        epilog="Exit codes: 0 done, 1 a problem was found, 2 bad usage.",
    )
    top.add_argument(
        "--version",
        action=_PrintVersion,
        nargs=0,
        help="print the version, the Python and whether the C accelerator is in use",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], summary: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    sub = command("demo", _demo, "store a rollup node's blocks with GC, reopen and verify them")
    sub.add_argument("--dir", default="l2-demo-data", help="data directory (default: %(default)s)")
    sub.add_argument(
        "--blocks", type=_positive, default=2000, help="blocks to add (default: %(default)s)"
    )
    sub.add_argument(
        "--gc-every",
        type=_positive,
        default=1000,
        metavar="K",
        help="start a GC every K levels (default: %(default)s)",
    )
    sub.add_argument(
        "--keep",
        type=_positive,
        default=500,
        metavar="L",
        help="levels a GC keeps (default: %(default)s)",
    )
    sub.add_argument(
        "--readers", type=_non_negative, default=2, help="reader threads (default: %(default)s)"
    )

    sub = command("info", _info, "describe a store, or every store under a directory")
    sub.add_argument("path", help="a store, or a directory of stores")
    sub.add_argument("--json", action="store_true", help="print a JSON array")

    sub = command("verify", _verify, "check every record of every file; exit 1 on any problem")
    sub.add_argument("path", help="a store, or a directory of stores")

    sub = command("dump", _dump, "print the bindings of one store, in hex, in key order")
    sub.add_argument("path", help="one store")
    sub.add_argument("--limit", type=_non_negative, metavar="N", help="print at most N bindings")
    key_help = (
        "a whole key in hex (as dump prints it), 0x and a hex prefix, or a number "
        "(a big-endian integer key)"
    )
    sub.add_argument("--start", metavar="KEY", help=f"from this key on: {key_help}")
    sub.add_argument("--stop", metavar="KEY", help=f"before this key: {key_help}")
    sub.add_argument("--reverse", action="store_true", help="in descending key order")
    sub.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (with the decoded key and value when the store "
        "records its codecs)",
    )
    sub.add_argument(
        "--decode",
        action="store_true",
        help="print keys and values decoded with the store's recorded codecs (as JSON)",
    )

    sub = command(
        "snapshot", lambda args: 2, "copy a directory of stores into one archive, and back"
    )
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the stores under DIR into FILE (no writer lock taken)",
        description="Write a consistent copy of the stores under DIR into the archive FILE; "
        "a writer may keep running.",
    )
    export.set_defaults(run=_export)
    export.add_argument("dir", metavar="DIR")
    export.add_argument(
        "file", metavar="FILE", help="the archive (.tar, or .tar.gz / .tgz compressed)"
    )
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    load = actions.add_parser(
        "import",
        help="rebuild the stores of FILE under DIR",
        description="Check the archive FILE, then rebuild its stores under DIR.",
    )
    load.set_defaults(run=_import)
    load.add_argument("file", metavar="FILE")
    load.add_argument("dir", metavar="DIR")
    load.add_argument("--force", action="store_true", help="replace stores that exist")

    sub = command("salvage", _salvage, "copy every binding whose checksums verify into new stores")
    sub.add_argument("source", help="a damaged store, or a directory of stores")
    sub.add_argument("target", help="where the new stores go (must not exist)")

    sub = command("migrate", _migrate, "rewrite a store under new codecs or as another kind")
    sub.add_argument("path", help="one store")
    sub.add_argument(
        "--from", dest="old", required=True, metavar="MODULE:CLASS", help="its store class now"
    )
    sub.add_argument(
        "--to", dest="new", required=True, metavar="MODULE:CLASS", help="its store class after"
    )
    sub.add_argument(
        "--convert",
        metavar="MODULE:FUNCTION",
        help="convert(key, value) -> (key, value) or None to drop (default: keep as decoded)",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit code."""
    args = parser().parse_args(argv)
    logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.WARNING)
    try:
        code: int = args.run(args)
        return code
    except (StoreError, ValueError) as error:
        _error(str(error))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``dump ... | head``).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        _error(str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
