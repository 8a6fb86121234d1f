"""The C accelerator against the pure-Python paths: same answers, same bytes, same errors."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2_stores.engine import accel, datafile, framing, merge
from l2_stores.engine.framing import HEADER_SIZE, Expected
from l2_stores.errors import CannotReadFromStore

_accel = pytest.importorskip(
    "l2_stores.engine._accel", reason="the C accelerator is not built (no C compiler?)"
)

EXPECTED = Expected("accel", key_size=8, value_size=4)


def colliding_keys(
    groups: int, seed: int = 7, size: int = 8, prefix: bytes = b""
) -> list[list[bytes]]:
    """``groups`` pairs of distinct keys of equal CRC-32 (a birthday search)."""
    rng = random.Random(seed)
    seen: dict[int, bytes] = {}
    found: list[list[bytes]] = []
    while len(found) < groups:
        key = prefix + rng.randbytes(size - len(prefix))
        hashed = zlib.crc32(key)
        other = seen.setdefault(hashed, key)
        if other != key:
            found.append([other, key])
            del seen[hashed]
    return found


def write(
    path: Path,
    old: datafile.DataFile | None,
    updates: dict[bytes, bytes | None],
    *,
    c: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> bytes:
    with monkeypatch.context() as patch:
        if not c:
            patch.setattr(merge, "AcceleratedMerge", None)
        merge.merge(old, updates, str(path), EXPECTED, 2 if old else 1, fsync=False)
    return path.read_bytes()


def open_data(path: Path, *, c: bool, monkeypatch: pytest.MonkeyPatch) -> datafile.DataFile:
    with monkeypatch.context() as patch:
        if not c:
            patch.setattr(datafile, "AcceleratedLookup", None)
        return datafile.DataFile(str(path), EXPECTED)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_crc32_is_zlibs(data: bytes) -> None:
    assert _accel.crc32(data) == zlib.crc32(data)
    assert _accel.crc32(memoryview(data)) == zlib.crc32(data)


def test_crc32_is_zlibs_at_every_length_and_alignment() -> None:
    # 64 bytes and more go through the carry-less multiplication where the CPU
    # has it; the remainder (and everything shorter) through the tables
    rng = random.Random(3)
    block = rng.randbytes(1 << 17)
    for length in [*range(300), 1023, 4096, 4111, 65536, 65537, (1 << 17) - 3]:
        for start in (0, 1, 7):
            data = block[start : start + length]
            assert _accel.crc32(data) == zlib.crc32(data), (length, start)
    assert framing.crc32 is _accel.crc32


def test_crc32_tables_alone_agree_with_zlib() -> None:
    code = (
        "import random, zlib\n"
        "from l2_stores.engine import _accel\n"
        "assert not _accel.clmul()\n"
        "block = random.Random(4).randbytes(5000)\n"
        "for n in range(0, 5000, 37):\n"
        "    assert _accel.crc32(block[:n]) == zlib.crc32(block[:n]), n\n"
        "print('ok')\n"
    )
    env = dict(os.environ, L2_STORES_NO_CLMUL="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_framed_is_the_parts_then_their_crc(parts: list[bytes]) -> None:
    record = _accel.framed(*parts)
    assert record == framing._framed(*parts)
    body = b"".join(parts)
    assert record == body + zlib.crc32(body).to_bytes(4, "little")
    assert _accel.framed(*map(bytearray, parts)) == record
    assert _accel.framed(*[memoryview(part) for part in parts]) == record


def test_framed_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError):
        _accel.framed(b"ok", "text")
    with pytest.raises(TypeError, match="at most 8"):
        _accel.framed(*[b"x"] * 9)
    assert framing.framed is _accel.framed


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.integers(min_value=0, max_value=5000),
    st.sampled_from([_accel.write_framed, framing._write_framed]),
)
def test_write_framed_writes_framed_at_the_offset(
    tmp_path_factory: pytest.TempPathFactory,
    parts: list[bytes],
    offset: int,
    write_framed: object,
) -> None:
    path = tmp_path_factory.mktemp("w") / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"\xaa" * 10)
        size = write_framed(fd, offset, *parts)  # type: ignore[operator]
    finally:
        os.close(fd)
    record = framing._framed(*parts)
    assert size == len(record)
    end = offset + len(record)
    before = b"\xaa" * 10 + bytes(max(0, offset - 10))
    assert path.read_bytes() == before[:offset] + record + before[end:]


def test_write_framed_refusals_and_errors(tmp_path: Path) -> None:
    assert framing.write_framed is _accel.write_framed
    with pytest.raises(TypeError, match="1 to 8 parts"):
        _accel.write_framed(0, 0)
    with pytest.raises(TypeError, match="1 to 8 parts"):
        _accel.write_framed(0, 0, *[b"x"] * 9)
    with pytest.raises(ValueError, match="negative offset"):
        _accel.write_framed(0, -1, b"x")
    with pytest.raises(ValueError, match="bad file descriptor"):
        _accel.write_framed(-1, 0, b"x")
    for write_framed in (_accel.write_framed, framing._write_framed):
        with pytest.raises(TypeError):
            write_framed(0, 0, "text")
        with pytest.raises(TypeError):  # could change while the GIL is released
            write_framed(0, 0, b"ok", bytearray(b"mutable"))
        with pytest.raises(TypeError):
            write_framed(0, 0)
    read_only = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as caught:
            _accel.write_framed(read_only, 0, b"abc")
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(read_only)


def test_write_framed_resumes_a_short_write_then_reports_the_error(tmp_path: Path) -> None:
    # A file size limit cuts the pwritev short; the next call fails with EFBIG.
    code = f"""
