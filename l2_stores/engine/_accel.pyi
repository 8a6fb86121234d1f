from collections.abc import Callable
from mmap import mmap

def crc32(data: bytes | bytearray | memoryview | mmap, /) -> int: ...
def clmul() -> bool: ...
def mappable(fd: int, /) -> bool: ...
def reserve(fd: int, offset: int, length: int, /) -> bool | None: ...
def framed(*parts: bytes | bytearray | memoryview) -> bytes: ...
def value_of_record(
    buffer: mmap | bytes | memoryview, offset: int, length: int, key: bytes, /
) -> bytes | None: ...
def replay_log(
    buffer: bytes | memoryview,
    key_size: int,
    value_size: int,
    bindings: dict[bytes, bytes | None],
    /,
) -> tuple[int, int, bool, int, int]: ...

#: (set, remove, mark, seal, begin, end, SYNCED flag): the log op bytes the C replay reads.
LOG_FORMAT: tuple[int, int, int, int, int, int, int]
def write_framed(fd: int, offset: int, /, *parts: bytes | bytearray | memoryview) -> int: ...


class LogTail:
    _fd: int
    _fsync: bool
    _end: int
    records: int
    _pending: bytearray
    @property
    def _mapped_size(self) -> int: ...
    def _map(self, size: int, /) -> None: ...
    def _unmap(self) -> None: ...

class ValuesTail:
    _fd: int
    _fsync: bool
    end: int
    _reserved: int
    _key_size: int
    number: int
    def append(self, key: bytes, value: bytes, /) -> int: ...
    def append_entry(self, key: bytes, value: bytes, header: bytes, /) -> bytes: ...

class IndexedAppend:
    def __init__(self, put: Callable[..., object], cache: object, /) -> None: ...
    def __call__(self, key: bytes, value: bytes, header: bytes, /) -> None: ...
    def retarget(self, target: ValuesTail, /) -> None: ...

class Writer:
    def __init__(
        self,
        put_in_python: Callable[[], Callable[[bytes, bytes, bool], None] | None],
        buffer_size: int,
        pace_from: int,
        key_size: int,
        value_size: int,
    ) -> None: ...
    def put(self, key: bytes, value: bytes, flush: bool) -> None: ...
    def set(
        self,
        log: LogTail | None,
        active: dict[bytes, bytes | None],
        merging: bool,
        recording: bool,
        /,
    ) -> None: ...

class LruCache:
    capacity: int
    max_bytes: int
    used_bytes: int
    hits: int
    misses: int
    def __init__(self, capacity: int, max_bytes: int = ...) -> None: ...
    def get(self, key: bytes, /) -> tuple[bytes, bytes] | None: ...
    def put(self, key: bytes, entry: tuple[bytes, bytes], /) -> None: ...
    def clear(self) -> None: ...
    def keys(self) -> list[bytes]: ...
    def __len__(self) -> int: ...

class ContainerDecoder:
    def __init__(
        self,
        unpack: Callable[[bytes], tuple[object, ...]],
        container: type[dict[str, object]],
        names: tuple[str, ...],
        fallback: Callable[[bytes], object],
        format: str | None = None,
    ) -> None: ...
    def decode(self, data: bytes, /) -> dict[str, object]: ...
