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

from l2_stores.engine import accel, framing, log
from l2_stores.engine.framing import Expected

_accel = pytest.importorskip(
    "l2_stores.engine._accel", reason="the C accelerator is not built (no C compiler?)"
)
if accel.pure_python_requested():
    pytest.skip("the C accelerator is turned off", allow_module_level=True)

EXPECTED = Expected("accel", key_size=8, value_size=4)




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
    assert accel.AcceleratedWriter is _accel.Writer
    code = (
        "from l2_stores.engine import accel; "
        "print(accel.AcceleratedLayers, accel.AcceleratedWriter, accel.accelerated_framed)"
    )
    env = dict(os.environ, **{accel.ENV_PURE_PYTHON: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "None", "None"], out.stderr


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
) -> tuple[tuple[int, int, bool, int, int], dict[bytes, Any]]:
    """The log's replay rule as log.py's docstring gives it (the oracle of the C one):
    records up to the first bad one or a seal; a part's records count at its end; an
    open part gives back everything from its begin."""
    size = 1 + key_size + value_size + 4
    good = []  # (position, op, synced, key, value) of each good record, in order
    position = 0
    while position + size <= len(buffer):
        record = buffer[position : position + size]
        op, synced = record[0] & 0x7F, bool(record[0] & 0x80)
        if zlib.crc32(record[:-4]) != int.from_bytes(record[-4:], "little") or not 1 <= op <= 6:
            break
        good.append((position, op, synced, record[1 : 1 + key_size], record[1 + key_size : -4]))
        position += size
        if op == 4:
            break
    bindings: dict[bytes, Any] = {}
    taken_end, synced_at, parts, sealed = 0, -1, 0, False
    part: list[tuple[int, int, bool, bytes, bytes]] | None = None
    valid_end = 0
    for record in good:
        at, op, synced, key, value = record
        if (op == 6 and part is None) or (op in (3, 4, 5) and part is not None):
            break  # an end outside a part; a mark, seal or begin inside one
        valid_end = at + size
        if part is not None and op != 6:
            part.append(record)
            continue
        if op == 5:
            part = [record]
            continue
        if op == 6:
            assert part is not None
            for _, part_op, part_synced, part_key, part_value in part:
                if part_op in (1, 2):
                    bindings[part_key] = part_value if part_op == 1 else None
                if part_synced:
                    synced_at = _
            part = None
            parts += 1
        elif op in (1, 2):
            bindings[key] = value if op == 1 else None
        if synced or op == 3:
            synced_at = at
        taken_end = at + size
        if op == 4:
            sealed = True
            break
    return (taken_end, synced_at, sealed, parts, valid_end), bindings


@pytest.mark.parametrize("seed", range(200))
def test_replay_log_stops_where_python_stops(seed: int) -> None:
    rng = random.Random(seed)
    key_size, value_size = rng.choice([(8, 4), (32, 32), (1, 0), (0, 3)])
    keys = [rng.randbytes(key_size) for _ in range(5)]
    records = []
    for _ in range(rng.randrange(0, 30)):
        op = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 5, 6, 6]) | rng.choice([0, 0, 0x80])
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
            bytes([rng.choice([0, 7, 0x87, 0x7F])]), buffer[at + 1 : at + record_size - 4]
        )
    elif damage == "torn":
        buffer += rng.randbytes(rng.randrange(1, 1 + key_size + value_size + 4))
    elif damage == "zeros":
        buffer += bytes(rng.randrange(1, 100))
    bindings: dict[bytes, bytes | None] = {}
    stopped = _accel.replay_log(bytes(buffer), key_size, value_size, bindings)
    oracle = python_replay(bytes(buffer), key_size, value_size)
    assert (stopped, bindings) == oracle
    in_python: dict[bytes, bytes | None] = {}
    size = 1 + key_size + value_size + 4
    assert (tuple(log._replay_in_python(bytes(buffer), size, key_size, in_python)), in_python) == (
        oracle
    )


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


def test_a_failed_c_write_is_made_again_and_reported_by_the_python_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the C put cannot make changes nothing and goes to the Python put, which
    writes again and, failing too, raises the store's error from the OSError, the log
    cut back to its end (as LogWriter.append_set does)."""
    from l2_stores.engine.index import Index
    from l2_stores.errors import CannotWriteToStore

    handed: list[bytes] = []
    python_put = Index._put_in_python

    def counted(self: Index, key: bytes, value: bytes, flush: bool) -> None:
        handed.append(key)
        python_put(self, key, value, flush)

    monkeypatch.setattr(Index, "_put_in_python", counted)
    expected = Expected("accel", key_size=8, value_size=8)
    index = Index(str(tmp_path / "a"), expected, readonly=False, buffer_size=100)
    log = index._log
    assert log is not None
    log._unmap()  # the written path: a store into the map cannot fail this way
    index.put(b"a" * 8, b"1" * 8, True)
    assert handed == []
    end = log._end
    cuts: list[int] = []
    real_failed_write = log._failed_write

    def failed_write(error: OSError) -> CannotWriteToStore:
        cuts.append(log._end)
        return real_failed_write(error)

    log._failed_write = failed_write  # type: ignore[method-assign]
    fd = log._fd
    try:
        os.close(fd)  # every write fails: EBADF
        with pytest.raises(CannotWriteToStore, match="Bad file descriptor") as raised:
            index.put(b"b" * 8, b"2" * 8, True)
        assert isinstance(raised.value.__cause__, OSError)
        assert raised.value.__cause__.errno == errno.EBADF
        assert handed == [b"b" * 8] and cuts == [end]
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


def test_c_put_goes_past_the_buffer_while_a_merge_runs_up_to_the_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the Python put: past the buffer while a merge runs, the C put appends; from the
    pace threshold it hands over to Python, which paces writers and, at the cap, waits
    for the merge."""
    import threading

    from l2_stores.engine.index import Index

    release = threading.Event()

    def held_write() -> None:
        assert release.wait(30), "the test never released the merge"

    handed: list[bytes] = []
    python_put = Index._put_in_python

    def counted(self: Index, key: bytes, value: bytes, flush: bool) -> None:
        handed.append(key)
        python_put(self, key, value, flush)

    monkeypatch.setattr(Index, "_put_in_python", counted)
    expected = Expected("accel", key_size=8, value_size=8)
    index = Index(str(tmp_path / "a"), expected, readonly=False, buffer_size=4)  # cap 12
    index.hooks.add("flush_write", held_write)
    keys = [bytes([i]) * 8 for i in range(17)]
    try:
        for key in keys[:4]:  # the fourth fills the buffer, in Python: a held merge
            index.put(key, key, True)
        assert handed == [keys[3]]
        for key in keys[4:16]:  # the new log past the buffer: in C up to the pace (11)
            index.put(key, key, True)
        assert handed == [keys[3], keys[14], keys[15]]  # from the pace on: Python, pacing
        assert index.pacing and index._log is not None and index._log.records == 12
        releaser = threading.Timer(0.2, release.set)
        releaser.start()
        index.put(keys[16], keys[16], True)  # at the cap: Python, which waits for the merge
        releaser.join()
        assert handed == [keys[3], keys[14], keys[15], keys[16]]
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
