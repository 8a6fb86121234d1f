"""Test settings: hypothesis is derandomized so CI runs are repeatable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def reserving_tmp_path(tmp_path: Path) -> Path:
    """``tmp_path``, on a file system that reserves blocks past a file's end
    (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``); the test is skipped elsewhere."""
    from l2_stores.engine.accel import accelerated_reserve

    probe = tmp_path / "reserve-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        works = (
            accelerated_reserve is not None
            and bool(accelerated_reserve(fd, 0, 1 << 20))
            and os.fstat(fd).st_blocks * 512 >= 1 << 20
        )
    finally:
        os.close(fd)
        probe.unlink()
    if not works:
        pytest.skip("this file system reserves no blocks past a file's end")
    return tmp_path
