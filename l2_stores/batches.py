"""Atomic batches across stores (API.md, "Atomic batches across stores").

A batch holds its writes, one dict per store, until it commits. A commit
writes every store's part into one record of a batch journal
(``engine.journal``): that record is the commit point. Each store then ends
its part in its files, then binds it in memory. The commit holds every
store's exclusive section throughout, and keeps each store's readers out
only while it makes room for its part and while the stores bind their
parts (see ``doc/design.md``). A store that
loads after a crash takes from the journal the parts it lacks, and drops a
part that a power loss left in its log without the journal's record (see
``doc/design.md``, "Batches").

The stores of a batch share a journal for life: the first batch of a store
links it (a link file beside its files) to the journal of its partners, or
to a new one in the directory that holds them all. One process commits to
a journal at a time (it holds the journal's lock while any linked store is
loaded ``READ_WRITE`` in it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol

from .engine.hooks import Hooks
from .engine.journal import Journal, Link, Part, read_link, read_records, write_link
from .errors import (
    CannotLoadStore,
    CannotReadFromStore,
    CannotWriteToStore,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)

logger = logging.getLogger("l2_stores.batches")

#: The journal directory a first batch creates in the directory that holds its stores.
JOURNAL_DIRECTORY = "l2_stores.journal"

#: Why a store that missed its part of a committed batch refuses writes.
MISSED_PART = "the store missed its part of a committed batch: load it again"


class Member(Protocol):
    """What a store kind gives the batches (``EngineStore`` and its kinds implement it)."""

    @property
    def name(self) -> str:
        """The store's name."""

    @property
    def path(self) -> str:
        """The store's path."""

    def _link_path(self) -> str:
        """Where the store's link file is."""

    def _part_count(self) -> int:
        """The batch parts the store has taken."""

    def _durable_part_count(self) -> int:
        """The parts a power loss can no longer take from it."""

    def _batch_fsync(self) -> bool:
        """Whether the store's writes are fsynced (its batches' commits are then)."""

    def _checkpoint(self) -> None:
        """Make durable in the store's own files the parts only the journal holds."""

    def _take_part(self, data: bytes) -> None:
        """Take a committed part (encoded by the store's batch view), alone."""

    def _prepare_part(self, data: bytes) -> Any:
        """A part (encoded by the store's batch view), touching nothing yet: an
        ``engine.interface.Prepared``, whose steps run in the store's exclusive section."""

    def _before_exclusive(self) -> None:
        """Wait, before its exclusive section, until a write need not wait inside it."""

    def _refuse_writes(self, reason: str) -> None:
        """Raise CannotWriteToStore(``reason``) at every write from now on."""

    def _limit_parts(self, parts: int) -> bool:
        """``READ_ONLY``: show only the first ``parts`` parts; False when it cannot."""

    def _batch_view(self, batch: Batch) -> BatchView:
        """A view of the store that holds its writes for ``batch``."""

    def _join(self, membership: Membership) -> None:
        """Belong to ``membership``'s group from now on."""


