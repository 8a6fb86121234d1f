"""The values file's append in C (``ValuesTail``) against its Python twin.

Both write the same records and return the same offsets and index entries,
whatever the inputs; every case the C append does not take itself (other
types, other sizes, fsync, past the reserved blocks) reaches the Python one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from l2_stores.engine import accel
from l2_stores.engine.framing import Expected
from l2_stores.engine.values import POINTER, RESERVE_STEP, ValuesFile

pytestmark = pytest.mark.skipif(
    accel.AcceleratedWriter is None, reason="the C accelerator is not built"
)

EXPECTED = Expected("tail", 8, 0, 4)


class PythonOnly(ValuesFile):
    """The same file, every append through the Python twin."""

    def append(self, key: bytes, value: bytes) -> int:
        return self._append_in_python(key, value)

    def append_entry(self, key: bytes, value: bytes, header: bytes) -> bytes:
        return self._append_entry_in_python(key, value, header)


def open_pair(tmp_path: Path, fsync: bool = False) -> tuple[ValuesFile, ValuesFile]:
    c_file = ValuesFile(str(tmp_path / "c"), EXPECTED, readonly=False, fsync=fsync, number=7)
    python_file = PythonOnly(str(tmp_path / "p"), EXPECTED, readonly=False, fsync=fsync, number=7)
    return c_file, python_file


def test_c_and_python_appends_write_the_same_records(tmp_path: Path) -> None:
    c_file, python_file = open_pair(tmp_path)
    calls: list[str] = []
    original = ValuesFile._append_in_python

    def counting(self: ValuesFile, key: bytes, value: bytes) -> int:
        calls.append(type(self).__name__)
        return original(self, key, value)

    ValuesFile._append_in_python = counting  # type: ignore[method-assign]
    try:
        rng = random.Random(3)
        for step in range(600):
            key = rng.randbytes(8)
            value = rng.randbytes(rng.choice([0, 1, 100, 5000, 70_000]))
            header = rng.randbytes(4)
            if step % 2:
                got: Any = c_file.append_entry(key, value, header)
                want: Any = python_file.append_entry(key, value, header)
            else:
                got = c_file.append(key, value)
                want = python_file.append(key, value)
            assert got == want
            assert c_file.end == python_file.end
    finally:
        ValuesFile._append_in_python = original  # type: ignore[method-assign]
    c_calls = calls.count("ValuesFile")
    # the C file's Python appends: each reservation step (about 9 MB written)
    assert 0 < c_calls < 60, "the C append took too little or too much of the work"
    c_file.close()
    python_file.close()
    assert (tmp_path / "c").read_bytes() == (tmp_path / "p").read_bytes()


def test_an_entry_points_at_its_record(tmp_path: Path) -> None:
    c_file, _ = open_pair(tmp_path)
    first = c_file.append_entry(b"k" * 8, b"value", b"head")
    second = c_file.append_entry(b"j" * 8, b"", b"tail")
    assert POINTER.unpack_from(first) == (64, 5, 7) and first[POINTER.size :] == b"head"
    assert POINTER.unpack_from(second) == (64 + 12 + 8 + 5, 0, 7)
    assert c_file.read(64, 5, b"k" * 8) == b"value"
    assert c_file.read(64 + 25, 0, b"j" * 8) == b""
    assert c_file.end == 64 + 25 + 20
    c_file.close()


def test_what_the_c_append_does_not_take_reaches_the_python_one(reserving_tmp_path: Path) -> None:
    c_file, _ = open_pair(reserving_tmp_path, fsync=True)
    seen: list[Any] = []

    def recording(key: bytes, value: bytes) -> int:
        seen.append((key, value))
        return ValuesFile._append_in_python(c_file, key, value)

    c_file._append_in_python = recording  # type: ignore[method-assign]
    c_file.append(b"k" * 8, b"fsync")  # fsync: Python
    c_file._fsync = False
    c_file.append(b"k" * 8, b"reserve")  # within the reservation made just above: C
    c_file.append(b"k" * 8, b"x" * (RESERVE_STEP + 10))  # past the reservation: Python
    c_file.append(b"k" * 8, b"after")  # within the new reservation: C
    assert [value[:7] for _, value in seen] == [b"fsync", b"xxxxxxx"]
    assert c_file.read(c_file.end - 25, 5, b"k" * 8) == b"after"
    c_file.close()
