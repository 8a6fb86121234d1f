"""The runs of an index directory, as the tests look at them."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

from l2_stores.engine.framing import HEADER_SIZE, HEADER_STRUCT
from l2_stores.engine.layout import scan
from l2_stores.engine.levels import live_and_superseded
from l2_stores.engine.run import FILTER_OFFSET, PARTS_BYTES, RUN_HEADER, Geometry

#: The run header's fields, in order (its checksum after them).
RUN_HEADER_FIELDS = (
    "lo",
    "capacity",
    "blocks",
    "fence_rows",
    "removals",
    "prefix",
    "shift",
    "base",
    "live",
    "parts",
)


def run_header(path: str | os.PathLike[str]) -> dict[str, int]:
    """The run header's fields of the run at ``path`` (``parts`` as an int)."""
    data = Path(path).read_bytes()[HEADER_SIZE:FILTER_OFFSET]
    fields = dict(zip(RUN_HEADER_FIELDS, RUN_HEADER.unpack(data)[:-1], strict=True))
    fields["parts"] = int.from_bytes(fields["parts"], "little")
    return fields


def rewrite_run_header(path: str | os.PathLike[str], **changes: int) -> None:
    """Change fields of the run header and give it a valid checksum again."""
    data = bytearray(Path(path).read_bytes())
    fields: dict[str, Any] = run_header(path) | changes
    fields["parts"] = fields["parts"].to_bytes(PARTS_BYTES, "little")
    body = RUN_HEADER.pack(*fields.values(), 0)[:-4]
    data[HEADER_SIZE:FILTER_OFFSET] = body + zlib.crc32(body).to_bytes(4, "little")
    Path(path).write_bytes(bytes(data))


def run_names(directory: str | os.PathLike[str]) -> list[str]:
    """The run files of ``directory`` (not those being written), oldest first."""
    return sorted(n for n in os.listdir(directory) if n.startswith("run.") and "." not in n[4:])


def assert_runs_tile(directory: str | os.PathLike[str]) -> list[str]:
    """Check that the runs tile the generations from 0 with none superseded; their names."""
    spans = scan(os.fspath(directory)).runs
    live, superseded = live_and_superseded(spans)
    assert superseded == [], f"superseded runs left: {superseded}"
    assert not live or live[0].lo == 0, f"runs start at {live[0]}"
    return run_names(directory)


def runs_tag(directory: str | os.PathLike[str]) -> int:
    """The word kept with the runs (an indexed file's values-file floor): the highest tag."""
    tags = [0]
    for name in run_names(directory):
        with open(os.path.join(directory, name), "rb") as file:
            tags.append(HEADER_STRUCT.unpack(file.read(HEADER_SIZE))[9])
    return max(tags)


def run_sections(geometry: Geometry) -> dict[str, tuple[int, int]]:
    """Each section of a run of ``geometry``: its first byte and the byte after its last."""
    g = geometry
    return {
        "file header": (0, 64),
        "run header": (64, 128),
        "filter": (g.filter, g.fence),
        "fences": (g.fence, g.fence + g.fences * g.key_size),
        "radix": (g.radix, g.rows),
        "rows": (g.rows, g.page_crcs),
        "page checksums": (g.page_crcs, g.size),
    }
