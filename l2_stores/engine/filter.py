"""A run's Bloom filter: blocked, one 64-byte block (a cache line) per key.

A key's probes all fall in one block, so a lookup that misses costs one
cache line per run, and the lines of all runs can be fetched at once. The
layout (``m`` blocks of ``BLOCK_BYTES``, bit ``b`` of a block is bit
``b & 7`` of its byte ``b >> 3``) and the probe positions below are part of
the run format: a writer and a reader, in C or in Python, must agree on
them bit for bit.

Probe positions of a key, from ``h = crc32(key)`` (zlib's CRC-32)::

    y = mix(h)                       mix: MurmurHash3's 64-bit finalizer
    block = ((y >> 32) * m) >> 32    one of the m blocks, evenly
    z = mix(y)
    bit i = (z >> (9 * i)) & 511     for i in 0 .. PROBES - 1

One CRC-32 per key serves every run of a store: the hash is computed once
per lookup, the probes once per run. Two keys of equal CRC-32 share their
probes in every run, which adds about n / 2^32 to the false-positive rate
of a run of n keys (0.2 % at 10M): small beside the filter's own ~1 %.
"""

from __future__ import annotations

from typing import Final

from .accel import check_runs_format

BLOCK_BYTES = 64
BLOCK_BITS = BLOCK_BYTES * 8
PROBES = 7
BITS_PER_KEY = 10
_PROBE_BITS = 9
_MASK64 = (1 << 64) - 1
assert 1 << _PROBE_BITS == BLOCK_BITS and PROBES * _PROBE_BITS <= 64
_MIX_SHIFT = 33
_MIX_MULTIPLIER_1 = 0xFF51AFD7ED558CCD
_MIX_MULTIPLIER_2 = 0xC4CEB9FE1A85EC53

#: The filter's part of the format, as the C run reader must have it (``_runs.FORMAT``).
FORMAT: Final = {
    "BLOCK_BYTES": BLOCK_BYTES,
    "PROBES": PROBES,
    "PROBE_BITS": _PROBE_BITS,
    "MIX_SHIFT": _MIX_SHIFT,
    "MIX_MULTIPLIER_1": _MIX_MULTIPLIER_1,
    "MIX_MULTIPLIER_2": _MIX_MULTIPLIER_2,
}
check_runs_format("filter", FORMAT)


def filter_blocks(keys: int) -> int:
    """The number of blocks of a filter for ``keys`` keys (at least one)."""
    return max(1, -(-keys * BITS_PER_KEY // BLOCK_BITS))


def _mix(value: int) -> int:
    value ^= value >> _MIX_SHIFT
    value = (value * _MIX_MULTIPLIER_1) & _MASK64
    value ^= value >> _MIX_SHIFT
    value = (value * _MIX_MULTIPLIER_2) & _MASK64
    return value ^ (value >> _MIX_SHIFT)


def probes(key_hash: int, blocks: int) -> tuple[int, tuple[int, ...]]:
    """The block of ``key_hash`` among ``blocks`` blocks, and its bit positions there."""
    mixed = _mix(key_hash)
    block = ((mixed >> 32) * blocks) >> 32
    bits = _mix(mixed)
    mask = BLOCK_BITS - 1
    return block, tuple((bits >> (_PROBE_BITS * probe)) & mask for probe in range(PROBES))


def add(filter_bytes: bytearray | memoryview, key_hash: int, blocks: int) -> None:
    """Set the bits of ``key_hash`` in a filter of ``blocks`` blocks."""
    block, bits = probes(key_hash, blocks)
    base = block * BLOCK_BYTES
    for bit in bits:
        filter_bytes[base + (bit >> 3)] |= 1 << (bit & 7)


def may_contain(filter_bytes: bytes | bytearray | memoryview, key_hash: int, blocks: int) -> bool:
    """False when no key of hash ``key_hash`` was added; True otherwise (perhaps wrongly)."""
    block, bits = probes(key_hash, blocks)
    base = block * BLOCK_BYTES
    return all(filter_bytes[base + (bit >> 3)] >> (bit & 7) & 1 for bit in bits)