class _Group:
    """A journal open in this process, and the loaded stores linked to it."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        #: Held through a commit: parts get their ordinals and go to the stores in order.
        self.commit_lock = threading.Lock()
        self.members: dict[int, weakref.ref[Any]] = {}
        #: The journal's rotations when the group last trimmed it.
        self.trimmed_at = 0
        #: The durable parts of members, recorded when they close.
        self.durable: dict[int, int] = {}
        self.users = 0

    def checkpoint(self) -> None:
        """Have the members hold durably the parts only the journal holds (singletons)."""
        for ref in list(self.members.values()):
            store = ref()
            if store is not None:
                store._checkpoint()

    def durable_parts(self) -> dict[int, int]:
        """What each linked store known here holds durably (for ``Journal.trim``)."""
        known = dict(self.durable)
        for participant, ref in list(self.members.items()):
            store = ref()
            if store is not None:
                known[participant] = store._durable_part_count()
        return known


_groups: dict[str, _Group] = {}
_groups_lock = threading.RLock()


def _open_group(directory: str, *, create: bool) -> _Group:
    key = os.path.realpath(directory)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            group = _groups[key] = _Group(Journal(directory, create=create))
        group.users += 1
        return group


def _open_free_group(parent: str) -> _Group:
    """A journal in ``parent`` for stores that have none: ``l2_stores.journal``, or, when
    another process holds that one, the first of ``l2_stores.journal.2``, ... it can."""
    for number in range(1, 100):
        name = JOURNAL_DIRECTORY if number == 1 else f"{JOURNAL_DIRECTORY}.{number}"
        try:
            return _open_group(os.path.join(parent, name), create=True)
        except StoreLockedError:
            continue
    raise StoreLockedError("every batch journal here is held by another process", path=parent)


def _release_group(group: _Group) -> None:
    with _groups_lock:  # held to the close: a load meanwhile waits, then opens it again
        group.users -= 1
        if group.users > 0:
            return
        for key, open_group in list(_groups.items()):
            if open_group is group:
                del _groups[key]
        try:
            group.journal.trim(group.durable_parts())
        except OSError:
            logger.warning(
                "cannot trim the batch journal %s", group.journal.directory, exc_info=True
            )
        group.journal.close()


class Membership:
    """A loaded store's place in its journal's group."""

    def __init__(self, group: _Group, link: Link, known: dict[int, bytes]) -> None:
        self.group = group
        self.link = link
        #: The store could not take the part of a committed batch: until it is loaded
        #: again (and takes it from the journal), it takes no batch.
        self.missed = False
        self._known: dict[int, bytes] | None = known

    @property
    def participant(self) -> int:
        """The store's id in the journal."""
        return self.link.participant

    def miss(self, store: Member) -> None:
        """The store could not take the part of a committed batch, which the journal
        holds: it refuses every write until it is loaded again (its load takes the part;
        a later write would come before it then, and lose to it)."""
        self.missed = True
        store._refuse_writes(MISSED_PART)

    def committed(self, ordinal: int) -> bool:
        """Whether the journal holds the store's part ``ordinal`` (at load)."""
        return self._known is not None and ordinal in self._known

    def catch_up(self, store: Member) -> None:
        """Take the parts the journal holds and the store lacks, in order (at load)."""
        known, self._known = self._known or {}, None
        for ordinal in sorted(known):
            have = store._part_count()
            if ordinal <= have:
                continue
            if ordinal != have + 1:
                raise CannotLoadStore(
                    f"the batch journal {self.group.journal.directory} holds part {ordinal} "
                    f"of this store, which holds {have}: parts are missing",
                    name=store.name,
                    path=store.path,
                )
            store._take_part(known[ordinal])
        self.group.members[self.participant] = weakref.ref(store)

    def abandon(self) -> None:
        """The store's load failed: let go of the journal."""
        _release_group(self.group)

    def leave(self, store: Member) -> None:
        """The store closed: remember what it holds durably; let go of the journal."""
        self.group.members.pop(self.participant, None)
        self.group.durable[self.participant] = store._durable_part_count()
        _release_group(self.group)

    def sync_journal(self) -> None:
        """Make the journal durable (before the store makes its parts durable)."""
        self.group.journal.sync()


def attach(link_path: str, name: str, store_path: str) -> Membership | None:
    """At a ``READ_WRITE`` load: the membership of the store whose link file is
    ``link_path`` (its journal opened), or None when it has none or its journal is gone."""
    link = read_link(link_path, name)
    if link is None:
        return None
    directory = link.journal_directory()
    if directory is None:
        logger.warning(
            "%s: the batch journal %s is gone (moved or deleted); loading %s without it",
            name,
            link.absolute,
            store_path,
        )
        return None
    group = _open_group(directory, create=False)
    try:
        if group.journal.id != link.journal_id:
            raise CannotLoadStore(
                f"linked to batch journal {link.journal_id:#x}, {directory} is journal "
                f"{group.journal.id:#x}",
                name=name,
                path=store_path,
            )
        return Membership(group, link, group.journal.parts_of(link.participant))
    except BaseException:
        _release_group(group)
        raise


