"""Store classes are generic in their keys and values: mypy catches a wrong key or value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent / "typing"


def mypy(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary",
         str(path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip


def test_typed_use_passes() -> None:
    proc = mypy(EXAMPLES / "typed_ok.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wrong_keys_and_values_are_reported() -> None:
    source = (EXAMPLES / "typed_wrong.py").read_text().splitlines()
    wrong = {
        number: 2 if "  # wrong twice" in line else 1
        for number, line in enumerate(source, 1)
        if "  # wrong" in line
    }
    proc = mypy(EXAMPLES / "typed_wrong.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    reported: dict[int, int] = {}
    for match in re.finditer(r"typed_wrong\.py:(\d+): error", proc.stdout):
        reported[int(match[1])] = reported.get(int(match[1]), 0) + 1
    assert reported == wrong, proc.stdout
