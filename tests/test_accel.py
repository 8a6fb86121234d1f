"""The C accelerator against the pure-Python paths: same answers, same bytes, same errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2_stores.engine import accel, datafile, merge
from l2_stores.engine.framing import HEADER_SIZE, Expected
from l2_stores.errors import CannotReadFromStore

_accel = pytest.importorskip(
    "l2_stores.engine._accel", reason="the C accelerator is not built (no C compiler?)"
)

EXPECTED = Expected("accel", key_size=8, value_size=4)


def colliding_keys(groups: int, seed: int = 7) -> list[list[bytes]]:
    """``groups`` pairs of distinct 8-byte keys of equal CRC-32 (a birthday search)."""
    rng = random.Random(seed)
    seen: dict[int, bytes] = {}
    found: list[list[bytes]] = []
    while len(found) < groups:
        key = rng.randbytes(8)
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


def test_accelerator_is_in_use_unless_turned_off() -> None:
    assert accel.AcceleratedLookup is _accel.Lookup
    code = (
        "from l2_stores.engine import accel; print(accel.AcceleratedLookup, accel.AcceleratedMerge)"
    )
    env = dict(os.environ, **{accel.ENV_PURE_PYTHON: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "None"], out.stderr


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
    lookup = _accel.Lookup(b"\0" * 100, bytearray(1), 8, 16, 0, 64, 64, 64, 0, handback)
    with pytest.raises(ValueError, match="key of 3 bytes"):
        lookup.find(b"abc")
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
    path = tmp_path / "data.1"
    write(path, None, {b"12345678": b"abcd"}, c=True, monkeypatch=monkeypatch)
    data = open_data(path, c=True, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="other sizes"):
        _accel.MergePlan(data.lookup, [b"123456789"], [b"abc"], 9, 3)
    data.close()
    with pytest.raises(ValueError, match="released"):
        _accel.MergePlan(data.lookup, [], [], 8, 4)
