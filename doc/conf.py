"""Sphinx configuration of the l2_stores guide (MyST Markdown, autodoc).

Build, warnings as errors:
    .venv/bin/python -m sphinx -W --keep-going -q -b html doc doc/_build/html
"""

from __future__ import annotations

import os
import sys

# The package is installed editable in .venv; this also lets a Sphinx from
# elsewhere import it from the source tree.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import l2_stores

project = "l2_stores"
author = "the l2_stores developers"
copyright = "the l2_stores developers"
release = l2_stores.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: anchors for headings down to ### so that [text](page.md#heading) works.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# autodoc: the names exported by l2_stores, in source order, with the
# signatures as written.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "__init__, __new__"}

html_theme = "alabaster"
html_title = f"l2_stores {release}"
html_static_path: list[str] = []


def _hide_constructor(app, what, name, obj, options, signature, return_annotation):
    """Store classes are made by ``load`` and errors are raised, not built:
    their constructors' signatures would only mislead. Retain and Chain keep
    theirs."""
    hidden = (l2_stores.Store, l2_stores.StoreError, l2_stores.Mode)
    if what in ("class", "exception") and isinstance(obj, type) and issubclass(obj, hidden):
        return "", return_annotation
    return None


def setup(app):
    app.connect("autodoc-process-signature", _hide_constructor)
