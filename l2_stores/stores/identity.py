"""A store's identity: the kind, name and codecs it was created with, kept beside it.

Layout of an identity file (little-endian), format version 1::

    offset  size  field
         0     8  magic ``L2SIDNT\\0``
         8     2  format version
        10     2  reserved, 0
        12     4  n: length of the body
        16     n  the body: UTF-8 JSON {"kind": ..., "name": ..., "codecs": {role: description}}
      16+n     4  crc32 of bytes 0..16+n

The file is ``<path>/identity`` for a store directory and ``<path>.identity``
for a singleton (``layout``). It is written once, when the store is created
(or at the first ``READ_WRITE`` load of a store made before identities
existed): to ``.tmp``, fsynced, renamed into place, the directory fsynced.

A codec's description is a JSON tree of what ``construct`` tells of it: an
integer's bits, sign and byte order, a ``Bytes``' size, a ``Struct``'s field
names and their codecs in order, and for other constructs their class name
and their plain attributes (lengths, encodings, constants, mappings) and
subconstructs. Wrappers that change nothing of the bytes (``compile()``, a
name given outside a ``Struct``) are left out, and ``BytesInteger(4)`` is
described as ``Int32ub`` is: two codecs with the same description read the
same bytes the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import construct

from ..engine import filesystem
from ..engine.framing import Finding, crc_ok, pwrite_all, with_crc
from ..errors import CannotLoadStore, CannotReadFromStore
from .layout import Kind, classify, identity_path, migration_switching

MAGIC = b"L2SIDNT\0"
IDENTITY_VERSION = 1
_HEADER = struct.Struct("<8sHHI")
HEADER_SIZE = 16
assert _HEADER.size == HEADER_SIZE
CRC_SIZE = 4
#: Larger than any sane description: a bigger length field is corruption.
_MOST_BODY_BYTES = 1 << 20

#: The kinds a record names (the Octez functors), and the files each one has.
KIND_FILES = {
    "singleton": Kind.SINGLETON,
    "indexable": Kind.INDEXABLE,
    "indexable_removable": Kind.INDEXABLE,
    "indexed_file": Kind.INDEXED_FILE,
    "simple_indexed_file": Kind.INDEXED_FILE,
}

Description = Any  # a JSON value: dict, list, str, int, bool or None

# -- codec descriptions

_INT_FORMATS = {"b": (8, True), "B": (8, False), "h": (16, True), "H": (16, False)}
_INT_FORMATS |= {"i": (32, True), "I": (32, False), "l": (32, True), "L": (32, False)}
_INT_FORMATS |= {"q": (64, True), "Q": (64, False)}
_FLOAT_FORMATS = {"e": 16, "f": 32, "d": 64}
_ORDERS = {">": "big", "<": "little", "=": "native"}
#: Attributes of every construct that say nothing of its bytes, and an ``Enum``'s
#: mappings derived from the one it was given.
_NOT_DESCRIBED = {"name", "docs", "flagbuildnone", "parsed", "decmapping", "ksymapping"}
_MOST_DEPTH = 32


def describe(codec: Any) -> Description:
    """The description of the construct ``codec`` (see the module's docstring)."""
    return _describe(codec, 0)


def _describe(codec: Any, depth: int) -> Description:
    if depth > _MOST_DEPTH:
        return {"type": "..."}
    codec = _unwrapped(codec)
    kind = type(codec)
    if kind is construct.FormatField and len(codec.fmtstr) == 2:
        order, char = _ORDERS.get(codec.fmtstr[0]), codec.fmtstr[1]
        if order is not None and char in _INT_FORMATS:
            bits, signed = _INT_FORMATS[char]
            return {"type": "int", "bits": bits, "signed": signed, "order": _order(order, bits)}
        if order is not None and char in _FLOAT_FORMATS:
            bits = _FLOAT_FORMATS[char]
            return {"type": "float", "bits": bits, "order": _order(order, bits)}
    if kind is construct.BytesInteger and _plain(codec.length) and _plain(codec.swapped):
        bits, signed = 8 * codec.length, bool(codec.signed)
        order = _order("little" if codec.swapped else "big", bits)
        return {"type": "int", "bits": bits, "signed": signed, "order": order}
    if kind is construct.Bytes and type(codec.length) is int:
        return {"type": "bytes", "size": codec.length}
    if kind is construct.Struct:
        return {
            "type": "struct",
            "fields": [
                {"name": sub.name, "codec": _describe(sub, depth + 1)} for sub in codec.subcons
            ],
        }
    described: dict[str, Any] = {"type": _class_name(kind)}
    for attribute, value in sorted(vars(codec).items()):
        if attribute not in _NOT_DESCRIBED and not attribute.startswith("_"):
            described[attribute] = _attribute(value, depth)
    return described


def _order(order: str, bits: int) -> str:
    """A byte order as stored: native resolved to this machine's; one byte has none."""
    if bits == 8:
        return "big"
    return sys.byteorder if order == "native" else order


def _class_name(kind: type) -> str:
    """A construct class by name; another package's (a user's Adapter) with its module."""
    if kind.__module__.split(".")[0] == "construct":
        return kind.__name__.lstrip("_")
    return f"{kind.__module__}.{kind.__qualname__}"


def _attribute(value: Any, depth: int) -> Any:
    if isinstance(value, construct.Construct):
        return _describe(value, depth + 1)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)  # not a subclass (an Enum's strings)
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_attribute(item, depth) for item in value]
    if isinstance(value, dict):
        pairs = [(_attribute(k, depth), _attribute(v, depth)) for k, v in value.items()]
        return sorted(([str(k), v] for k, v in pairs), key=lambda pair: json.dumps(pair))
    if isinstance(value, construct.expr.ExprMixin):  # this.n * 2
        return {"expression": repr(value)}
    if callable(value):  # a function's behaviour is unknown: its name at least
        module = getattr(value, "__module__", None) or "?"
        return {"function": f"{module}.{getattr(value, '__qualname__', repr(type(value)))}"}
    return {"object": _class_name(type(value))}


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int))


