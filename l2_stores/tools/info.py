"""``l2-stores info``: what a store is, how big, and who writes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.framing import FORMAT_VERSION
from ..engine.lock import lock_holder
from ..errors import StoreError
from ..stores.base import EngineStore
from ..stores.identity import render
from ..stores.layout import Kind
from ..stores.singleton import SingletonStore
from .on_disk import StoreOnDisk


@dataclass
class StoreInfo:
    """What ``info`` tells about one store."""

    path: str
    name: str
    kind: str
    format_version: int
    key_size: int | None
    value_size: int | None
    header_size: int
    bindings: int
    generation: int | None
    writer_pid: int | None
    files: dict[str, int] = field(default_factory=dict)
    #: The recorded identity (see ``stores.identity``): the kind it was created as (``kind``
    #: tells only its files) and its codecs in words; None for a store made before them.
    created_as: str | None = None
    codecs: dict[str, str] | None = None
    #: Whether the identity file is there but cannot be read (see ``problem``).
    identity_damaged: bool = False
    #: Why the store could not be read whole (its other fields are what could be).
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The fields as printable lines."""

        def size(value: int | None) -> str:
            return "variable" if value is None else str(value)

        kind = Kind(self.kind).label
        if self.created_as is not None:
            kind = self.created_as.replace("_", " ")
        rows = [("kind", kind), ("format version", str(self.format_version))]
        if self.identity_damaged:
            rows.append(("codecs", "unknown (the identity file is damaged)"))
        elif self.codecs is None:
            rows.append(("codecs", "not recorded (made before identities)"))
        else:
            rows += [(role, codec) for role, codec in self.codecs.items()]
        if self.kind != Kind.SINGLETON.value:
            rows.append(("key size", size(self.key_size)))
        rows.append(("value size", size(self.value_size)))
        if self.kind == Kind.INDEXED_FILE.value:
            rows.append(("header size", str(self.header_size)))
        rows.append(("bindings", "unknown" if self.problem else str(self.bindings)))
        if self.generation is not None:
            rows.append(("generation", str(self.generation)))
        writer = "none" if self.writer_pid is None else f"pid {self.writer_pid} holds the lock"
        rows.append(("writer", writer))
        if self.problem is not None:
            rows.append(("DAMAGED", self.problem))
        width = max(len(file) for file in self.files) if self.files else 0
        return (
            [f"{self.name}  ({self.path})"]
            + [f"  {label:<15} {value}" for label, value in rows]
            + ["  files"]
            + [f"    {file:<{width}}  {size:>12,} B" for file, size in self.files.items()]
        )


def describe(store: StoreOnDisk) -> StoreInfo:
    """Open ``store`` read-only (no writer lock) and describe it; a damaged store is
    described as far as it can be read, with its ``problem``."""
    found = StoreInfo(
        path=store.path,
        name=store.name,
        kind=store.kind.value,
        format_version=FORMAT_VERSION,
        key_size=None,
        value_size=None,
        header_size=0,
        bindings=0,
        generation=None,
        writer_pid=lock_holder(store.lock_path),
        files=store.files(),
    )
    try:
        recorded = store.identity()
    except StoreError as error:
        found.identity_damaged, found.problem = True, str(error)
        return found
    if recorded is not None:
        found.created_as = recorded.kind
        found.codecs = {role: render(codec) for role, codec in recorded.codecs.items()}
    try:
        sizes = store.sizes()
        found.key_size, found.value_size, found.header_size = sizes.key, sizes.value, sizes.header
        opened = store.open()
        if opened is None:
            found.generation = None if store.kind is Kind.SINGLETON else 0
            return found
        with opened:
            if isinstance(opened, SingletonStore):
                found.bindings = 0 if opened.read() is None else 1
            else:
                assert isinstance(opened, EngineStore)
                found.bindings = len(opened)
                found.generation = opened._engine.generation
    except StoreError as error:
        found.problem = str(error)
    return found
