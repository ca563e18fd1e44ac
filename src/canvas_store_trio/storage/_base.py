"""The ``Storage`` protocols every backend implements, and the in-memory backend.

A room calls ``load()`` once before it serves anyone, and ``save(snapshot)`` from its
saver task (throttled) and when it closes. A room never runs two saves of its own at
once. Backends may do blocking I/O only through ``trio.to_thread``.

A backend that can store a change without rewriting the whole document also implements
``save_changes(changes)`` (:class:`IncrementalStorage`); the room then hands it only the
keys written since the last save. Backends that only know whole snapshots (memory,
files, a user's own class) keep working unchanged.

A backend that can make a batch of edits durable quickly also implements
``commit(changes)`` (:class:`JournalStorage`): with durable acks on, a room acks an edit
only once a ``commit`` holding it has returned. Files append to a journal; the SQL
backends run one transaction for every room's pending edits.

A backend that keeps past versions of a room also implements
:class:`HistoryStorage`: with a history interval set, the room hands it the whole
document, encoded, at most once per interval while it changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from .._document import Changes, Snapshot

__all__ = [
    "CommitGroup",
    "HistoryStorage",
    "IncrementalStorage",
    "JournalStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
    "StreamingStorage",
    "VersionInfo",
    "take_parts",
]


class StorageError(Exception):
    """A backend could not read or write. The message says which room and why."""


@runtime_checkable
class Storage(Protocol):
    """Loads and saves one room's snapshot."""

    async def load(self) -> Snapshot | None:
        """The stored snapshot, or None for a room that was never saved.

        Raise (:class:`StorageError`, :class:`SnapshotError`, anything) when the data
        exists but cannot be read: the room then refuses to start instead of starting
        empty and overwriting it.
        """
        ...

    async def save(self, snapshot: Snapshot) -> None:
        """Store the whole snapshot. Raise on failure; the room keeps it and retries."""
        ...


@runtime_checkable
class IncrementalStorage(Storage, Protocol):
    """A storage that can also save just the keys that changed."""

    async def save_changes(self, changes: Changes) -> None:
        """Store the changed records and the room timestamp, all or nothing."""
        ...


@runtime_checkable
class JournalStorage(Storage, Protocol):
    """A storage that can make a batch of edits durable before anyone is told of them.

    With durable acks on, a room hands it, one call at a time, every change since the
    previous commit (what :meth:`Document.take_changes` gives: the room timestamp and
    each changed key's whole record and field timestamps), and sends the edits' acks
    and broadcasts only after the call returns.
    """

    async def commit(self, changes: Changes) -> None:
        """Make ``changes`` durable (fsynced, or a committed transaction), all or nothing.

        Raise on failure: the room then acks none of them. A caller cancelled midway
        has not been told whether they are durable; the room shields its commits.
        """
        ...


class CommitGroup(Protocol):
    """Commits several rooms' changes together: one transaction, one file sync.

    A :class:`JournalStorage` may name the group it shares with other rooms' storages
    as its ``commit_group`` attribute (a folder's writer, a database's group commit).
    With durable acks, the rooms of one group then commit in lockstep, one call for all
    of them at a time, with no task per room.
    """

    async def commit_many(self, commits: Sequence[tuple[Any, Changes]]) -> list[Exception | None]:
        """Make each ``(storage, changes)`` durable (the storages are this group's own),
        each all or nothing; return, in order, None for each that is durable and the
        error for each that is not. Cancelled midway, as :meth:`JournalStorage.commit`.
        """
        ...


@runtime_checkable
class StreamingStorage(Storage, Protocol):
    """A storage that can also take the snapshot already encoded, a piece at a time.

    The room then never copies its document: it encodes it straight from the live
    state, keeping aside only what changes meanwhile (:meth:`Document.encode_in_steps`).
    """

    async def save_encoded(self, parts: Iterable[bytes]) -> None:
        """Store the snapshot whose encoding (:func:`encode_snapshot_parts`'s format)
        ``parts`` yields. Take every part before returning, yielding to the event loop
        often enough that a big document never holds it for long (each part is encoded
        as it is taken); ``parts`` may not be used after this returns."""
        ...


@attrs.frozen
class VersionInfo:
    """One kept version of a room."""

    version: int
    """Its id: the room timestamp of the document it holds (ids only grow, as the
    room timestamp does)."""
    saved_at: datetime
    """When it was stored (UTC)."""


@runtime_checkable
class HistoryStorage(Storage, Protocol):
    """A storage that also keeps past versions of its room, each a whole snapshot.

    Versions live beside the room's snapshot and never change it: saving, listing and
    loading one touches only the history.
    """

    async def save_version(self, version: int, parts: Sequence[bytes], *, keep: int) -> None:
        """Store the snapshot whose encoding (:func:`encode_snapshot_parts`'s format) is
        ``parts`` as ``version`` (its room timestamp; one already kept under that id is
        replaced), durably and all or nothing, then drop the oldest versions beyond the
        ``keep`` newest. Raise on failure (the history is then as it was). Cancelled, the
        write still runs to its end; the caller only stops waiting."""
        ...

    async def list_versions(self) -> list[VersionInfo]:
        """Every kept version, oldest first (empty if none). Creates nothing."""
        ...

    async def load_version(self, version: int) -> Snapshot | None:
        """The snapshot kept as ``version``, or None if there is no such version.

        Raise (:class:`StorageError`, :class:`SnapshotError`) when it exists but cannot
        be read."""
        ...


@attrs.define
class MemoryStorage:
    """Keeps the snapshot in memory: for tests, demos and ``serve --memory``."""

    snapshot: Snapshot | None = None

    async def load(self) -> Snapshot | None:
        """The snapshot last saved, or None."""
        return self.snapshot

    async def save(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` (in memory only)."""
        self.snapshot = snapshot


YIELD_EVERY_BYTES = 32 * 1024
""":func:`take_parts` yields to the event loop each time this much more of an encoding
has been taken: after about every piece of a big document (a piece of 1000 keys is some
tens of KiB), not at all for a room of a hundred keys."""


async def take_parts(parts: Iterable[bytes]) -> list[bytes]:
    """Every part of an encoding (:meth:`Document.encode_in_steps`), taken on the event
    loop, yielding each :data:`YIELD_EVERY_BYTES`: a big document never holds the loop
    for long, and a small one costs no extra step. Cancelled, it stops taking."""
    taken = []
    unyielded = 0
    for part in parts:
        taken.append(part)
        unyielded += len(part)
        if unyielded >= YIELD_EVERY_BYTES:
            await trio.sleep(0)
            unyielded = 0
    return taken
