"""Progress bars for the command-line tool, shown only on a terminal.

Built on tqdm: it is small, has no dependencies of its own, is maintained,
writes to stderr and redraws at a bounded rate, so a bar costs almost
nothing in a hot loop.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Never, Self

from tqdm import tqdm


def shown() -> bool:
    """True when progress bars are drawn: stderr is a terminal."""
    return sys.stderr.isatty()


class Progress:
    """A progress bar on stderr; does nothing when stderr is not a terminal."""

    def __init__(self, description: str, total: int | None = None, unit: str = "it") -> None:
        self._bar: tqdm[Never] | None = (
            tqdm(
                total=total,
                desc=description,
                unit=unit,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
                unit_scale=unit == "B",
            )
            if shown()
            else None
        )

    def update(self, amount: int = 1) -> None:
        """Advance the bar by ``amount``."""
        if self._bar is not None:
            self._bar.update(amount)

    def describe(self, description: str) -> None:
        """Change the bar's label."""
        if self._bar is not None:
            self._bar.set_description(description, refresh=False)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