import errno, os, resource, signal
from l2_stores.engine import _accel
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT)
try:
    _accel.write_framed(fd, 90, b"0123456789", b"abcdefghij")
except OSError as error:
    print(error.errno == errno.EFBIG, os.pread(fd, 100, 90))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True b'0123456789'", out.stderr


def values_record(key: bytes, value: bytes) -> bytes:
    n = len(value).to_bytes(4, "little")
    return framing._framed(n, key, value, n)


def python_value_of_record(buffer: bytes, offset: int, length: int, key: bytes) -> bytes | None:
    size = 12 + len(key) + length
    record = buffer[offset : offset + size]
    if (
        offset < 0
        or len(record) != size
        or zlib.crc32(record) != framing.CRC_RESIDUE
        or int.from_bytes(record[:4], "little") != length
        or record[4 : 4 + len(key)] != key
    ):
        return None
    return record[4 + len(key) : 4 + len(key) + length]


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=8, max_size=8),
    st.binary(max_size=200),
    st.integers(min_value=0, max_value=40),
    st.one_of(
        st.none(),
        st.tuples(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=255)),
    ),
    st.sampled_from(["same", "other key", "other length", "offset", "cut"]),
)
def test_value_of_record_checks_like_python(
    key: bytes, value: bytes, before: int, flip: tuple[int, int] | None, ask: str
) -> None:
    buffer = bytearray(b"\x55" * before + values_record(key, value) + b"\x66" * 3)
    if flip is not None and flip[0] < len(buffer):
        buffer[flip[0]] ^= flip[1]
    offset, length, probe = before, len(value), key
    if ask == "other key":
        probe = bytes(8)
    elif ask == "other length":
        length += 1
    elif ask == "offset":
        offset += 1
    elif ask == "cut":
        del buffer[before + 12 + 8 + len(value) - 1 :]
    data = bytes(buffer)
    expected = python_value_of_record(data, offset, length, probe)
    assert _accel.value_of_record(data, offset, length, probe) == expected
    if flip is None and ask == "same":
        assert expected == value


def test_value_of_record_refusals() -> None:
    record = values_record(b"k" * 8, b"value")
    assert _accel.value_of_record(record, 0, 5, b"k" * 8) == b"value"
    assert _accel.value_of_record(record, -1, 5, b"k" * 8) is None
    assert _accel.value_of_record(record, 0, -1, b"k" * 8) is None
    assert _accel.value_of_record(record, 1 << 40, 5, b"k" * 8) is None
    # A well-checksummed record whose length field is not the index's length.
    lying = framing._framed(
        (6).to_bytes(4, "little"), b"k" * 8, b"value", (5).to_bytes(4, "little")
    )
    assert _accel.value_of_record(lying, 0, 5, b"k" * 8) is None
    assert python_value_of_record(lying, 0, 5, b"k" * 8) is None
    with pytest.raises(TypeError, match="key must be bytes"):
        _accel.value_of_record(record, 0, 5, bytearray(b"k" * 8))
    with pytest.raises(TypeError):
        _accel.value_of_record(record, 0, 5)


