"""The values files of an indexed file: which are live, reads, appends, GC copies.

An indexed file's directory holds numbered values files ``values.<number>``
(see ``values``); index entries name the file their value is in. One file,
the *target* (the highest number), takes appends; the others are read-only.

A GC copies the values it keeps into a new file flagged ``GC_COPY`` (number
C) while appends go to a new target (number C + 1). It commits by merging the
index into a data file whose tag is C: the *floor*. Files below the floor are
then dead, and deleted. So, at a writer's load, with the floor F read from
the index's data file:

- files numbered below F are dead: an interrupted deletion of a committed GC;
- files above F flagged ``GC_COPY`` are uncommitted GC copies: deleted;
- ``values.<n>.tmp`` files are files cut short while being created: deleted;
- every other file is live; the highest one is the target.

Before any GC the floor is 0 and ``values.00000000`` is the only file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable

from ..errors import CannotLoadStore, CannotReadFromStore
from . import filesystem
from .framing import CRC_RESIDUE, HEADER_SIZE, Expected, crc32
from .values import GC_COPY, LENGTH, POINTER, RECORD_OVERHEAD, ValuesFile

logger = logging.getLogger("l2_stores.indexed_file")

_NAME = re.compile(r"values\.(\d{8,})(\.tmp)?\Z")


def values_name(number: int) -> str:
    """File name of the values file ``number``."""
    return f"values.{number:08d}"


def list_values(directory: str) -> tuple[list[int], list[str]]:
    """Numbers of the values files in ``directory``, ascending, and leftover temporaries."""
    numbers: list[int] = []
    temporaries: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return numbers, temporaries
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        if match.group(2):
            temporaries.append(name)
        else:
            numbers.append(int(match.group(1)))
    numbers.sort()
    return numbers, temporaries


def record_readable(fd: int, key: bytes, entry: bytes) -> bool:
    """Whether the record an index ``entry`` of ``key`` points at in file ``fd`` is whole."""
    offset, length, _ = POINTER.unpack_from(entry)
    size = RECORD_OVERHEAD + len(key) + length
    record = os.pread(fd, size, offset)
    return (
        len(record) == size
        and crc32(record) == CRC_RESIDUE
        and LENGTH.unpack_from(record)[0] == length
        and record[LENGTH.size : LENGTH.size + len(key)] == key
    )


class ValuesOnDisk:
    """The values files of a directory as the index engine sees them (``ReferencedValues``).

    It opens the files itself, by name, so that it serves the engine before
    the store has opened them (a load) and beside it (merges, close).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._open: dict[int, int] = {}

    def sync(self) -> None:
        """Fsync every values file (a clean file costs little), then their directory.

        The names too: a process killed between a values file's rename and
        its directory's fsync leaves a name the next process would otherwise
        never make durable.
        """
        for number in list_values(self.directory)[0]:
            try:
                fd = os.open(os.path.join(self.directory, values_name(number)), os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted by a GC meanwhile
            try:
                filesystem.fsync(fd)
            finally:
                os.close(fd)
        filesystem.fsync_directory(self.directory)

    def readable(self, key: bytes, value: bytes) -> bool:
        """Whether the value of the index entry ``value`` reads back whole."""
        _, _, number = POINTER.unpack_from(value)
        fd = self._open.get(number)
        if fd is None:
            try:
                fd = os.open(os.path.join(self.directory, values_name(number)), os.O_RDONLY)
            except FileNotFoundError:
                return False
            self._open[number] = fd
        return record_readable(fd, key, value)

    def release(self) -> None:
        """Close the files :meth:`readable` opened."""
        opened, self._open = self._open, {}
        for fd in opened.values():
            os.close(fd)


class ValueFiles:
    """The live values files of one indexed file."""

    def __init__(
        self, directory: str, expected: Expected, *, readonly: bool, fsync: bool, floor: int
    ) -> None:
        self.directory = directory
        self._expected = expected
        self._name = expected.name
        self._readonly = readonly
        self._fsync = fsync
        self.floor = floor
        self._files: dict[int, ValuesFile] = {}
        self._open_lock = threading.Lock()
        self._target: ValuesFile | None = None
        self._follower: Callable[[ValuesFile], object] | None = None
        #: The target at the load, and its size then (see ``bytes_written``).
        self._loaded: tuple[int, int] = (-1, 0)
        #: What ``bytes_written`` counted of the files a GC deleted since.
        self._retired = 0
        try:
            if readonly:
                self.refresh(floor)
            else:
                self._open_writer()
        except BaseException:
            self.close()
            raise

    # -- opening

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, values_name(number))

    def _open(self, number: int, *, flags: int = 0) -> ValuesFile:
        return ValuesFile(
            self._path(number),
            self._expected,
            readonly=self._readonly,
            fsync=self._fsync,
            number=number,
            flags=flags,
        )

    def _open_writer(self) -> None:
        numbers, temporaries = list_values(self.directory)
        for name in temporaries:
            self._delete(name)
        if self.floor and self.floor not in numbers:
            raise CannotLoadStore(
                f"{values_name(self.floor)}, which the index points into, is missing",
                name=self._name,
                path=self.directory,
            )
        for number in numbers:
            if number < self.floor:
                self._delete(values_name(number))
                continue
            file = self._open(number)
            if file.flags & GC_COPY and number != self.floor:
                file.close()
                self._delete(values_name(number))
                continue
            self._files[number] = file
        if not self._files:
            self._files[0] = self._open(0)
        last = max(self._files)
        if self._files[last].flags & GC_COPY:
            self._files[last + 1] = self._open(last + 1)
        self._retarget(self._files[max(self._files)])
        number = max(self._files)
        self._loaded = (number, os.path.getsize(self._path(number)))

    def bytes_written(self) -> int:
        """The bytes appended to the values files since the load (GC copies included)."""
        return self._retired + sum(
            self._growth(number) for number in list_values(self.directory)[0]
        )

    def _growth(self, number: int) -> int:
        """The bytes values file ``number`` gained since the load (0 if older, or gone)."""
        loaded, size_then = self._loaded
        if loaded < 0 or number < loaded:
            return 0
        try:
            size = os.path.getsize(self._path(number))
        except FileNotFoundError:
            return 0
        return size - size_then if number == loaded else size

    @property
    def target(self) -> ValuesFile | None:
        """The file appends go to (None when read-only)."""
        return self._target

    def follow_target(self, follower: Callable[[ValuesFile], object]) -> None:
        """Hand ``follower`` the target now and each time it changes (one follower)."""
        self._follower = follower
        if self._target is not None:
            follower(self._target)

    def _retarget(self, target: ValuesFile) -> None:
        self._target = target
        if self._follower is not None:
            self._follower(target)

    def _delete(self, name: str) -> None:
        logger.info("%s: deleting %s, left by an interrupted GC", self._name, name)
        with contextlib.suppress(FileNotFoundError):
            filesystem.unlink(os.path.join(self.directory, name))

    def refresh(self, floor: int) -> None:
        """Read-only: open the live files not yet open, forget the dead ones.

        A forgotten file is closed when the last snapshot reading it lets
        it go (``ValuesFile.__del__``).
        """
        self.floor = floor
        numbers, _ = list_values(self.directory)
        with self._open_lock:
            for number in [n for n in self._files if n < floor]:
                del self._files[number]
            for number in numbers:
                if number >= floor and number not in self._files:
                    with contextlib.suppress(FileNotFoundError):
                        self._files[number] = self._open_existing(number)

    def _open_existing(self, number: int) -> ValuesFile:
        file = self._open(number)
        if not file.opened:  # a read-only open of a file gone meanwhile
            file.close()
            raise FileNotFoundError(self._path(number))
        return file

    @property
    def has_values(self) -> bool:
        """True when any file holds a record."""
        return any(file.end > HEADER_SIZE for file in self._files.values())

    @property
    def numbers(self) -> list[int]:
        """Numbers of the open files, ascending."""
        return sorted(self._files)

    # -- reading and writing

    def read(self, number: int, offset: int, length: int, key: bytes) -> bytes:
        """The value of ``length`` bytes recorded for ``key`` in file ``number`` at ``offset``."""
        file = self._files.get(number)
        if file is None:
            file = self._file_for_read(number, offset)
        return file.read(offset, length, key)

    def pin(self) -> dict[int, ValuesFile]:
        """The files open now, for a snapshot that must read them after a GC deleted them."""
        with self._open_lock:
            return dict(self._files)

    def read_pinned(
        self, pinned: dict[int, ValuesFile], number: int, offset: int, length: int, key: bytes
    ) -> bytes:
        """Like :meth:`read`, from the files of :meth:`pin` first."""
        file = pinned.get(number)
        if file is None:
            return self.read(number, offset, length, key)
        return file.read(offset, length, key)

    def _file_for_read(self, number: int, offset: int) -> ValuesFile:
        if self._readonly:
            with self._open_lock:
                file = self._files.get(number)
                if file is None:
                    with contextlib.suppress(FileNotFoundError):
                        file = self._files[number] = self._open_existing(number)
            if file is not None:
                return file
        raise CannotReadFromStore(
            f"values file {values_name(number)} is missing (offset {offset})",
            name=self._name,
            path=self._path(number),
        )

    # -- GC

    def begin_gc(self) -> int:
        """Make a new target for the appends of the GC's time; return the copy's number."""
        copy_number = max(self._files) + 1
        target = self._open(copy_number + 1)
        if self.target is not None:
            self.target.release_reserve()  # it takes no more appends
        self._files[target.number] = target
        self._retarget(target)
        return copy_number

    def create_copy(self, number: int) -> ValuesFile:
        """Create the GC copy file ``number``: unsynced appends, one fsync at the end."""
        file = ValuesFile(
            self._path(number),
            self._expected,
            readonly=False,
            fsync=False,
            number=number,
            flags=GC_COPY,
        )
        with self._open_lock:
            self._files[number] = file
        return file

    def drop_copy(self, number: int) -> None:
        """Forget and delete a GC copy that will not be committed."""
        with self._open_lock:
            file = self._files.pop(number, None)
        if file is not None:
            file.close()
        with contextlib.suppress(FileNotFoundError):
            filesystem.unlink(self._path(number))

    def commit(self, floor: int) -> int:
        """Delete the files below ``floor`` (the GC committed); return bytes freed.

        They are closed when the last snapshot reading them lets them go
        (``ValuesFile.__del__``).
        """
        self.floor = floor
        freed = 0
        with self._open_lock:
            dead = [self._files.pop(n) for n in sorted(self._files) if n < floor]
        for file in dead:
            freed += file.end
            self._retired += self._growth(file.number)
            with contextlib.suppress(FileNotFoundError):
                filesystem.unlink(file.path)
        if dead:
            with contextlib.suppress(OSError):
                filesystem.fsync_directory(self.directory)
        return freed

    def close(self) -> None:
        """Close every file."""
        with self._open_lock:
            files, self._files = list(self._files.values()), {}
        for file in files:
            file.close()
