"""A power-loss model of a file system, in the manner of LevelDB's ``FaultInjectionTestEnv``.

:class:`PowerLossFileSystem` is installed with
``l2_stores.engine.filesystem.installed`` over a directory tree, the *root*.
It sees every call the stores make through that seam (creations, ``fsync``,
directory syncs, renames, unlinks) and remembers, in a *state* directory,
what each made durable:

- ``images/<id>``: the bytes of file ``id`` as of its last ``fsync`` (the
  file's content read back at that moment: bytes written by Python, by the
  C accelerator's ``pwrite``/``pwritev`` and through shared maps alike);
- ``lost/<id>``: the bytes of a file when it was unlinked;
- ``journal``: one JSON line per namespace change and directory sync, in
  order.

Everything lives on disk and is written before (images) or right after
(journal) the call it records, so the record survives the process being
killed with SIGKILL at any moment; the fsyncs themselves are skipped, since
nothing real loses power. A layer made on a state directory that holds a
journal goes on from it: a kill, then another process, then the power loss.
:func:`power_loss_image` then computes, from the state and the files as the
dead (or paused) writer left them, what a power loss would leave, and writes
it into a new directory:

- a directory keeps the entries it had at its last sync, plus some of the
  changes made since (none, all, a prefix in order, or any subset);
- a file keeps its last fsynced bytes, plus some of the pages written since:
  none, all, a prefix (in-order writeback), any subset (out of order), or any
  subset with pages torn at 512-byte sectors or zero-filled; its size is the
  synced one, the current one, or one between. Bytes past the synced size
  that did not reach the disk read as zeros.

:meth:`PowerLossFileSystem.capture` does the same in the writer's own
process, under the layer's lock, while the stores keep running.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from l2_stores.engine.filesystem import FileSystem, OsFileSystem

PAGE = 4096
SECTOR = 512

#: How the unsynced pages of a file fare.
PAGE_MODES = ("none", "all", "prefix", "pages", "torn")
#: How the unsynced entries of a directory fare.
NAME_MODES = ("none", "all", "prefix", "subset")

Entry = tuple[str, int]  # ("file", id) or ("dir", 0)


def choose_modes(rng: random.Random) -> dict[str, str]:
    """How one power loss treats unsynced pages and entries, drawn from ``rng``."""
    return {
        "pages": rng.choice(("none", "all", "prefix", "pages", "torn", "mixed", "mixed")),
        "names": rng.choice(("none", "all", "prefix", "subset", "subset")),
    }


class UnknownFile(AssertionError):
    """An fsync of a file the layer never saw created: a call that bypassed the seam."""


class PowerLossFileSystem(FileSystem):
    """Records durability under ``root`` into ``state``; see the module docstring.

    ``hook(call, count)`` runs before each recorded call (``count`` from 1),
    outside the layer's lock: a test may kill the process there, hold the
    calling thread, or capture.
    """

    def __init__(
        self, root: str, state: str, hook: Callable[[str, int], None] | None = None
    ) -> None:
        self.root = os.path.abspath(root)
        self.state = os.path.abspath(state)
        self.hook = hook
        self.calls = 0
        self._real = OsFileSystem()
        self._lock = threading.RLock()
        self._counter = threading.Lock()
        self._ids: dict[tuple[int, int], int] = {}
        self._next_id = 1
        os.makedirs(os.path.join(self.state, "images"), exist_ok=True)
        os.makedirs(os.path.join(self.state, "lost"), exist_ok=True)
        os.makedirs(self.root, exist_ok=True)
        journal = os.path.join(self.state, "journal")
        resuming = os.path.exists(journal)
        self._journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if resuming:
            self._resume()
        else:
            self._record_initial_tree()

    # -- bookkeeping

    def _relative(self, path: str) -> str | None:
        full = os.path.abspath(path)
        if full == self.root:
            return "."
        if full.startswith(self.root + os.sep):
            return os.path.relpath(full, self.root)
        return None

    def _log(self, **entry: object) -> None:
        os.write(self._journal, (json.dumps(entry) + "\n").encode())

    def _new_id(self, status: os.stat_result) -> int:
        number = self._next_id
        self._next_id += 1
        self._ids[(status.st_dev, status.st_ino)] = number
        return number

    def _save(self, folder: str, number: int, data: bytes) -> None:
        final = os.path.join(self.state, folder, str(number))
        temporary = final + ".tmp"
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, final)  # whole or not at all, even if killed

    def _record_initial_tree(self) -> None:
        """Everything under the root now is durable, as after a clean shutdown."""
        for directory, names, files in os.walk(self.root):
            relative = os.path.relpath(directory, self.root)
            self._log(op="dir", path=relative)
            for name in sorted(files):
                path = os.path.join(directory, name)
                status = os.lstat(path)
                if not stat.S_ISREG(status.st_mode):
                    continue
                number = self._new_id(status)
                with open(path, "rb") as file:
                    self._save("images", number, file.read())
                self._log(op="file", path=os.path.join(relative, name), id=number,
                          ino=status.st_ino)
            names.sort()

    def _resume(self) -> None:
        """Go on from the state an earlier process recorded (it was killed: no power loss)."""
        namespace = _replay(self.state)
        numbers = [0, *namespace.inodes]
        self._next_id = max(numbers) + 1
        for directory, names in namespace.current.items():
            for name, (what, number) in names.items():
                if what != "file":
                    continue
                with contextlib.suppress(FileNotFoundError):
                    status = os.lstat(os.path.join(self.root, directory, name))
                    if status.st_ino == namespace.inodes.get(number):
                        self._ids[(status.st_dev, status.st_ino)] = number

    def still(self) -> contextlib.AbstractContextManager[object]:
        """While held, no recorded operation is half done (its real effect made, its
        journal entry not yet written): a hook that kills the process holds it, or the
        next process could meet a file it never heard of."""
        return self._lock

    def _call(self, name: str) -> None:
        with self._counter:
            self.calls += 1
            number = self.calls
        if self.hook is not None:
            self.hook(name, number)

    # -- the seam

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        relative = self._relative(path)
        if relative is None or not flags & os.O_CREAT:
            return self._real.open(path, flags, mode)
        self._call("open")
        with self._lock:
            existed = os.path.lexists(path)
            fd = self._real.open(path, flags, mode)
            if not existed:
                status = os.fstat(fd)
                number = self._new_id(status)
                self._log(op="create", path=relative, id=number, ino=status.st_ino)
            return fd

    def fsync(self, fd: int) -> None:
        self._call("fsync")
        with self._lock:
            status = os.fstat(fd)
            number = self._ids.get((status.st_dev, status.st_ino))
            if number is None:
                raise UnknownFile(f"fsync of a file made outside the seam (inode {status.st_ino})")
            # Through a descriptor of its own: the caller's may be write-only.
            reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            try:
                data = os.pread(reader, os.fstat(reader).st_size, 0)
            finally:
                os.close(reader)
            self._save("images", number, data)

    def fsync_directory(self, path: str) -> None:
        relative = self._relative(path)
        if relative is None:
            return self._real.fsync_directory(path)
        self._call("fsync_directory")
        with self._lock:
            self._log(op="dirsync", path=relative)

    def rename(self, source: str, target: str) -> None:
        relative_source, relative_target = self._relative(source), self._relative(target)
        if relative_source is None or relative_target is None:
            return self._real.rename(source, target)
        assert os.path.dirname(relative_source) == os.path.dirname(relative_target), (
            "renames stay in their directory"
        )
        self._call("rename")
        with self._lock:
            replaced = self._id_of(target)
            if replaced is not None:
                self._keep_lost(target, replaced)
            self._real.rename(source, target)
            self._log(op="rename", source=relative_source, target=relative_target)

    def unlink(self, path: str) -> None:
        relative = self._relative(path)
        if relative is None:
            return self._real.unlink(path)
        self._call("unlink")
        with self._lock:
            number = self._id_of(path)
            if number is not None:
                self._keep_lost(path, number)
            self._real.unlink(path)
            self._log(op="unlink", path=relative)

    def mkdir(self, path: str) -> None:
        relative = self._relative(path)
        if relative is None:
            return self._real.mkdir(path)
        self._call("mkdir")
        with self._lock:
            self._real.mkdir(path)
            self._log(op="mkdir", path=relative)

    def _id_of(self, path: str) -> int | None:
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            return None
        return self._ids.get((status.st_dev, status.st_ino))

    def _keep_lost(self, path: str, number: int) -> None:
        with open(path, "rb") as file:
            self._save("lost", number, file.read())

    # -- in-process power loss

    def capture(self, image: str, rng: random.Random, **modes: str) -> None:
        """Write into ``image`` what a power loss now would leave (see :func:`power_loss_image`)."""
        with self._lock:
            power_loss_image(self.root, self.state, image, rng, **modes)

    def close(self) -> None:
        """Stop recording (the journal's file is closed)."""
        with self._lock:
            if self._journal >= 0:
                os.close(self._journal)
                self._journal = -1


# -- what a power loss leaves


@dataclass
class _Namespace:
    """The journal replayed: per directory, the durable entries and the changes since."""

    durable: dict[str, dict[str, Entry]] = field(default_factory=dict)
    current: dict[str, dict[str, Entry]] = field(default_factory=dict)
    pending: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    inodes: dict[int, int] = field(default_factory=dict)

    def add_directory(self, path: str, durable: bool) -> None:
        self.current.setdefault(path, {})
        self.durable.setdefault(path, {})
        self.pending.setdefault(path, [])
        if path != ".":
            parent, name = _split(path)
            self.current[parent][name] = ("dir", 0)
            if durable:
                self.durable[parent][name] = ("dir", 0)
            else:
                self.pending[parent].append(("link", name, "dir", "0"))


def _split(path: str) -> tuple[str, str]:
    parent, name = os.path.split(path)
    return parent or ".", name


def _replay(state: str) -> _Namespace:
    namespace = _Namespace()
    namespace.add_directory(".", True)
    with open(os.path.join(state, "journal"), "rb") as journal:
        lines = journal.read().split(b"\n")
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line, cut short by a kill
        op = entry["op"]
        if op == "dir":
            namespace.add_directory(entry["path"], True)
        elif op == "mkdir":
            namespace.add_directory(entry["path"], False)
        elif op in ("file", "create"):
            parent, name = _split(entry["path"])
            namespace.inodes[entry["id"]] = entry["ino"]
            namespace.current[parent][name] = ("file", entry["id"])
            if op == "file":
                namespace.durable[parent][name] = ("file", entry["id"])
            else:
                namespace.pending[parent].append(("link", name, "file", str(entry["id"])))
        elif op == "dirsync":
            path = entry["path"]
            namespace.durable[path] = dict(namespace.current[path])
            namespace.pending[path] = []
        elif op == "rename":
            parent, source = _split(entry["source"])
            _, target = _split(entry["target"])
            moved = namespace.current[parent].pop(source)
            namespace.current[parent][target] = moved
            namespace.pending[parent].append(("rename", source, target))
        elif op == "unlink":
            parent, name = _split(entry["path"])
            namespace.current[parent].pop(name, None)
            namespace.pending[parent].append(("unlink", name))
    return namespace


def _apply(entries: dict[str, Entry], change: tuple[str, ...]) -> None:
    kind = change[0]
    if kind == "link":
        _, name, what, number = change
        entries[name] = (what, int(number))
    elif kind == "rename":
        # The file the source named when the rename was made, whatever it names in this
        # image: a rename moves an inode, never a later file of the same name.
        _, source, target, what, number = change
        moved = (what, int(number))
        if entries.get(source) == moved:
            del entries[source]
        entries[target] = moved  # its creation may not have persisted: the file is there
    elif kind == "unlink":
        entries.pop(change[1], None)


def _with_moved_files(
    durable: dict[str, Entry], changes: list[tuple[str, ...]]
) -> list[tuple[str, ...]]:
    """The changes, each rename with the entry its source named at that moment."""
    names = dict(durable)
    annotated: list[tuple[str, ...]] = []
    for change in changes:
        if change[0] == "rename":
            moved = names.get(change[1])
            if moved is None:
                continue  # a rename of nothing the layer knows: it moved nothing
            change = (*change, moved[0], str(moved[1]))
        annotated.append(change)
        _apply(names, change)
    return annotated


def _surviving_entries(
    namespace: _Namespace, directory: str, rng: random.Random, mode: str
) -> dict[str, Entry]:
    entries = dict(namespace.durable[directory])
    changes = _with_moved_files(entries, namespace.pending[directory])
    if mode == "none":
        kept = []
    elif mode == "all":
        kept = changes
    elif mode == "prefix":
        kept = changes[: rng.randint(0, len(changes))]
    else:  # any subset, in order
        kept = [change for change in changes if rng.random() < 0.5]
    for change in kept:
        _apply(entries, change)
    return entries


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _current_bytes(root: str, state: str, namespace: _Namespace, number: int) -> bytes:
    """The file's bytes as the writer left them (or when it was unlinked)."""
    inode = namespace.inodes.get(number)
    for directory, names in namespace.current.items():
        for name, entry in names.items():
            if entry == ("file", number):
                path = os.path.join(root, directory, name)
                try:
                    if os.lstat(path).st_ino == inode:
                        data = _read(path)
                        if data is not None:
                            return data
                except FileNotFoundError:
                    pass
    lost = _read(os.path.join(state, "lost", str(number)))
    if lost is not None:
        return lost
    if inode is not None:  # a call the kill kept out of the journal: find the file by inode
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                if os.lstat(path).st_ino == inode:
                    data = _read(path)
                    if data is not None:
                        return data
    return _read(os.path.join(state, "images", str(number))) or b""


def surviving_bytes(synced: bytes, current: bytes, rng: random.Random, mode: str) -> bytes:
    """What a power loss leaves of a file fsynced as ``synced`` and now ``current``."""
    if mode == "none" or synced == current:
        return synced
    if mode == "all":
        return current
    sizes = [len(synced), len(current)]
    low, high = min(sizes), max(sizes)
    roll = rng.random()
    if roll < 0.4:
        size = len(current)
    elif roll < 0.7 or high == low:
        size = len(synced)
    else:
        size = rng.randint(low, high)
    pages = (high + PAGE - 1) // PAGE
    cut = rng.randint(0, pages)
    out = bytearray()
    for page in range(pages):
        start = page * PAGE
        old = synced[start : start + PAGE].ljust(PAGE, b"\0")
        new = current[start : start + PAGE].ljust(PAGE, b"\0")
        if old == new:
            out += old
            continue
        if mode == "prefix":
            out += new if page < cut else old
            continue
        roll = rng.random()
        if mode == "pages" or roll < 0.6:
            out += new if rng.random() < 0.5 else old
        elif roll < 0.8 or start < len(synced):  # torn: some sectors written, others not
            for sector in range(0, PAGE, SECTOR):
                source = new if rng.random() < 0.5 else old
                out += source[sector : sector + SECTOR]
        else:  # past the synced size: the size reached the disk, the data did not
            out += bytes(PAGE)
    return bytes(out[:size]).ljust(size, b"\0")


def power_loss_image(
    root: str,
    state: str,
    image: str,
    rng: random.Random,
    *,
    pages: str = "torn",
    names: str = "subset",
) -> None:
    """Write into the new directory ``image`` what a power loss leaves of ``root``.

    ``pages`` (one of :data:`PAGE_MODES`, or ``mixed`` for a mode per file)
    and ``names`` (one of :data:`NAME_MODES`) choose how unsynced bytes and
    directory entries fare.
    """
    namespace = _replay(state)
    os.makedirs(image)

    def build(directory: str) -> None:
        for name, (what, number) in sorted(
            _surviving_entries(namespace, directory, rng, names).items()
        ):
            relative = os.path.join(directory, name) if directory != "." else name
            target = os.path.join(image, relative)
            if what == "dir":
                os.makedirs(target, exist_ok=True)
                if relative in namespace.durable:
                    build(relative)
                continue
            synced = _read(os.path.join(state, "images", str(number))) or b""
            current = _current_bytes(root, state, namespace, number)
            mode = rng.choice(PAGE_MODES) if pages == "mixed" else pages
            with open(target, "wb") as file:
                file.write(surviving_bytes(synced, current, rng, mode))

    build(".")


def copy_tree(source: str, target: str) -> None:
    """A plain copy of a directory tree (for loads that must not change the image)."""
    shutil.copytree(source, target)