def _unwrapped(codec: Any) -> Any:
    while True:
        if type(codec) is construct.Renamed:
            codec = codec.subcon
        elif type(codec) is construct.Compiled and isinstance(
            codec.defersubcon, construct.Construct
        ):
            codec = codec.defersubcon
        else:
            return codec


def render(description: Description) -> str:
    """A description in a line: ``Int32ub``, ``Bytes(32)``, ``Struct(level=Int32ub, ...)``."""
    if not isinstance(description, dict):
        return json.dumps(description)
    kind = description.get("type")
    if kind == "int":
        sign = "s" if description["signed"] else "u"
        return f"Int{description['bits']}{sign}{description['order'][0]}"
    if kind == "float":
        return f"Float{description['bits']}{description['order'][0]}"
    if kind == "bytes":
        return f"Bytes({description['size']})"
    if kind == "struct":
        fields = (
            f"{field['name']}={render(field['codec'])}" if field["name"] else render(field["codec"])
            for field in description["fields"]
        )
        return f"Struct({', '.join(fields)})"
    if set(description) == {"bytes"}:
        return f"0x{description['bytes']}"
    if len(description) == 1 and set(description) <= {"expression", "function", "object"}:
        return str(next(iter(description.values())))
    arguments = [render(description["subcon"])] if "subcon" in description else []
    arguments += [
        f"{attribute}={_render_value(value)}"
        for attribute, value in description.items()
        if attribute not in ("type", "subcon")
    ]
    return f"{kind}({', '.join(arguments)})" if arguments else str(kind)


