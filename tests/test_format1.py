"""Stores written by the engine of one data file (tests/data/format1.tar.gz) load."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from l2_stores import Mode
from tests.helpers import format1

ARCHIVE = Path(__file__).parent / "data" / "format1.tar.gz"


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path


@pytest.mark.parametrize("mode", [Mode.READ_ONLY, Mode.READ_WRITE, "reopened"])
def test_every_kind_loads_with_its_bindings(stores: Path, mode: Mode | str) -> None:
    loads = 2 if mode == "reopened" else 1
    load_mode = Mode.READ_WRITE if mode == "reopened" else mode
    assert isinstance(load_mode, Mode)
    for _ in range(loads):
        with format1.Blocks.load(stores / "blocks", load_mode) as blocks:
            assert dict(blocks.items()) == format1.blocks()
        with format1.Levels.load(stores / "levels", load_mode) as levels:
            assert dict(levels.items()) == format1.levels()
            assert levels.find(7) is None and levels.find(8) == format1.digest("l", 8)
        with format1.Messages.load(stores / "messages", load_mode) as messages:
            assert {k: (v, h) for k, (v, h) in messages.items()} == format1.messages()


def test_written_to_after_loading(stores: Path) -> None:
    with format1.Blocks.load(stores / "blocks", index_buffer_size=50) as blocks:
        for i in range(300):
            blocks.add(format1.digest("new", i), format1.digest("w", i))
    expected = format1.blocks() | {
        format1.digest("new", i): format1.digest("w", i) for i in range(300)
    }
    with format1.Blocks.load(stores / "blocks", Mode.READ_ONLY) as blocks:
        assert dict(blocks.items()) == expected
