"""Tests for l2_stores.codecs: every fast path must agree with construct itself."""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import struct
import weakref
from typing import Any
from unittest import mock

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2_stores import codecs as codecs_module
from l2_stores.codecs import Codec, compile_codec, fixed
from l2_stores.engine import accel
from l2_stores.errors import CodecError, DecodingError

FAST = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)

FORMAT_FIELDS = sorted(
    (name, obj)
    for name in dir(construct)
    if type(obj := getattr(construct, name)) is construct.FormatField
)
INT_FIELDS = [(n, f) for n, f in FORMAT_FIELDS if f.fmtstr[1] in "bBhHlLqQ"]
FLOAT_FIELDS = [(n, f) for n, f in FORMAT_FIELDS if f.fmtstr[1] in "efd"]


def int_range(field: Any) -> tuple[int, int]:
    bits = struct.calcsize(field.fmtstr) * 8
    if field.fmtstr[1].islower():
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def key_codec(con: Any) -> Codec:
    return compile_codec(con, role="key", require_fixed=False)


def same(a: Any, b: Any) -> bool:
    """Equality that treats two NaNs as equal."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def check_parse_agrees(codec: Codec, con: Any, data: bytes) -> None:
    """decode(data) is what construct parses, or DecodingError when construct fails."""
    try:
        expected = con.parse(data)
    except Exception:
        with pytest.raises(DecodingError):
            codec.decode(data)
        return
    assert same(codec.decode(data), expected)


def check_build_agrees(codec: Codec, con: Any, value: Any) -> None:
    """encode(value) is what construct builds, or CodecError when construct fails."""
    try:
        expected = con.build(value)
    except Exception:
        with pytest.raises(CodecError):
            codec.encode(value)
        return
    assert codec.encode(value) == expected


LEVEL_HASH = construct.Struct("level" / construct.Int32ub, "hash" / construct.Bytes(32))
THREE_LE = construct.Struct(
    "a" / construct.Int8ul, "b" / construct.Int16sl, "c" / construct.Int64ul
)
MIXED = construct.Struct("a" / construct.Int16ub, "b" / construct.Int32ul, "h" / construct.Bytes(3))
COLOR = construct.Enum(construct.Int8ub, red=1, green=2, blue=3)
WITH_CONST = construct.Struct(
    "magic" / construct.Const(b"L2"), "level" / construct.Int32ub, "flag" / construct.Flag
)
PASCAL = construct.PascalString(construct.VarInt, "utf8")
PREFIXED = construct.Prefixed(construct.VarInt, construct.GreedyBytes)


class ZeroIsFortyTwo(construct.Construct):  # type: ignore[misc]
    """A one-byte construct whose compiled parser disagrees with the interpreted one."""

    def _parse(self, stream: Any, context: Any, path: Any) -> int:
        return int(construct.stream_read(stream, 1, path)[0])

    def _build(self, obj: Any, stream: Any, context: Any, path: Any) -> Any:
        construct.stream_write(stream, bytes([obj]), 1, path)
        return obj

    def _sizeof(self, context: Any, path: Any) -> int:
        return 1

    def _emitparse(self, code: Any) -> str:
        return "42"


HOOKED_CALLS: list[Any] = []
HOOKED = construct.Int24ub * (lambda obj, ctx: HOOKED_CALLS.append(obj))

# Fixed-size codecs of every kind, with the kind compile_codec must choose.
FIXED_CASES: list[tuple[str, Any, str]] = [
    ("Bytes(0)", construct.Bytes(0), "bytes"),
    ("Bytes(1)", construct.Bytes(1), "bytes"),
    ("Bytes(32)", construct.Bytes(32), "bytes"),
    ("renamed Bytes(32)", "key" / construct.Bytes(32), "bytes"),
    ("Int32ub", construct.Int32ub, "struct"),
    ("Int32un", construct.Int32un, "struct"),
    ("Float64l", construct.Float64l, "struct"),
    ("compiled Int32ub", construct.Int32ub.compile(), "struct"),
    ("level/hash", LEVEL_HASH, "struct"),
    ("three le ints", THREE_LE, "struct"),
    (
        "bytes-only struct",
        construct.Struct("a" / construct.Bytes(2), "b" / construct.Bytes(0)),
        "struct",
    ),
    ("mixed endianness", MIXED, "compiled"),
    ("Int24ub", construct.Int24ub, "compiled"),
    ("Enum", COLOR, "compiled"),
    ("Const struct", WITH_CONST, "compiled"),
    (
        "Padding struct",
        construct.Struct("a" / construct.Int16ub, construct.Padding(2)),
        "compiled",
    ),
    (
        "unnamed field struct",
        construct.Struct("a" / construct.Int16ub, construct.Int8ub),
        "compiled",
    ),
    ("lambda length", construct.Bytes(lambda ctx: 4), "construct"),
    ("compiled parser disagrees", ZeroIsFortyTwo(), "construct"),
    ("parsed hook", HOOKED, "construct"),
]
FIXED_IDS = [case[0] for case in FIXED_CASES]

VARIABLE_CASES: list[tuple[str, Any, str]] = [
    ("GreedyBytes", construct.GreedyBytes, "greedy_bytes"),
    ("PascalString", PASCAL, "construct"),
    ("Prefixed", PREFIXED, "construct"),
]


# ---------------------------------------------------------------------------
# Kinds, sizes, descriptions


@pytest.mark.parametrize(("label", "con", "kind"), FIXED_CASES, ids=FIXED_IDS)
def test_fixed_kind_and_size(label: str, con: Any, kind: str) -> None:
    codec = key_codec(con)
    assert codec.kind == kind
    assert codec.construct is con
    assert codec.size == con.sizeof()


@pytest.mark.parametrize(
    ("label", "con", "kind"), VARIABLE_CASES, ids=[case[0] for case in VARIABLE_CASES]
)
def test_variable_kind_and_size(label: str, con: Any, kind: str) -> None:
    codec = key_codec(con)
    assert codec.kind == kind
    assert codec.construct is con
    assert codec.size is None


def test_descriptions() -> None:
    assert key_codec(construct.Bytes(32)).description == "Bytes(32)"
    assert key_codec(construct.Int32ub).description == "Int32ub"
    assert key_codec(construct.Int64sn).description == "Int64sn"
    assert key_codec(construct.GreedyBytes).description == "GreedyBytes"
    assert key_codec(LEVEL_HASH).description == "Struct(level=Int32ub, hash=Bytes(32))"


def test_codec_is_frozen() -> None:
    codec = key_codec(construct.Bytes(4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        codec.kind = "construct"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Agreement with construct, path by path


@pytest.mark.parametrize("n", [0, 1, 32])
@FAST
@given(data=st.data())
def test_bytes_agrees_with_construct(n: int, data: st.DataObject) -> None:
    con = construct.Bytes(n)
    codec = key_codec(con)
    value = data.draw(st.binary(min_size=n, max_size=n))
    assert codec.encode(value) == con.build(value)
    assert codec.encode(bytearray(value)) == con.build(bytearray(value))
    assert type(codec.encode(bytearray(value))) is bytes
    # construct refuses memoryview; accepting it is a deliberate leniency
    assert codec.encode(memoryview(value)) == con.build(value)
    assert codec.decode(value) == con.parse(value)
    decoded = codec.decode(bytearray(value))  # type: ignore[arg-type]
    assert type(decoded) is bytes
    assert decoded == con.parse(bytearray(value))


def test_bytes_is_identity_for_bytes() -> None:
    codec = key_codec(construct.Bytes(32))
    value = bytes(range(32))
    assert codec.encode(value) is value
    assert codec.decode(value) is value


@FAST
@given(value=st.binary(max_size=64))
def test_greedy_bytes_agrees_with_construct(value: bytes) -> None:
    con = construct.GreedyBytes
    codec = key_codec(con)
    assert codec.encode(value) == con.build(value)
    assert codec.encode(bytearray(value)) == con.build(bytearray(value))
    assert codec.encode(memoryview(value)) == value
    assert codec.decode(value) == con.parse(value)
    assert type(codec.decode(bytearray(value))) is bytes  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "field"), INT_FIELDS, ids=[n for n, _ in INT_FIELDS])
@FAST
@given(data=st.data())
def test_int_fields_agree_with_construct(name: str, field: Any, data: st.DataObject) -> None:
    codec = key_codec(field)
    assert codec.kind == "struct"
    lo, hi = int_range(field)
    value = data.draw(st.integers(lo, hi))
    built = field.build(value)
    assert codec.encode(value) == built
    assert codec.decode(built) == value == field.parse(built)
    raw = data.draw(st.binary(min_size=field.length, max_size=field.length))
    assert codec.decode(raw) == field.parse(raw)


@pytest.mark.parametrize(("name", "field"), FLOAT_FIELDS, ids=[n for n, _ in FLOAT_FIELDS])
@FAST
@given(data=st.data())
def test_float_fields_agree_with_construct(name: str, field: Any, data: st.DataObject) -> None:
    codec = key_codec(field)
    assert codec.kind == "struct"
    width = field.length * 8
    value = data.draw(st.floats(width=width) | st.integers(-(2**10), 2**10))
    assert codec.encode(value) == field.build(value)
    check_build_agrees(codec, field, data.draw(st.integers(-(2**70), 2**70) | st.floats()))
    raw = data.draw(st.binary(min_size=field.length, max_size=field.length))
    assert same(codec.decode(raw), field.parse(raw))


ANY_VALUE = (
    st.integers(-(2**70), 2**70)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
    | st.binary(max_size=3)
)


@pytest.mark.parametrize(("name", "field"), FORMAT_FIELDS, ids=[n for n, _ in FORMAT_FIELDS])
@FAST
@given(value=ANY_VALUE)
def test_format_fields_refuse_what_construct_refuses(name: str, field: Any, value: Any) -> None:
    check_build_agrees(key_codec(field), field, value)


@FAST
@given(
    level=st.integers(0, 2**32 - 1),
    hash_=st.binary(min_size=32, max_size=32),
    raw=st.binary(min_size=36, max_size=36),
)
def test_level_hash_struct_agrees_with_construct(level: int, hash_: bytes, raw: bytes) -> None:
    codec = key_codec(LEVEL_HASH)
    assert codec.kind == "struct"
    value = {"level": level, "hash": hash_}
    built = LEVEL_HASH.build(value)
    assert codec.encode(value) == built
    assert codec.encode(construct.Container(value)) == built
    assert codec.encode({**value, "extra": "ignored"}) == LEVEL_HASH.build({**value, "extra": 1})
    assert codec.encode({"level": level, "hash": bytearray(hash_)}) == built
    decoded = codec.decode(raw)
    parsed = LEVEL_HASH.parse(raw)
    assert isinstance(decoded, construct.Container)
    assert decoded == parsed
    assert parsed == decoded
    assert dict(decoded) == {k: v for k, v in parsed.items() if not k.startswith("_")}
    assert list(decoded) == ["level", "hash"]
    assert decoded.level == parsed.level
    assert codec.encode(decoded) == raw


def decode_outcome(codec: Codec, data: Any) -> tuple[str, Any]:
    try:
        decoded = codec.decode(data)
    except DecodingError as error:
        return "error", str(error)
    return type(decoded).__name__, dict(decoded)


@pytest.mark.skipif(
    accel.AcceleratedContainerDecoder is None, reason="the C accelerator is not built"
)
@pytest.mark.parametrize("con", [LEVEL_HASH, THREE_LE], ids=["level_hash", "three_le"])
@FAST
@given(data=st.data())
def test_c_struct_decode_is_the_python_one(con: Any, data: st.DataObject) -> None:
    """The C decode of Struct codecs gives what the Python one gives, errors included."""
    c_codec = key_codec(con)
    with mock.patch.object(codecs_module, "AcceleratedContainerDecoder", None):
        python_codec = key_codec(con)
    assert "ContainerDecoder" in repr(c_codec.decode)
    assert "ContainerDecoder" not in repr(python_codec.decode)
    size = con.sizeof()
    raw = data.draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=40)))
    for shaped in (raw, bytearray(raw), memoryview(raw), raw.decode("latin-1"), None):
        assert decode_outcome(c_codec, shaped) == decode_outcome(python_codec, shaped)


FIELD_NAMES = ["Int8s", "Int8u", "Int16s", "Int16u", "Int32s", "Int32u", "Int64s", "Int64u"]
FIELD_NAMES += ["Float16", "Float32", "Float64"]


@st.composite
def struct_layouts(draw: Any) -> Any:
    """A Struct of named ints, floats and Bytes(n) fields, all in one byte order."""
    order = draw(st.sampled_from(["b", "l", "n"]))
    kinds = draw(st.lists(st.sampled_from([*FIELD_NAMES, "Bytes"]), min_size=1, max_size=8))
    fields = [
        f"f{i}"
        / (
            construct.Bytes(draw(st.integers(0, 40)))
            if kind == "Bytes"
            else getattr(construct, kind + order)
        )
        for i, kind in enumerate(kinds)
    ]
    return construct.Struct(*fields)


@pytest.mark.skipif(
    accel.AcceleratedContainerDecoder is None, reason="the C accelerator is not built"
)
@settings(FAST, max_examples=300)
@given(con=struct_layouts(), data=st.data())
def test_c_struct_decode_reads_every_field_as_struct_does(con: Any, data: st.DataObject) -> None:
    """The fields read in C equal struct's unpack and construct's parse, NaN bits included."""
    codec = key_codec(con)
    assert "ContainerDecoder" in repr(codec.decode)
    raw = data.draw(st.binary(min_size=con.sizeof(), max_size=con.sizeof()))
    decoded = codec.decode(raw)
    parsed = con.parse(raw)
    assert isinstance(decoded, construct.Container) and list(decoded) == list(decoded.keys())
    for name, value in decoded.items():
        expected = parsed[name]
        assert type(value) is type(expected), name
        if isinstance(value, float):
            assert struct.pack("<d", value) == struct.pack("<d", expected) or (
                math.isnan(value) and math.isnan(expected)
            ), name
        else:
            assert value == expected, name
    assert codec.encode(decoded) == raw or any(
        isinstance(value, float) for value in decoded.values()
    )


@pytest.mark.skipif(
    accel.AcceleratedContainerDecoder is None, reason="the C accelerator is not built"
)
def test_c_struct_decode_reads_a_known_format_itself() -> None:
    """With its format, exact bytes of its size are read in C; anything else is unpacked."""
    assert accel.AcceleratedContainerDecoder is not None

    def unpack(data: Any) -> tuple[Any, ...]:
        return (-1, b"from unpack")

    def decoder(fmt: str | None) -> Any:
        return accel.AcceleratedContainerDecoder(
            unpack, construct.Container, ("level", "hash"), print, fmt
        ).decode

    raw = b"\x00\x00\x01\x02" + b"h" * 4
    assert dict(decoder(">l4s")(raw)) == {"level": 258, "hash": b"hhhh"}
    assert dict(decoder("<l4s")(raw)) == {"level": 0x02010000, "hash": b"hhhh"}
    assert dict(decoder(None)(raw)) == {"level": -1, "hash": b"from unpack"}
    assert dict(decoder(">l4s")(bytearray(raw)))["hash"] == b"from unpack"
    assert dict(decoder(">l4s")(raw + b"!"))["hash"] == b"from unpack"
    for unknown in (">l?", "@l4s", ">l4s4s", "l4s", ">l99999999999s"):
        assert dict(decoder(unknown)(raw))["hash"] == b"from unpack", unknown
    for order in "<>=!":
        fmt = order + "bBhHlLqQefd3s"
        names = tuple(f"f{i}" for i in range(12))
        every_code = accel.AcceleratedContainerDecoder(
            lambda data: tuple(range(12)), construct.Container, names, print, fmt
        ).decode
        for seed in range(20):
            data = random.Random(seed).randbytes(struct.calcsize(fmt))
            expected = struct.unpack(fmt, data)
            got = tuple(every_code(data).values())
            assert repr(got) == repr(expected), (fmt, data)


@pytest.mark.skipif(
    accel.AcceleratedContainerDecoder is None, reason="the C accelerator is not built"
)
def test_c_struct_decode_leaves_the_gc_nothing_to_track_until_it_must() -> None:
    """A decoded Container of ints and bytes is untracked, as a plain dict of them is."""
    codec = key_codec(LEVEL_HASH)
    decoded = codec.decode(bytes(36))
    assert not gc.is_tracked(decoded)
    decoded.level = 7
    assert not gc.is_tracked(decoded)

    class Witness:
        pass

    witness = Witness()
    seen = weakref.ref(witness)
    decoded.cycle = [decoded, witness]  # a value the GC tracks: tracked again
    assert gc.is_tracked(decoded)
    del decoded, witness
    gc.collect()
    assert seen() is None
    other = codec.decode(bytes(36))
    other.update({"cycle": [other]})
    assert gc.is_tracked(other)


@FAST
@given(
    a=st.integers(0, 255),
    b=st.integers(-(2**15), 2**15 - 1),
    c=st.integers(0, 2**64 - 1),
    raw=st.binary(min_size=11, max_size=11),
)
def test_three_little_endian_ints_agree_with_construct(a: int, b: int, c: int, raw: bytes) -> None:
    codec = key_codec(THREE_LE)
    assert codec.kind == "struct"
    value = {"a": a, "b": b, "c": c}
    assert codec.encode(value) == THREE_LE.build(value)
    assert codec.decode(raw) == THREE_LE.parse(raw)
    assert codec.decode(THREE_LE.build(value)) == value


@pytest.mark.parametrize(("label", "con", "kind"), FIXED_CASES, ids=FIXED_IDS)
@FAST
@given(data=st.data())
def test_fixed_codecs_agree_with_construct_on_any_bytes(
    label: str, con: Any, kind: str, data: st.DataObject
) -> None:
    codec = key_codec(con)
    size = con.sizeof()
    magic = b"L2" + bytes(size - 2) if size >= 2 else bytes(size)  # passes WITH_CONST
    raw = data.draw(st.binary(min_size=size, max_size=size) | st.just(bytes(size)) | st.just(magic))
    check_parse_agrees(codec, con, raw)
    if kind in ("bytes", "struct"):  # these layouts are canonical: decoding loses nothing
        assert codec.encode(codec.decode(raw)) == raw
    try:
        parsed = con.parse(raw)
    except Exception:
        return
    # whatever construct parses, encode builds back like construct (or both refuse,
    # e.g. a Struct with an unnamed field cannot build its own parse result)
    check_build_agrees(codec, con, parsed)


@FAST
@given(value=st.integers(0, 2**24 - 1))
def test_int24_falls_back_and_agrees(value: int) -> None:
    con = construct.Int24ub
    codec = key_codec(con)
    assert codec.kind == "compiled"
    assert codec.encode(value) == con.build(value)
    assert codec.decode(con.build(value)) == value


@FAST
@given(
    a=st.integers(0, 2**16 - 1),
    b=st.integers(0, 2**32 - 1),
    h=st.binary(min_size=3, max_size=3),
)
def test_mixed_endianness_falls_back_and_agrees(a: int, b: int, h: bytes) -> None:
    codec = key_codec(MIXED)
    assert codec.kind in ("compiled", "construct")
    value = {"a": a, "b": b, "h": h}
    built = MIXED.build(value)
    assert codec.encode(value) == built
    assert codec.decode(built) == MIXED.parse(built)


@FAST
@given(value=st.sampled_from(["red", "green", "blue", 1, 2, 3]))
def test_enum_falls_back_and_agrees(value: Any) -> None:
    codec = key_codec(COLOR)
    built = COLOR.build(value)
    assert codec.encode(value) == built
    assert codec.decode(built) == COLOR.parse(built)


@FAST
@given(value=st.text(max_size=40))
def test_pascal_string_agrees_with_construct(value: str) -> None:
    codec = key_codec(PASCAL)
    built = PASCAL.build(value)
    assert codec.encode(value) == built
    assert codec.decode(built) == value == PASCAL.parse(built)


@FAST
@given(value=st.binary(max_size=300))
def test_prefixed_agrees_with_construct(value: bytes) -> None:
    codec = key_codec(PREFIXED)
    built = PREFIXED.build(value)
    assert codec.encode(value) == built
    assert codec.decode(built) == value == PREFIXED.parse(built)
    if value:
        # construct's compiled parser would return short bytes here
        with pytest.raises(DecodingError):
            codec.decode(built[:-1])


# ---------------------------------------------------------------------------
# Refusals


HASH = bytes(32)


class GetItemOnly:
    """Answers ``obj[name]`` like a dict but is no mapping; construct refuses it."""

    def __getitem__(self, key: str) -> Any:
        return {"level": 1, "hash": HASH}[key]


REFUSED: list[tuple[str, Any, Any]] = [
    ("short bytes", construct.Bytes(32), b"ab"),
    ("long bytes", construct.Bytes(32), bytes(33)),
    ("str for Bytes", construct.Bytes(32), "x" * 32),
    ("None for Bytes", construct.Bytes(32), None),
    ("list for Bytes", construct.Bytes(4), [1, 2, 3, 4]),
    ("str for GreedyBytes", construct.GreedyBytes, "abc"),
    ("None for GreedyBytes", construct.GreedyBytes, None),
    ("too big", construct.Int32ub, 2**32),
    ("negative unsigned", construct.Int32ub, -1),
    ("too small signed", construct.Int8sb, -129),
    ("too big signed", construct.Int8sb, 128),
    ("str for int", construct.Int64ul, "1"),
    ("float for int", construct.Int16ub, 1.5),
    ("None for int", construct.Int32ub, None),
    ("float overflow", construct.Float32b, 1e300),
    ("missing field", LEVEL_HASH, {"level": 1}),
    ("short hash field", LEVEL_HASH, {"level": 1, "hash": b"ab"}),
    ("str hash field", LEVEL_HASH, {"level": 1, "hash": "x" * 32}),
    ("negative level", LEVEL_HASH, {"level": -1, "hash": HASH}),
    ("None for struct", LEVEL_HASH, None),
    ("list for struct", LEVEL_HASH, [1, HASH]),
    ("str for struct", LEVEL_HASH, "level"),
    ("not a mapping", LEVEL_HASH, GetItemOnly()),
    ("missing le field", THREE_LE, {"a": 1, "b": 2}),
    ("mixed struct out of range", MIXED, {"a": 2**16, "b": 0, "h": b"abc"}),
    ("mixed struct short bytes", MIXED, {"a": 1, "b": 0, "h": b"ab"}),
    ("unknown enum label", COLOR, "purple"),
    ("bytes for PascalString", PASCAL, b"abc"),
    ("None for Prefixed", PREFIXED, None),
    ("lambda length wrong size", construct.Bytes(lambda ctx: 4), b"abc"),
]


@pytest.mark.parametrize(("label", "con", "value"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_match_construct(label: str, con: Any, value: Any) -> None:
    with pytest.raises(Exception):  # noqa: B017 - construct raises assorted types
        con.build(value)
    codec = compile_codec(con, role="key", require_fixed=False)
    with pytest.raises(CodecError) as info:
        codec.encode(value)
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert message.startswith("cannot encode key ")
    assert codec.description in message
    assert err.reason == message
    assert err.name is None
    assert err.path is None


@pytest.mark.parametrize("con", [construct.Bytes(4), LEVEL_HASH], ids=["Bytes", "Struct"])
def test_bytes_refuse_int_although_construct_accepts(con: Any) -> None:
    """construct turns an int into big-endian bytes; a key codec must not."""
    value: Any = 5 if con is not LEVEL_HASH else {"level": 1, "hash": 5}
    con.build(value)  # construct accepts it...
    with pytest.raises(CodecError, match="expected a bytes-like object, got int"):
        compile_codec(con, role="key", require_fixed=True).encode(value)


def test_refusal_messages() -> None:
    with pytest.raises(CodecError) as info:
        key_codec(construct.Bytes(32)).encode(b"ab")
    assert str(info.value) == "cannot encode key b'ab' with Bytes(32): expected 32 bytes, got 2"
    with pytest.raises(CodecError, match="missing field 'hash'"):
        key_codec(LEVEL_HASH).encode({"level": 1})
    with pytest.raises(CodecError, match=r"field 'level': struct\.error") as info:
        key_codec(LEVEL_HASH).encode({"level": -1, "hash": HASH})
    assert isinstance(info.value.__cause__, struct.error)
    with pytest.raises(CodecError, match="field 'hash': expected 32 bytes, got 2"):
        key_codec(LEVEL_HASH).encode({"level": 1, "hash": b"ab"})
    with pytest.raises(CodecError, match=r"^cannot encode value 'purple' with Enum") as info:
        compile_codec(COLOR, role="value", require_fixed=True).encode("purple")
    assert isinstance(info.value.__cause__, construct.ConstructError)


def test_long_values_are_truncated_in_messages() -> None:
    with pytest.raises(CodecError) as info:
        key_codec(construct.Bytes(4)).encode(b"x" * 10_000)
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)
    with pytest.raises(DecodingError) as dinfo:
        key_codec(construct.Int32ub).decode(b"y" * 10_000)
    assert len(str(dinfo.value)) < 200
    assert str(dinfo.value).endswith("expected 4 bytes, got 10000")


def test_compiled_builder_is_not_trusted() -> None:
    """Compiled builders skip field length checks; the codec must not."""
    con = construct.Struct(
        "x" / construct.Int16ub,
        "y" / construct.Int16ul,
        "a" / construct.Bytes(2),
        "b" / construct.Bytes(4),
    )
    codec = key_codec(con)
    assert codec.kind == "compiled"
    wrong = {"x": 1, "y": 2, "a": b"abcd", "b": b"ef"}
    assert len(con.compile().build(wrong)) == con.sizeof()  # compiled code is fooled
    with pytest.raises(CodecError):
        codec.encode(wrong)


# ---------------------------------------------------------------------------
# Decoding errors


@pytest.mark.parametrize(("label", "con", "kind"), FIXED_CASES, ids=FIXED_IDS)
def test_decode_rejects_wrong_lengths(label: str, con: Any, kind: str) -> None:
    codec = key_codec(con)
    size = con.sizeof()
    lengths = [size + 1, size + 7] + ([size - 1, 0] if size > 0 else [])
    for length in lengths:
        with pytest.raises(DecodingError) as info:
            codec.decode(b"\x01" * length)
        assert str(info.value).endswith(f"expected {size} bytes, got {length}")
        assert str(info.value).startswith("cannot decode key ")
    for junk in ("x" * size, None, size):
        with pytest.raises(DecodingError, match="expected a bytes-like object"):
            codec.decode(junk)  # type: ignore[arg-type]


def test_compiled_struct_short_input_is_a_decoding_error() -> None:
    codec = key_codec(MIXED)
    assert codec.kind == "compiled"
    with pytest.raises(struct.error):
        MIXED.compile().parse(bytes(5))  # what the compiled parser alone does
    with pytest.raises(DecodingError, match="expected 9 bytes, got 5"):
        codec.decode(bytes(5))


def test_decode_invalid_values() -> None:
    const = key_codec(WITH_CONST)
    good = WITH_CONST.build({"level": 7, "flag": True})
    assert const.decode(good).level == 7
    with pytest.raises(DecodingError) as info:
        const.decode(b"XX" + good[2:])
    assert isinstance(info.value.__cause__, construct.ConstructError)
    one_of = key_codec(construct.OneOf(construct.Int8ub, [1, 2]))
    assert one_of.decode(b"\x02") == 2
    with pytest.raises(DecodingError):
        one_of.decode(b"\x03")
    mapping = key_codec(construct.Mapping(construct.Int8ub, {"a": 1}))
    assert mapping.decode(b"\x01") == "a"
    with pytest.raises(DecodingError):
        mapping.decode(b"\x05")
    # construct's Enum does not refuse unknown values; neither does the codec
    assert key_codec(COLOR).decode(b"\x09") == COLOR.parse(b"\x09") == 9
    with pytest.raises(DecodingError):
        key_codec(PASCAL).decode(b"\x02\xff\xfe")
    with pytest.raises(DecodingError):
        key_codec(PASCAL).decode(b"\x05ab")


def test_non_fixed_decode_keeps_construct_semantics() -> None:
    codec = key_codec(PASCAL)
    built = PASCAL.build("hello")
    assert codec.decode(built + b"trailing") == PASCAL.parse(built + b"trailing") == "hello"
    with pytest.raises(DecodingError):
        key_codec(construct.GreedyBytes).decode("text")  # type: ignore[arg-type]


def test_parsed_hook_still_runs() -> None:
    codec = key_codec(HOOKED)
    assert codec.kind == "construct"
    HOOKED_CALLS.clear()
    assert codec.decode(b"\x00\x01\x02") == 0x000102
    assert HOOKED_CALLS == [0x000102]


def test_disagreeing_compiled_parser_is_not_used() -> None:
    con = ZeroIsFortyTwo()
    assert con.compile().parse(b"\x00") == 42
    codec = key_codec(con)
    assert codec.kind == "construct"
    assert codec.decode(b"\x00") == 0
    assert codec.encode(7) == b"\x07"


# ---------------------------------------------------------------------------
# fixed() and require_fixed


@pytest.mark.parametrize(
    "con",
    [construct.Bytes(32), construct.Bytes(0), construct.Int32ub, LEVEL_HASH, construct.Int24ub],
    ids=["Bytes32", "Bytes0", "Int32ub", "Struct", "Int24ub"],
)
def test_fixed_returns_the_codec(con: Any) -> None:
    assert fixed(con) is con
    assert fixed(con, "my_store key") is con


@pytest.mark.parametrize(
    "con", [construct.GreedyBytes, PASCAL, PREFIXED], ids=["GreedyBytes", "Pascal", "Prefixed"]
)
def test_fixed_refuses_variable_codecs(con: Any) -> None:
    with pytest.raises(CodecError, match="my_store key") as info:
        fixed(con, "my_store key")
    assert isinstance(info.value, ValueError)
    with pytest.raises(CodecError, match="not fixed-size"):
        fixed(con)


def test_fixed_names_the_codec_by_default() -> None:
    with pytest.raises(CodecError, match=r"^codec GreedyBytes is not fixed-size"):
        fixed(construct.GreedyBytes)


@pytest.mark.parametrize("value", [5, None, "Bytes(32)", construct.Bytes], ids=repr)
def test_non_constructs_are_refused(value: Any) -> None:
    with pytest.raises(CodecError, match=r"^key codec must be a construct"):
        compile_codec(value, role="key", require_fixed=True)
    with pytest.raises(CodecError, match="must be a construct"):
        compile_codec(value, role="key", require_fixed=False)
    with pytest.raises(CodecError, match="not a construct"):
        fixed(value, "thing")


@pytest.mark.parametrize(
    "con", [construct.GreedyBytes, PASCAL, PREFIXED], ids=["GreedyBytes", "Pascal", "Prefixed"]
)
def test_require_fixed_refuses_variable_codecs(con: Any) -> None:
    with pytest.raises(CodecError, match=r"^header codec .* must be fixed-size"):
        compile_codec(con, role="header", require_fixed=True)
    assert compile_codec(con, role="value", require_fixed=False).size is None
