"""The ``l2-stores`` command-line tool, run as a real subprocess on real stores.

Every command runs as ``python -m l2_stores ...`` (or the ``l2-stores``
console script next to ``sys.executable``) on stores built with the library's
factories (tests/helpers/cli_zoo.py). Expected errors must never print a
traceback; exit codes are 0 (ok), 1 (problem found) and 2 (usage).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import construct
import pytest

from l2_stores import Mode, make_indexable, make_singleton
from l2_stores.engine.framing import Expected
from l2_stores.engine.run import Run
from l2_stores.stores import identity
from l2_stores.tools import dump
from tests.helpers.runs import run_names

HELPERS = Path(__file__).parent / "helpers"
CONSOLE_SCRIPT = Path(sys.executable).parent / "l2-stores"
GUARD = 120.0


def _load_helper(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_helper("cli_zoo")
writer = _load_helper("cli_concurrent_writer")

Other = make_singleton("other", construct.Bytes(3))

PROBLEM = re.compile(r"^(?P<path>.+?):(?P<offset>\d+): (?P<what>.+)$")
OK_LINE = re.compile(r"^ok: (\d+) stores?, (\d+) files?, ([\d,]+) bytes? checked$")
BAD_LINE = re.compile(r"^(\d+) problems? in (\d+) stores?$")
EXPORTED = re.compile(r"^exported (\d+) stores?, ([\d,]+) bindings?, ([\d,]+) bytes? to (.+)$")
IMPORTED = re.compile(r"^imported (\d+) stores?, ([\d,]+) bindings? into (.+)$")


# ---------------------------------------------------------------- running the tool


def command(args: list[Any], script: bool = False) -> list[str]:
    head = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "l2_stores"]
    return head + [str(a) for a in args]


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


def run(*args: Any, cwd: Path, script: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        command(list(args), script),
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=GUARD,
    )
    assert "Traceback" not in proc.stderr, describe(proc)
    return proc


def run_many(commands: list[list[Any]], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (they are independent); results in order."""
    procs = [
        subprocess.Popen(
            command(args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=GUARD)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert "Traceback" not in err, describe(result)
        results.append(result)
    return results


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, describe(proc)


def assert_error(proc: subprocess.CompletedProcess[str], *needles: Any) -> None:
    """Exit 1 with ``l2-stores: error: ...`` on stderr naming every needle."""
    assert proc.returncode == 1, describe(proc)
    assert "l2-stores: error:" in proc.stderr, describe(proc)
    for needle in needles:
        assert str(needle) in proc.stderr, f"{needle!r} not named\n{describe(proc)}"


def number(text: str) -> int:
    """An integer as printed (thousands may be separated by commas)."""
    return int(text.replace(",", ""))


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.strip()]


def same_path(printed: str, cwd: Path, expected: Path) -> bool:
    path = Path(printed)
    if not path.is_absolute():
        path = cwd / path
    return path.resolve() == expected.resolve()


def problem_lines(proc: subprocess.CompletedProcess[str], cwd: Path) -> list[tuple[Path, int, str]]:
    found = []
    for line in lines(proc):
        match = PROBLEM.match(line)
        if match:
            path = Path(match["path"])
            if not path.is_absolute():
                path = cwd / path
            found.append((path.resolve(), int(match["offset"]), match["what"]))
    return found


# ---------------------------------------------------------------- stores on disk


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (to show that nothing changed).

    Lock files count by name only: whoever takes a writer lock writes its pid
    there, which changes no store data.
    """
    return {
        p.relative_to(root).as_posix(): b""
        if p.name == "lock" or p.suffix == ".lock"
        else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def one_file(directory: Path, prefix: str) -> Path:
    found = [
        p for p in directory.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".tmp")
    ]
    assert len(found) == 1, f"expected one {prefix}* in {directory}: {found}"
    return found[0]


def generation_of(index_dir: Path) -> int:
    return max(
        int(p.name.split(".")[1])
        for p in index_dir.iterdir()
        if p.name.startswith("log.") and not p.name.endswith(".tmp")
    )


def size_or_none(codec: Any) -> int | None:
    try:
        return int(codec.sizeof())
    except construct.SizeofError:
        return None


def expected_meta(rel: str) -> dict[str, Any]:
    cls, kind = zoo.STORES[rel]
    return {
        "kind": kind,
        "key_size": None if kind == "singleton" else size_or_none(cls.key_codec),
        "value_size": size_or_none(cls.value_codec),
        "header_size": size_or_none(cls.header_codec) if kind == "indexed_file" else 0,
    }


def store_files(store: Path) -> list[Path]:
    """The data-bearing files of a store (lock files aside)."""
    if store.is_file():
        return [store]
    return [p for p in store.rglob("*") if p.is_file() and p.name != "lock"]


def expected_lines(kind: str, bindings: dict[bytes, Any]) -> set[tuple[str, ...]]:
    if kind == "singleton":
        return {(value.hex(),) for value in bindings.values()}
    if kind == "indexed_file":
        return {(k.hex(), h.hex(), v.hex()) for k, (h, v) in bindings.items()}
    return {(k.hex(), v.hex()) for k, v in bindings.items()}


def expected_json(kind: str, bindings: dict[bytes, Any]) -> list[dict[str, str]]:
    if kind == "singleton":
        return [{"value": value.hex()} for value in bindings.values()]
    if kind == "indexed_file":
        return [
            {"key": k.hex(), "header": h.hex(), "value": v.hex()} for k, (h, v) in bindings.items()
        ]
    return [{"key": k.hex(), "value": v.hex()} for k, v in bindings.items()]


def canonical(objects: list[dict[str, str]]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


def assert_same_stores(root: Path, expected: dict[str, dict[bytes, Any]]) -> None:
    """Every zoo store under root loads READ_ONLY with the zoo's classes and holds `expected`."""
    for rel, (cls, kind) in zoo.STORES.items():
        assert (root / rel).exists(), f"{rel} missing under {root}"
        got = zoo.read_back(cls, kind, root / rel)
        assert got == expected[rel], f"{rel}: bindings differ"


@pytest.fixture(scope="module")
def built_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[bytes, Any]]]:
    root = tmp_path_factory.mktemp("zoo")
    expected = zoo.build(root)
    return root, expected