class Retirements:
    """The journals of stores about to be replaced, opened (and so locked) up front; once
    the stores are replaced, ``retire`` retires them (see ``retire``)."""

    def __init__(self, links: Sequence[tuple[str, str]]) -> None:
        """``links``: each store's link file and name."""
        self._held: list[tuple[_Group, Link]] = []
        try:
            for path, name in links:
                link = read_link(path, name)
                directory = None if link is None else link.journal_directory()
                if link is not None and directory is not None:
                    self._held.append((_open_group(directory, create=False), link))
        except BaseException:
            self.release()
            raise

    def retire(self) -> None:
        """Retire every store: gone for good, whatever the journals still hold of them."""
        for group, link in self._held:
            _retire_from(group, link, 0)

    def release(self) -> None:
        """Let go of the journals."""
        held, self._held = self._held, []
        for group, _ in held:
            _release_group(group)


def retire(link_path: str, name: str, store_path: str, parts: int) -> None:
    """Retire the store whose link file is ``link_path`` from its journal (it took
    ``parts`` parts and its files hold them durably; it will take no more), if linked."""
    link = read_link(link_path, name)
    if link is None:
        return
    directory = link.journal_directory()
    if directory is None:
        return  # its journal is gone: nothing keeps its records
    group = _open_group(directory, create=False)
    try:
        _retire_from(group, link, parts)
    finally:
        _release_group(group)


def _retire_from(group: _Group, link: Link, parts: int) -> None:
    """Retire the store of ``link`` from the journal of ``group`` if it is the one it names:
    gone for good, so what the journal holds of it need not be kept either (a singleton's
    file may lag the parts the journal holds, after a kill), nor ``parts`` it took."""
    if group.journal.id == link.journal_id:
        held = max(group.journal.parts_of(link.participant), default=0)
        group.journal.retire(link.participant, max(parts, held))


# ------------------------------------------------------------------- batches


class BatchView:
    """A store's face inside a batch: its writes held, its reads over them."""

    def __init__(self, batch: Batch, store: Any) -> None:
        self._batch = batch
        self._store = store

    def _check_open(self) -> None:
        self._batch._check_open(self._store)

    def _has_writes(self) -> bool:
        raise NotImplementedError

    def _encode_part(self) -> bytes:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<batch view of {self._store!r}>"


def _journal_of(stores: Sequence[Any]) -> _Group | None:
    """The group of the journal the stores linked to one have (None: none has one);
    ValueError when they have several."""
    groups = {id(store._batch.group): store._batch.group for store in stores if store._batch}
    if len(groups) > 1:
        raise ValueError(
            "stores linked to different batch journals cannot share a batch: "
            + ", ".join(
                f"{store.name} ({store._batch.group.journal.directory})"
                for store in stores
                if store._batch is not None
            )
        )
    return next(iter(groups.values()), None)


def _place(store: Member) -> str:
    """The directory that holds a store (its directory's parent, or its file's)."""
    return os.path.dirname(os.path.abspath(store.path))


