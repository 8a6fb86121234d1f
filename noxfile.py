"""The whole matrix, for a machine with every supported Python: ``nox`` (``pip install nox``).

``.ci/run`` runs the whole suite on Python 3.11 and the engine, model and
crash tests on 3.12 and 3.13, to stay within CI's time; ``nox`` runs the
whole suite, with and without the C accelerator, on each of them.
"""

from __future__ import annotations

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
EDITABLE = ["--config-settings", "editable_mode=compat"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite with the C accelerator, then on the pure-Python paths."""
    session.install("-e", ".[test]", *EDITABLE)
    session.run("python", "-m", "pytest", "-q", *session.posargs)
    session.run(
        "python", "-m", "pytest", "-q", *session.posargs, env={"L2_STORES_PURE_PYTHON": "1"}
    )


@nox.session(python=PYTHONS[0])
def lint(session: nox.Session) -> None:
    """mypy --strict and ruff."""
    session.install("-e", ".[dev]", *EDITABLE)
    session.run("python", "-m", "mypy")
    session.run("python", "-m", "ruff", "check", "l2_stores", "tests", "bench")