def test_accelerator_is_in_use_unless_turned_off() -> None:
    assert accel.AcceleratedLookup is _accel.Lookup
    code = (
        "from l2_stores.engine import accel; "
        "print(accel.AcceleratedLookup, accel.AcceleratedMerge, accel.accelerated_framed)"
    )
    env = dict(os.environ, **{accel.ENV_PURE_PYTHON: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "None", "None"], out.stderr


COLLIDING = [key for pair in colliding_keys(40, seed=3) for key in pair]
keys_st = st.binary(min_size=8, max_size=8) | st.sampled_from(COLLIDING)
values_st = st.binary(min_size=4, max_size=4)


@settings(max_examples=150)
@given(
    st.dictionaries(keys_st, values_st, max_size=1500),
    st.dictionaries(keys_st, st.none() | values_st, max_size=300),
    st.booleans(),
)
def test_c_and_python_merges_write_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    base: dict[bytes, bytes],
    updates: dict[bytes, bytes | None],
    shared: bool,
) -> None:
    monkeypatch = pytest.MonkeyPatch()
    directory = tmp_path_factory.mktemp("merge")
    if shared:  # updates that replace and remove existing keys
        for existing in list(base)[: len(updates)]:
            updates[existing] = None if existing[0] % 3 == 0 else existing[:4]
    first_c = write(directory / "c.1", None, dict(base), c=True, monkeypatch=monkeypatch)
    first_py = write(directory / "py.1", None, dict(base), c=False, monkeypatch=monkeypatch)
    assert first_c == first_py
    old = open_data(directory / "c.1", c=True, monkeypatch=monkeypatch)
    try:
        second_c = write(directory / "c.2", old, updates, c=True, monkeypatch=monkeypatch)
        second_py = write(directory / "py.2", old, updates, c=False, monkeypatch=monkeypatch)
    finally:
        old.close()
    assert second_c == second_py
    expected = dict(base)
    for key, value in updates.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    for c in (True, False):
        merged = open_data(directory / "c.2", c=c, monkeypatch=monkeypatch)
        try:
            assert dict(merged.items()) == expected
            for key in list(base) + list(updates):
                assert merged.find(key) == expected.get(key)
        finally:
            merged.close()


@pytest.mark.parametrize("c_merge", [True, False])
def test_real_hash_collisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, c_merge: bool
) -> None:
    groups = colliding_keys(12)
    base = {pair[0]: b"old%d" % (i % 10) for i, pair in enumerate(groups)}
    rng = random.Random(1)
    filler = {rng.randbytes(8): b"fill" for _ in range(2000)}
    write(tmp_path / "data.1", None, {**base, **filler}, c=c_merge, monkeypatch=monkeypatch)
    old = open_data(tmp_path / "data.1", c=True, monkeypatch=monkeypatch)
    # The second key of each pair is inserted beside the first; some firsts are replaced or removed.
    updates: dict[bytes, bytes | None] = {
        pair[1]: b"new%d" % (i % 10) for i, pair in enumerate(groups)
    }
    for i, pair in enumerate(groups[:6]):
        updates[pair[0]] = None if i % 2 else b"rep%d" % i
    write(tmp_path / "data.2", old, updates, c=c_merge, monkeypatch=monkeypatch)
    old.close()
    for c_find in (True, False):
        merged = open_data(tmp_path / "data.2", c=c_find, monkeypatch=monkeypatch)
        for i, (first, second) in enumerate(groups):
            assert merged.find(second) == b"new%d" % (i % 10)
            if i < 6:
                assert merged.find(first) == (None if i % 2 else b"rep%d" % i)
            else:
                assert merged.find(first) == b"old%d" % (i % 10)
        merged.close()


def corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


def test_c_lookup_reports_a_corrupt_bucket_and_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindings = {i.to_bytes(8, "big"): i.to_bytes(4, "big") for i in range(3000)}
    path = tmp_path / "data.1"
    write(path, None, bindings, c=True, monkeypatch=monkeypatch)
    probe = open_data(path, c=True, monkeypatch=monkeypatch)
    victim = next(iter(bindings))
    index, found = probe.locate(datafile.key_hash(victim), victim)
    count, row_size = probe.count, probe.row_size
    probe.close()
    assert found
    rows_start = HEADER_SIZE + 4 * count

    corrupt(path, rows_start + index * row_size + 9)  # a value byte of the victim's row
    data = open_data(path, c=True, monkeypatch=monkeypatch)
    with pytest.raises(CannotReadFromStore) as raised:
        data.find(victim)
    assert raised.value.offset == rows_start + index * row_size
    assert str(path) in str(raised.value) and "accel" in str(raised.value)
    data.close()
    corrupt(path, rows_start + index * row_size + 9)  # repaired

    corrupt(path, HEADER_SIZE + 4 * index)  # the victim's hash
    data = open_data(path, c=True, monkeypatch=monkeypatch)
    with pytest.raises(CannotReadFromStore, match="hash column checksum mismatch"):
        data.find(victim)
    with pytest.raises(CannotReadFromStore, match="hash column checksum mismatch"):
        data.find(victim)  # still refused: the bucket was never marked verified
    with pytest.raises(CannotReadFromStore, match="hash column checksum mismatch"):
        write(tmp_path / "data.2", data, {b"new key!": b"valu"}, c=True, monkeypatch=monkeypatch)
    assert not (tmp_path / "data.2").exists()
    data.close()