class Batch:
    """Writes to several stores, held until one atomic commit (see :func:`batch`)."""

    def __init__(self, stores: Sequence[Any]) -> None:
        if not stores:
            raise ValueError("a batch needs at least one store")
        seen: set[int] = set()
        for store in stores:
            if id(store) in seen:
                raise ValueError(f"store given twice to one batch: {store!r}")
            seen.add(id(store))
        for store in stores:
            if not hasattr(store, "_batch_view"):
                raise TypeError(f"not a store that batches support yet: {store!r}")
            store._check_open()
            store._check_writable("write in a batch")
        _journal_of(stores)
        self._stores = tuple(stores)
        self._state = "open"
        #: Named points of the commit where tests step in (``part_written``,
        #: ``journal_written``, ``part_ended``, ``part_taken``; see ``engine.hooks``).
        self.hooks = Hooks()
        #: One batch view per store, in the order given.
        self.views: tuple[Any, ...] = tuple(store._batch_view(self) for store in stores)

    def _check_open(self, store: Any = None) -> None:
        if self._state != "open":
            name = store.name if store is not None else "batch"
            path = store.path if store is not None else None
            raise StoreClosedError(f"batch already {self._state}", name=name, path=path)

    def __enter__(self) -> tuple[Any, ...]:
        self._check_open()
        return self.views

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def rollback(self) -> None:
        """Drop every write of the batch; its views close."""
        self._check_open()
        self._state = "rolled back"

    def commit(self) -> None:
        """Write every store's part at once: all of them, or none (see the module)."""
        self._check_open()
        writing = [view for view in self.views if view._has_writes()]
        if not writing:
            self._state = "committed"
            return
        stores = [view._store for view in writing]
        for store in stores:
            store._check_open()
        group = self._link(stores)
        with group.commit_lock:
            parts = [
                Part(store._batch.participant, store._part_count() + 1, view._encode_part())
                for view, store in zip(writing, stores, strict=True)
            ]
            fsync = any(store._batch_fsync() for store in stores)
            for store in stores:
                store._before_exclusive()
            ready = [
                store._prepare_part(part.data) for store, part in zip(stores, parts, strict=True)
            ]
            with contextlib.ExitStack() as sections:
                let_in: list[Any] = []  # each store's waiter if it let its readers in
                for store, prepared in zip(stores, ready, strict=True):
                    # Every store's writers out until it took its part; its readers out
                    # only while it makes room for it, and while the stores take theirs.
                    waiter = store._waiter
                    sections.enter_context(waiter.force_idle())
                    store._check_open()
                    prepared.make_room()
                    let_in.append(waiter if waiter.let_tasks_in() else None)  # (False: nested)
                self._commit(group, stores, parts, ready, let_in, fsync)
            if group.journal.rotations != group.trimmed_at:  # a segment just ended
                group.trimmed_at = group.journal.rotations
                try:  # the batch is committed: what follows only frees space
                    group.checkpoint()
                    group.journal.trim(group.durable_parts())
                except (OSError, StoreError):
                    logger.warning("cannot trim the batch journal", exc_info=True)

    def _commit(
        self,
        group: _Group,
        stores: Sequence[Any],
        parts: Sequence[Part],
        ready: Sequence[Any],
        let_in: Sequence[Any],
        fsync: bool,
    ) -> None:
        """Write the parts, then the journal's record (the commit point), then the parts'
        ends, with the stores' readers let in (nothing they read changes: only the files
        do); then keep every store's readers out while the stores bind their parts in
        memory."""
        written: list[Any] = []
        try:
            for prepared in ready:
                written.append(prepared)  # first: an interrupt just after its write takes it back
                prepared.write()
                self.hooks.run("part_written")
            group.journal.append(parts, fsync=fsync)  # the commit point
        except BaseException:
            self._take_back(written)
            raise
        self._state = "committed"
        ended: list[Any] = []  # each store's part once its end is written (None: failed)
        taken = 0
        failed: tuple[Any, BaseException] | None = None
        try:
            self.hooks.run("journal_written")
            for store, prepared in zip(stores, written, strict=True):
                try:
                    prepared.end()
                except (OSError, StoreError) as error:
                    # Committed: the store's next load takes the part from the journal. Until
                    # then it takes no write (see Membership.miss).
                    store._batch.miss(store)
                    failed = failed or (store, error)
                    ended.append(None)
                    continue
                ended.append(prepared)
                self.hooks.run("part_ended")
            # Every store's readers out until the last take (the sections end then): a
            # reader who saw the batch in one store sees it in any other it reads after.
            for waiter in let_in:
                if waiter is not None:
                    waiter.keep_tasks_out()
            for prepared in ended:
                if prepared is not None:
                    prepared.take()
                    self.hooks.run("part_taken")
                taken += 1
        except BaseException:
            # Interrupted after the commit point (Ctrl-C while the readers drain): the
            # stores that did not take their part take it from the journal at their next
            # load (marked first: a second interrupt may come during what follows), and,
            # as for an EIO, a part without its end is taken back from the log.
            for store in stores[taken:]:
                store._batch.miss(store)
            self._take_back(written[len(ended) :])
            raise
        if failed is not None:
            missed, cause = failed
            raise CannotWriteToStore(
                f"the batch is committed, but the store could not take its part now "
                f"({cause}): load it again to take it (it refuses writes until then)",
                name=missed.name,
                path=missed.path,
            ) from cause

    @staticmethod
    def _take_back(prepared: Sequence[Any]) -> None:
        """Cancel the parts written before the commit point gave up."""
        for written in prepared:
            try:
                written.cancel()
            except (OSError, StoreError):
                logger.exception("a batch's part could not be taken back")

    def _link(self, stores: Sequence[Any]) -> _Group:
        """The group of the batch's journal, every store linked to it (once, durably)."""
        first: Membership | None = stores[0]._batch
        if first is not None and all(  # the common case: linked already, to one journal
            store._batch is not None
            and store._batch.group is first.group
            and not store._batch.missed
            for store in stores
        ):
            return first.group  # (held by its members)
        with _groups_lock:
            group = _journal_of(stores)  # again: a commit meanwhile may have linked one
            for store in stores:
                if store._batch is not None and store._batch.missed:
                    raise CannotWriteToStore(
                        MISSED_PART,
                        name=store.name,
                        path=store.path,
                    )
            if group is None:
                parent = os.path.commonpath([_place(store) for store in stores])
                group = _open_free_group(parent)
            else:
                group.users += 1
            try:
                for store in stores:
                    if store._batch is None:
                        link = write_link(store._link_path(), group.journal)
                        group.users += 1
                        membership = Membership(group, link, {})
                        membership.catch_up(store)
                        store._join(membership)
            finally:
                _release_group(group)  # this call's hold; the members hold it on
            return group