@pytest.fixture(scope="module")
def zoo_archive(
    built_zoo: tuple[Path, dict[str, dict[bytes, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root, _ = built_zoo
    out = tmp_path_factory.mktemp("archive")
    archive = out / "zoo.tar"
    proc = run("snapshot", "export", root, archive, cwd=out)
    assert_ok(proc)
    return archive, proc


# ---------------------------------------------------------------- help and usage


SUBCOMMANDS = [
    [],
    ["info"],
    ["verify"],
    ["dump"],
    ["snapshot"],
    ["snapshot", "export"],
    ["snapshot", "import"],
    ["demo"],
]


def test_help_on_the_tool_and_every_subcommand(tmp_path: Path) -> None:
    results = run_many([[*words, "-h"] for words in SUBCOMMANDS], tmp_path)
    for words, proc in zip(SUBCOMMANDS, results, strict=True):
        assert proc.returncode == 0, describe(proc)
        first = proc.stdout.lstrip().splitlines()[0]
        assert first.startswith("usage: l2-stores"), describe(proc)
        assert " ".join(["l2-stores", *words]) in first, describe(proc)
    top = results[0].stdout
    for name in ("info", "verify", "dump", "snapshot", "demo"):
        assert name in top, f"{name} not listed in the tool's help\n{top}"
    for flag, proc in [("--json", results[1]), ("--limit", results[3]), ("--force", results[5])]:
        assert flag in proc.stdout, describe(proc)
    assert "--force" in results[6].stdout, describe(results[6])
    for flag in ("--dir", "--blocks", "--gc-every", "--keep", "--readers"):
        assert flag in results[7].stdout, describe(results[7])


USAGE_ERRORS = [
    [],
    ["frobnicate"],
    ["info"],
    ["verify"],
    ["dump"],
    ["dump", "somewhere", "--limit", "many"],
    ["info", "somewhere", "--bogus"],
    ["snapshot"],
    ["snapshot", "sideways", "a", "b"],
    ["snapshot", "export", "only-a-dir"],
    ["snapshot", "import"],
    ["demo", "--blocks", "lots"],
]


def test_usage_errors_exit_2_with_usage_on_stderr(tmp_path: Path) -> None:
    for proc in run_many(USAGE_ERRORS, tmp_path):
        assert proc.returncode == 2, describe(proc)
        assert "usage: l2-stores" in proc.stderr, describe(proc)
        assert proc.stdout == "", describe(proc)
    assert list(tmp_path.iterdir()) == []


def test_console_script(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    assert CONSOLE_SCRIPT.exists(), f"no console script at {CONSOLE_SCRIPT}"
    helped = run("-h", cwd=tmp_path, script=True)
    assert_ok(helped)
    assert helped.stdout.lstrip().startswith("usage: l2-stores")
    info = run("info", "--json", root, cwd=tmp_path, script=True)
    assert_ok(info)
    assert {entry["name"] for entry in json.loads(info.stdout)} == {
        Path(rel).name for rel in zoo.STORES
    }
    dumped = run("dump", root / "plain", cwd=tmp_path, script=True)
    assert_ok(dumped)
    assert {tuple(line.split()) for line in lines(dumped)} == expected_lines(
        "indexable", expected["plain"]
    )
    missing = run("verify", tmp_path / "nowhere", cwd=tmp_path, script=True)
    assert_error(missing, tmp_path / "nowhere")


# ---------------------------------------------------------------- paths that hold no store


@pytest.mark.parametrize("what", ["missing", "empty_dir", "plain_file"])
def test_no_store_at_path_is_an_error_naming_it(tmp_path: Path, what: str) -> None:
    if what == "missing":
        target = tmp_path / "does-not-exist"
    elif what == "empty_dir":
        target = tmp_path / "nothing-here"
        (target / "sub").mkdir(parents=True)
        (target / "sub" / "notes.txt").write_text("not a store\n")
    else:
        target = tmp_path / "notes.txt"
        target.write_bytes(b"L2SSNG not quite a singleton, just a file\n")
    before = tree(tmp_path)
    commands = [
        ["info", target],
        ["info", "--json", target],
        ["verify", target],
        ["dump", target],
        ["snapshot", "export", target, tmp_path / "out.tar"],
    ]
    for proc in run_many(commands, tmp_path):
        assert_error(proc, target)
    assert not (tmp_path / "out.tar").exists()
    assert tree(tmp_path) == before


def test_import_of_a_missing_archive_is_an_error_naming_it(tmp_path: Path) -> None:
    proc = run("snapshot", "import", tmp_path / "no.tar", tmp_path / "dest", cwd=tmp_path)
    assert_error(proc, tmp_path / "no.tar")
    assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------- info


def check_info_entry(entry: dict[str, Any], rel: str, root: Path, cwd: Path, expected: Any) -> None:
    store = root / rel
    meta = expected_meta(rel)
    assert same_path(entry["path"], cwd, store), (entry["path"], store)
    assert entry["name"] == store.name
    for field, value in meta.items():
        assert entry[field] == value, f"{rel}: {field} = {entry[field]!r}, expected {value!r}"
    assert entry["format_version"] == 1
    assert entry["bindings"] == len(expected[rel]), rel
    cls = zoo.STORES[rel][0]
    assert entry["created_as"] == cls._kind, rel
    assert entry["codecs"] == {
        role: identity.render(identity.describe(getattr(cls, f"{role}_codec")))
        for role in cls._roles
    }, rel
    if meta["kind"] == "singleton":
        assert entry["generation"] is None, rel
    else:
        index_dir = store / "index" if meta["kind"] == "indexed_file" else store
        assert entry["generation"] == generation_of(index_dir), rel
    files = entry["files"]
    assert isinstance(files, dict) and files, rel
    base = store if store.is_dir() else store.parent
    for name, size in files.items():
        assert (base / name).is_file(), f"{rel}: listed file {name} does not exist"
        assert size == os.path.getsize(base / name), f"{rel}: size of {name}"
    for path in store_files(store):
        assert path.relative_to(base).as_posix() in files, f"{rel}: {path} not listed"


@pytest.mark.parametrize("rel", list(zoo.STORES))
def test_info_json_on_each_store(built_zoo: tuple[Path, Any], tmp_path: Path, rel: str) -> None:
    root, expected = built_zoo
    proc = run("info", "--json", root / rel, cwd=tmp_path)
    assert_ok(proc)
    entries = json.loads(proc.stdout)
    assert isinstance(entries, list) and len(entries) == 1, describe(proc)
    check_info_entry(entries[0], rel, root, tmp_path, expected)
    # writer_pid is null although the lock files name this (live) test process
    assert entries[0]["writer_pid"] is None


def test_info_json_on_a_directory_of_stores(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    before = tree(root)
    proc = run("info", "--json", root, cwd=tmp_path)
    assert_ok(proc)
    entries = json.loads(proc.stdout)
    assert len(entries) == len(zoo.STORES), describe(proc)
    by_rel = {}
    for entry in entries:
        matches = [rel for rel in zoo.STORES if same_path(entry["path"], tmp_path, root / rel)]
        assert len(matches) == 1, entry["path"]
        by_rel[matches[0]] = entry
    assert set(by_rel) == set(zoo.STORES)
    for rel, entry in by_rel.items():
        check_info_entry(entry, rel, root, tmp_path, expected)
        assert entry["writer_pid"] is None
    assert tree(root) == before, "info changed the stores"


TEXT_FIELD = re.compile(
    r"^\s+(kind|format version|key size|value size|header size|bindings|generation|writer|files)"
    r"(?:\s+(.*?))?\s*$"
)
TEXT_HEAD = re.compile(r"^\s*(\S+)\s+\((.+)\)\s*$")


def parse_text_info(out: str, cwd: Path) -> dict[Path, dict[str, str]]:
    blocks: dict[Path, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in out.splitlines():
        if not line.strip():
            continue
        field = TEXT_FIELD.match(line)
        if field and current is not None:
            current[field[1]] = field[2] or ""
            continue
        head = TEXT_HEAD.match(line)
        if head:
            path = Path(head[2])
            path = (path if path.is_absolute() else cwd / path).resolve()
            current = blocks.setdefault(path, {"name": head[1]})
    return blocks


def test_info_text_on_a_directory_of_stores(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    proc = run("info", root, cwd=tmp_path)
    assert_ok(proc)
    blocks = parse_text_info(proc.stdout, tmp_path)
    assert set(blocks) == {(root / rel).resolve() for rel in zoo.STORES}, describe(proc)
    for rel in zoo.STORES:
        block = blocks[(root / rel).resolve()]
        meta = expected_meta(rel)
        assert block["name"] == Path(rel).name
        assert block["kind"] == zoo.STORES[rel][0]._kind.replace("_", " "), (rel, block)
        assert block["format version"] == "1", (rel, block)
        assert block["bindings"] == str(len(expected[rel])), (rel, block)
        assert block["writer"] == "none", (rel, block)
        value_size = "variable" if meta["value_size"] is None else str(meta["value_size"])
        assert block["value size"].split()[0] == value_size, (rel, block)
        assert "files" in block, (rel, block)
        if meta["kind"] == "singleton":
            assert "key size" not in block and "generation" not in block, (rel, block)
        else:
            assert block["key size"].split()[0] == str(meta["key_size"]), (rel, block)
            index_dir = root / rel / "index" if meta["kind"] == "indexed_file" else root / rel
            assert block["generation"] == str(generation_of(index_dir)), (rel, block)
        if meta["kind"] == "indexed_file":
            assert block["header size"].split()[0] == str(meta["header_size"]), (rel, block)
        else:
            assert "header size" not in block, (rel, block)
    # the files of each store are listed with their sizes
    for path in store_files(root / "blocks"):
        rel = path.relative_to(root / "blocks").as_posix()
        listed = re.search(rf"^\s+{re.escape(rel)}\s+([\d,]+)(?: B| bytes)?\s*$", proc.stdout, re.M)
        assert listed, f"{rel} not listed\n{describe(proc)}"
        assert int(listed[1].replace(",", "")) == path.stat().st_size, rel


def start_holder(root: Path, *rels: str) -> subprocess.Popen[str]:
    """A child holding the zoo stores under root (or only ``rels``) open READ_WRITE."""
    holder = subprocess.Popen(
        [sys.executable, str(HELPERS / "cli_zoo.py"), "hold", str(root), *rels],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        pytest.fail(f"holder did not start: {holder.communicate(timeout=GUARD)[1][-3000:]}")
    return holder


def stop_holder(holder: subprocess.Popen[str]) -> None:
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "closed"
        holder.wait(timeout=GUARD)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_info_shows_the_pid_of_a_writer_and_locked_stores_are_refused(
    built_zoo: tuple[Path, Any], zoo_archive: tuple[Path, Any], tmp_path: Path
) -> None:
    root, expected = built_zoo
    archive, _ = zoo_archive
    held = tmp_path / "held"
    shutil.copytree(root, held)
    holder = start_holder(held)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        as_json, as_text, verified = run_many(
            [["info", "--json", held], ["info", held], ["verify", held]], tmp_path
        )
        forced = run("snapshot", "import", "--force", archive, held, cwd=tmp_path)
        assert_ok(as_json)
        entries = json.loads(as_json.stdout)
        assert len(entries) == len(zoo.STORES)
        for entry in entries:
            assert entry["writer_pid"] == holder.pid, entry
            assert entry["writer_pid"] != os.getpid()
        assert_ok(as_text)
        blocks = parse_text_info(as_text.stdout, tmp_path)
        assert len(blocks) == len(zoo.STORES)
        for block in blocks.values():
            assert block["writer"] == f"pid {holder.pid} holds the lock", block
        # a store held by a running writer is refused even with --force
        assert_error(forced)
        # verify reads without the writer lock
        assert_ok(verified)
    finally:
        stop_holder(holder)
    assert_same_stores(held, expected)
    after = run("info", "--json", held, cwd=tmp_path)
    assert_ok(after)
    # the refused import left nothing behind (no extra store, no staging copy)
    left, original = set(tree(held)), set(tree(root))
    assert left == original, f"files added or removed: {sorted(left ^ original)}"
    assert [entry["writer_pid"] for entry in json.loads(after.stdout)] == [None] * len(zoo.STORES)


def test_forced_import_onto_one_locked_store_changes_nothing(
    zoo_archive: tuple[Path, Any], tmp_path: Path
) -> None:
    archive, _ = zoo_archive
    dest = tmp_path / "dest"
    with zoo.Head.load(dest / "head") as head:
        head.write(999)
    with zoo.Plain.load(dest / "plain") as plain:
        plain.add(zoo.plain_key(0), b"old old!")
    holder = start_holder(dest, "plain")
    try:
        before = tree(dest)
        forced = run("snapshot", "import", "--force", archive, dest, cwd=tmp_path)
        assert_error(forced, "plain")
        assert tree(dest) == before, "a refused import changed the directory"
    finally:
        stop_holder(holder)
    with zoo.Head.load(dest / "head", Mode.READ_ONLY) as head:
        assert head.read() == 999


# ---------------------------------------------------------------- verify


def test_verify_a_healthy_directory_of_stores(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, _ = built_zoo
    before = tree(root)
    proc = run("verify", root, cwd=tmp_path)
    assert_ok(proc)
    assert problem_lines(proc, tmp_path) == [], describe(proc)
    match = OK_LINE.match(lines(proc)[-1])
    assert match, describe(proc)
    data_files = [p for rel in zoo.STORES for p in store_files(root / rel)]
    assert int(match[1]) == len(zoo.STORES)
    assert int(match[2]) >= len(data_files)
    assert number(match[3]) >= sum(p.stat().st_size for p in data_files) - 64 * len(data_files)
    assert tree(root) == before, "verify changed the stores"


@pytest.mark.parametrize("rel", list(zoo.STORES))
def test_verify_each_healthy_store(built_zoo: tuple[Path, Any], tmp_path: Path, rel: str) -> None:
    root, _ = built_zoo
    proc = run("verify", root / rel, cwd=tmp_path)
    assert_ok(proc)
    match = OK_LINE.match(lines(proc)[-1])
    assert match and int(match[1]) == 1, describe(proc)
    assert int(match[2]) >= len(store_files(root / rel)), describe(proc)


def log_store(path: Path, records: int = 6) -> Path:
    """An indexable store whose bindings are all in its log; returns the log."""
    with zoo.Plain.load(path) as store:
        for i in range(records):
            store.add(zoo.plain_key(i), i.to_bytes(8, "big"))
    log = one_file(path, "log.")
    assert log.stat().st_size == 64 + (records + 1) * 45  # and the close's mark
    return log


def indexed_log_store(path: Path, records: int = 6) -> Path:
    """An indexed file whose index bindings are all in its log; returns the log."""
    with zoo.Blocks.load(path) as store:
        for i in range(records):
            store.append(
                zoo.block_key(i), zoo.block_payload(i), {"level": i, "predecessor": bytes(32)}
            )
    log = one_file(path / "index", "log.")
    assert log.stat().st_size == 64 + (records + 1) * (1 + 32 + 16 + 36 + 4)  # and a mark
    return log


def merged_store(path: Path) -> Path:
    """An indexable store after many adds (index_buffer_size 16); returns its oldest run."""
    with zoo.Plain.load(path, index_buffer_size=16) as store:
        for i in range(100):
            store.add(zoo.plain_key(i), i.to_bytes(8, "big"))
    return path / run_names(path)[0]


def values_records(path: Path, key_size: int = 32) -> list[tuple[int, int]]:
    """(offset, size) of each record of a values file."""
    data = path.read_bytes()
    records, offset = [], 64
    while offset + 4 <= len(data):
        n = int.from_bytes(data[offset : offset + 4], "little")
        records.append((offset, 12 + key_size + n))
        offset += 12 + key_size + n
    assert offset == len(data)
    return records


def corrupt(case: str, tmp_path: Path) -> tuple[Path, Path, range]:
    """Damage one store; returns (store path, damaged file, offsets a report may name)."""
    store = tmp_path / case
    if case == "log_record":
        log = log_store(store)
        record = 64 + 2 * 45
        flip(log, record + 6)
        return store, log, range(record, record + 45)
    if case == "indexed_log_record":
        log = indexed_log_store(store)
        size = 1 + 32 + 16 + 36 + 4
        record = 64 + 2 * size
        flip(log, record + 40)
        return store, log, range(record, record + size)
    if case in ("run_row", "run_fences", "run_header"):
        data = merged_store(store)
        opened = Run(str(data), Expected("plain", 32, 8))
        geometry, n = opened.geometry, opened.count
        opened.close()
        assert n > 10
        if case == "run_row":
            row = geometry.rows + geometry.row_size * (n // 2)
            flip(data, row + 35)
            return store, data, range(row, row + geometry.row_size)
        if case == "run_fences":
            # a report may point at the fence or at the start of the page holding it
            flip(data, geometry.fence + 1)
            return store, data, range(0, data.stat().st_size)
        flip(data, 20)
        return store, data, range(0, 64)
    if case == "values_record":
        with zoo.Blocks.load(store) as blocks:
            for i in range(10):
                blocks.append(
                    zoo.block_key(i), zoo.block_payload(i), {"level": i, "predecessor": bytes(32)}
                )
        values = one_file(store, "values.")
        offset, size = values_records(values)[4]
        flip(values, offset + 4 + 32 + 3)
        return store, values, range(offset, offset + size)
    if case in ("singleton_fixed", "singleton_variable"):
        store = tmp_path / "single"
        if case == "singleton_fixed":
            with zoo.Head.load(store) as head:
                head.write(77)
        else:
            with zoo.Meta.load(store) as meta:
                meta.write(b"some variable-size value")
        flip(store, 24 + 3)
        return store, store, range(0, store.stat().st_size + 1)
    raise AssertionError(case)


FLIPS = [
    "log_record",
    "indexed_log_record",
    "run_row",
    "run_fences",
    "run_header",
    "values_record",
    "singleton_fixed",
    "singleton_variable",
]


@pytest.mark.parametrize("case", FLIPS)
def test_verify_reports_a_flipped_byte(tmp_path: Path, case: str) -> None:
    store, damaged, offsets = corrupt(case, tmp_path)
    before = tree(tmp_path)
    proc = run("verify", store, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    found = problem_lines(proc, tmp_path)
    named = [
        (offset, what)
        for path, offset, what in found
        if path == damaged.resolve() and not what.startswith("note:")
    ]
    assert named, f"no problem reported in {damaged}\n{describe(proc)}"
    assert any(offset in offsets for offset, _ in named), (
        f"no problem at an offset in [{offsets.start}, {offsets.stop}) "
        f"of {damaged}\n{describe(proc)}"
    )
    summary = BAD_LINE.match(lines(proc)[-1])
    assert summary, describe(proc)
    assert int(summary[1]) >= 1 and int(summary[2]) == 1, describe(proc)
    assert tree(tmp_path) == before, "verify changed the damaged store"


@pytest.mark.parametrize("case", ["run_file", "values_file", "singleton"])
def test_verify_reports_a_truncated_file(tmp_path: Path, case: str) -> None:
    store = tmp_path / "store"
    if case == "run_file":
        damaged = merged_store(store)
    elif case == "values_file":
        with zoo.Blocks.load(store) as blocks:
            for i in range(20):
                blocks.append(
                    zoo.block_key(i), zoo.block_payload(i), {"level": i, "predecessor": bytes(32)}
                )
        damaged = one_file(store, "values.")
    else:
        with zoo.Meta.load(store) as meta:
            meta.write(b"a value that will be cut short")
        damaged = store
    truncate(damaged, damaged.stat().st_size // 2)
    proc = run("verify", store, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    found = [p for p in problem_lines(proc, tmp_path) if not p[2].startswith("note:")]
    assert found, describe(proc)
    assert all(path.is_relative_to(store.resolve()) for path, _, _ in found), describe(proc)
    if case != "values_file":
        assert any(path == damaged.resolve() for path, _, _ in found), describe(proc)
    assert BAD_LINE.match(lines(proc)[-1]), describe(proc)


@pytest.mark.parametrize("case", ["cut", "zeros", "indexed_cut"])
def test_verify_a_torn_log_tail_is_a_note(tmp_path: Path, case: str) -> None:
    store = tmp_path / "store"
    if case == "indexed_cut":
        log = indexed_log_store(store)
        record = 1 + 32 + 16 + 36 + 4
    else:
        log = log_store(store)
        record = 45
    size = log.stat().st_size
    last = size - record
    if case == "zeros":
        data = bytearray(log.read_bytes())
        data[last:] = bytes(record)
        log.write_bytes(bytes(data))
    else:
        truncate(log, size - 5)
    before = log.read_bytes()
    proc = run("verify", store, cwd=tmp_path)
    assert_ok(proc)
    notes = [
        (offset, what)
        for path, offset, what in problem_lines(proc, tmp_path)
        if path == log.resolve()
    ]
    assert len(notes) == 1, describe(proc)
    offset, what = notes[0]
    assert what.startswith("note:") and "torn" in what, describe(proc)
    assert last <= offset <= size, describe(proc)
    assert OK_LINE.match(lines(proc)[-1]), describe(proc)
    assert log.read_bytes() == before, "verify repaired the log"


def test_verify_a_directory_with_one_damaged_store(
    built_zoo: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = built_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(root, copy)
    values = sorted((copy / "blocks").glob("values.*"))[-1]
    offset, size = values_records(values)[3]
    flip(values, offset + 40)
    proc = run("verify", copy, cwd=tmp_path)
    assert proc.returncode == 1, describe(proc)
    found = [
        (path, o) for path, o, what in problem_lines(proc, tmp_path) if not what.startswith("note:")
    ]
    # only the damaged store is reported, and its values file at the damaged record
    assert found, describe(proc)
    assert all(path.is_relative_to((copy / "blocks").resolve()) for path, _ in found), describe(
        proc
    )
    assert any(path == values.resolve() and offset <= o < offset + size for path, o in found), (
        describe(proc)
    )
    summary = BAD_LINE.match(lines(proc)[-1])
    assert summary and int(summary[1]) >= 1, describe(proc)


# ---------------------------------------------------------------- dump


@pytest.mark.parametrize("rel", list(zoo.STORES))
def test_dump_each_store(built_zoo: tuple[Path, Any], tmp_path: Path, rel: str) -> None:
    root, expected = built_zoo
    kind = zoo.STORES[rel][1]
    text, as_json = run_many([["dump", root / rel], ["dump", "--json", root / rel]], tmp_path)
    assert_ok(text)
    got = [tuple(line.split()) for line in lines(text)]
    assert len(got) == len(expected[rel]), describe(text)
    assert set(got) == expected_lines(kind, expected[rel])
    assert_ok(as_json)
    objects = [json.loads(line) for line in lines(as_json)]
    cls = zoo.STORES[rel][0]
    for found in objects:  # decoded by the codecs the store recorded, as the class decodes
        codecs = {
            role: getattr(cls, f"{role}_codec")
            for role in ("key", "header", "value")
            if role in found
        }
        rebuilt = {
            role: dump.jsonable(codec.parse(bytes.fromhex(found[role])))
            for role, codec in codecs.items()
            if identity.construct_of(identity.describe(codec)) is not None
        }
        assert found.pop("decoded", None) == (rebuilt or None), found
    assert canonical(objects) == canonical(expected_json(kind, expected[rel]))


def test_dump_removable_leaves_out_removed_keys(
    built_zoo: tuple[Path, Any], tmp_path: Path
) -> None:
    root, expected = built_zoo
    proc = run("dump", root / "removable", cwd=tmp_path)
    assert_ok(proc)
    keys = {line.split()[0] for line in lines(proc)}
    removed = {zoo.removable_key(i).hex() for i in range(15, 120, 3)}
    readded = {zoo.removable_key(i).hex() for i in range(0, 15, 3)}
    assert not keys & removed
    assert readded <= keys
    assert len(keys) == len(expected["removable"]) == 120 - len(removed)


def test_dump_limit(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    few, all_, few_json, zero = run_many(
        [
            ["dump", root / "plain", "--limit", "7"],
            ["dump", "--limit", "1000", root / "plain"],
            ["dump", "--json", "--limit", "3", root / "blocks"],
            ["dump", "--limit", "0", root / "simple"],
        ],
        tmp_path,
    )
    everything = expected_lines("indexable", expected["plain"])
    for proc in (few, all_, few_json, zero):
        assert_ok(proc)
    got = [tuple(line.split()) for line in lines(few)]
    assert len(got) == 7 and len(set(got)) == 7 and set(got) <= everything
    got = [tuple(line.split()) for line in lines(all_)]
    assert len(got) == len(everything) and set(got) == everything
    objects = [json.loads(line) for line in lines(few_json)]
    assert all("decoded" in found for found in objects)  # blocks records its codecs
    objects = [{k: v for k, v in found.items() if k != "decoded"} for found in objects]
    allowed = set(canonical(expected_json("indexed_file", expected["blocks"])))
    assert len(objects) == 3 and set(canonical(objects)) <= allowed
    assert len(set(canonical(objects))) == 3
    assert lines(zero) == []


def test_dump_in_key_order_with_ranges(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    everything = sorted(expected_lines("indexable", expected["plain"]))
    keys = [key for key, _ in everything]
    low, high = keys[10], keys[20]
    whole, ranged, backwards, prefix, bad = run_many(
        [
            ["dump", root / "plain"],
            ["dump", root / "plain", "--start", low, "--stop", high],
            ["dump", root / "plain", "--reverse", "--limit", "5", "--stop", high],
            ["dump", root / "plain", "--start", "0x" + low[:4], "--stop", "0x" + high[:4]],
            ["dump", root / "plain", "--start", "not a key"],
        ],
        tmp_path,
    )
    for proc in (whole, ranged, backwards, prefix):
        assert_ok(proc)
    assert [tuple(line.split()) for line in lines(whole)] == everything
    assert [tuple(line.split()) for line in lines(ranged)] == everything[10:20]
    assert [tuple(line.split()) for line in lines(backwards)] == everything[15:20][::-1]
    by_prefix = [row for row in everything if low[:4] <= row[0][:4] < high[:4]]
    assert [tuple(line.split()) for line in lines(prefix)] == by_prefix
    assert_error(bad)
    assert "not a key" in bad.stderr and str(root / "plain") in bad.stderr, describe(bad)


def test_dump_integer_keys_given_as_numbers(tmp_path: Path) -> None:
    levels = make_indexable("cli_levels", construct.Int32ub, construct.Bytes(1))
    with levels.load(tmp_path / "levels", index_buffer_size=8) as store:
        for level in range(300):
            store.add(level, bytes([level % 256]), flush=False)
    proc = run("dump", tmp_path / "levels", "--start", "254", "--stop", "258", cwd=tmp_path)
    assert_ok(proc)
    assert [line.split()[0] for line in lines(proc)] == [
        level.to_bytes(4, "big").hex() for level in range(254, 258)
    ]


def test_dump_of_a_directory_of_stores_is_refused(
    built_zoo: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = built_zoo
    for proc in run_many([["dump", root], ["dump", "--json", root / "sub"]], tmp_path):
        assert_error(proc)
        assert proc.stdout.strip() == "", describe(proc)


# ---------------------------------------------------------------- snapshot


def read_manifest(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    with tarfile.open(archive) as tar:
        members = {}
        for info in tar.getmembers():
            f = tar.extractfile(info)
            if f is not None:
                members[info.name] = f.read()
    return json.loads(members["manifest.json"]), members


def test_export_summary_and_manifest(
    built_zoo: tuple[Path, Any], zoo_archive: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    _, expected = built_zoo
    archive, proc = zoo_archive
    summary = EXPORTED.match(lines(proc)[-1])
    assert summary, describe(proc)
    assert int(summary[1]) == len(zoo.STORES)
    assert number(summary[2]) == sum(len(b) for b in expected.values())
    assert same_path(summary[4].strip(), archive.parent, archive)
    assert tarfile.is_tarfile(archive)
    manifest, members = read_manifest(archive)
    assert manifest["format"] == "l2_stores-snapshot"
    assert manifest["version"] == 1
    assert isinstance(manifest["created"], str) and manifest["created"]
    entries = {entry["path"]: entry for entry in manifest["stores"]}
    assert set(entries) == set(zoo.STORES)
    assert len({entry["member"] for entry in manifest["stores"]}) == len(zoo.STORES)
    for rel, entry in entries.items():
        for field, value in expected_meta(rel).items():
            assert entry[field] == value, (rel, field, entry[field])
        assert entry["bindings"] == len(expected[rel]), rel
        body = members[entry["member"]]
        assert entry["bytes"] == len(body), rel
        assert entry["sha256"] == hashlib.sha256(body).hexdigest(), rel


def test_export_then_import_gives_the_same_bindings(
    built_zoo: tuple[Path, Any], zoo_archive: tuple[Path, Any], tmp_path: Path
) -> None:
    _, expected = built_zoo
    archive, _ = zoo_archive
    dest = tmp_path / "restored"
    proc = run("snapshot", "import", archive, dest, cwd=tmp_path)
    assert_ok(proc)
    summary = IMPORTED.match(lines(proc)[-1])
    assert summary, describe(proc)
    assert int(summary[1]) == len(zoo.STORES)
    assert number(summary[2]) == sum(len(b) for b in expected.values())
    assert_same_stores(dest, expected)
    verified = run("verify", dest, cwd=tmp_path)
    assert_ok(verified)
    assert OK_LINE.match(lines(verified)[-1]), describe(verified)


def test_import_refuses_existing_stores_unless_forced(
    built_zoo: tuple[Path, Any], zoo_archive: tuple[Path, Any], tmp_path: Path
) -> None:
    _, expected = built_zoo
    archive, _ = zoo_archive
    dest = tmp_path / "dest"
    with zoo.Head.load(dest / "head") as head:
        head.write(999)
    with Other.load(dest / "other") as other:
        other.write(b"abc")
    before = tree(dest)
    refused = run("snapshot", "import", archive, dest, cwd=tmp_path)
    assert_error(refused, "head")
    assert tree(dest) == before, "a refused import changed the directory"
    forced = run("snapshot", "import", "--force", archive, dest, cwd=tmp_path)
    assert_ok(forced)
    assert_same_stores(dest, expected)
    with Other.load(dest / "other", Mode.READ_ONLY) as other:
        assert other.read() == b"abc"
    again = run("snapshot", "import", archive, dest, cwd=tmp_path)
    assert_error(again)


def rewrite_archive(src: Path, dst: Path, change: Any) -> None:
    """Copy a tar archive member by member; ``change(name, bytes)`` -> new bytes or None (drop)."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            body = f.read() if f is not None else b""
            new = change(info.name, body)
            if new is None:
                continue
            info.size = len(new)
            out.addfile(info, io.BytesIO(new))


@pytest.mark.parametrize(
    "damage",
    [
        "flip_member",
        "drop_manifest",
        "bad_sha256",
        "bad_size",
        "garbage_manifest",
        "drop_member",
        "truncated",
    ],
)
def test_import_refuses_a_damaged_archive_and_writes_nothing(
    zoo_archive: tuple[Path, Any], tmp_path: Path, damage: str
) -> None:
    archive, _ = zoo_archive
    manifest, _ = read_manifest(archive)
    blocks = next(entry for entry in manifest["stores"] if entry["path"] == "blocks")
    bad = tmp_path / "bad.tar"
    named: str | None = blocks["member"]

    def edit_manifest(field: str, value: Any) -> Any:
        def change(name: str, body: bytes) -> bytes:
            if name != "manifest.json":
                return body
            data = json.loads(body)
            for entry in data["stores"]:
                if entry["path"] == "blocks":
                    entry[field] = value
            return json.dumps(data).encode()

        return change

    if damage == "flip_member":
        shutil.copy(archive, bad)
        with tarfile.open(archive) as tar:
            info = tar.getmember(blocks["member"])
            flip(bad, info.offset_data + info.size // 2)
    elif damage == "drop_manifest":
        rewrite_archive(archive, bad, lambda name, body: None if name == "manifest.json" else body)
        named = "manifest"
    elif damage == "garbage_manifest":
        rewrite_archive(
            archive,
            bad,
            lambda name, body: b'{"format": "l2_st' if name == "manifest.json" else body,
        )
        named = "manifest"
    elif damage == "bad_sha256":
        rewrite_archive(archive, bad, edit_manifest("sha256", "0" * 64))
    elif damage == "bad_size":
        rewrite_archive(archive, bad, edit_manifest("bytes", blocks["bytes"] + 1))
    elif damage == "drop_member":
        rewrite_archive(archive, bad, lambda name, body: None if name == blocks["member"] else body)
    else:
        shutil.copy(archive, bad)
        truncate(bad, int(bad.stat().st_size * 0.6))
        named = None
    dest = tmp_path / "dest"
    proc = run("snapshot", "import", bad, dest, cwd=tmp_path)
    assert_error(proc, *([named] if named else []))
    assert not dest.exists() or not any(dest.rglob("*")), "a refused import wrote files"


def test_export_refuses_to_overwrite_a_file_unless_forced(
    built_zoo: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = built_zoo
    target = tmp_path / "existing.tar"
    target.write_bytes(b"precious")
    refused = run("snapshot", "export", root, target, cwd=tmp_path)
    assert_error(refused, target)
    assert target.read_bytes() == b"precious"
    forced = run("snapshot", "export", "--force", root, target, cwd=tmp_path)
    assert_ok(forced)
    assert tarfile.is_tarfile(target)
    manifest, _ = read_manifest(target)
    assert {entry["path"] for entry in manifest["stores"]} == set(zoo.STORES)


def test_export_import_tar_gz(built_zoo: tuple[Path, Any], tmp_path: Path) -> None:
    root, expected = built_zoo
    archive = tmp_path / "zoo.tar.gz"
    exported = run("snapshot", "export", root, archive, cwd=tmp_path)
    assert_ok(exported)
    assert archive.read_bytes()[:2] == b"\x1f\x8b", "not gzip-compressed"
    manifest, _ = read_manifest(archive)
    assert len(manifest["stores"]) == len(zoo.STORES)
    imported = run("snapshot", "import", archive, tmp_path / "restored", cwd=tmp_path)
    assert_ok(imported)
    assert_same_stores(tmp_path / "restored", expected)


def test_export_during_concurrent_writes(tmp_path: Path) -> None:
    live = tmp_path / "live"
    child = subprocess.Popen(
        [sys.executable, str(HELPERS / "cli_concurrent_writer.py"), str(live), "10", "20000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    exports = 4
    try:
        assert child.stdout is not None and child.stdin is not None
        ready = child.stdout.readline().strip()
        if ready != "ready":
            child.kill()
            pytest.fail(f"writer did not start: {child.communicate(timeout=GUARD)[1][-3000:]}")
        info = run("info", "--json", live, cwd=tmp_path)
        assert_ok(info)
        entries = {entry["name"]: entry for entry in json.loads(info.stdout)}
        assert set(entries) == {"chain", "blocks", "head"}
        assert all(entry["writer_pid"] == child.pid for entry in entries.values()), entries
        for r in range(exports):
            exported = run("snapshot", "export", live, tmp_path / f"live{r}.tar", cwd=tmp_path)
            assert_ok(exported)
            imported = run(
                "snapshot", "import", tmp_path / f"live{r}.tar", tmp_path / f"copy{r}", cwd=tmp_path
            )
            assert_ok(imported)
        child.stdin.close()
        stopped = child.stdout.readline().split()
        assert stopped[:1] == ["stopped"], stopped
        written = int(stopped[1])
        assert child.wait(timeout=GUARD) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    number = {writer.key(i): i for i in range(written)}
    heads = []
    for r in range(exports):
        copy = tmp_path / f"copy{r}"
        with writer.Head.load(copy / "head", Mode.READ_ONLY) as head:
            h = head.read()
        assert h is not None and 10 <= h <= written, (r, h)
        heads.append(h)
        with writer.Chain.load(copy / "chain", Mode.READ_ONLY) as chain:
            seen = set()
            for key, value in chain.items():
                assert key in number, f"export {r}: chain holds a key never written"
                assert value == writer.value(key), f"export {r}: wrong value"
                seen.add(number[key])
        assert set(range(h)) <= seen, f"export {r}: chain misses bindings below head {h}"
        with writer.Blocks.load(copy / "blocks", Mode.READ_ONLY) as blocks:
            seen = set()
            for key, (payload, header) in blocks.items():
                assert key in number, f"export {r}: blocks holds a key never written"
                assert payload == writer.payload(key) and header == writer.header(key), r
                seen.add(number[key])
        assert set(range(h)) <= seen, f"export {r}: blocks misses bindings below head {h}"
    print("heads exported:", heads, "written:", written)
    assert heads == sorted(heads), heads
    verified = run("verify", live, cwd=tmp_path)
    assert_ok(verified)


# ---------------------------------------------------------------- demo


def test_demo_runs_resumes_and_leaves_healthy_stores(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    args = ["demo", "--dir", data, "--blocks", "300", "--gc-every", "100", "--keep", "50"]
    for attempt in ("first", "resumed"):
        proc = run(*args, cwd=tmp_path)
        assert_ok(proc)
        verdict = [line for line in lines(proc) if "verification" in line]
        assert verdict and "passed" in verdict[0] and "FAILED" not in proc.stdout, (
            attempt,
            describe(proc),
        )
    info, verified = run_many([["info", "--json", data], ["verify", data]], tmp_path)
    assert_ok(info)
    names = {entry["name"] for entry in json.loads(info.stdout)}
    assert {"blocks", "levels_to_hashes", "pending_messages", "head"} <= names, names
    assert all(entry["writer_pid"] is None for entry in json.loads(info.stdout))
    assert_ok(verified)
    assert OK_LINE.match(lines(verified)[-1]), describe(verified)
    assert not (tmp_path / "l2-demo-data").exists()