def test_c_merge_refuses_a_corrupt_row_it_compares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = colliding_keys(1)[0]
    path = tmp_path / "data.1"
    write(path, None, {first: b"abcd"}, c=True, monkeypatch=monkeypatch)
    corrupt(path, HEADER_SIZE + 4 + 9)  # the only row's value
    data = open_data(path, c=True, monkeypatch=monkeypatch)
    with pytest.raises(CannotReadFromStore, match="row 0 checksum mismatch"):
        write(tmp_path / "data.2", data, {second: b"efgh"}, c=True, monkeypatch=monkeypatch)
    assert not (tmp_path / "data.2").exists()
    data.close()


def test_lookup_and_plan_refuse_bad_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def handback(key: bytes, code: int) -> None:
        return None

    with pytest.raises(ValueError, match="outside the buffer"):
        _accel.Lookup(b"\0" * 100, bytearray(1), 8, 16, 10, 64, 104, 0, 0, handback)
    with pytest.raises(ValueError, match="outside the buffer"):
        _accel.Lookup(b"\0" * 100, bytearray(0), 8, 16, 0, 64, 64, 64, 0, handback)
    with pytest.raises(ValueError, match="out of range"):
        _accel.Lookup(b"\0" * 100, bytearray(1), 8, 4, 0, 64, 64, 64, 0, handback)
    with pytest.raises(TypeError):
        _accel.Lookup(b"\0" * 100, bytearray(1), 8, 16, 0, 64, 64, 64, 0, None)
    # no room for the bucket checksums after the fan-out
    with pytest.raises(ValueError, match="outside the buffer"):
        _accel.Lookup(b"\0" * 100, bytearray(1), 8, 16, 0, 64, 64, 90, 0, handback)
    lookup = _accel.Lookup(b"\0" * 100, bytearray(1), 8, 16, 0, 64, 64, 64, 0, handback)
    assert lookup.find(b"abc") is None  # no key of another size is bound, as in Python
    lookup.release()
    with pytest.raises(ValueError, match="released"):
        lookup.find(b"12345678")
    with pytest.raises(ValueError, match="given twice"):
        _accel.MergePlan(None, [b"12345678", b"12345678"], [b"abcd", b"efgh"], 8, 4)
    with pytest.raises(ValueError, match="not 8 bytes"):
        _accel.MergePlan(None, [b"1234567"], [b"abcd"], 8, 4)
    with pytest.raises(ValueError, match="not 4 bytes"):
        _accel.MergePlan(None, [b"12345678"], [b"abc"], 8, 4)
    with pytest.raises(ValueError, match="differ in length"):
        _accel.MergePlan(None, [b"12345678"], [], 8, 4)
    with pytest.raises(ValueError, match="sizes out of range"):
        _accel.MergePlan(None, [b"12345678"] * 16, [None] * 16, 8, 2**60)
    plan = _accel.MergePlan(None, [b"12345678"], [b"abcd"], 8, 4)
    with pytest.raises(RuntimeError, match="already initialised"):
        plan.__init__(None, [b"87654321"], [b"abcd"], 8, 4)  # type: ignore[misc]
    with pytest.raises(ValueError, match="out of range"):
        plan.write(-1, 64, 0)
    path = tmp_path / "data.1"
    write(path, None, {b"12345678": b"abcd"}, c=True, monkeypatch=monkeypatch)
    data = open_data(path, c=True, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="other sizes"):
        _accel.MergePlan(data.lookup, [b"123456789"], [b"abc"], 9, 3)
    data.close()
    with pytest.raises(ValueError, match="released"):
        _accel.MergePlan(data.lookup, [], [], 8, 4)


