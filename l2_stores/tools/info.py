"""``l2-stores info``: what a store is, how big, and who writes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.framing import FORMAT_VERSION
from ..engine.lock import lock_holder
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
        if self.codecs is None:
            rows.append(("codecs", "not recorded (made before identities)"))
        else:
            rows += [(role, codec) for role, codec in self.codecs.items()]
        if self.kind != Kind.SINGLETON.value:
            rows.append(("key size", size(self.key_size)))
        rows.append(("value size", size(self.value_size)))
        if self.kind == Kind.INDEXED_FILE.value:
            rows.append(("header size", str(self.header_size)))
        rows.append(("bindings", str(self.bindings)))
        if self.generation is not None:
            rows.append(("generation", str(self.generation)))
        writer = "none" if self.writer_pid is None else f"pid {self.writer_pid} holds the lock"
        rows.append(("writer", writer))
        width = max(len(file) for file in self.files) if self.files else 0
        return (
            [f"{self.name}  ({self.path})"]
            + [f"  {label:<15} {value}" for label, value in rows]
            + ["  files"]
            + [f"    {file:<{width}}  {size:>12,} B" for file, size in self.files.items()]
        )


def describe(store: StoreOnDisk) -> StoreInfo:
    """Open ``store`` read-only (no writer lock) and describe it."""
    sizes = store.sizes()
    bindings, generation = 0, None
    opened = store.open()
    if opened is not None:
        with opened:
            if isinstance(opened, SingletonStore):
                bindings = 0 if opened.read() is None else 1
            else:
                assert isinstance(opened, EngineStore)
                bindings = len(opened)
                generation = opened._engine.generation
    elif store.kind is not Kind.SINGLETON:
        generation = 0
    writer = lock_holder(store.lock_path)
    recorded = store.identity()
    return StoreInfo(
        path=store.path,
        name=store.name,
        kind=store.kind.value,
        format_version=FORMAT_VERSION,
        key_size=sizes.key,
        value_size=sizes.value,
        header_size=sizes.header,
        bindings=bindings,
        generation=generation,
        writer_pid=writer,
        files=store.files(),
        created_as=None if recorded is None else recorded.kind,
        codecs=None
        if recorded is None
        else {role: render(codec) for role, codec in recorded.codecs.items()},
    )
