"""File headers and checksums shared by every file of the engine.

Every engine file starts with the same 64-byte header, little-endian::

    offset  size  field
         0     8  magic            identifies the kind of file (log, data, ...)
         8     2  format version   FORMAT_VERSION
        10     2  flags            kind-specific (values file: GC copy)
        12     4  key size         bytes of an encoded key
        16     4  value size       bytes of an engine value (encoded value,
                                   or an indexed file's index entry)
        20     4  header size      bytes of an indexed file's header, else 0
        24     8  generation       the generation the file belongs to
        32     8  count            kind-specific (data file: number of rows)
        40     1  fan-out bits     kind-specific (data file: log2 of buckets)
        41     8  tag              kind-specific (data file: a word the store
                                   keeps with it; indexed files keep their
                                   values-file floor there)
        49    11  reserved         zero
        60     4  crc32            of bytes 0..59

Records are checksummed with CRC-32 (zlib) stored little-endian right after
the bytes it covers. CRC-32 has a fixed residue: the CRC of
``data + crc32(data).to_bytes(4, "little")`` is always ``CRC_RESIDUE``, so a
record is checked with one ``crc32`` call over the whole record.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CannotLoadStore
from .accel import accelerated_crc32, accelerated_framed, accelerated_write_framed

FORMAT_VERSION = 1
HEADER_FORMAT = "<8sHHIIIQQBQ11xI"
HEADER_STRUCT = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = 64
assert HEADER_STRUCT.size == HEADER_SIZE

CRC_SIZE = 4
CRC_RESIDUE = 0x2144DF1C
assert zlib.crc32(b"l2" + zlib.crc32(b"l2").to_bytes(4, "little")) == CRC_RESIDUE

#: ``crc32(data)``: zlib's CRC-32 (the same function computed in C with the
#: accelerator, by carry-less multiplication where the CPU has it).
crc32: Callable[[bytes | bytearray | memoryview], int] = accelerated_crc32 or zlib.crc32


def with_crc(data: bytes) -> bytes:
    """Return ``data`` followed by its CRC-32, little-endian."""
    return data + crc32(data).to_bytes(CRC_SIZE, "little")


def _framed(*parts: bytes) -> bytes:
    return with_crc(b"".join(parts))


#: ``framed(*parts)``: the parts one after the other, then their CRC-32
#: (little-endian); a whole record in one call (in C with the accelerator).
framed: Callable[..., bytes] = accelerated_framed or _framed


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``, resuming short writes."""
    written = os.pwrite(fd, data, offset)
    if written < len(data):  # rare, so the view's slices are too
        view = memoryview(data)
        while written < len(data):
            more = os.pwrite(fd, view[written:], offset + written)
            if not more:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            written += more


def _write_framed(fd: int, offset: int, *parts: bytes) -> int:
    if not parts or not all(isinstance(part, bytes) for part in parts):
        raise TypeError("write_framed(fd, offset, *parts): one part or more, all bytes")
    record = _framed(*parts)
    pwrite_all(fd, record, offset)
    return len(record)


#: ``write_framed(fd, offset, *parts)``: ``framed(*parts)`` written at
#: ``offset`` of ``fd``; returns its size. The parts are ``bytes``. Raises
#: OSError, having written any part of it. In C with the accelerator: one
#: ``pwritev``, no copy.
write_framed: Callable[..., int] = accelerated_write_framed or _write_framed


def crc_ok(record: bytes | memoryview) -> bool:
    """True when ``record`` ends with the valid CRC-32 of what precedes it."""
    return crc32(record) == CRC_RESIDUE


@dataclass(frozen=True)
class FileHeader:
    """The decoded 64-byte header of an engine file."""

    magic: bytes
    key_size: int
    value_size: int
    header_size: int
    generation: int
    count: int = 0
    fanout_bits: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0
    tag: int = 0

    def encode(self) -> bytes:
        """The 64 bytes of this header, checksum included."""
        body = HEADER_STRUCT.pack(
            self.magic,
            self.version,
            self.flags,
            self.key_size,
            self.value_size,
            self.header_size,
            self.generation,
            self.count,
            self.fanout_bits,
            self.tag,
            0,
        )[: HEADER_SIZE - CRC_SIZE]
        return with_crc(body)


@dataclass(frozen=True)
class Expected:
    """What a store expects to find in the headers of its files."""

    name: str
    key_size: int
    value_size: int
    header_size: int = 0


@dataclass(frozen=True)
class Finding:
    """What a check of a file found at ``offset``: a problem, or a note when harmless."""

    file: str
    offset: int
    what: str
    problem: bool = True

    def __str__(self) -> str:
        return f"{self.file}:{self.offset}: {'' if self.problem else 'note: '}{self.what}"


def parse_header(
    raw: bytes,
    magic: bytes,
    file: str,
    name: str = "",
    versions: tuple[int, ...] = (FORMAT_VERSION,),
) -> FileHeader:
    """Decode the header at the start of ``file``, checking magic, checksum and version.

    Raises :class:`CannotLoadStore` when the header is missing, corrupted, of
    another kind or of a format version not in ``versions``.
    """

    def fail(what: str) -> CannotLoadStore:
        return CannotLoadStore(f"{what} (file {file}, offset 0)", name=name, path=file, offset=0)

    if len(raw) < HEADER_SIZE:
        raise fail(f"file header cut short: {len(raw)} of {HEADER_SIZE} bytes")
    raw = raw[:HEADER_SIZE]
    if raw[:8] != magic:
        kind = magic.rstrip(b"\0").decode()
        raise fail(f"not a {kind} file: magic {raw[:8]!r}")
    if not crc_ok(raw):
        raise fail("file header checksum mismatch")
    (_, version, flags, key_size, value_size, header_size, generation, count, bits, tag, _) = (
        HEADER_STRUCT.unpack(raw)
    )
    if version not in versions:
        wanted = " or ".join(str(known) for known in versions)
        raise fail(f"format version {version} found, version {wanted} expected")
    return FileHeader(
        magic, key_size, value_size, header_size, generation, count, bits, version, flags, tag
    )


def decode_header(
    raw: bytes,
    magic: bytes,
    file: str,
    expected: Expected,
    versions: tuple[int, ...] = (FORMAT_VERSION,),
) -> FileHeader:
    """Decode the header at the start of ``file`` and check it against ``expected``.

    Raises :class:`CannotLoadStore` as :func:`parse_header` does, and when the
    file was written for other encoding sizes.
    """
    header = parse_header(raw, magic, file, expected.name, versions)
    found = (header.key_size, header.value_size, header.header_size)
    wanted = (expected.key_size, expected.value_size, expected.header_size)
    if found != wanted:
        raise CannotLoadStore(
            "encoding sizes differ: expected key {} B, value {} B, header {} B; "
            "found key {} B, value {} B, header {} B (file {}, offset 0)".format(
                *wanted, *found, file
            ),
            name=expected.name,
            path=file,
            offset=0,
        )
    return header