def keys_hashing(count: int, low: int, high: int, size: int = 8, seed: int = 5) -> list[bytes]:
    """``count`` random keys whose CRC-32 lies in ``[low, high)``."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    while len(keys) < count:
        key = rng.randbytes(size)
        if low <= zlib.crc32(key) < high:
            keys.append(key)
    return keys


@pytest.mark.parametrize(
    ("case", "expected", "base_keys", "update_keys"),
    [
        # empty trailing buckets, then empty leading ones (fan-out bits 3 and more)
        ("low hashes", EXPECTED, keys_hashing(6000, 0, 2**29), keys_hashing(700, 0, 2**29, seed=6)),
        (
            "high hashes",
            EXPECTED,
            keys_hashing(6000, 2**31 + 2**30, 2**32),
            keys_hashing(700, 2**31 + 2**30, 2**32, seed=6),
        ),
        # 50,000 rows: 7 fan-out bits
        (
            "many rows",
            EXPECTED,
            keys_hashing(50_000, 0, 2**32),
            keys_hashing(5000, 0, 2**32, seed=6),
        ),
        # rows of 4 KiB: the output passes the C merge's 1 MiB buffers, both branches
        (
            "big rows, few updates",
            Expected("accel", key_size=8, value_size=4096),
            keys_hashing(1500, 0, 2**32),
            keys_hashing(3, 0, 2**32, seed=6),
        ),
        (
            "big rows, many updates",
            Expected("accel", key_size=8, value_size=4096),
            keys_hashing(1500, 0, 2**32),
            keys_hashing(300, 0, 2**32, seed=6),
        ),
        # another key size, with colliding keys that share their first 16 bytes
        (
            "24-byte keys",
            Expected("accel", key_size=24, value_size=4),
            keys_hashing(3000, 0, 2**32, size=24),
            [k for pair in colliding_keys(4, size=24, prefix=bytes(16)) for k in pair]
            + keys_hashing(300, 0, 2**32, size=24, seed=6),
        ),
    ],
)
def test_c_and_python_agree_across_fanouts_and_sizes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    expected: Expected,
    base_keys: list[bytes],
    update_keys: list[bytes],
) -> None:
    value_of = {key: key[:1] * expected.value_size for key in base_keys}
    updates: dict[bytes, bytes | None] = {
        key: key[-1:] * expected.value_size for key in update_keys
    }
    for i, key in enumerate(base_keys[: min(200, len(update_keys))]):  # replace, remove
        updates[key] = None if i % 2 else bytes(expected.value_size)
    outputs: dict[bool, tuple[bytes, bytes]] = {}
    for c in (True, False):
        with monkeypatch.context() as patch:
            if not c:
                patch.setattr(merge, "AcceleratedMerge", None)
            first = tmp_path / f"{c}.1"
            merge.merge(None, dict(value_of), str(first), expected, 1, fsync=False)
            old = datafile.DataFile(str(first), expected)
            second = tmp_path / f"{c}.2"
            merge.merge(old, updates, str(second), expected, 2, fsync=False)
            old.close()
            outputs[c] = (first.read_bytes(), second.read_bytes())
    assert outputs[True] == outputs[False], case
    merged = datafile.DataFile(str(tmp_path / "True.2"), expected)
    final = {**value_of, **updates}
    for key in list(final)[:2000]:
        assert merged.find(key) == final[key]
    merged.close()


def test_c_find_answers_as_python_for_odd_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data.1"
    write(path, None, {b"12345678": b"abcd"}, c=True, monkeypatch=monkeypatch)
    for c in (True, False):
        data = open_data(path, c=c, monkeypatch=monkeypatch)
        assert data.find(b"1234") is None
        assert data.find(bytearray(b"12345678")) == b"abcd"  # type: ignore[arg-type]
        assert data.find(memoryview(b"12345678")) == b"abcd"  # type: ignore[arg-type]
        data.close()


def test_layers_look_in_active_then_frozen_then_the_data_file() -> None:
    layers = _accel.Layers()
    assert layers.get(b"k") is None  # nothing set yet: an empty store
    asked: list[bytes] = []

    def find(key: bytes) -> bytes | None:
        asked.append(key)
        return b"data" if key == b"in-data" else None

    active: dict[bytes, bytes | None] = {b"a": b"1", b"removed": None, b"both": b"new"}
    frozen: dict[bytes, bytes | None] = {b"f": b"2", b"both": b"old", b"gone": None}
    layers.set(active, frozen, find)
    assert layers.get(b"a") == b"1"
    assert layers.get(b"both") == b"new"  # the active log wins over the frozen one
    assert layers.get(b"f") == b"2"
    assert layers.get(b"removed") is None and layers.get(b"gone") is None
    assert asked == []  # a binding or a removal in a log answers without the data file
    assert layers.get(b"in-data") == b"data"
    assert layers.get(b"absent") is None
    assert asked == [b"in-data", b"absent"]
    active[b"later"] = b"3"  # the dicts are shared, not copied
    assert layers.get(b"later") == b"3"
    layers.set(active, None, None)
    assert layers.get(b"f") is None and layers.get(b"in-data") is None


def test_layers_pass_errors_through_and_refuse_bad_arguments() -> None:
    layers = _accel.Layers()

    def broken(key: bytes) -> bytes | None:
        raise CannotReadFromStore("corrupt", name="accel")

    layers.set({}, None, broken)
    with pytest.raises(CannotReadFromStore):
        layers.get(b"k")
    with pytest.raises(TypeError):
        layers.get([])  # unhashable: the dict's own error
    for bad in (([], None, None), ({}, [], None), ({}, None, 3)):
        with pytest.raises(TypeError):
            layers.set(*bad)
    with pytest.raises(TypeError):
        layers.set({}, None)


def test_index_c_read_path_follows_merges_and_reloads(tmp_path: Path) -> None:
    from l2_stores.engine.index import Index

    directory = str(tmp_path / "index")
    expected = Expected("accel", key_size=8, value_size=8)
    rng = random.Random(3)
    model: dict[bytes, bytes | None] = {}
    index = Index(directory, expected, readonly=False, buffer_size=7)
    reader = Index(directory, expected, readonly=True, buffer_size=7)
    try:
        assert index.get is not Index.get.__get__(index)  # the C read path is in use
        keys = [rng.randbytes(8) for _ in range(60)]
        for step in range(400):
            key = rng.choice(keys)
            if rng.random() < 0.2:
                index.remove(key, flush=True)
                model[key] = None
            else:
                value = rng.randbytes(8)
                index.put(key, value, True)
                model[key] = value
            if step % 50 == 49:
                reader.sync()
                for probe in keys:
                    assert index.get(probe) == model.get(probe)
                    assert reader.get(probe) == Index.get(reader, probe) == model.get(probe)
            probe = rng.choice(keys)
            assert index.get(probe) == Index.get(index, probe) == model.get(probe)
        index.begin_gc()  # a GC drops half the keys: the old data file must not answer
        kept = {key: None for key in keys[::2]}
        index.collect(kept)
        model = {key: model.get(key) for key in kept}
        for probe in keys:
            assert index.get(probe) == Index.get(index, probe) == model.get(probe)
    finally:
        reader.close()
        index.close()
    index = Index(directory, expected, readonly=False, buffer_size=7)
    try:
        for probe in keys:
            assert index.get(probe) == model.get(probe)
    finally:
        index.close()


def python_replay(
    buffer: bytes, key_size: int, value_size: int
) -> tuple[tuple[int, int, bool], dict[bytes, Any]]:
    """The log's replay rule as log.py's docstring gives it (the oracle of the C one)."""
    size = 1 + key_size + value_size + 4
    bindings: dict[bytes, Any] = {}
    position, synced_at = 0, -1
    while position + size <= len(buffer):
        record = buffer[position : position + size]
        op, synced = record[0] & 0x7F, record[0] & 0x80
        if zlib.crc32(record[:-4]) != int.from_bytes(record[-4:], "little") or op not in (
            1,
            2,
            3,
            4,
        ):
            break
        key = record[1 : 1 + key_size]
        if op in (1, 2):
            bindings[key] = record[1 + key_size : -4] if op == 1 else None
        if synced or op == 3:
            synced_at = position
        position += size
        if op == 4:
            return (position, synced_at, True), bindings
    return (position, synced_at, False), bindings


@pytest.mark.parametrize("seed", range(40))
def test_replay_log_stops_where_python_stops(seed: int) -> None:
    rng = random.Random(seed)
    key_size, value_size = rng.choice([(8, 4), (32, 32), (1, 0), (0, 3)])
    keys = [rng.randbytes(key_size) for _ in range(5)]
    records = []
    for _ in range(rng.randrange(0, 30)):
        op = rng.choice([1, 1, 1, 2, 2, 3, 4]) | rng.choice([0, 0, 0x80])
        value = rng.randbytes(value_size) if op & 0x7F == 1 else bytes(value_size)
        records.append(framing.framed(bytes([op]), rng.choice(keys), value))
    buffer = bytearray(b"".join(records))
    damage = rng.choice(["none", "flip", "op", "torn", "zeros"])
    if damage == "flip" and buffer:
        buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif damage == "op" and records:
        record_size = len(records[0])
        at = rng.randrange(len(records)) * record_size
        buffer[at : at + record_size] = framing.framed(
            bytes([rng.choice([0, 5, 0x85, 0x7F])]), buffer[at + 1 : at + record_size - 4]
        )
    elif damage == "torn":
        buffer += rng.randbytes(rng.randrange(1, 1 + key_size + value_size + 4))
    elif damage == "zeros":
        buffer += bytes(rng.randrange(1, 100))
    bindings: dict[bytes, bytes | None] = {}
    stopped = _accel.replay_log(bytes(buffer), key_size, value_size, bindings)
    assert (stopped, bindings) == python_replay(bytes(buffer), key_size, value_size)


def test_replay_log_refusals() -> None:
    with pytest.raises(ValueError):
        _accel.replay_log(b"", -1, 4, {})
    with pytest.raises(ValueError):
        _accel.replay_log(b"", 8, 4, [])
    with pytest.raises(TypeError):
        _accel.replay_log("text", 8, 4, {})
    with pytest.raises(TypeError):
        _accel.replay_log(b"", 8, 4)


def _python_puts(index: Any) -> None:
    """Make ``index`` put through the Python path only, as without the accelerator."""
    index.put = index._put_in_python


def test_c_put_writes_the_bytes_python_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same writes through the C put and the Python put: the same log, byte for byte
    (no merge), and the same bindings once merges ran (their timing is the threads')."""
    from l2_stores.engine.index import Index

    expected = Expected("accel", key_size=8, value_size=8)
    rng = random.Random(11)
    keys = [rng.randbytes(8) for _ in range(40)]
    steps = []
    for _ in range(300):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.1:
            steps.append(("remove", key, b"", True))
        else:
            steps.append(("put", key, rng.randbytes(8), roll > 0.25))  # a quarter unflushed
    handed: list[bytes] = []
    python_put = Index._put_in_python

    def counted(self: Index, key: bytes, value: bytes, flush: bool) -> None:
        handed.append(key)
        python_put(self, key, value, flush)

    monkeypatch.setattr(Index, "_put_in_python", counted)
    for buffer_size in (1000, 9):
        finals = []
        for c in (True, False):
            directory = tmp_path / f"{buffer_size}-{'c' if c else 'python'}"
            index = Index(str(directory), expected, readonly=False, buffer_size=buffer_size)
            if not c:
                _python_puts(index)
            handed.clear()
            try:
                for op, key, value, flush in steps:
                    if op == "remove":
                        index.remove(key, flush=flush)
                    else:
                        index.put(key, value, flush)
                    probe = rng.choice(keys)
                    assert index.get(probe) == Index.get(index, probe)
                index.flush()
                if c:  # the C put did most flushed puts
                    flushed = sum(1 for op, _, _, flush in steps if op == "put" and flush)
                    assert len(handed) < flushed / 2
                if buffer_size == 1000:
                    finals.append([path.read_bytes() for path in directory.glob("log.*")])
            finally:
                index.close()
            index = Index(str(directory), expected, readonly=True)
            finals.append(dict(index.items()))
            index.close()
        assert finals[: len(finals) // 2] == finals[len(finals) // 2 :]
        assert finals[0]


def test_c_put_hands_other_cases_to_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from l2_stores.engine.index import Index

    expected = Expected("accel", key_size=8, value_size=8)
    handed: list[tuple[bytes, bytes, bool]] = []
    python_put = Index._put_in_python

    def counted(self: Index, key: bytes, value: bytes, flush: bool) -> None:
        handed.append((key, value, flush))
        python_put(self, key, value, flush)

    monkeypatch.setattr(Index, "_put_in_python", counted)
    index = Index(str(tmp_path / "a"), expected, readonly=False, buffer_size=4)
    try:
        index.put(b"k" * 8, b"v" * 8, True)
        index.put(b"k" * 8, b"w" * 8, flush=True)  # flush as a keyword
        assert handed == []  # both done in C
        assert index.get(b"k" * 8) == b"w" * 8
        index.put(b"u" * 8, b"1" * 8, False)  # unflushed: Python
        index.put(b"p" * 8, b"2" * 8, True)  # something pending: Python (keeps the order)
        assert [key for key, _, _ in handed] == [b"u" * 8, b"p" * 8]
        index.put(b"q" * 8, b"3" * 8, True)  # the 4th record froze the log: a new one, in C
        assert len(handed) == 2
        index.begin_gc()  # keys are recorded during a GC: Python
        index.put(b"g" * 8, b"4" * 8, True)
        assert len(handed) == 3
        index.end_gc()
        index.put(b"h" * 8, b"5" * 8, True)
        assert len(handed) == 3
        index.put(b"short", b"5" * 8, True)  # not the key size: Python
        assert len(handed) == 4
        with pytest.raises(TypeError):  # not bytes: Python, which refuses it
            index.put(b"h" * 8, bytearray(b"5" * 8), True)  # type: ignore[arg-type]
        assert len(handed) == 5
        with pytest.raises(TypeError):
            index.put(b"h" * 8, b"5" * 8)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            index.put(b"h" * 8, b"5" * 8, fsync=True)  # type: ignore[call-arg]
    finally:
        index.close()
    syncing = Index(str(tmp_path / "b"), expected, readonly=False, buffer_size=4, fsync=True)
    try:
        syncing.put(b"k" * 8, b"v" * 8, True)  # fsync: Python
        assert len(handed) == 6
    finally:
        syncing.close()
    reader = Index(str(tmp_path / "a"), expected, readonly=True)
    try:
        with pytest.raises(Exception, match="read-only"):
            reader.put(b"k" * 8, b"v" * 8, True)
        assert len(handed) == 7
    finally:
        reader.close()


def test_c_put_reports_a_failed_write_as_python_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the C put cannot make raises the store's error from the OSError, the
    log cut back to its end (as LogWriter.append_set does); Python is not asked."""
    from l2_stores.engine.index import Index
    from l2_stores.errors import CannotWriteToStore

    handed: list[bytes] = []
    monkeypatch.setattr(Index, "_put_in_python", lambda self, key, *rest: handed.append(key))
    expected = Expected("accel", key_size=8, value_size=8)
    index = Index(str(tmp_path / "a"), expected, readonly=False, buffer_size=100)
    log = index._log
    assert log is not None
    log._unmap()  # the written path: a store into the map cannot fail this way
    index.put(b"a" * 8, b"1" * 8, True)
    end = log._end
    cuts: list[int] = []
    real_failed_write = log._failed_write

    def failed_write(error: OSError) -> CannotWriteToStore:
        cuts.append(log._end)
        return real_failed_write(error)

    log._failed_write = failed_write  # type: ignore[method-assign]
    fd = log._fd
    try:
        os.close(fd)  # the C write fails: EBADF
        with pytest.raises(CannotWriteToStore, match="Bad file descriptor") as raised:
            index.put(b"b" * 8, b"2" * 8, True)
        assert isinstance(raised.value.__cause__, OSError)
        assert raised.value.__cause__.errno == errno.EBADF
        assert cuts == [end] and handed == []
        assert log._end == end and log.records == 1
        assert index.get(b"b" * 8) is None
    finally:
        log._fd = -1
        index.close()


def test_c_writer_goes_with_its_index(tmp_path: Path) -> None:
    import gc
    import weakref

    from l2_stores.engine.index import Index

    index = Index(str(tmp_path / "a"), Expected("accel", 8, 8), readonly=False)
    index.put(b"k" * 8, b"v" * 8, True)
    put = index.put
    index.close()
    alive = weakref.ref(index)
    gc.disable()
    try:
        del index  # no cycle through the writer: freed at once, without the collector
        assert alive() is None
    finally:
        gc.enable()
    with pytest.raises(ReferenceError):
        put(b"k" * 8, b"v" * 8, True)
    with pytest.raises(ValueError):
        _accel.Writer(object(), 0, 0, 8, 8)
    tail = _accel.LogTail()
    assert tail._fd == -1 and tail.records == 0


def test_c_put_goes_past_the_buffer_while_a_merge_runs_up_to_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the Python put: past the buffer while a merge runs, the C put appends; at the
    cap it hands over to Python, which waits for the merge."""
    import threading

    import l2_stores.engine.index as index_module
    from l2_stores.engine.index import Index

    release = threading.Event()
    real_merge = index_module.merge

    def held_merge(*args: Any) -> Any:
        assert release.wait(30), "the test never released the merge"
        return real_merge(*args)

    handed: list[bytes] = []
    python_put = Index._put_in_python

    def counted(self: Index, key: bytes, value: bytes, flush: bool) -> None:
        handed.append(key)
        python_put(self, key, value, flush)

    monkeypatch.setattr(index_module, "merge", held_merge)
    monkeypatch.setattr(Index, "_put_in_python", counted)
    expected = Expected("accel", key_size=8, value_size=8)
    index = Index(str(tmp_path / "a"), expected, readonly=False, buffer_size=4)  # cap 12
    keys = [bytes([i]) * 8 for i in range(17)]
    try:
        for key in keys[:4]:  # the fourth freezes the log: a held merge
            index.put(key, key, True)
        for key in keys[4:16]:  # the new log to its cap, past the buffer: all in C
            index.put(key, key, True)
        assert handed == [] and index._log is not None and index._log.records == 12
        releaser = threading.Timer(0.2, release.set)
        releaser.start()
        index.put(keys[16], keys[16], True)  # at the cap: Python, which waits for the merge
        releaser.join()
        assert handed == [keys[16]]
        for key in keys:
            assert index.get(key) == key
    finally:
        release.set()
        index.close()
    again = Index(str(tmp_path / "a"), expected, readonly=True)
    try:
        assert dict(again.items()) == {key: key for key in keys}
    finally:
        again.close()
