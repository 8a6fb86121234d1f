"""The C run reader (``_runs``) against run.py's Python path: same answers, same errors.

Each run is opened twice: ``Run(path, expected)`` reads through the C
reader, ``Run(path, expected, accelerated=False)`` through the Python
methods. Both must answer every call alike (values, removals, None, indexes,
rows) and, on corruption, raise the same error at the same offset, the C
never returning data its checksums do not vouch for.
"""

from __future__ import annotations

import contextlib
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2_stores.engine import accel
from l2_stores.engine import filter as bloom
from l2_stores.engine import run as runs
from l2_stores.engine.framing import Expected
from l2_stores.engine.run import REMOVED, Removed, Run, RunWriter
from l2_stores.errors import CannotLoadStore, CannotReadFromStore
from tests.helpers.runs import run_sections

if accel.AcceleratedRunReader is None:
    pytest.skip(
        "the C run reader is not in use (not built, or L2_STORES_PURE_PYTHON=1)",
        allow_module_level=True,
    )

from l2_stores.engine import _runs  # (after the skip)

Model = dict[bytes, bytes | Removed]


def write(path: Path, expected: Expected, model: Model, capacity: int | None = None) -> None:
    writer = RunWriter(str(path), expected, 1, 4, len(model) if capacity is None else capacity)
    for key in sorted(model):
        writer.add(key, model[key])
    writer.finish(fsync=False)


@pytest.fixture
def opened() -> Iterator[Callable[[Path, Expected], tuple[Run, Run]]]:
    """``opened(path, expected)``: the run through C and through Python, closed at the end."""
    runs_opened: list[Run] = []

    def open_both(path: Path, expected: Expected) -> tuple[Run, Run]:
        c = Run(str(path), expected)
        runs_opened.append(c)
        python = Run(str(path), expected, accelerated=False)
        runs_opened.append(python)
        assert c.reader is not None and python.reader is None
        return c, python

    yield open_both
    for run in runs_opened:
        run.close()


def outcome(call: Callable[..., Any], *args: Any) -> tuple[str, Any, Any]:
    """What ``call(*args)`` answers, or the error it raises (its text and offset)."""
    try:
        return ("answer", call(*args), None)
    except CannotReadFromStore as error:
        return ("error", error.reason, error.offset)


def same(c: Run, python: Run, call: Callable[..., Any], *args: Any) -> tuple[str, Any, Any]:
    """``call(run, *args)`` through C then Python: the same answer or the same error."""
    answer = outcome(call, c, *args)
    assert answer == outcome(call, python, *args), (call, args)
    return answer


def random_model(rng: random.Random, count: int, key_size: int, value_size: int) -> Model:
    model: Model = {}
    while len(model) < count:
        key = rng.randbytes(key_size)
        model[key] = REMOVED if rng.random() < 0.1 else rng.randbytes(value_size)
    return model


def neighbours(key: bytes) -> list[bytes]:
    """Keys just below and just above ``key``, of its size and of other sizes."""
    number = int.from_bytes(key, "big") if key else 0
    size = len(key)
    found = [key[:-1], key + b"\0", key + b"\xff", b"\0" + key]
    if number > 0:
        found.append((number - 1).to_bytes(size, "big"))
    if size and number + 1 < 1 << (8 * size):
        found.append((number + 1).to_bytes(size, "big"))
    return found


def probes_of(run: Run, model: Model, rng: random.Random, extra: int = 300) -> list[bytes]:
    """Present keys, absent ones, the bounds, fences and their neighbours, odd sizes."""
    size = run.geometry.key_size
    keys = sorted(model)
    # (a key cut short compares like itself padded with zeros where bytes end in one)
    probes = [*keys, *(key[:-1] for key in keys), *(rng.randbytes(size) for _ in range(extra))]
    probes += [b"", bytes(size), b"\xff" * size, bytes(size + 1), b"\xff" * (size + 1)]
    edges = keys[:: run.geometry.fence_rows] + keys[:3] + keys[-3:]
    for key in edges:
        probes += neighbours(key)
    return probes


def assert_agree(c: Run, python: Run, probes: list[bytes], model: Model) -> None:
    """Every call answers alike through C and Python (in the same order on both, so
    that both have checked the same pages), and every answer is the model's."""
    for key in probes:
        key_hash = zlib.crc32(key)
        found = same(c, python, Run.find, key)
        if found[0] == "answer":
            assert found[1] == model.get(key), key.hex()
        same(c, python, Run.find, key, key_hash)
        same(c, python, Run.seek, key)
        same(c, python, Run.may_contain, key_hash)
    assert c.seek(None) == python.seek(None) == 0
    for index in range(c.count):
        row = same(c, python, Run._checked_row, index)
        if row[0] == "answer":
            key, value = row[1]
            assert model[key] == value
    for reverse in (False, True):
        same(c, python, lambda run, reverse=reverse: list(run.rows(reverse=reverse)))


def round_trip(
    path: Path,
    opened: Callable[[Path, Expected], tuple[Run, Run]],
    expected: Expected,
    model: Model,
    capacity: int | None = None,
    seed: int = 0,
) -> tuple[Run, Run]:
    write(path, expected, model, capacity)
    c, python = opened(path, expected)
    rng = random.Random(seed)
    assert_agree(c, python, probes_of(c, model, rng), model)
    assert list(c.rows()) == sorted(model.items())
    return c, python


@pytest.mark.parametrize(
    ("key_size", "value_size", "count", "spare"),
    [(32, 32, 5000, 0), (32, 32, 3000, 1000), (8, 8, 2000, 17), (4, 0, 700, 0), (2, 3, 1, 0)],
)
def test_random_keys_agree(
    tmp_path: Path,
    opened: Callable[[Path, Expected], tuple[Run, Run]],
    key_size: int,
    value_size: int,
    count: int,
    spare: int,
) -> None:
    rng = random.Random(count + spare)
    expected = Expected("agree", key_size, value_size)
    model = random_model(rng, count, key_size, value_size)
    round_trip(tmp_path / "run", opened, expected, model, count + spare, seed=count)


