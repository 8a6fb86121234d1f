"""Turn ``construct`` codecs, once, into fast encode/decode closures.

:func:`compile_codec` picks the fastest path that keeps construct's results:
plain bytes, one precompiled :class:`struct.Struct`, construct's own compiler,
or the interpreted construct.  Encoders raise only :class:`CodecError`,
decoders only :class:`DecodingError`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Mapping
from typing import Any

import construct

from l2_stores.engine.accel import AcceleratedContainerDecoder
from l2_stores.errors import CodecError, DecodingError

__all__ = ["Codec", "compile_codec", "fixed"]

_BYTES_LIKE = (bytes, bytearray, memoryview)
_REPR_LIMIT = 80
_DESCRIPTION_LIMIT = 120
_CAUSE_LIMIT = 200

_FORMAT_NAMES = {
    "b": "Int8s",
    "B": "Int8u",
    "h": "Int16s",
    "H": "Int16u",
    "l": "Int32s",
    "L": "Int32u",
    "q": "Int64s",
    "Q": "Int64u",
    "e": "Float16",
    "f": "Float32",
    "d": "Float64",
}
_ORDER_SUFFIXES = {">": "b", "<": "l", "=": "n"}


@dataclasses.dataclass(frozen=True, slots=True)
class Codec:
    """A construct turned into an encoder/decoder pair (see :func:`compile_codec`)."""

    construct: Any
    size: int | None
    encode: Callable[[Any], bytes] = dataclasses.field(repr=False, compare=False)
    decode: Callable[[bytes], Any] = dataclasses.field(repr=False, compare=False)
    kind: str
    description: str


# --------------------------------------------------------------------------
# Messages


def _short(text: str, limit: int = _REPR_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object (repr failed: {type(exc).__name__})>"
    return _short(text)


def _cause(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = "struct.error" if isinstance(exc, struct.error) else type(exc).__name__
    return _short(f"{name}: {'; '.join(lines)}" if lines else name, _CAUSE_LIMIT)


def _nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, memoryview) else len(value)


def _bytes_cause(value: Any, size: int | None) -> str:
    """Why ``value`` is not acceptable as ``size`` raw bytes (any size if None)."""
    if not isinstance(value, _BYTES_LIKE):
        return f"expected a bytes-like object, got {type(value).__name__}"
    return f"expected {size} bytes, got {_nbytes(value)}"


def _encode_error(role: str, desc: str, value: Any, cause: str) -> CodecError:
    return CodecError(f"cannot encode {role} {_short_repr(value)} with {desc}: {cause}")


def _decode_error(role: str, desc: str, data: Any, cause: str) -> DecodingError:
    return DecodingError(f"cannot decode {role} {_short_repr(data)} with {desc}: {cause}")


def _describe(codec: Any, depth: int = 0) -> str:
    return _short(_describe_raw(codec, depth), _DESCRIPTION_LIMIT)


def _describe_raw(codec: Any, depth: int) -> str:
    if depth > 6:
        return "..."
    kind = type(codec)
    try:
        if codec is construct.GreedyBytes:
            return "GreedyBytes"
        if kind is construct.FormatField:
            order, char = codec.fmtstr[0], codec.fmtstr[1:]
            if char in _FORMAT_NAMES and order in _ORDER_SUFFIXES:
                return _FORMAT_NAMES[char] + _ORDER_SUFFIXES[order]
            return f"FormatField({order!r}, {char!r})"
        if kind is construct.Bytes:
            length = codec.length
            return f"Bytes({length!r})" if isinstance(length, int) else "Bytes(<dynamic>)"
        if kind is construct.Renamed:
            return _describe_raw(codec.subcon, depth + 1)
        if kind is construct.Struct:
            fields = []
            for sub in codec.subcons:
                inner = _describe_raw(sub, depth + 1)
                name = sub.name
                fields.append(f"{name}={inner}" if isinstance(name, str) and name else inner)
            return f"Struct({', '.join(fields)})"
        if kind is construct.Compiled and isinstance(codec.defersubcon, construct.Construct):
            return f"{_describe_raw(codec.defersubcon, depth + 1)}.compile()"
        sub = getattr(codec, "subcon", None)
        if isinstance(sub, construct.Construct):
            return f"{kind.__name__}({_describe_raw(sub, depth + 1)})"
    except Exception:  # exotic constructs: a plain name will do
        pass
    return kind.__name__


# --------------------------------------------------------------------------
# Analysis


def _fixed_size(codec: Any) -> tuple[int | None, str]:
    """``(size, "")`` when ``codec`` is fixed-size, else ``(None, why)``."""
    try:
        size = codec.sizeof()
    except Exception as exc:  # SizeofError, or anything a user lambda raises
        return None, _cause(exc)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return None, f"sizeof() returned {_short_repr(size)}"
    return size, ""


def _unwrap(codec: Any) -> Any:
    """Strip wrappers that do not change parsing or building semantics."""
    while True:
        kind = type(codec)
        if kind is construct.Renamed and codec.parsed is None:
            codec = codec.subcon
        elif (
            kind is construct.Compiled
            and codec.parsed is None
            and isinstance(codec.defersubcon, construct.Construct)
        ):
            # The interpreted original: same results, plus the length checks
            # that compiled code skips.
            codec = codec.defersubcon
        else:
            return codec


def _plain_bytes_length(codec: Any) -> int | None:
    if type(codec) is construct.Bytes and codec.parsed is None:
        length = codec.length
        if type(length) is int and length >= 0:
            return length
    return None


def _plain_format(codec: Any) -> str | None:
    if type(codec) is construct.FormatField and codec.parsed is None:
        fmtstr: str = codec.fmtstr
        return fmtstr
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _StructPlan:
    fmt: str
    names: tuple[str, ...]
    field_formats: tuple[str, ...]
    bytes_fields: tuple[tuple[int, int], ...]


def _struct_plan(codec: Any) -> _StructPlan | None:
    """A single-``struct.Struct`` plan for a Struct of named ints and Bytes(n)."""
    if type(codec) is not construct.Struct or codec.parsed is not None:
        return None
    orders: set[str] = set()
    names: list[str] = []
    formats: list[str] = []
    bytes_fields: list[tuple[int, int]] = []
    for index, sub in enumerate(codec.subcons):
        if type(sub) is not construct.Renamed or sub.parsed is not None:
            return None
        name = sub.name
        if not isinstance(name, str) or not name or name in names:
            return None
        inner = sub.subcon
        while type(inner) is construct.Renamed and inner.parsed is None:
            inner = inner.subcon
        fmtstr = _plain_format(inner)
        length = _plain_bytes_length(inner)
        if fmtstr is not None:
            orders.add(fmtstr[0])
            formats.append(fmtstr[1:])
        elif length is not None:
            formats.append(f"{length}s")
            bytes_fields.append((index, length))
        else:
            return None
        names.append(name)
    if not names or len(orders) > 1:
        return None
    order = orders.pop() if orders else ">"
    return _StructPlan(
        fmt=order + "".join(formats),
        names=tuple(names),
        field_formats=tuple(order + fmt for fmt in formats),
        bytes_fields=tuple(bytes_fields),
    )


# --------------------------------------------------------------------------
# Fast paths


def _bytes_codec(original: Any, size: int, role: str, desc: str) -> Codec:
    def encode_slow(value: Any) -> bytes:
        if isinstance(value, _BYTES_LIKE):
            data = bytes(value)
            if len(data) == size:
                return data
        raise _encode_error(role, desc, value, _bytes_cause(value, size))

    def encode(value: Any) -> bytes:
        if type(value) is bytes and len(value) == size:
            return value
        return encode_slow(value)

    def decode_slow(data: Any) -> bytes:
        if isinstance(data, _BYTES_LIKE):
            result = bytes(data)
            if len(result) == size:
                return result
        raise _decode_error(role, desc, data, _bytes_cause(data, size))

    def decode(data: bytes) -> Any:
        if type(data) is bytes and len(data) == size:
            return data
        return decode_slow(data)

    return Codec(original, size, encode, decode, "bytes", desc)


def _greedy_bytes_codec(original: Any, role: str, desc: str) -> Codec:
    def encode(value: Any) -> bytes:
        if type(value) is bytes:
            return value
        if isinstance(value, _BYTES_LIKE):
            return bytes(value)
        raise _encode_error(role, desc, value, _bytes_cause(value, None))

    def decode(data: bytes) -> Any:
        if type(data) is bytes:
            return data
        if isinstance(data, _BYTES_LIKE):
            return bytes(data)
        raise _decode_error(role, desc, data, _bytes_cause(data, None))

    return Codec(original, None, encode, decode, "greedy_bytes", desc)


def _format_codec(original: Any, fmtstr: str, role: str, desc: str) -> Codec:
    packer = struct.Struct(fmtstr)
    pack = packer.pack
    unpack = packer.unpack
    size = packer.size

    # construct's FormatField builds with struct.pack(fmtstr, obj) and parses
    # with struct.unpack: the same struct accepts and refuses the same values.
    def encode(value: Any) -> bytes:
        try:
            return pack(value)
        except Exception as exc:
            raise _encode_error(role, desc, value, _cause(exc)) from exc

    def decode(data: bytes) -> Any:
        try:
            return unpack(data)[0]
        except Exception as exc:
            raise _decode_error(role, desc, data, _unpack_cause(data, size, exc)) from exc

    return Codec(original, size, encode, decode, "struct", desc)


def _unpack_cause(data: Any, size: int, exc: Exception) -> str:
    if not isinstance(data, _BYTES_LIKE) or _nbytes(data) != size:
        return _bytes_cause(data, size)
    return _cause(exc)


def _struct_codec(original: Any, plan: _StructPlan, role: str, desc: str) -> Codec:
    packer = struct.Struct(plan.fmt)
    size = packer.size
    names = plan.names

    def not_a_mapping(value: Any) -> CodecError:
        return _encode_error(
            role, desc, value, f"expected a mapping of fields, got {type(value).__name__}"
        )

    def lookup_failure(value: Any, exc: Exception) -> CodecError:
        if isinstance(exc, KeyError):
            missing = exc.args[0] if exc.args else "?"
            return _encode_error(role, desc, value, f"missing field {_short_repr(missing)}")
        return _encode_error(role, desc, value, _cause(exc))

    def normalize(value: Any, args: list[Any]) -> list[Any]:
        for index, length in plan.bytes_fields:
            arg = args[index]
            if type(arg) is bytes and len(arg) == length:
                continue
            if isinstance(arg, _BYTES_LIKE) and _nbytes(arg) == length:
                args[index] = bytes(arg)
                continue
            cause = f"field {names[index]!r}: {_bytes_cause(arg, length)}"
            raise _encode_error(role, desc, value, cause)
        return args

    def pack_failure(value: Any, args: list[Any], exc: Exception) -> CodecError:
        for name, fmt, arg in zip(names, plan.field_formats, args, strict=True):
            try:
                struct.pack(fmt, arg)
            except Exception as field_exc:
                return _encode_error(role, desc, value, f"field {name!r}: {_cause(field_exc)}")
        return _encode_error(role, desc, value, _cause(exc))

    def unpack_failure(data: Any, exc: Exception) -> DecodingError:
        return _decode_error(role, desc, data, _unpack_cause(data, size, exc))

    namespace: dict[str, Any] = {
        "_pack": packer.pack,
        "_unpack": packer.unpack,
        "_container": construct.Container,
        "_Mapping": Mapping,
        "_not_a_mapping": not_a_mapping,
        "_lookup_failure": lookup_failure,
        "_normalize": normalize,
        "_pack_failure": pack_failure,
        "_unpack_failure": unpack_failure,
    }
    namespace.update((f"_k{i}", name) for i, name in enumerate(names))
    exec(_struct_source(len(names), plan.bytes_fields), namespace)
    decode = namespace["decode"]
    if AcceleratedContainerDecoder is not None and _container_sets_as_dict():
        # The same decode in one C call; it hands any failure to the Python one.
        decode = AcceleratedContainerDecoder(
            packer.unpack, construct.Container, names, decode, plan.fmt
        ).decode
    return Codec(original, size, namespace["encode"], decode, "struct", desc)


def _container_sets_as_dict() -> bool:
    """Whether a ``Container`` is made and filled as a dict is (what the C decoder does)."""
    container = construct.Container
    return (
        container.__new__ is dict.__new__
        and container.__init__ is dict.__init__
        and container.__setitem__ is dict.__setitem__
    )


def _struct_source(count: int, bytes_fields: tuple[tuple[int, int], ...]) -> str:
    """Straight-line encode/decode for a Struct of ``count`` fields.

    Only variable names and integer lengths appear in the source; field names
    are bound through the namespace (``_k0``, ``_k1``, ...).
    """
    values = ", ".join(f"_v{i}" for i in range(count))
    trail = "," if count == 1 else ""  # one-element tuple unpacking
    lines = [
        "def encode(value):",
        "    if not isinstance(value, dict) and not isinstance(value, _Mapping):",
        "        raise _not_a_mapping(value)",
        "    try:",
        *(f"        _v{i} = value[_k{i}]" for i in range(count)),
        "    except Exception as exc:",
        "        raise _lookup_failure(value, exc) from exc",
    ]
    if bytes_fields:
        checks = " or ".join(
            f"type(_v{i}) is not bytes or len(_v{i}) != {length}" for i, length in bytes_fields
        )
        lines += [
            f"    if {checks}:",
            f"        {values}{trail} = _normalize(value, [{values}])",
        ]
    lines += [
        "    try:",
        f"        return _pack({values})",
        "    except Exception as exc:",
        f"        raise _pack_failure(value, [{values}], exc) from exc",
        "",
        "def decode(data):",
        "    try:",
        f"        {values}{trail} = _unpack(data)",
        "    except Exception as exc:",
        "        raise _unpack_failure(data, exc) from exc",
        "    result = _container()",
        *(f"    result[_k{i}] = _v{i}" for i in range(count)),
        "    return result",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Generic paths: construct's compiler, or the interpreted construct


def _parse_outcome(codec: Any, sample: bytes) -> tuple[bool, Any]:
    try:
        return True, codec.parse(sample)
    except Exception:
        return False, None


def _same_parse(interpreted: Any, compiled: Any, sample: bytes) -> bool:
    ok_i, got_i = _parse_outcome(interpreted, sample)
    ok_c, got_c = _parse_outcome(compiled, sample)
    if ok_i != ok_c:
        return False
    if not ok_i:
        return True
    try:
        return bool(got_i == got_c) and bool(got_c == got_i)
    except Exception:
        return False


def _try_compile(codec: Any, size: int | None) -> Any:
    """construct's compiled parser for ``codec`` when it can be trusted, else None.

    Only fixed-size codecs qualify: compiled code skips construct's internal
    length checks (a truncated ``Prefixed`` parses into short bytes), which
    the exact-length check on decode covers only when the size is fixed.
    """
    if size is None or codec.parsed is not None:  # compiled code skips parsed hooks
        return None
    try:
        compiled = codec.compile()
    except Exception:  # NotImplementedError, SyntaxError, ConstructError, ...
        return None
    for sample in (bytes(size), b"\xff" * size):
        if not _same_parse(codec, compiled, sample):
            return None
    return compiled


def _generic_codec(original: Any, base: Any, size: int | None, role: str, desc: str) -> Codec:
    compiled = _try_compile(base, size)
    parse = compiled.parse if compiled is not None else base.parse
    kind = "compiled" if compiled is not None else "construct"
    # Building always goes through the interpreted construct: compiled builders
    # do not check field lengths, so two wrongly sized Bytes fields can still
    # produce the right total size.
    build = base.build

    if size is None:

        def encode(value: Any) -> bytes:
            try:
                data: bytes = build(value)
            except Exception as exc:
                raise _encode_error(role, desc, value, _cause(exc)) from exc
            return data

        def decode(data: bytes) -> Any:
            if not isinstance(data, _BYTES_LIKE):
                raise _decode_error(role, desc, data, _bytes_cause(data, None))
            try:
                return parse(data)
            except Exception as exc:
                raise _decode_error(role, desc, data, _cause(exc)) from exc

        return Codec(original, None, encode, decode, kind, desc)

    def encode_fixed(value: Any) -> bytes:
        try:
            data: bytes = build(value)
        except Exception as exc:
            raise _encode_error(role, desc, value, _cause(exc)) from exc
        if len(data) != size:
            raise _encode_error(role, desc, value, f"built {len(data)} bytes, expected {size}")
        return data

    def decode_fixed(data: bytes) -> Any:
        if type(data) is not bytes or len(data) != size:
            if not isinstance(data, _BYTES_LIKE) or _nbytes(data) != size:
                raise _decode_error(role, desc, data, _bytes_cause(data, size))
            data = bytes(data)
        try:
            return parse(data)
        except Exception as exc:
            raise _decode_error(role, desc, data, _cause(exc)) from exc

    return Codec(original, size, encode_fixed, decode_fixed, kind, desc)


# --------------------------------------------------------------------------
# Public API


def fixed(codec: Any, name: str | None = None) -> Any:
    """Return ``codec`` unchanged if it is a fixed-size construct.

    Raise :class:`CodecError` naming the codec (``name``, or its description)
    otherwise.
    """
    label = name if name is not None else _describe(codec)
    if not isinstance(codec, construct.Construct):
        raise CodecError(
            f"codec {label} is not a construct (got {type(codec).__name__} {_short_repr(codec)})"
        )
    size, why = _fixed_size(codec)
    if size is None:
        raise CodecError(f"codec {label} is not fixed-size: {why}")
    return codec


def compile_codec(codec: Any, *, role: str, require_fixed: bool) -> Codec:
    """Turn a construct into a :class:`Codec`, choosing the fastest faithful path.

    ``role`` ("key", "value", ...) appears in error messages.  With
    ``require_fixed``, a codec whose size is not fixed is refused with
    :class:`CodecError`, as is anything that is not a construct.
    """
    if not isinstance(codec, construct.Construct):
        raise CodecError(
            f"{role} codec must be a construct, got {type(codec).__name__} {_short_repr(codec)}"
        )
    desc = _describe(codec)
    size, why = _fixed_size(codec)
    if require_fixed and size is None:
        raise CodecError(f"{role} codec {desc} must be fixed-size: {why}")
    base = _unwrap(codec)

    length = _plain_bytes_length(base)
    if length is not None:
        return _bytes_codec(codec, length, role, desc)
    if base is construct.GreedyBytes:
        return _greedy_bytes_codec(codec, role, desc)
    fmtstr = _plain_format(base)
    if fmtstr is not None:
        return _format_codec(codec, fmtstr, role, desc)
    plan = _struct_plan(base)
    if plan is not None:
        return _struct_codec(codec, plan, role, desc)
    return _generic_codec(codec, base, size, role, desc)
