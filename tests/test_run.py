"""Runs alone: the format, lookups, seeks, ordered scans, the filter and corruption."""

from __future__ import annotations

import itertools
import os
import random
import struct
import zlib
from bisect import bisect_left
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l2_stores.engine import filter as bloom
from l2_stores.engine.framing import Expected
from l2_stores.engine.run import (
    REMOVAL_RESIDUE,
    REMOVED,
    Removed,
    Run,
    RunWriter,
    check_run,
)
from l2_stores.errors import CannotLoadStore, CannotReadFromStore
from tests.helpers.runs import rewrite_run_header, run_header, run_sections

Model = dict[bytes, bytes | Removed]


def write_run(
    path: Path, expected: Expected, model: Model, *, capacity: int | None = None, lo: int = 0
) -> Run:
    writer = RunWriter(str(path), expected, lo, lo + 3, capacity or len(model), tag=7)
    for key in sorted(model):
        writer.add(key, model[key])
    writer.finish(fsync=False)
    return Run(str(path), expected)


def random_model(rng: random.Random, count: int, key_size: int, value_size: int) -> Model:
    model: Model = {}
    while len(model) < count:
        key = rng.randbytes(key_size)
        model[key] = REMOVED if rng.random() < 0.1 else rng.randbytes(value_size)
    return model


def check_against(run: Run, model: Model, probes: list[bytes]) -> None:
    keys = sorted(model)
    for key in keys:
        assert run.find(key) == model[key]
    for key in probes:
        assert run.find(key) == model.get(key)
        assert run.seek(key) == bisect_left(keys, key)
    assert list(run.rows()) == [(key, model[key]) for key in keys]


@pytest.mark.parametrize(
    ("key_size", "value_size", "count"),
    [(32, 32, 3000), (4, 4, 5000), (8, 0, 700), (2, 3, 1), (1, 8, 200)],
)
def test_random_keys_round_trip(tmp_path: Path, key_size: int, value_size: int, count: int) -> None:
    rng = random.Random(key_size * 1000 + count)
    expected = Expected("runs", key_size, value_size)
    model = random_model(rng, count, key_size, value_size)
    run = write_run(tmp_path / "run", expected, model, capacity=count + 17)
    assert (run.count, run.lo, run.hi, run.tag) == (count, 0, 3, 7)
    assert run.removals == sum(value is REMOVED for value in model.values())
    probes = [rng.randbytes(key_size) for _ in range(500)]
    check_against(run, model, probes)
    assert list(check_run(run.path, expected.name)) == []
    run.close()


def test_dense_counter_keys(tmp_path: Path) -> None:
    """Int32ub levels counting up: the radix spreads them as evenly as random hashes."""
    expected = Expected("levels", 4, 32)
    model: Model = {struct.pack(">I", 1_000 + level): bytes(32) for level in range(20_000)}
    run = write_run(tmp_path / "run", expected, model)
    probes = [struct.pack(">I", level) for level in range(0, 25_000, 7)]
    check_against(run, model, probes)
    g = run.geometry
    radix = [
        int.from_bytes(run._view[g.radix + 4 * b : g.radix + 4 * b + 4], "little")
        for b in range((1 << g.radix_bits) + 1)
    ]
    assert max(b - a for a, b in itertools.pairwise(radix)) <= 3
    run.close()


def test_ranges_and_reverse(tmp_path: Path) -> None:
    rng = random.Random(5)
    expected = Expected("ranges", 2, 2)
    model = random_model(rng, 3000, 2, 2)
    run = write_run(tmp_path / "run", expected, model)
    keys = sorted(model)
    for _ in range(300):
        start, stop = sorted(rng.randbytes(2) for _ in range(2))
        low, high = bisect_left(keys, start), bisect_left(keys, stop)
        want = [(key, model[key]) for key in keys[low:high]]
        assert list(run.rows(start, stop)) == want
        assert list(run.rows(start, stop, reverse=True)) == want[::-1]
    assert list(run.rows(None, keys[10])) == [(key, model[key]) for key in keys[:10]]
    assert list(run.rows(keys[-10], None)) == [(key, model[key]) for key in keys[-10:]]
    run.close()


@given(
    st.dictionaries(
        st.binary(min_size=3, max_size=3),
        st.one_of(st.just(REMOVED), st.binary(min_size=2, max_size=2)),
        max_size=400,
    ),
    st.lists(st.binary(min_size=3, max_size=3), max_size=50),
    st.integers(min_value=0, max_value=300),
)
def test_any_run_answers_like_a_dict(
    tmp_path_factory: pytest.TempPathFactory, model: Model, probes: list[bytes], spare: int
) -> None:
    path = tmp_path_factory.mktemp("run") / "run"
    run = write_run(path, Expected("prop", 3, 2), model, capacity=len(model) + spare)
    check_against(run, model, [*probes, bytes(3), b"\xff" * 3])
    run.close()


def test_empty_run(tmp_path: Path) -> None:
    expected = Expected("empty", 8, 8)
    run = write_run(tmp_path / "run", expected, {}, capacity=0)
    assert run.find(bytes(8)) is None
    assert run.seek(bytes(8)) == 0
    assert list(run.rows()) == []
    assert list(check_run(run.path, expected.name)) == []
    run.close()


def test_removal_residue_is_one_constant() -> None:
    rng = random.Random(1)
    for size in (0, 1, 5, 64, 1000):
        body = rng.randbytes(size)
        inverted = (zlib.crc32(body) ^ 0xFFFFFFFF).to_bytes(4, "little")
        assert zlib.crc32(body + inverted) == REMOVAL_RESIDUE


