"""The optional C accelerator: checksums, the read path, the common put, caches, codecs.

Two extensions are built from ``csrc/`` when the package is installed with a
C compiler at hand: ``_accel`` (framing, the logs' and values files' tails,
the index's put, the log's replay, the indexed files' cache and appends) and
``_runs`` (the run reader and writer, and the index's read path over its
logs and runs). Without them, or with ``L2_STORES_PURE_PYTHON=1`` in the
environment, every path is pure Python. Both paths read the same bytes and
check the same checksums; the tests run both. This module is the one place
that chooses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping
    from mmap import mmap

ENV_PURE_PYTHON = "L2_STORES_PURE_PYTHON"


def pure_python_requested() -> bool:
    """Whether ``L2_STORES_PURE_PYTHON`` asks for the pure-Python paths (every C extension off)."""
    return os.environ.get(ENV_PURE_PYTHON, "") not in ("", "0")


#: Why each C extension is not in use (its name -> the reason); empty when all are.
missing: dict[str, str] = {}


def load_extension(name: str, importer: Callable[[], ModuleType]) -> ModuleType | None:
    """The C extension ``importer()`` imports, or None (the reason noted in ``missing``)."""
    if pure_python_requested():
        missing[name] = f"{ENV_PURE_PYTHON} is set"
        return None
    try:
        return importer()
    except ImportError as error:
        absent = isinstance(error, ModuleNotFoundError) or str(error).startswith("cannot import")
        missing[name] = f"{name} is not built" if absent else f"{name} does not load ({error})"
        return None


def in_use() -> bool:
    """Whether every C extension is in use."""
    return not missing


def _import_accel() -> ModuleType:
    from . import _accel

    return _accel


def _import_runs() -> ModuleType:
    from . import _runs

    return _runs


_module = load_extension("_accel", _import_accel)
if _module is not None:
    from ._accel import (
        LOG_FORMAT,
        ContainerDecoder,
        IndexedAppend,
        LogTail,
        LruCache,
        ValuesTail,
        Writer,
        crc32,
        framed,
        mappable,
        replay_log,
        reserve,
        value_of_record,
        write_framed,
    )

    #: The index's common put in one C call (see ``Writer`` in ``csrc/log_writer.c``).
    AcceleratedWriter: type[Writer] | None = Writer
    #: The base of ``LogWriter``: its tail state in C, where the C put appends.
    LogTailBase: type = LogTail
    #: The base of ``ValuesFile``: its tail state in C, and its common append.
    ValuesTailBase: type = ValuesTail
    #: The indexed files' LRU cache of (value, header) pairs, without a lock.
    AcceleratedLruCache: type[LruCache] | None = LruCache
    #: An indexed file's append of encoded bytes in one C call (values, index, cache).
    AcceleratedIndexedAppend: type[IndexedAppend] | None = IndexedAppend
    #: The decode of a ``Struct`` codec of fixed-size fields, in one C call.
    AcceleratedContainerDecoder: type[ContainerDecoder] | None = ContainerDecoder
    accelerated_framed: Callable[..., bytes] | None = framed
    accelerated_crc32: Callable[[bytes | bytearray | memoryview], int] | None = crc32
    #: ``mappable(fd)``: whether a log on that file system may be written through a map.
    accelerated_mappable: Callable[[int], bool] | None = mappable
    accelerated_write_framed: Callable[..., int] | None = write_framed
    #: ``reserve(fd, offset, length)``: allocate blocks past the end, keeping the
    #: size; True, False (failed this time), or None (cannot be done there).
    accelerated_reserve: Callable[[int, int, int], bool | None] | None = reserve
    #: ``replay_log(buffer, key_size, value_size, bindings)``: where the replay
    #: stopped, where the last SYNCED record is (-1: none), whether after a seal,
    #: the parts taken and the end of the good records (``log.Replayed``).
    accelerated_replay_log: (
        Callable[
            [bytes | memoryview, int, int, dict[bytes, bytes | None]],
            tuple[int, int, bool, int, int],
        ]
        | None
    ) = replay_log
    #: The log's op bytes as the C replay reads them: (set, remove, mark, seal,
    #: begin, end, SYNCED).
    accelerated_log_format: tuple[int, ...] | None = LOG_FORMAT
    #: ``value_of_record(buffer, offset, length, key)``: a checked value, or None.
    accelerated_value_of_record: Callable[[mmap, int, int, bytes], bytes | None] | None = (
        value_of_record
    )
else:
    AcceleratedWriter = None
    AcceleratedLruCache = AcceleratedContainerDecoder = AcceleratedIndexedAppend = None
    accelerated_framed = accelerated_crc32 = accelerated_mappable = None

    class ValuesTailBase:  # type: ignore[no-redef]
        """A values file's tail without the accelerator: appends are in Python."""

    class LogTailBase:  # type: ignore[no-redef]
        """A log writer's tail without the accelerator: appends are always written."""

        _mapped_size = 0

        def _map(self, size: int) -> None:
            raise OSError("no accelerator: logs are not written through a map")

        def _unmap(self) -> None:
            pass

    accelerated_write_framed = accelerated_value_of_record = accelerated_replay_log = None
    accelerated_reserve = accelerated_log_format = None


