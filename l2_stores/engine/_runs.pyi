from collections.abc import Callable
from mmap import mmap
from typing import Any, Final, Generic, TypeVar

_Removed = TypeVar("_Removed")

#: The run format's constants the reader was built with (runs_c/format.h).
FORMAT: Final[dict[str, int]]

class RunCorrupt(Exception):
    """``RunCorrupt(what, offset)``: a checksum or index section failed there."""

    #: Set by ``find_first`` only: the failing reader's place in its tuple.
    index: int

class RunReader(Generic[_Removed]):
    def __init__(
        self,
        buffer: mmap | bytes | memoryview,
        removed: _Removed,
        key_size: int,
        value_size: int,
        count: int,
        filter_offset: int,
        filter_blocks: int,
        fence_offset: int,
        fence_rows: int,
        fences: int,
        radix_offset: int,
        radix_bits: int,
        rows_offset: int,
        page_crcs_offset: int,
        prefix: int,
        shift: int,
        base: int,
        first_key: bytes,
        last_key: bytes,
    ) -> None: ...
    def find(self, key: bytes, key_hash: int | None = None, /) -> bytes | _Removed | None: ...
    def seek(self, key: bytes, /) -> int: ...
    def may_contain(self, key_hash: int, /) -> bool: ...
    def row(self, index: int, /) -> tuple[bytes, bytes | _Removed]: ...
    def check_pages(self, start: int, end: int, /) -> None: ...
    def page_checked(self, page: int, /) -> bool: ...
    def dense_step(self) -> int: ...
    def release(self) -> None: ...

class Layers:
    """The index's read path: the active log's dict, the frozen one's, then the runs."""

    def get(self, key: bytes, /) -> bytes | None: ...
    def set(
        self,
        active: dict[bytes, bytes | None],
        frozen: dict[bytes, bytes | None] | None,
        readers: tuple[RunReader[Any], ...] | None,
        find: Callable[[bytes], bytes | None] | None,
        /,
    ) -> None: ...

class MergeCursor:
    """The live ``(key, value)`` pairs of logs and runs (newest first) with ``start <= key
    < stop``, in key order (``reverse``: descending), each key from its newest source."""

    def __new__(
        cls,
        logs: tuple[tuple[dict[bytes, bytes | None], list[bytes]], ...],
        readers: tuple[RunReader[Any], ...],
        key_size: int,
        start: bytes | None,
        stop: bytes | None,
        reverse: bool,
        on_corrupt: Callable[[RunCorrupt], BaseException] | None,
        closed: bytearray | None,
        on_closed: Callable[[], BaseException] | None,
        /,
    ) -> MergeCursor: ...
    def __iter__(self) -> MergeCursor: ...
    def __next__(self) -> tuple[bytes, bytes]: ...

def find_first(
    readers: tuple[RunReader[_Removed], ...], key: bytes, /
) -> bytes | _Removed | None: ...
def count_changes(
    readers: tuple[RunReader[Any], ...], bindings: dict[bytes, bytes | None], /
) -> int: ...

class RunBuilder:
    """The byte work of ``run.RunWriter``, written through ``fd``."""

    def __init__(
        self,
        fd: int,
        removed: object,
        key_size: int,
        value_size: int,
        capacity: int,
        filter_blocks: int,
        fence_rows: int,
        radix_bits: int,
        fence_offset: int,
        radix_offset: int,
        rows_offset: int,
        map_index_from: int = ...,
    ) -> None: ...
    @property
    def count(self) -> int: ...
    @property
    def mapped(self) -> bool:
        """Whether the index sections are written through a map of the file."""
    def add(self, rows: list[tuple[bytes, bytes | object]], /) -> None: ...
    def add_bindings(self, bindings: dict[bytes, bytes | None], drop_removals: bool, /) -> None: ...
    def merge(
        self,
        readers: tuple[RunReader[Any], ...],
        drop_removals: bool,
        cancel: bytearray | None,
        /,
    ) -> bool: ...
    def finish(self) -> tuple[int, int, int, int, int]: ...
    def close(self) -> None: ...