def test_dense_counters_agree(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Int32ub levels counting up, with gaps, removals and probes around every one."""
    expected = Expected("levels", 4, 32)
    model: Model = {
        struct.pack(">I", 1_000 + 3 * level): bytes([level % 251]) * 32 for level in range(20_000)
    }
    for level in range(0, 20_000, 17):
        model[struct.pack(">I", 1_000 + 3 * level)] = REMOVED
    c, python = round_trip(tmp_path / "run", opened, expected, model)
    probes = [struct.pack(">I", level) for level in range(0, 62_000, 5)]
    assert_agree(c, python, probes, model)


def test_dense_runs_guess_rows_alike_and_search_where_the_guess_fails(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Even Int32ub keys (a counter of step 2): C and Python take the same step, and
    answer alike through it; ten keys moved off the step between two sampled fences
    (the run still looks dense) are found by the usual search, absent keys beside
    them proven absent."""
    expected = Expected("dense", 4, 4)
    numbers = [2 * i + (1 if 100 <= i < 110 else 0) for i in range(20_000)]
    model: Model = {struct.pack(">I", n): struct.pack(">I", n) for n in numbers}
    c, python = round_trip(tmp_path / "run", opened, expected, model)
    assert c.reader is not None
    # the first and last keys share two bytes: the radix coordinate is the rest, << 48
    assert python.dense_step == c.reader.dense_step() == 2 << 48
    probes = [struct.pack(">I", n) for n in [*range(150, 260), *range(0, 40_010, 7)]]
    assert_agree(c, python, probes, model)


def test_a_dense_run_s_lookups_read_no_fence_and_no_radix(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Present and absent keys of a counter's run, found and sought through its step:
    the index pages read (checked) are the filter's alone, in C and Python alike."""
    expected = Expected("dense", 32, 4)  # 64 rows a fence: 313 fences of 32 bytes
    model: Model = {(2 * n).to_bytes(32, "big"): b"vvvv" for n in range(20_000)}
    write(tmp_path / "run", expected, model)
    c, python = opened(tmp_path / "run", expected)
    assert c.reader is not None
    g = c.geometry
    for number in range(0, 40_000, 3):
        key = number.to_bytes(32, "big")
        for run in (c, python):
            assert run.find(key) == model.get(key)
            assert run.seek(key) == (number + 1) // 2
    past_filter = [page for page in range(g.pages) if g.page_bounds(page)[0] >= g.fence]
    assert len(past_filter) >= 2  # the fences' and the radix's own pages
    checked = [page for page in range(g.pages) if c.reader.page_checked(page)]
    assert checked == [page for page in range(g.pages) if python._checked[page]]
    assert checked and not set(checked) & set(past_filter)


def test_runs_off_a_step_take_none(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Random keys, a counter whose last key breaks the step, one whose sampled fence
    does: no step, in C and Python alike."""
    rng = random.Random(5)
    expected = Expected("steps", 4, 4)
    counter = [3 * i for i in range(5_000)]
    off_fence = [*counter]
    off_fence[2_560] += 1  # a fence row (256 rows a fence), and the sampled 10th fence
    for number, keys in enumerate(
        [
            [rng.randrange(1 << 32) for _ in range(5_000)],
            [*counter[:-1], counter[-1] + 1],
            off_fence,
        ]
    ):
        model: Model = {struct.pack(">I", n): b"vvvv" for n in keys}
        c, python = round_trip(tmp_path / f"run{number}", opened, expected, model)
        assert c.reader is not None
        assert python.dense_step == c.reader.dense_step() == 0, number


def test_unevenly_spread_keys_agree(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Keys far from evenly spread (cubes, tight clusters beside wide gaps): some radix
    buckets hold many fences, others none."""
    rng = random.Random(12)
    keys = [(i**3).to_bytes(8, "big") for i in range(3_000)]
    for centre in rng.sample(range(1 << 62), 40):
        keys += [(centre + rng.randrange(64)).to_bytes(8, "big") for _ in range(60)]
    model: Model = {key: key[::-1] for key in keys}
    c, python = round_trip(tmp_path / "run", opened, Expected("uneven", 8, 8), model)
    assert_agree(c, python, [rng.randbytes(8) for _ in range(2_000)], model)


def test_long_shared_prefix_agrees(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """300-byte keys sharing 260 bytes: the radix's prefix stops at 255."""
    rng = random.Random(9)
    head = rng.randbytes(260)
    model: Model = {head + rng.randbytes(40): rng.randbytes(4) for _ in range(300)}
    c, python = round_trip(tmp_path / "run", opened, Expected("long", 300, 4), model)
    assert_agree(c, python, [head + rng.randbytes(40) for _ in range(100)], model)


def test_empty_and_single_row_runs_agree(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    expected = Expected("small", 8, 8)
    for name, model, capacity in [
        ("empty", {}, 0),
        ("empty-with-room", {}, 500),
        ("single", {b"\x01" * 8: b"v" * 8}, 1),
        ("single-removal", {b"\x80" * 8: REMOVED}, 1),
        ("single-with-room", {b"\x00" * 8: b"w" * 8}, 5000),
    ]:
        round_trip(tmp_path / name, opened, expected, model, capacity)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=3).flatmap(
        lambda size: st.tuples(
            st.just(size),
            st.dictionaries(
                st.binary(min_size=size, max_size=size),
                st.one_of(st.just(REMOVED), st.binary(min_size=2, max_size=2)),
                max_size=600,
            ),
            st.lists(st.binary(min_size=0, max_size=size + 1), max_size=40),
        )
    ),
    st.integers(min_value=0, max_value=400),
)
def test_tiny_keys_agree(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[int, Model, list[bytes]],
    spare: int,
) -> None:
    size, model, extra = case
    path = tmp_path_factory.mktemp("tiny") / "run"
    expected = Expected("tiny", size, 2)
    write(path, expected, model, len(model) + spare)
    c = Run(str(path), expected)
    python = Run(str(path), expected, accelerated=False)
    try:
        probes = probes_of(c, model, random.Random(len(model)), extra=20) + extra
        assert list(c.rows()) == sorted(model.items())
        assert_agree(c, python, probes, model)
    finally:
        c.close()
        python.close()


def overlapping_runs(
    tmp_path: Path,
    expected: Expected,
    opened: Callable[[Path, Expected], tuple[Run, Run]],
    rng: random.Random,
    universe: list[bytes],
    sizes: list[int],
    runs: int,
    removed: float = 0.2,
    slack: int = 100,
) -> list[tuple[Run, Run]]:
    """``runs`` runs of keys drawn from ``universe`` (in the order made), each of one of
    ``sizes`` keys, a ``removed`` share of them removals, opened through C and Python."""
    pairs = []
    for number in range(runs):
        model: Model = {}
        for key in rng.sample(universe, rng.choice(sizes)):
            model[key] = REMOVED if rng.random() < removed else bytes([number]) * 8
        path = tmp_path / f"run{number}"
        write(path, expected, model, len(model) + rng.randrange(slack))
        pairs.append(opened(path, expected))
    return pairs


def first_in_python(pairs: list[tuple[Run, Run]], key: bytes) -> bytes | Removed | None:
    """The first answer other than None of the Python runs, in the order given."""
    return next((found for _, run in pairs if (found := run.find(key)) is not None), None)


def test_find_first_answers_as_the_runs_in_order(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """Newest run first: the first answer other than None, removals included."""
    rng = random.Random(11)
    expected = Expected("first", 16, 8)
    universe = [rng.randbytes(16) for _ in range(6000)]
    pairs = overlapping_runs(tmp_path, expected, opened, rng, universe, [0, 50, 1500, 3000], 6)
    readers = tuple(c.reader for c, _ in pairs)
    assert all(reader is not None for reader in readers)
    for key in [*universe, *(rng.randbytes(16) for _ in range(1000)), b"", b"\xff" * 17]:
        assert _runs.find_first(readers, key) == first_in_python(pairs, key)
    assert _runs.find_first((), universe[0]) is None
    with pytest.raises(TypeError):
        _runs.find_first(list(readers), universe[0])
    with pytest.raises(TypeError):
        _runs.find_first((*readers, "reader"), universe[0])
    with pytest.raises(TypeError):
        _runs.find_first(readers, bytearray(universe[0]))


def test_count_changes_agrees_with_python_lookups(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    """count_changes (C, lookups without the GIL) counts as a lookup of each key in
    Python does: +1 a value, -1 a key the runs hold a value for (removals hold none)."""
    rng = random.Random(12)
    expected = Expected("changes", 16, 8)
    universe = [rng.randbytes(16) for _ in range(5000)]
    sizes = [0, 40, 1200, 2500]
    pairs = overlapping_runs(tmp_path, expected, opened, rng, universe, sizes, 5, 0.25, 50)
    readers = tuple(c.reader for c, _ in pairs)

    def python_count(bindings: dict[bytes, bytes | None]) -> int:
        count = 0
        for key, value in bindings.items():
            found = first_in_python(pairs, key)
            count += (value is not None) - (found is not None and found is not REMOVED)
        return count

    for size in (0, 1, 300, 4000):
        keys = rng.sample(universe, size) + [rng.randbytes(16) for _ in range(size // 3)]
        bindings = {key: None if rng.random() < 0.3 else b"v" * 8 for key in keys}
        assert _runs.count_changes(readers, bindings) == python_count(bindings)
        assert _runs.count_changes((), bindings) == sum(v is not None for v in bindings.values())
    with pytest.raises(ValueError, match="another size"):
        _runs.count_changes(readers, {b"short": None})
    with pytest.raises(TypeError):
        _runs.count_changes(readers, [(universe[0], None)])
    pairs[0][0].close()  # a released reader is refused, not read
    with pytest.raises(ValueError, match="released"):
        _runs.count_changes(readers, {universe[0]: None})


def test_find_first_names_the_corrupt_reader(tmp_path: Path) -> None:
    expected = Expected("named", 8, 8)
    model = random_model(random.Random(4), 500, 8, 8)
    key = sorted(model)[100]
    paths = [tmp_path / "a", tmp_path / "b"]
    write(paths[0], expected, {}, 10)
    write(paths[1], expected, model)
    first_row = Run(str(paths[1]), expected)
    offset = first_row.geometry.rows + 100 * first_row.geometry.row_size
    first_row.close()
    data = bytearray(paths[1].read_bytes())
    data[offset + 9] ^= 4  # the value of the key's row
    paths[1].write_bytes(bytes(data))
    opened_runs = [Run(str(path), expected) for path in paths]
    readers = tuple(run.reader for run in opened_runs)
    with pytest.raises(_runs.RunCorrupt) as caught:
        _runs.find_first(readers, key)
    assert caught.value.args == (runs.ROW_MISMATCH, offset)
    assert caught.value.index == 1
    error = opened_runs[caught.value.index].corruption_error(caught.value)
    assert error.path == str(paths[1]) and error.offset == offset
    for run in opened_runs:
        run.close()


def corrupt_and_compare(
    path: Path,
    expected: Expected,
    data: bytes,
    model: Model,
    absent: int = 200,
    probes: Sequence[bytes] = (),
) -> bool:
    """Write ``data`` at ``path``; open it through C and Python and compare everything
    (the model's keys, ``absent`` random others and ``probes``). True when the run loaded."""
    path.write_bytes(data)
    loaded: list[Run] = []
    errors = []
    for accelerated in (True, False):
        try:
            loaded.append(Run(str(path), expected, accelerated=accelerated))
        except CannotLoadStore as error:
            errors.append((error.reason, error.offset))
    assert len(errors) in (0, 2), errors
    if errors:
        assert errors[0] == errors[1]
        return False
    c, python = loaded
    try:
        rng = random.Random(len(data))
        probes = [*model, *(rng.randbytes(expected.key_size) for _ in range(absent)), *probes]
        assert_agree(c, python, probes, model)
        c_check = [(finding.offset, finding.what) for finding in runs._check_open_run(c)]
        python_check = [(finding.offset, finding.what) for finding in runs._check_open_run(python)]
        assert c_check == python_check
    finally:
        c.close()
        python.close()
    return True


@pytest.mark.parametrize(
    "section", ["file header", "run header", "filter", "fences", "radix", "rows", "page checksums"]
)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keys", ["random", "dense"])
def test_corruption_same_errors_never_wrong_data(
    tmp_path: Path, section: str, seed: int, keys: str
) -> None:
    rng = random.Random(f"{section}{seed}")
    expected = Expected("corrupt", 8, 8)
    between: list[bytes] = []
    if keys == "random":
        model = random_model(rng, 2000, 8, 8)
    else:  # a counter's run, 24 fences (17 sampled): lookups guess rows by its step
        model = {(5 * n).to_bytes(8, "big"): rng.randbytes(8) for n in range(3000)}
        between = [(5 * n + k).to_bytes(8, "big") for n in range(0, 3000, 11) for k in (1, 4)]
    path = tmp_path / "run"
    write(path, expected, model, len(model) + 100)
    run = Run(str(path), expected)
    low, high = run_sections(run.geometry)[section]
    run.close()
    data = bytearray(path.read_bytes())
    for _ in range(1 + seed):
        data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
    corrupt_and_compare(path, expected, bytes(data), model, probes=between)


def with_page_crcs(data: bytearray, g: runs.Geometry) -> bytes:
    """``data`` with its index pages' checksums computed again (as a writer would)."""
    for page in range(g.pages):
        low, high = g.page_bounds(page)
        at = g.page_crcs + page * runs.CRC_SIZE
        data[at : at + runs.CRC_SIZE] = zlib.crc32(data[low:high]).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("section", ["filter", "fences", "radix"])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("keys", ["random", "dense"])
def test_wrong_index_with_valid_page_checksums(
    tmp_path: Path, section: str, seed: int, keys: str
) -> None:
    """An index section gone wrong under valid page checksums (a writer's bug): the
    radix's range check and the fences' cover, and the answers, alike in C and Python
    (a wrong index may lose keys, but a value found is the key's)."""
    rng = random.Random(f"{section}{seed}")
    expected = Expected("index", 4, 4)  # 256 rows a fence, 40 fences
    if keys == "random":
        model = random_model(rng, 10_000, 4, 4)
    else:  # a counter's run: its lookups guess rows first
        model = {struct.pack(">I", 3 * n): b"vvvv" for n in range(10_000)}
    path = tmp_path / "run"
    write(path, expected, model)
    g = Run(str(path), expected, accelerated=False).geometry
    low, high = run_sections(g)[section]
    data = bytearray(path.read_bytes())
    for _ in range(1 + seed % 3):
        at = rng.randrange(low, high)
        if section == "radix" and seed % 2:  # a whole entry, often past the fences
            at -= (at - low) % runs.RADIX_ENTRY
            data[at : at + 4] = rng.randrange(g.fences + 3).to_bytes(4, "little")
        else:
            data[at] ^= 1 << rng.randrange(8)
    data = bytearray(with_page_crcs(data, g))
    path.write_bytes(bytes(data))
    c = Run(str(path), expected)
    python = Run(str(path), expected, accelerated=False)
    try:
        between = [struct.pack(">I", 3 * n + 1) for n in range(0, 10_000, 5)]
        for key in [*model, *(rng.randbytes(4) for _ in range(2000)), *between]:
            found = same(c, python, Run.find, key)
            assert found[0] == "error" or found[1] in (None, model.get(key))
            same(c, python, Run.seek, key)
    finally:
        c.close()
        python.close()


def test_verify_finds_a_dense_run_s_wrong_radix(tmp_path: Path) -> None:
    """A counter's run whose radix sends every key to fence 0, under valid page
    checksums: its lookups still answer through the step, and ``verify`` (which
    checks the radix itself) reports the first row the radix misses."""
    expected = Expected("dense", 4, 4)
    model: Model = {struct.pack(">I", 3 * n): b"vvvv" for n in range(20_000)}
    path = tmp_path / "run"
    write(path, expected, model)
    with contextlib.closing(Run(str(path), expected, accelerated=False)) as clean:
        g = clean.geometry
        assert clean.dense_step and not list(runs._check_open_run(clean))
    data = bytearray(path.read_bytes())
    data[g.radix : g.rows] = (1).to_bytes(4, "little") * ((g.rows - g.radix) // 4)
    path.write_bytes(with_page_crcs(data, g))
    for accelerated in (True, False):
        with contextlib.closing(Run(str(path), expected, accelerated=accelerated)) as run:
            assert run.dense_step
            assert all(run.find(key) == value for key, value in list(model.items())[::97])
            findings = [(finding.offset, finding.what) for finding in runs._check_open_run(run)]
            assert findings == [(g.radix, f"index does not find row {g.fence_rows}")]


def test_radix_out_of_range_and_fences_short(tmp_path: Path) -> None:
    """The two index errors that page checksums cannot catch, at run.py's offsets."""
    expected = Expected("short", 4, 4)
    model: Model = {struct.pack(">I", 7 * n): b"vvvv" for n in range(5000)}
    model[struct.pack(">I", 7 * 5000 + 1)] = b"vvvv"  # off the step: lookups take the radix
    path = tmp_path / "run"
    write(path, expected, model)
    g = Run(str(path), expected, accelerated=False).geometry
    clean = bytearray(path.read_bytes())
    key = struct.pack(">I", 7 * 2500)
    python = Run(str(path), expected, accelerated=False)
    assert python.dense_step == 0
    bucket = (runs._normalized(key, python._prefix) - python._base) >> python._shift
    python.close()
    entry = g.radix + bucket * runs.RADIX_ENTRY
    for (low, high), fence_0, what, offset in [
        ((0, g.fences + 1), None, "run radix entry out of range", entry),
        ((5, 4), None, "run radix entry out of range", entry),
        # the key's bucket names fence 0 alone, whose key is above it: no fence covers it
        ((0, 1), b"\xff" * 4, "run fences do not cover their rows", g.fence),
    ]:
        data = bytearray(clean)
        data[entry : entry + 8] = low.to_bytes(4, "little") + high.to_bytes(4, "little")
        if fence_0 is not None:
            data[g.fence : g.fence + 4] = fence_0
        path.write_bytes(with_page_crcs(data, g))
        c = Run(str(path), expected)
        python = Run(str(path), expected, accelerated=False)
        try:
            for call in (Run.find, Run.seek):
                kind, reason, at = same(c, python, call, key)
                assert (kind, at) == ("error", offset) and reason.startswith(what)
        finally:
            c.close()
            python.close()


def test_checked_pages_are_remembered(tmp_path: Path) -> None:
    """A page's checksum is checked once: a byte changed under the mapping after the
    check goes unseen by that run (both paths), and is seen by a new one."""
    expected = Expected("remembered", 8, 8)
    model = random_model(random.Random(12), 5000, 8, 8)
    path = tmp_path / "run"
    write(path, expected, model)
    key = next(key for key, value in model.items() if value is not REMOVED)
    c = Run(str(path), expected)
    python = Run(str(path), expected, accelerated=False)
    g = c.geometry
    block, _ = bloom.probes(zlib.crc32(key), g.filter_blocks)
    page_low, page_high = g.page_bounds(block * bloom.BLOCK_BYTES // runs.PAGE)
    other = page_low if page_low != g.filter + block * bloom.BLOCK_BYTES else page_high - 1
    try:
        assert same(c, python, Run.find, key) == ("answer", model[key], None)
        with open(path, "r+b") as file:  # seen through both shared mappings
            file.seek(other)
            byte = file.read(1)[0]
            file.seek(other)
            file.write(bytes([byte ^ 1]))
        assert same(c, python, Run.find, key) == ("answer", model[key], None)
        fresh = Run(str(path), expected)
        with pytest.raises(CannotReadFromStore, match="page checksum"):
            fresh.find(key)
        fresh.close()
    finally:
        c.close()
        python.close()


def test_a_bit_flip_at_every_byte_of_a_small_run(tmp_path: Path) -> None:
    """One flipped bit at each byte of a small run's headers and index (15 fences)
    and of its rows' keys and checksums: C and Python load, answer and fail alike,
    the C never wrongly."""
    rng = random.Random(13)
    expected = Expected("flips", 4, 1000)  # 4 rows a fence
    model = random_model(rng, 60, 4, 1000)
    path = tmp_path / "run"
    write(path, expected, model, 64)
    g = Run(str(path), expected, accelerated=False).geometry
    assert g.fences == 15
    clean = path.read_bytes()
    rows = [g.rows + index * g.row_size for index in range(g.count)]
    places = [
        *range(g.rows),
        *(row + at for row in rows for at in (0, 1, 2, 3, 4, 500, 1004, 1005, 1006, 1007)),
        *range(g.page_crcs, g.size),
    ]
    loaded = 0
    for at in places:
        flipped = clean[:at] + bytes([clean[at] ^ (1 << (at % 8))]) + clean[at + 1 :]
        loaded += corrupt_and_compare(path, expected, flipped, model, absent=20)
    assert 0 < loaded < len(places)


def test_pages_are_checked_once_in_the_reader(
    tmp_path: Path, opened: Callable[[Path, Expected], tuple[Run, Run]]
) -> None:
    expected = Expected("pages", 32, 32)
    model = random_model(random.Random(5), 20_000, 32, 32)
    write(tmp_path / "run", expected, model)
    c, python = opened(tmp_path / "run", expected)
    reader = c.reader
    assert reader is not None
    g = c.geometry
    assert g.pages > 10 and len(c._checked) == 0  # one state: the reader's
    assert not any(reader.page_checked(page) for page in range(g.pages))
    key = sorted(model)[1234]
    block, _ = bloom.probes(zlib.crc32(key), g.filter_blocks)
    assert c.find(key) == model[key]
    assert reader.page_checked(block * bloom.BLOCK_BYTES // runs.PAGE)
    checked = [page for page in range(g.pages) if reader.page_checked(page)]
    assert python.find(key) == model[key]
    assert checked == [page for page in range(g.pages) if python._checked[page]]
    with pytest.raises(IndexError):
        reader.page_checked(g.pages)
    with pytest.raises(ValueError, match="outside"):
        reader.check_pages(g.filter - 1, g.filter + 10)
    for page in range(g.pages):
        c._check_pages(*g.page_bounds(page))
    assert all(reader.page_checked(page) for page in range(g.pages))


def test_a_corrupt_page_stays_unchecked_and_fails_again(tmp_path: Path) -> None:
    expected = Expected("again", 8, 8)
    model = random_model(random.Random(6), 3000, 8, 8)
    path = tmp_path / "run"
    write(path, expected, model)
    data = bytearray(path.read_bytes())
    data[runs.FILTER_OFFSET + 5] ^= 0x10
    path.write_bytes(bytes(data))
    run = Run(str(path), expected)
    reader = run.reader
    assert reader is not None
    for _ in range(2):
        with pytest.raises(_runs.RunCorrupt) as caught:
            reader.check_pages(runs.FILTER_OFFSET, runs.FILTER_OFFSET + 64)
        assert caught.value.args == ("run index page checksum mismatch", runs.FILTER_OFFSET)
        assert not reader.page_checked(0)
    with pytest.raises(CannotReadFromStore, match="page checksum mismatch") as error:
        run._check_pages(runs.FILTER_OFFSET, runs.FILTER_OFFSET + 1)
    assert error.value.offset == runs.FILTER_OFFSET and error.value.path == str(path)
    run.close()


def test_close_releases_the_reader_then_the_mapping(tmp_path: Path) -> None:
    expected = Expected("close", 8, 8)
    model = random_model(random.Random(7), 100, 8, 8)
    write(tmp_path / "run", expected, model)
    run = Run(str(tmp_path / "run"), expected)
    reader = run.reader
    assert reader is not None
    key = next(iter(model))
    assert run.find(key) == model[key]
    run.close()
    assert run._map is not None and run._map.closed
    for call in (
        lambda: reader.find(key),
        lambda: reader.seek(key),
        lambda: reader.may_contain(0),
        lambda: reader.row(0),
        lambda: reader.page_checked(0),
        lambda: _runs.find_first((reader,), key),
    ):
        with pytest.raises(ValueError, match="released"):
            call()
    reader.release()  # twice is fine


def test_release_lets_the_mapping_close(tmp_path: Path) -> None:
    expected = Expected("release", 8, 8)
    write(tmp_path / "run", expected, random_model(random.Random(8), 10, 8, 8))
    run = Run(str(tmp_path / "run"), expected)
    assert run._map is not None and run.reader is not None
    run._view.release()
    with pytest.raises(BufferError):  # the reader still holds the mapping
        run._map.close()
    run.reader.release()
    run._map.close()
    assert run._map.closed
    run.close()  # and again, harmlessly


def test_reader_refuses_bad_parameters(tmp_path: Path) -> None:
    expected = Expected("params", 8, 8)
    model = random_model(random.Random(9), 3000, 8, 8)
    write(tmp_path / "run", expected, model)
    run = Run(str(tmp_path / "run"), expected)
    g = run.geometry
    good: dict[str, Any] = {
        "buffer": run._map,
        "removed": REMOVED,
        "key_size": g.key_size,
        "value_size": g.value_size,
        "count": run.count,
        "filter_offset": g.filter,
        "filter_blocks": g.filter_blocks,
        "fence_offset": g.fence,
        "fence_rows": g.fence_rows,
        "fences": g.fences,
        "radix_offset": g.radix,
        "radix_bits": g.radix_bits,
        "rows_offset": g.rows,
        "page_crcs_offset": g.page_crcs,
        "prefix": run._prefix,
        "shift": run._shift,
        "base": run._base,
        "first_key": run.first_key,
        "last_key": run.last_key,
    }
    reader = _runs.RunReader(**good)
    key = sorted(model)[7]
    assert reader.find(key) == model[key] == reader.find(key, zlib.crc32(key))
    assert reader.row(7) == (key, model[key])
    with pytest.raises(IndexError):
        reader.row(run.count)
    with pytest.raises(IndexError):
        reader.row(-1)
    with pytest.raises(TypeError):
        reader.find(bytearray(key))
    with pytest.raises(OverflowError):
        reader.may_contain(-1)
    reader.release()
    for change in [
        {"count": run.count + 1},
        {"fences": g.fences + 1},
        {"page_crcs_offset": g.page_crcs + 1},
        {"filter_blocks": g.filter_blocks * 100},
        {"radix_bits": g.radix_bits + 1},
        {"radix_bits": 40},
        {"buffer": bytes(g.size - 1)},
        {"filter_offset": 0},
        {"prefix": g.key_size + 1},
        {"base": run._base + 1},
        {"base": -1},
        {"shift": 0},
        {"first_key": run.last_key},
        {"last_key": run.first_key + b"\0"},
    ]:
        with pytest.raises((ValueError, OverflowError)):
            _runs.RunReader(**(good | change))
    with pytest.raises(TypeError):
        _runs.RunReader(**(good | {"base": 1.5}))
    run.close()


def filter_reader(filter_bytes: bytes | bytearray) -> _runs.RunReader[Removed]:
    """A reader of a run of no row whose filter is ``filter_bytes`` (checksums valid)."""
    blocks = len(filter_bytes) // bloom.BLOCK_BYTES
    index = bytes(filter_bytes) + bytes(2 * runs.RADIX_ENTRY)  # and a radix of one bucket
    crcs = b"".join(
        zlib.crc32(index[start : start + runs.PAGE]).to_bytes(4, "little")
        for start in range(0, len(index), runs.PAGE)
    )
    fence = runs.FILTER_OFFSET + len(filter_bytes)
    rows = runs.FILTER_OFFSET + len(index)
    buffer = bytes(runs.FILTER_OFFSET) + index + crcs
    return _runs.RunReader(
        buffer, REMOVED, 8, 8, 0, runs.FILTER_OFFSET, blocks, fence, 1, 0, fence, 0, rows, rows,
        0, 0, 0, b"", b"",
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.integers(min_value=1, max_value=5000),
)
def test_probes_bit_for_bit(key_hash: int, blocks: int) -> None:
    """The C probes are filter.py's: the bits ``add`` sets answer True, and clearing
    any one of them answers False."""
    filter_bytes = bytearray(blocks * bloom.BLOCK_BYTES)
    bloom.add(filter_bytes, key_hash, blocks)
    assert filter_reader(filter_bytes).may_contain(key_hash)
    block, bits = bloom.probes(key_hash, blocks)
    for bit in set(bits):
        cleared = bytearray(filter_bytes)
        cleared[block * bloom.BLOCK_BYTES + (bit >> 3)] &= ~(1 << (bit & 7)) & 0xFF
        assert not filter_reader(cleared).may_contain(key_hash)


def test_format_constants_are_checked() -> None:
    built = dict(_runs.FORMAT)
    assert set(built) == set(runs.FORMAT) | set(bloom.FORMAT)
    assert built == runs.FORMAT | bloom.FORMAT
    accel.check_runs_format("run", runs.FORMAT)
    with pytest.raises(RuntimeError, match=r"run\.PAGE is 0x2000 but .* 0x1000"):
        accel.check_runs_format("run", runs.FORMAT | {"PAGE": 8192})
    with pytest.raises(RuntimeError, match="no such constant"):
        accel.check_runs_format("filter", {"WIDTH": 1})


def test_layers_look_in_active_then_frozen_then_the_runs() -> None:
    layers = _runs.Layers()
    assert layers.get(b"k") is None  # nothing set yet: an empty store
    asked: list[bytes] = []

    def find(key: bytes) -> bytes | None:
        asked.append(key)
        return b"data" if key == b"in-data" else None

    active: dict[bytes, bytes | None] = {b"a": b"1", b"removed": None, b"both": b"new"}
    frozen: dict[bytes, bytes | None] = {b"f": b"2", b"both": b"old", b"gone": None}
    layers.set(active, frozen, None, find)
    assert layers.get(b"a") == b"1"
    assert layers.get(b"both") == b"new"  # the active log wins over the frozen one
    assert layers.get(b"f") == b"2"
    assert layers.get(b"removed") is None and layers.get(b"gone") is None
    assert asked == []  # a binding or a removal in a log answers without the runs
    assert layers.get(b"in-data") == b"data"
    assert layers.get(b"absent") is None
    assert asked == [b"in-data", b"absent"]
    active[b"later"] = b"3"  # the dicts are shared, not copied
    assert layers.get(b"later") == b"3"
    layers.set(active, None, None, None)
    assert layers.get(b"f") is None and layers.get(b"in-data") is None


def test_layers_search_the_readers_themselves_and_fall_back_on_damage(tmp_path: Path) -> None:
    """With the runs' readers, a lookup never calls Python: values, removal rows (None)
    and misses come from the readers, newest first; a damaged row hands the key to the
    Python lookup, whose answer (or error) is the lookup's."""
    expected = Expected("layers", 8, 8)
    rng = random.Random(5)
    older: Model = {rng.randbytes(8): rng.randbytes(8) for _ in range(800)}
    newer: Model = {key: REMOVED for key in list(older)[:100]}
    newer.update({rng.randbytes(8): rng.randbytes(8) for _ in range(300)})
    write(tmp_path / "older", expected, older)
    write(tmp_path / "newer", expected, newer)
    opened_runs = [Run(str(tmp_path / name), expected) for name in ("newer", "older")]
    readers = tuple(run.reader for run in opened_runs)
    asked: list[object] = []

    def find(key: bytes) -> bytes | None:
        asked.append(key)
        return b"python"

    layers = _runs.Layers()
    layers.set({b"x" * 8: b"logged!!"}, None, readers, find)
    try:
        assert layers.get(b"x" * 8) == b"logged!!"
        for key, value in newer.items():
            assert layers.get(key) == (None if value is REMOVED else value)
        for key, value in older.items():
            if key not in newer:
                assert layers.get(key) == value
        for _ in range(300):
            assert layers.get(rng.randbytes(8)) is None
        assert layers.get(b"short") is None  # another size: in no run
        assert layers.get("text") == b"python"  # not bytes: the Python lookup decides
        assert asked == ["text"]
        asked.clear()
        # damage the row of one key of the older run: that key goes to Python
        victim = sorted(key for key in older if key not in newer)[10]
        older_run = opened_runs[1]
        index = sorted(older).index(victim)
        offset = older_run.geometry.rows + index * older_run.geometry.row_size
        for run in opened_runs:
            run.close()
        data = bytearray((tmp_path / "older").read_bytes())
        data[offset + 9] ^= 1  # its value
        (tmp_path / "older").write_bytes(bytes(data))
        opened_runs = [Run(str(tmp_path / name), expected) for name in ("newer", "older")]
        layers.set({}, None, tuple(run.reader for run in opened_runs), find)
        assert layers.get(victim) == b"python" and asked == [victim]
        with pytest.raises(TypeError, match="readers must be a tuple of RunReader"):
            layers.set({}, None, ("reader",), find)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            layers.set({}, None, None)  # type: ignore[call-arg]
    finally:
        for run in opened_runs:
            run.close()


def test_layers_pass_errors_through_and_refuse_bad_arguments() -> None:
    layers = _runs.Layers()

    def broken(key: bytes) -> bytes | None:
        raise CannotReadFromStore("corrupt", name="accel")

    layers.set({}, None, None, broken)
    with pytest.raises(CannotReadFromStore):
        layers.get(b"k")
    with pytest.raises(TypeError):
        layers.get([])  # type: ignore[arg-type]  # unhashable: the dict's own error
    for bad in (([], None, None, None), ({}, [], None, None), ({}, None, None, 3)):
        with pytest.raises(TypeError):
            layers.set(*bad)  # type: ignore[arg-type]


# ------------------------------------------------------------- MergeCursor

Log = dict[bytes, bytes | None]


def merge_witness(
    logs: list[Log], runs_model: list[Model], start: bytes | None, stop: bytes | None, reverse: bool
) -> list[tuple[bytes, bytes]]:
    """What a merge of logs over runs (both newest first) must give: a plain dict of the
    newest binding of each key, its removals left out, bounded, sorted."""
    newest: dict[bytes, bytes | None] = {}
    for run_model in reversed(runs_model):
        newest.update({k: None if v is REMOVED else v for k, v in run_model.items()})  # type: ignore[misc]
    for log in reversed(logs):
        newest.update(log)
    live = [
        (key, value)
        for key, value in newest.items()
        if value is not None and (start is None or key >= start) and (stop is None or key < stop)
    ]
    return sorted(live, reverse=reverse)


def cursor_sources(
    tmp_path: Path, rng: random.Random, universe: list[bytes], expected: Expected, runs_count: int
) -> tuple[list[Log], list[Model], list[Run]]:
    """Two logs and ``runs_count`` runs over keys of ``universe``, newest first."""
    runs_model: list[Model] = []
    opened_runs: list[Run] = []
    for number in range(runs_count):
        model: Model = {}
        for key in rng.sample(universe, rng.choice([0, 1, 30, 400, 1500])):
            model[key] = REMOVED if rng.random() < 0.2 else key[:7] + bytes([number])
        path = tmp_path / f"cursor-run{number}"
        write(path, expected, model, len(model) + rng.randrange(20))
        runs_model.insert(0, model)
        opened_runs.insert(0, Run(str(path), expected))
    logs: list[Log] = [
        {
            key: None if rng.random() < 0.25 else b"log%d-%03d" % (age, rng.randrange(1000))
            for key in rng.sample(universe, size)
        }
        for age, size in enumerate(rng.sample([0, 5, 200], 2))
    ]
    return logs, runs_model, opened_runs


def cursor(
    logs: list[Log],
    opened_runs: list[Run],
    start: bytes | None = None,
    stop: bytes | None = None,
    reverse: bool = False,
    on_corrupt: Callable[[Any], BaseException] | None = None,
    key_size: int = 16,
    closed: bytearray | None = None,
    on_closed: Callable[[], BaseException] | None = None,
) -> _runs.MergeCursor:
    return _runs.MergeCursor(
        tuple((log, sorted(log)) for log in logs),
        tuple(run.reader for run in opened_runs),
        key_size,
        start,
        stop,
        reverse,
        on_corrupt,
        closed,
        on_closed,
    )


def write_damaged(path: Path, expected: Expected, model: Model, row: int, at: int) -> int:
    """Write the run of ``model`` at ``path``, then flip a bit of byte ``at`` of row
    ``row``; return that row's file offset."""
    write(path, expected, model)
    run = Run(str(path), expected)
    offset = run.geometry.rows + row * run.geometry.row_size
    run.close()
    data = bytearray(path.read_bytes())
    data[offset + at] ^= 4
    path.write_bytes(bytes(data))
    return offset


@pytest.mark.parametrize("seed", range(6))
def test_merge_cursor_agrees_with_a_dict_witness(tmp_path: Path, seed: int) -> None:
    """Each key once, from the newest source holding it, removals left out, in key order
    either way, within any bounds (keys held, keys between them, outside them, None)."""
    rng = random.Random(seed)
    expected = Expected("cursor", 16, 8)
    universe = [rng.randbytes(16) for _ in range(3000)]
    logs, runs_model, opened_runs = cursor_sources(tmp_path, rng, universe, expected, 1 + seed)
    bounds: list[bytes | None] = [None, b"", b"\xff" * 16, *rng.sample(universe, 8)]
    bounds += [rng.randbytes(16) for _ in range(4)]
    for start in bounds:
        for stop in rng.sample(bounds, 5):
            for reverse in (False, True):
                assert list(cursor(logs, opened_runs, start, stop, reverse)) == merge_witness(
                    logs, runs_model, start, stop, reverse
                ), (start, stop, reverse)
    for run in opened_runs:
        run.close()


def counter_runs(
    tmp_path: Path, expected: Expected, count: int, width: int
) -> tuple[list[Run], list[Model]]:
    """``count`` runs of a 16-byte counter, ``width`` keys each and each a range of its own
    (as levels are), opened, with their models: newest (highest keys) first."""
    opened_runs: list[Run] = []
    runs_model: list[Model] = []
    for number in range(count):
        levels = range(number * width, (number + 1) * width)
        model: Model = {i.to_bytes(16, "big"): i.to_bytes(8, "big") for i in levels}
        path = tmp_path / f"counter{number}"
        write(path, expected, model)
        runs_model.insert(0, model)
        opened_runs.insert(0, Run(str(path), expected))
    return opened_runs, runs_model


def overwrite(path: str, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` of the file at ``path`` in place (a run already open
    sees it: a load would check its bound rows); return the bytes it replaced."""
    with open(path, "r+b") as file:
        file.seek(offset)
        replaced = file.read(len(data))
        file.seek(offset)
        file.write(data)
    return replaced


def test_merge_cursor_over_disjoint_runs_and_no_sources(tmp_path: Path) -> None:
    """Runs of a counter (each a range of its own, as levels are) and the empty cases."""
    opened_runs, runs_model = counter_runs(tmp_path, Expected("counter", 16, 8), 5, 700)
    log: Log = {(3500 + i).to_bytes(16, "big"): b"x" * 8 for i in range(10)}
    for reverse in (False, True):
        got = list(cursor([log], opened_runs, reverse=reverse))
        assert got == merge_witness([log], runs_model, None, None, reverse)
        assert len(got) == 3510
    assert list(cursor([], [])) == []
    assert list(cursor([{}], opened_runs, b"\x01" * 16, b"\x00" * 16)) == []  # stop before start
    for run in opened_runs:
        run.close()


def test_merge_cursor_raises_a_damaged_row_at_its_place_every_time(tmp_path: Path) -> None:
    """The rows before the damage come; then the error, from on_corrupt when given (the
    run's CannotReadFromStore), again at every later step: never a wrong row."""
    expected = Expected("damaged", 16, 8)
    model: Model = {i.to_bytes(16, "big"): b"v" * 8 for i in range(1000)}
    path = tmp_path / "run"
    offset = write_damaged(path, expected, model, 600, 20)  # its value
    run = Run(str(path), expected)
    plain = cursor([], [run])
    assert [next(plain)[0] for _ in range(600)] == sorted(model)[:600]
    for _ in range(2):
        with pytest.raises(_runs.RunCorrupt) as caught:
            next(plain)
        assert caught.value.args == (runs.ROW_MISMATCH, offset) and caught.value.index == 0
    translated = cursor([], [run], on_corrupt=run.corruption_error, reverse=True)
    assert [next(translated)[0] for _ in range(399)] == sorted(model)[:600:-1]
    for _ in range(2):
        with pytest.raises(CannotReadFromStore) as read_error:
            next(translated)
        assert read_error.value.path == str(path) and read_error.value.offset == offset
        assert read_error.value.__suppress_context__
    run.close()


def test_merge_cursor_reads_a_run_s_rows_only_once_the_merge_reaches_them(
    tmp_path: Path,
) -> None:
    """Runs of a counter enter the merge by their headers' bounds: a seek reads the rows of
    the run holding its start only. A damaged first row of a later run (reverse: last row
    of an earlier one) raises when the merge reaches it, at every later step, never before
    and never a wrong row."""
    opened_runs, _ = counter_runs(tmp_path, Expected("bounds", 16, 8), 5, 700)
    offsets: dict[int, int] = {}
    for number, row in ((3, 0), (1, 699)):  # damaged once open: a load checks the bound rows
        run = opened_runs[4 - number]
        offsets[number] = run.geometry.rows + row * run.geometry.row_size
        with open(run.path, "rb") as file:
            file.seek(offsets[number] + 20)
            damaged = file.read(1)[0] ^ 4
        overwrite(run.path, offsets[number] + 20, bytes([damaged]))
    forward = cursor([], opened_runs, start=(1400).to_bytes(16, "big"))
    assert [int.from_bytes(next(forward)[0], "big") for _ in range(700)] == list(range(1400, 2100))
    for _ in range(2):
        with pytest.raises(_runs.RunCorrupt) as caught:
            next(forward)
        assert caught.value.args == (runs.ROW_MISMATCH, offsets[3]) and caught.value.index == 1
    backward = cursor([], opened_runs, stop=(2100).to_bytes(16, "big"), reverse=True)
    assert [int.from_bytes(next(backward)[0], "big") for _ in range(700)] == list(
        range(2099, 1399, -1)
    )
    for _ in range(2):
        with pytest.raises(_runs.RunCorrupt) as caught:
            next(backward)
        assert caught.value.args == (runs.ROW_MISMATCH, offsets[1]) and caught.value.index == 3
    for run in opened_runs:
        run.close()


def test_merge_cursor_refuses_a_sound_bound_row_with_another_key_every_time(
    tmp_path: Path,
) -> None:
    """A first (reverse: last) row rewritten, its checksum sound, with a key other than
    the one its header gives: the step that reaches it raises, and so does every later
    one; the row is never given, nor anything after it."""
    opened_runs, _ = counter_runs(tmp_path, Expected("forged", 16, 8), 3, 100)
    middle = opened_runs[1]
    for reverse, row, forged_key in ((False, 0, 250), (True, 99, 50)):
        offset = middle.geometry.rows + row * middle.geometry.row_size
        body = forged_key.to_bytes(16, "big") + b"FORGED!!"
        original = overwrite(middle.path, offset, body + zlib.crc32(body).to_bytes(4, "little"))
        merge = cursor([], opened_runs, reverse=reverse)
        before = list(range(0, 100)) if not reverse else list(range(299, 199, -1))
        assert [int.from_bytes(next(merge)[0], "big") for _ in before] == before
        for _ in range(3):
            with pytest.raises(_runs.RunCorrupt) as caught:
                next(merge)
            assert caught.value.args[1] == offset and caught.value.index == 1
            assert "header" in caught.value.args[0]
        translated = cursor([], opened_runs, reverse=reverse, on_corrupt=middle.corruption_error)
        for _ in before:
            next(translated)
        for _ in range(2):
            with pytest.raises(CannotReadFromStore) as read_error:
                next(translated)
            assert read_error.value.path == middle.path and read_error.value.offset == offset
        overwrite(middle.path, offset, original)
    for run in opened_runs:
        run.close()


def test_merge_cursor_stops_at_a_released_reader_and_refuses_bad_arguments(
    tmp_path: Path,
) -> None:
    expected = Expected("refused", 16, 8)
    path = tmp_path / "run"
    write(path, expected, {i.to_bytes(16, "big"): b"v" * 8 for i in range(100)})
    run = Run(str(path), expected)
    reader = run.reader
    assert reader is not None
    live = cursor([], [run])
    next(live)
    with pytest.raises(TypeError):
        _runs.MergeCursor([], (reader,), 16, None, None, False, None, None, None)
    eight: tuple[Any, ...] = ((), (reader,), 16, None, None, False, None, None)
    with pytest.raises(TypeError, match="nine positional"):
        _runs.MergeCursor(*eight)
    with pytest.raises(TypeError, match="nine positional"):
        _runs.MergeCursor(*eight, on_closed=None)
    with pytest.raises(TypeError):
        _runs.MergeCursor((), (reader,), "16", None, None, False, None, None, None)  # type: ignore[arg-type]
    # the type's __new__ (a call from Python without vectorcall) makes the same cursor
    made = _runs.MergeCursor.__new__(
        _runs.MergeCursor, (), (reader,), 16, None, None, True, None, None, None
    )
    assert next(made)[0] == (99).to_bytes(16, "big")
    with pytest.raises(TypeError, match="nine positional"):
        _runs.MergeCursor.__new__(_runs.MergeCursor, (), (reader,))  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _runs.MergeCursor(((({}, [])),), ("reader",), 16, None, None, False, None, None, None)
    with pytest.raises(TypeError):
        _runs.MergeCursor(((([], {})),), (), 16, None, None, False, None, None, None)
    with pytest.raises(TypeError):
        cursor([], [run], on_corrupt="not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _runs.MergeCursor(
            (), (reader,), 16, "start", None, False, None, None, None  # type: ignore[arg-type]
        )
    for closed, on_closed in [(bytearray(), Exception), (b"\0", Exception), (bytearray(1), None)]:
        with pytest.raises(TypeError, match="closed"):
            cursor([], [run], closed=closed, on_closed=on_closed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key size"):
        cursor([], [run], key_size=8)
    with pytest.raises(ValueError, match="another size"):
        list(cursor([{b"short": b"v"}], []))
    closed = bytearray(1)
    guarded = cursor([], [run], closed=closed, on_closed=lambda: LookupError("closed!"))
    assert next(guarded)[0] == bytes(16)
    ended = cursor([], [run], closed=closed, on_closed=lambda: LookupError("closed!"))
    assert len(list(ended)) == 100
    with pytest.raises(ValueError, match="in use"):  # (its buffer must not change under them)
        reader.__init__(b"", None, *[0] * 14, 0, b"", b"")  # type: ignore[misc]
    closed[0] = 1  # the store closes: each step raises what on_closed gives, reads nothing
    for _ in range(2):
        with pytest.raises(LookupError, match="closed!"):
            next(guarded)
    assert list(ended) == []  # ended before: ends again
    run.close()  # its readers are released, never read again
    with pytest.raises(LookupError, match="closed!"):  # the close comes first
        next(guarded)
    with pytest.raises(ValueError, match="released"):
        next(live)
    with pytest.raises(ValueError, match="released"):
        cursor([], [run])


def test_merge_cursor_sees_a_release_of_any_of_its_readers_at_its_next_step(
    tmp_path: Path,
) -> None:
    """The cursor looks at its readers again whenever some reader let go of its
    buffer: one elsewhere leaves it going, one of its own stops it before a read."""
    expected = Expected("released", 16, 8)
    opened = []
    for number in range(3):
        path = tmp_path / f"run{number}"
        keys = range(number, 300, 3)  # interleaved: every step moves to another run
        write(path, expected, {i.to_bytes(16, "big"): b"v" * 8 for i in keys})
        opened.append(Run(str(path), expected))
    elsewhere = opened.pop()
    live = cursor([], opened)
    assert [next(live)[0] for _ in range(4)] == [i.to_bytes(16, "big") for i in (0, 1, 3, 4)]
    elsewhere.close()  # another run's reader goes: this cursor's are all still held
    assert next(live)[0] == (6).to_bytes(16, "big")
    opened[1].close()  # one of its own: stopped before its rows are read
    with pytest.raises(ValueError, match="released"):
        next(live)
    with pytest.raises(ValueError, match="released"):
        next(live)
    opened[0].close()


def test_merge_cursor_holds_its_log_keys_and_refuses_what_is_not_bytes(tmp_path: Path) -> None:
    """A log's key list is not trusted: a list cut short under a cursor raises, its
    heads stay readable (held), keys that are not bytes are refused."""
    log: Log = {bytes([i]) * 16: b"v" * 8 for i in range(10)}
    keys = sorted(log)
    live = _runs.MergeCursor(((log, keys),), (), 16, None, None, False, None, None, None)
    assert next(live) == (keys[0], b"v" * 8)
    keys.clear()
    with pytest.raises(RuntimeError, match="shrank"):
        next(live)
    with pytest.raises(TypeError, match="bytes"):
        _runs.MergeCursor((({}, [1, 2, 3]),), (), 16, b"x" * 16, None, False, None, None, None)


def test_merge_cursor_raises_a_damaged_row_even_when_a_newer_source_hides_it(
    tmp_path: Path,
) -> None:
    expected = Expected("hidden", 16, 8)
    model: Model = {i.to_bytes(16, "big"): i.to_bytes(8, "big") for i in range(500)}
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    offset = write_damaged(old_path, expected, model, 250, 20)  # its value
    write(new_path, expected, {key: b"newer!!!" for key in sorted(model)[200:300]})
    old, new = Run(str(old_path), expected), Run(str(new_path), expected)
    iterator = cursor([], [new, old], on_corrupt=old.corruption_error)
    assert [next(iterator)[1] for _ in range(250)][-1] == b"newer!!!"
    with pytest.raises(CannotReadFromStore) as caught:
        next(iterator)
    assert caught.value.offset == offset
    old.close()
    new.close()


def test_a_seek_that_meets_damage_falls_back_to_reading_around_it(tmp_path: Path) -> None:
    """A damaged row just below a range's start fails the C seek at creation; the
    stack then merges in Python, whose seek reads around it: the range is whole."""
    from l2_stores.engine.runstack import RunStack

    expected = Expected("around", 16, 8)
    model: Model = {i.to_bytes(16, "big"): i.to_bytes(8, "big") for i in range(1000)}
    path = tmp_path / "run"
    write_damaged(path, expected, model, 600, 3)  # its key
    run = Run(str(path), expected)
    keys = sorted(model)
    with pytest.raises(_runs.RunCorrupt):  # the C cursor alone gives up at creation
        cursor([], [run], keys[601])
    stack = RunStack([run])  # type: ignore[list-item]
    rows = list(stack.live_rows((), 16, keys[601], None, False))
    assert rows == [(key, model[key]) for key in keys[601:]]
    with pytest.raises(CannotReadFromStore):  # a range over the damaged row
        list(stack.live_rows((), 16, keys[500], None, False))
    run.close()