#: How long a READ_ONLY snapshot tries to cut its stores at a batch, when the parts to
#: hide keep being merged into runs, before it gives up.
SETTLE_SECONDS = 1.0


def synced_together(stores: Sequence[Any]) -> None:
    """Bring ``READ_ONLY`` stores up to date at one batch boundary: every batch whole in
    all of them or in none (see the design's "Batches")."""
    for store in stores:
        store.sync()
    by_journal: dict[str, list[tuple[Any, Link]]] = {}
    for store in stores:
        link = read_link(store._link_path(), store.name)
        directory = link.journal_directory() if link is not None else None
        if link is not None and directory is not None:
            by_journal.setdefault(directory, []).append((store, link))
    for directory, members in by_journal.items():
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            lagging = _cut_at_a_batch(directory, members)
            if not lagging:
                break
            if time.monotonic() > deadline:
                raise CannotReadFromStore(
                    "a batch stays half applied in these stores (the writer stopped in "
                    "its commit) and cannot be hidden (merged): a READ_WRITE load "
                    "completes it",
                    name=lagging[0].name,
                    path=lagging[0].path,
                )
            for store in lagging:
                store.sync()


def _cut_at_a_batch(directory: str, members: list[tuple[Any, Link]]) -> list[Any]:
    """End every store of ``members`` at the newest batch all of them show whole; the
    stores to sync again before trying again (none: done).

    A part in a run cannot be hidden: when a store holds in its runs a batch that
    another store does not show yet (it was synced earlier), that other store lags,
    and is synced again (the writer applied the batch's parts right after its record).
    """
    records = read_records(directory)  # after the syncs: it holds every part they show
    ordinals: dict[int, dict[int, int]] = {link.participant: {} for _, link in members}
    for record in records:
        for part in record.parts:
            if part.participant in ordinals:
                ordinals[part.participant][part.ordinal] = record.seq
    shown = {link.participant: store._part_count() for store, link in members}
    behind = [  # synced before the journal dropped records of parts it does not show
        store
        for store, link in members
        if ordinals[link.participant]
        and shown[link.participant] < min(ordinals[link.participant]) - 1
    ]
    if behind:
        return behind
    missing = [
        seq
        for participant, seqs in ordinals.items()
        for ordinal, seq in seqs.items()
        if ordinal > shown[participant]
    ]
    if not missing:
        return []  # every store shows every batch of the journal
    cut = min(missing) - 1  # the newest batch every store shows whole
    in_runs = max(
        ordinals[link.participant].get(store._durable_part_count(), 0) for store, link in members
    )
    if in_runs > cut:  # the stores that do not show a batch another holds in a run
        return [
            store
            for store, link in members
            if any(
                seq <= in_runs and ordinal > shown[link.participant]
                for ordinal, seq in ordinals[link.participant].items()
            )
        ]
    for store, link in members:
        seqs = ordinals[link.participant]
        older = min(seqs, default=shown[link.participant] + 1) - 1  # before the journal's
        limit = max((ordinal for ordinal, seq in seqs.items() if seq <= cut), default=older)
        if shown[link.participant] > limit and not store._limit_parts(limit):
            return [store]  # merged meanwhile: read it again
    return []


