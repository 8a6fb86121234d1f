"""What the package tells of itself: its version, and whether the C accelerator is in use."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import l2_stores
from l2_stores.engine import accel

WITHOUT_RUNS = """
import sys
sys.modules["l2_stores.engine._runs"] = None  # as if it had not been built
import l2_stores
print(l2_stores.accelerated)
import l2_stores.aio, l2_stores.tools.salvage  # more imports: no second warning
"""


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != accel.ENV_PURE_PYTHON} | env
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment
    )


def test_accelerated_says_whether_every_extension_is_in_use() -> None:
    assert l2_stores.accelerated == accel.in_use()
    assert l2_stores.accelerated == (not accel.missing)
    if accel.pure_python_requested():
        assert not l2_stores.accelerated


def test_a_missing_extension_is_a_warning_once() -> None:
    built = python("import l2_stores; print(l2_stores.accelerated)")
    if built.stdout.strip() != "True":  # this install has no accelerator at all
        assert "not in use" in built.stderr
        return
    assert built.stderr == ""
    proc = python(WITHOUT_RUNS)
    assert proc.stdout.strip() == "False"
    assert proc.stderr.count("C accelerator is not in use") == 1, proc.stderr
    assert "_runs" in proc.stderr
    off = python("import l2_stores; print(l2_stores.accelerated)", L2_STORES_PURE_PYTHON="1")
    assert off.stdout.strip() == "False" and off.stderr == ""  # asked for: no warning


def test_the_version_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "l2_stores", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    line = proc.stdout.strip()
    assert line.startswith(f"l2-stores {l2_stores.__version__} (Python {platform.python_version()}")
    state = (
        "in use"
        if l2_stores.accelerated
        else ("off" if accel.pure_python_requested() else "not in use")
    )
    assert line.endswith(f"C accelerator {state}") or f"C accelerator {state}" in line
