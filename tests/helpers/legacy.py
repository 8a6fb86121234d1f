"""Data files of the format before runs, as that engine wrote them (``datafile.py``'s layout)."""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_left
from collections.abc import Mapping

from l2_stores.engine import datafile
from l2_stores.engine.framing import Expected, FileHeader, with_crc


def data_file_bytes(
    expected: Expected,
    bindings: Mapping[bytes, bytes],
    generation: int,
    tag: int = 0,
    key_hash: object = zlib.crc32,
) -> bytes:
    """The bytes of ``data.<generation>`` holding ``bindings``."""
    hashed = key_hash if callable(key_hash) else zlib.crc32
    ordered = sorted(bindings.items(), key=lambda kv: (hashed(kv[0]), kv[0]))
    count = len(ordered)
    bits = datafile.fanout_bits_for(count)
    header = FileHeader(
        datafile.MAGIC,
        expected.key_size,
        expected.value_size,
        expected.header_size,
        generation,
        count,
        bits,
        tag=tag,
    ).encode()
    hash_values = [hashed(key) for key, _ in ordered]
    hashes = b"".join(value.to_bytes(4, "little") for value in hash_values)
    rows = b"".join(with_crc(key + value) for key, value in ordered)
    buckets = 1 << bits
    fanout = [bisect_left(hash_values, bucket << (32 - bits)) for bucket in range(buckets)]
    fanout.append(count)
    bucket_crcs = [
        zlib.crc32(hashes[4 * fanout[b] : 4 * fanout[b + 1]]) for b in range(buckets)
    ]
    tail = struct.pack(f"<{buckets + 1}Q{buckets}I", *fanout, *bucket_crcs)
    return header + hashes + rows + tail + zlib.crc32(tail).to_bytes(4, "little")


def write_data_file(
    path: str,
    expected: Expected,
    bindings: Mapping[bytes, bytes],
    generation: int = 1,
    tag: int = 0,
) -> None:
    """Write ``data.<generation>`` holding ``bindings`` at ``path``."""
    with open(path, "wb") as file:
        file.write(data_file_bytes(expected, bindings, generation, tag))