def construct_of(description: Description) -> Any | None:
    """A construct that reads what the described codec wrote, for the common codecs
    (integers, floats, bytes, structs of them, strings, arrays...); None for others."""
    if not isinstance(description, dict):
        return None
    kind = description.get("type")
    try:
        if kind == "int":
            bits, signed = description["bits"], description["signed"]
            swapped = description["order"] == "little"
            return construct.BytesInteger(bits // 8, signed=signed, swapped=swapped)
        if kind == "float":
            order = {"big": ">", "little": "<", "native": "="}[description["order"]]
            return construct.FormatField(order, {16: "e", 32: "f", 64: "d"}[description["bits"]])
        if kind == "bytes":
            return construct.Bytes(description["size"])
        if kind == "GreedyBytes":
            return construct.GreedyBytes
        if kind == "Flag":
            return construct.Flag
        if kind == "VarInt":
            return construct.VarInt
        if kind == "struct":
            fields = []
            for field in description["fields"]:
                sub = construct_of(field["codec"])
                if sub is None:
                    return None
                fields.append(field["name"] / sub if field["name"] else sub)
            return construct.Struct(*fields)
        return _generic_construct(kind, description)
    except (KeyError, TypeError, ValueError):
        return None


def _generic_construct(kind: Any, description: dict[str, Any]) -> Any | None:
    sub = construct_of(description.get("subcon"))
    if kind == "StringEncoded" and sub is not None:
        return construct.StringEncoded(sub, description["encoding"])
    if kind == "Prefixed" and sub is not None:
        length = construct_of(description["lengthfield"])
        if length is not None:
            return construct.Prefixed(length, sub, description.get("includelength", False))
    if kind == "Array" and sub is not None and isinstance(description.get("count"), int):
        return construct.Array(description["count"], sub)
    if kind == "Const" and sub is not None and isinstance(description.get("value"), dict):
        return construct.Const(bytes.fromhex(description["value"]["bytes"]), sub)
    if kind == "Enum" and sub is not None:
        return construct.Enum(sub, **dict(description.get("encmapping", [])))
    if kind == "Padded" and sub is not None:
        pattern = bytes.fromhex(description["pattern"]["bytes"])
        return construct.Padded(description["length"], sub, pattern)
    return None


def size_of(description: Description) -> int | None:
    """The size in bytes of the encodings of a fixed-size description, else None."""
    if not isinstance(description, dict):
        return None
    kind = description.get("type")
    if kind in ("int", "float"):
        return int(description["bits"]) // 8
    if kind == "bytes":
        return int(description["size"])
    if kind == "struct":
        sizes = [size_of(field["codec"]) for field in description["fields"]]
        return None if None in sizes else sum(size for size in sizes if size is not None)
    if kind == "Padded" and isinstance(description.get("length"), int):
        return int(description["length"])
    return None


def _render_value(value: Any) -> str:
    if isinstance(value, dict):
        return render(value)
    if isinstance(value, list):
        return "[" + ", ".join(_render_value(item) for item in value) + "]"
    return repr(value)


# -- the record


@dataclass(frozen=True)
class Identity:
    """What a store was created as: its kind, its name and its codecs' descriptions."""

    kind: str
    name: str
    codecs: dict[str, Description]

    @property
    def files(self) -> Kind:
        """The kind of files the store has."""
        return KIND_FILES[self.kind]

    def same_as(self, other: Identity) -> bool:
        """Whether a store of this identity may be loaded as ``other`` (names may differ)."""
        return self.kind == other.kind and self.codecs == other.codecs

    def show(self) -> str:
        """The identity in words: ``indexable 'levels' (key Int32ub, value Bytes(32))``."""
        codecs = ", ".join(
            f"{role} {render(codec)}" + ("" if size is None else f" ({size} B)")
            for role, codec in self.codecs.items()
            for size in [size_of(codec)]
        )
        return f"{self.kind.replace('_', ' ')} {self.name!r} ({codecs})"

    def as_json(self) -> dict[str, Any]:
        """The identity as a JSON-ready dict (what the file's body holds)."""
        return {"kind": self.kind, "name": self.name, "codecs": self.codecs}

    def to_bytes(self) -> bytes:
        """The identity file's bytes."""
        body = json.dumps(self.as_json(), separators=(",", ":")).encode()
        return with_crc(_HEADER.pack(MAGIC, IDENTITY_VERSION, 0, len(body)) + body)


def read(path: str, name: str = "", store_path: str | None = None) -> Identity | None:
    """The identity recorded in the file ``path`` (of the store at ``store_path``); None
    when there is none.

    Raises :class:`CannotLoadStore` when the file is damaged or of another format
    (its path and offset are the error's), or cannot be read (the store's path is).
    """
    try:
        with open(path, "rb") as file:
            raw = file.read(HEADER_SIZE + _MOST_BODY_BYTES + CRC_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CannotLoadStore(
            f"cannot read the store's identity ({error.strerror})",
            name=name,
            path=store_path or path,
        ) from error

    def fail(what: str, offset: int) -> CannotLoadStore:
        return CannotLoadStore(
            f"identity file {what} (file {path}, offset {offset})",
            name=name,
            path=path,
            offset=offset,
        )

    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise fail(f"cut short: {len(raw)} bytes", 0)
    magic, version, _, length = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise fail(f"has magic {magic!r}, not {MAGIC!r}", 0)
    if version != IDENTITY_VERSION:
        raise fail(f"of format version {version}, version {IDENTITY_VERSION} expected", 8)
    if len(raw) != HEADER_SIZE + length + CRC_SIZE or not crc_ok(raw):
        raise fail("fails its checksum", HEADER_SIZE)
    try:
        return from_json(json.loads(raw[HEADER_SIZE:-CRC_SIZE]))
    except ValueError as error:
        raise fail(f"holds no identity ({error})", HEADER_SIZE) from error


def from_json(body: Any) -> Identity:
    """The identity of ``as_json``'s dict; ValueError when it is not one."""
    if not (
        isinstance(body, dict)
        and isinstance(body.get("kind"), str)
        and isinstance(body.get("name"), str)
        and isinstance(body.get("codecs"), dict)
    ):
        raise ValueError(f"not an identity: {str(body)[:80]}")
    if body["kind"] not in KIND_FILES:
        raise ValueError(f"unknown kind {body['kind']!r}")
    return Identity(body["kind"], body["name"], body["codecs"])


def write(path: str, identity: Identity, name: str, store_path: str) -> None:
    """Put the identity file ``path`` in place, durably."""
    temporary = path + ".tmp"
    try:
        fd = filesystem.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            pwrite_all(fd, identity.to_bytes(), 0)
            filesystem.fsync(fd)
        finally:
            os.close(fd)
        filesystem.rename(temporary, path)
        filesystem.fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as error:
        with contextlib.suppress(OSError):
            filesystem.unlink(temporary)
        raise CannotLoadStore(
            f"cannot record the store's identity in {path}: {error}", name=name, path=store_path
        ) from error


def check_file(path: str, name: str = "") -> Iterator[Finding]:
    """``verify``'s check of the identity file ``path``."""
    try:
        read(path, name)
    except CannotLoadStore as error:
        yield Finding(path, error.offset or 0, error.reason.split(" (file ", 1)[0])


# -- the checks of a load


def mismatch(expected: str, found: str, *, name: str, path: str) -> CannotLoadStore:
    """The error of a load that found a store of another kind, or with codecs described
    differently; ``expected`` and ``found`` (the identities in words) are its fields too."""
    return CannotLoadStore(
        f"expected {expected}, found {found}: a store loads only with the kind and codecs "
        "it was created with",
        name=name,
        path=path,
        expected=expected,
        found=found,
    )


def found_at(path: str, files: Kind, name: str = "") -> Identity | str | None:
    """What is at ``path``, for a store with ``files``: the recorded identity of the store
    there, else what is there in words when no store with ``files`` can be (another kind's
    files, a file where a directory is expected...), else None (nothing, or a store with
    ``files`` made before identities)."""
    is_directory = os.path.isdir(path)
    if not os.path.exists(path):
        there = None
    else:
        there = classify(path)
        if there is None:  # no store: only the right type of file system entry may be used
            if is_directory == (files is not Kind.SINGLETON):
                return read(identity_path(path, files), name, path)
            return "a directory" if is_directory else "a file that is no store"
    recorded = read(identity_path(path, there or files), name, path)
    if recorded is not None:
        return recorded
    if there is not None and there is not files:
        return f"{there.label} store (made before identities)"
    return None


def check(path: str, expected: Identity, name: str) -> bool:
    """Check that ``path`` holds nothing or a store of ``expected``'s kind and codecs;
    True when the identity is still to be recorded.

    Raises :class:`CannotLoadStore` (see :func:`mismatch`) otherwise.
    """
    if expected.files is Kind.SINGLETON and os.path.exists(migration_switching(path)):
        raise CannotLoadStore(
            "its replacement (by migrate or a snapshot import) was cut short: a READ_WRITE "
            "load of the new class, or running it again, finishes it",
            name=name,
            path=path,
        )
    try:
        found = found_at(path, expected.files, name)
    except OSError as error:
        raise CannotLoadStore(f"cannot look at the store: {error}", name=name, path=path) from error
    if found is None:
        return True
    if isinstance(found, str):
        raise mismatch(expected.show(), found, name=name, path=path)
    if not found.same_as(expected):
        raise mismatch(expected.show(), found.show(), name=name, path=path)
    return False


def check_unchanged(path: str, expected: Identity, name: str) -> None:
    """At a ``READ_ONLY`` store's sync: refuse when the files at ``path`` are now another
    store's (a migration switched them) or a singleton's switch is under way."""
    switching = expected.files is Kind.SINGLETON and os.path.exists(migration_switching(path))
    recorded = None if switching else read(identity_path(path, expected.files), name, path)
    if switching or (recorded is not None and not recorded.same_as(expected)):
        found = "a store being switched" if recorded is None else recorded.show()
        raise CannotReadFromStore(
            f"the store was replaced by {found} (migrated?): load it with its new class",
            name=name,
            path=path,
        )


def record(path: str, expected: Identity, name: str) -> None:
    """At a ``READ_WRITE`` load, holding the store's lock: check again and record the
    identity if the store has none yet."""
    if check(path, expected, name):
        write(identity_path(path, expected.files), expected, name, path)