def test_filter_false_positives_near_one_percent() -> None:
    rng = random.Random(2)
    keys = [rng.randbytes(32) for _ in range(20_000)]
    blocks = bloom.filter_blocks(len(keys))
    bits = bytearray(blocks * bloom.BLOCK_BYTES)
    for key in keys:
        bloom.add(bits, zlib.crc32(key), blocks)
    assert all(bloom.may_contain(bits, zlib.crc32(key), blocks) for key in keys)
    others = [struct.pack(">Q", n) for n in range(20_000)]
    rate = sum(bloom.may_contain(bits, zlib.crc32(key), blocks) for key in others) / len(others)
    assert rate < 0.02


def test_writer_refuses_bad_rows(tmp_path: Path) -> None:
    expected = Expected("bad", 2, 1)
    writer = RunWriter(str(tmp_path / "run"), expected, 0, 0, capacity=2)
    writer.add(b"bb", b"x")
    with pytest.raises(ValueError, match="out of order"):
        writer.add(b"aa", b"x")
    with pytest.raises(ValueError, match="out of order"):
        writer.add(b"bb", b"x")
    with pytest.raises(ValueError, match="key of 3 bytes"):
        writer.add(b"ccc", b"x")
    with pytest.raises(ValueError, match="value of 2 bytes"):
        writer.add(b"cc", b"xy")
    writer.add(b"cc", REMOVED)
    with pytest.raises(ValueError, match="full"):
        writer.add(b"dd", b"x")
    writer.abort()
    assert not (tmp_path / "run").exists()


def test_wrong_sizes_and_truncation_refused_naming_the_file(tmp_path: Path) -> None:
    expected = Expected("sizes", 4, 4)
    model: Model = {struct.pack(">I", n): b"abcd" for n in range(100)}
    write_run(tmp_path / "run", expected, model).close()
    with pytest.raises(CannotLoadStore, match="expected key 8 B") as caught:
        Run(str(tmp_path / "run"), Expected("sizes", 8, 4))
    assert caught.value.path == str(tmp_path / "run")
    size = (tmp_path / "run").stat().st_size
    os.truncate(tmp_path / "run", size - 1)
    with pytest.raises(CannotLoadStore, match=r"bytes, [0-9]+ expected") as caught:
        Run(str(tmp_path / "run"), expected)
    assert caught.value.name == "sizes"


@pytest.mark.parametrize(
    "section", ["file header", "run header", "filter", "fences", "radix", "rows", "page checksums"]
)
def test_corruption_is_an_error_never_wrong_data(tmp_path: Path, section: str) -> None:
    rng = random.Random(section)
    expected = Expected("corrupt", 8, 8)
    model = random_model(rng, 2000, 8, 8)
    path = tmp_path / "run"
    written = write_run(path, expected, model, capacity=2100)
    geometry = written.geometry
    written.close()
    low, high = run_sections(geometry)[section]
    data = bytearray(path.read_bytes())
    for _ in range(3):
        data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    assert list(check_run(str(path), expected.name)) != []
    try:
        run = Run(str(path), expected)
    except CannotLoadStore as error:
        assert error.path == str(path) and error.offset is not None
        return
    errors = 0
    for key in [*model, *(rng.randbytes(8) for _ in range(2000))]:
        try:
            assert run.find(key) == model.get(key)
        except CannotReadFromStore as error:
            assert error.path == str(path) and error.offset is not None
            errors += 1
    try:
        rows = list(run.rows())
    except CannotReadFromStore:
        errors += 1
    else:
        assert rows == sorted(model.items())
    assert errors
    run.close()


@pytest.mark.parametrize(("count", "shared"), [(1, 300), (50, 260), (50, 255), (50, 254)])
def test_keys_sharing_a_long_prefix(tmp_path: Path, count: int, shared: int) -> None:
    """The radix's prefix length is a byte: keys sharing 256 bytes or more (one
    row of 300-byte keys, say) use the first 255, and the run is written and read."""
    expected = Expected("long", 300, 4)
    rng = random.Random(shared)
    head = rng.randbytes(shared)
    model: Model = {}
    while len(model) < count:
        model[head + rng.randbytes(300 - shared)] = rng.randbytes(4)
    run = write_run(tmp_path / "run", expected, model)
    probes = [head + rng.randbytes(300 - shared) for _ in range(50)]
    check_against(run, model, [*probes, bytes(300), b"\xff" * 300])
    assert list(check_run(run.path, expected)) == []
    run.close()


@pytest.mark.parametrize(
    "change",
    [{"base": 1}, {"shift": 0}, {"blocks": 1}, {"capacity": 1}, {"prefix": 1}],
    ids=lambda change: next(iter(change)),
)
def test_header_fields_checked_against_the_rows(tmp_path: Path, change: dict[str, int]) -> None:
    """A run header whose checksum holds but whose radix base, shift, filter size
    or capacity disagree with the rest is refused at load, not trusted by lookups."""
    expected = Expected("fields", 8, 8)
    rng = random.Random(3)
    model = random_model(rng, 3000, 8, 8)
    path = tmp_path / "run"
    write_run(path, expected, model).close()
    header = run_header(path)
    shift, base = header["shift"], header["base"]
    assert shift > 0 and base > 1  # so that each change is one
    rewrite_run_header(path, **change)
    with pytest.raises(CannotLoadStore, match="run header disagrees") as caught:
        Run(str(path), expected)
    assert caught.value.offset == 64
    # the refused run let go of its mapping (while the error still holds the Run)
    assert str(path) not in Path("/proc/self/maps").read_text()
