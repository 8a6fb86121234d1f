"""Run every ```python block of the guide (doc/**/*.md) and of README.md.

Each page's blocks run in order, in one namespace, in a fresh temporary
directory, so the examples cannot drift from the library. Blocks that must
not run carry another info string (```console, ```text, ...). A last test
builds the guide with Sphinx, warnings as errors.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "doc"
BUILD = DOC / "_build"

# A fence opens with three or more backticks or tildes and an info string.
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_RUNNABLE = {"python", "py", "python3"}


def _pages() -> list[Path]:
    pages = sorted(path for path in DOC.rglob("*.md") if BUILD not in path.parents)
    readme = ROOT / "README.md"
    if readme.exists():
        pages.append(readme)
    return pages


def _language(info: str) -> str:
    """The language of a fence's info string: "python", "{code-block} python" -> python."""
    words = info.strip().split()
    if not words:
        return ""
    if words[0].startswith("{") and words[0].endswith("}"):
        directive = words[0][1:-1]
        if directive in ("code-block", "code", "sourcecode") and len(words) > 1:
            return words[1].lower()
        return directive
    return words[0].lower()


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Every runnable block of ``text`` as (line of its first code line, source)."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        index += 1
        if match is None:
            continue
        fence = match["fence"]
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        start = index
        while index < len(lines) and not closing.match(lines[index]):
            index += 1
        body = lines[start:index]
        index += 1  # the closing fence
        if _language(match["info"]) in _RUNNABLE:
            # MyST directive options (":caption: ...") at the top are not code.
            skip = 0
            while skip < len(body) and body[skip].startswith(":"):
                skip += 1
            blocks.append((start + skip + 1, "\n".join(body[skip:]) + "\n"))
    return blocks


PAGES = _pages()


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOC if DOC in page.parents else ROOT))


def test_pages_found() -> None:
    assert PAGES, f"no .md pages found under {DOC}"
    assert any(python_blocks(page.read_text(encoding="utf-8")) for page in PAGES), (
        "no ```python block found in any page"
    )


@pytest.mark.parametrize("page", PAGES, ids=[_page_id(page) for page in PAGES])
def test_page_examples(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"guide:{_page_id(page)}"}
    for line, source in python_blocks(page.read_text(encoding="utf-8")):
        # Padding keeps the tracebacks' line numbers those of the .md file.
        code = compile("\n" * (line - 1) + source, str(page), "exec")
        exec(code, namespace)  # the guide's own examples, nothing else


def test_fence_parser() -> None:
    text = (
        "```python\nx = 1\n```\n"
        "```console\n$ make demo\n```\n"
        "````markdown\n```python\nnot code\n```\n````\n"
        "```{code-block} python\n:caption: c\ny = 2\n```\n"
    )
    assert python_blocks(text) == [(2, "x = 1\n"), (14, "y = 2\n")]


def test_sphinx_build(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOC),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stderr.strip(), result.stderr
    assert (tmp_path / "html" / "index.html").exists()