_runs_module = load_extension("_runs", _import_runs)
if _runs_module is not None:
    from ._runs import FORMAT as _RUNS_FORMAT
    from ._runs import (
        Layers,
        MergeCursor,
        RunBuilder,
        RunCorrupt,
        RunReader,
        count_changes,
        find_first,
    )

    #: The index's read path in one C call (active dict, frozen dict, then the runs).
    AcceleratedLayers: type[Layers] | None = Layers

    #: The C run reader (``csrc/``), or None when running pure Python.
    AcceleratedRunReader: type[RunReader[Any]] | None = RunReader
    #: The C run writer's byte work and the C merge of runs (``RunWriter`` uses it).
    AcceleratedRunBuilder: type[RunBuilder] | None = RunBuilder
    #: ``find_first(readers, key)``: the first answer of the readers, newest first.
    accelerated_find_first: Callable[[tuple[RunReader[Any], ...], bytes], Any] | None = (
        find_first
    )
    #: ``count_changes(readers, bindings)``: the live keys bindings add on top of the runs.
    accelerated_count_changes: (
        Callable[[tuple[RunReader[Any], ...], dict[bytes, bytes | None]], int] | None
    ) = count_changes
    #: The ordered merge of a store's logs and runs (``Index.items``).
    AcceleratedMergeCursor: type[MergeCursor] | None = MergeCursor
    #: The run format's constants the C run reader was built with.
    runs_format: Mapping[str, int] | None = _RUNS_FORMAT
else:
    AcceleratedRunReader = AcceleratedRunBuilder = accelerated_find_first = runs_format = None
    accelerated_count_changes = None
    AcceleratedLayers = AcceleratedMergeCursor = None

    class RunCorrupt(Exception):  # type: ignore[no-redef]
        """Never raised without the C run reader."""


def check_runs_format(owner: str, constants: Mapping[str, int]) -> None:
    """Check that the C run reader, when in use, was built with ``owner``'s ``constants``.

    Raises RuntimeError naming the first that differs (a stale build of
    ``_runs``): a reader of another format must not read runs.
    """
    if runs_format is None:
        return
    for name, value in constants.items():
        built = runs_format.get(name)
        if built != value:
            raise RuntimeError(
                f"{owner}.{name} is {value:#x} but the C run reader (_runs) was built with "
                f"{'no such constant' if built is None else f'{built:#x}'}: rebuild it"
            )


__all__ = [
    "ENV_PURE_PYTHON",
    "AcceleratedContainerDecoder",
    "AcceleratedIndexedAppend",
    "AcceleratedLayers",
    "AcceleratedLruCache",
    "AcceleratedMergeCursor",
    "AcceleratedRunBuilder",
    "AcceleratedRunReader",
    "AcceleratedWriter",
    "LogTailBase",
    "RunCorrupt",
    "ValuesTailBase",
    "accelerated_crc32",
    "accelerated_count_changes",
    "accelerated_find_first",
    "accelerated_framed",
    "accelerated_log_format",
    "accelerated_mappable",
    "accelerated_replay_log",
    "accelerated_reserve",
    "accelerated_value_of_record",
    "accelerated_write_framed",
    "check_runs_format",
    "pure_python_requested",
    "runs_format",
]