def latest_part(
    link_path: str, name: str, have: int, limit: int | None = None
) -> tuple[int, bytes] | None:
    """For a reader: the newest part (ordinal, bytes) the journal holds for the store whose
    link is ``link_path``, if newer than ``have`` (and at most ``limit``)."""
    link = read_link(link_path, name)
    directory = link.journal_directory() if link is not None else None
    if link is None or directory is None:
        return None
    newest = None
    for record in read_records(directory):
        for part in record.parts:
            if (
                part.participant == link.participant
                and part.ordinal > have
                and (limit is None or part.ordinal <= limit)
                and (newest is None or part.ordinal > newest[0])
            ):
                newest = (part.ordinal, part.data)
    return newest


@contextlib.contextmanager
def no_commit_running(stores: Sequence[Any]) -> Iterator[None]:
    """Hold back every commit to the journals of ``stores`` (none is half applied meanwhile)."""
    while True:
        with _groups_lock:
            groups = sorted(
                {
                    id(store._batch.group): store._batch.group for store in stores if store._batch
                }.items()
            )
        with contextlib.ExitStack() as held:
            for _, group in groups:
                held.enter_context(group.commit_lock)
            now = {id(store._batch.group) for store in stores if store._batch}
            if now == {key for key, _ in groups}:  # no store joined a journal meanwhile
                yield
                return


def batch(*stores: Any) -> Batch:
    """A batch over ``stores`` (open, ``READ_WRITE``, each once): ``with batch(a, b) as
    (a_view, b_view):`` commits on normal exit and rolls back on an exception."""
    return Batch(stores)


def iter_sorted_overlay(
    base: Iterator[tuple[bytes, bytes]],
    writes: dict[bytes, bytes | None],
    start: bytes | None,
    stop: bytes | None,
    reverse: bool,
) -> Iterator[tuple[bytes, bytes]]:
    """``base`` (encoded pairs in key order) with ``writes`` over it (None: removed)."""
    keys = sorted(
        key for key in writes if (start is None or key >= start) and (stop is None or key < stop)
    )
    if reverse:
        keys.reverse()
    position = 0

    def before(a: bytes, b: bytes) -> bool:
        return a > b if reverse else a < b

    for key, value in base:
        while position < len(keys) and before(keys[position], key):
            written = writes[keys[position]]
            if written is not None:
                yield keys[position], written
            position += 1
        if position < len(keys) and keys[position] == key:
            written = writes[key]
            position += 1
            if written is not None:
                yield key, written
            continue
        yield key, value
    for key in keys[position:]:
        written = writes[key]
        if written is not None:
            yield key, written
