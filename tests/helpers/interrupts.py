"""A Ctrl-C at an exact place: :func:`interrupt_at` raises ``KeyboardInterrupt`` just
before or just after one call of a C function (``os.pwrite``, say), as a signal handled
at that bytecode boundary would, through the interpreter's profile hook (no patching)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


@contextlib.contextmanager
def interrupt_at(function: Callable[..., Any], caller: str, *, after: bool) -> Iterator[list[bool]]:
    """Within the block, in this thread: interrupt the first call of the C ``function``
    made by a function named ``caller`` (or by one it calls directly), just before it
    (``after=False``) or just after it returned. The list yielded holds True once the
    interrupt was raised."""
    fired: list[bool] = []
    event = "c_return" if after else "c_call"
    thread = threading.get_ident()

    def profile(frame: FrameType, seen: str, arg: Any) -> None:
        if fired or seen != event or arg is not function or threading.get_ident() != thread:
            return
        names = {frame.f_code.co_name}
        if frame.f_back is not None:
            names.add(frame.f_back.f_code.co_name)
        if caller in names:
            fired.append(True)
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(profile)
    try:
        yield fired
    finally:
        sys.setprofile(None)
