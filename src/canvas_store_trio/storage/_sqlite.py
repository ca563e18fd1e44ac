"""Rooms in one SQLite database file: :class:`SQLiteDatabase` and :class:`SQLiteStorage`.

One :class:`SQLiteDatabase` owns one connection to its file, shared by every room that
uses it. SQLite lets one writer in at a time anyway, so the database runs every
operation in a worker thread, one at a time and in the order they were asked for (a
``trio.CapacityLimiter`` of 1). Writes are transactions (``BEGIN IMMEDIATE`` ...
``COMMIT``) in WAL mode with ``synchronous=FULL``: a save is on disk when it returns, and
a reader, or a crash at any point, sees the previous save or the new one, never half.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from .._document import Snapshot
from ._base import StorageError, VersionInfo
from ._sql import (
    HISTORY_TABLE,
    MIGRATIONS_TABLE,
    RECORDS_TABLE,
    ROOMS_TABLE,
    GroupCommit,
    RoomChanges,
    SQLRoomWrites,
    change_rows,
    pending_migrations,
    snapshot_from_rows,
    snapshot_rows,
    version_snapshot,
)

__all__ = ["SQLiteDatabase", "SQLiteStorage"]

T = TypeVar("T")

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_UPSERT_ROOM = (
    f"INSERT INTO {ROOMS_TABLE} (id, timestamp, updated_at) VALUES (?, ?, {_NOW}) "
    "ON CONFLICT (id) DO UPDATE SET timestamp = excluded.timestamp, "
    "updated_at = excluded.updated_at"
)
_UPSERT_RECORD = (
    f"INSERT INTO {RECORDS_TABLE} (room, key, record, timestamps) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (room, key) DO UPDATE SET record = excluded.record, "
    "timestamps = excluded.timestamps"
)
_INSERT_RECORD = f"INSERT INTO {RECORDS_TABLE} (room, key, record, timestamps) VALUES (?, ?, ?, ?)"
_UPSERT_VERSION = (
    f"INSERT INTO {HISTORY_TABLE} (room, version, saved_at, snapshot) VALUES (?, ?, {_NOW}, ?) "
    "ON CONFLICT (room, version) DO UPDATE SET saved_at = excluded.saved_at, "
    "snapshot = excluded.snapshot"
)
_PRUNE_VERSIONS = (
    f"DELETE FROM {HISTORY_TABLE} WHERE room = ? AND version NOT IN "
    f"(SELECT version FROM {HISTORY_TABLE} WHERE room = ? ORDER BY version DESC LIMIT ?)"
)


def _commit(conn: sqlite3.Connection) -> None:
    """Commit the open transaction. (A module function, so a crash test can replace it.)"""
    conn.execute("COMMIT")


@attrs.define(eq=False)
class SQLiteDatabase:
    """A SQLite database file holding any number of rooms.

    ``SQLiteDatabase("rooms.db")`` opens nothing yet: the file (and its folder) is
    created, and the schema migrated, on first use. :meth:`create_storage` gives the
    :class:`~canvas_store_trio.Storage` for one room; pass it as a room's
    ``create_storage``. Call :meth:`aclose` (or use ``async with``) when the rooms are
    closed. ``path`` may be ``":memory:"`` for a private in-memory database.

    ``synchronous="NORMAL"`` trades the last commits on power loss (never on a process
    crash) for fewer fsyncs. ``busy_timeout`` is how long to wait for another process
    that holds the write lock (for example an ``import`` run while the server runs).
    """

    path: str = attrs.field(converter=str)
    busy_timeout: float = 5.0
    synchronous: str = attrs.field(
        default="FULL", validator=attrs.validators.in_(("FULL", "NORMAL", "EXTRA"))
    )
    _conn: sqlite3.Connection | None = attrs.field(default=None, init=False, repr=False)
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False, repr=False
    )
    _closed: bool = attrs.field(default=False, init=False, repr=False)
    group_commit: GroupCommit = attrs.field(init=False, repr=False)
    """Where the rooms' durable-ack commits meet, to share transactions."""

    @group_commit.default
    def _default_group_commit(self) -> GroupCommit:
        return GroupCommit(self.write_changes)

    def create_storage(self, room_id: str) -> SQLiteStorage:
        """The storage for one room in this database."""
        return SQLiteStorage(self, room_id)

    async def list_room_ids(self) -> list[str]:
        """Every room saved in this database, sorted."""

        def query(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(f"SELECT id FROM {ROOMS_TABLE} ORDER BY id").fetchall()
            return [row[0] for row in rows]

        return await self._run(query, "cannot list rooms")

    async def aclose(self) -> None:
        """Close the connection. Waits for an operation in progress; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    async def __aenter__(self) -> SQLiteDatabase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __str__(self) -> str:
        return f"SQLite database {self.path}"

    async def write_changes(self, batch: list[RoomChanges]) -> None:
        """Upsert the changed records and timestamps of some rooms, in one transaction."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            for room_id, changes in batch:
                conn.execute(_UPSERT_ROOM, (room_id, changes.timestamp))
                conn.executemany(_UPSERT_RECORD, _with_room(room_id, change_rows(changes)))
            _commit(conn)

        rooms = ", ".join(repr(room_id) for room_id, _ in batch[:3])
        more = f" and {len(batch) - 3} more" if len(batch) > 3 else ""
        await self._run(write, f"cannot save room{'s' if len(batch) > 1 else ''} {rooms}{more}")

    # --- worker-thread side -----------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        """Run ``fn(connection)`` in a worker thread, after every earlier operation.

        Not abandoned on cancellation: a cancelled caller waits for the thread, so a
        transaction is always committed or rolled back before the caller moves on.
        """
        if self._closed:
            raise StorageError(f"{self}: {what}: the database is closed")
        return await trio.to_thread.run_sync(self._call, fn, what, limiter=self._limiter)

    def _call(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        if self._closed and self._conn is None:  # never reopen after aclose()
            raise StorageError(f"{self}: {what}: the database is closed")
        conn = self._connection()
        try:
            return fn(conn)
        except (sqlite3.Error, UnicodeError) as exc:
            self._rollback(conn)
            raise StorageError(f"{self}: {what}: {exc}") from None
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is in an unknown state; start over with a new one.
            # (SQLite itself rolls back an unfinished transaction when it reopens.)
            self._close_sync()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            if self.path != ":memory:" and not self.path.startswith("file:"):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN and COMMIT ourselves
                check_same_thread=False,  # used from worker threads, one at a time
                uri=self.path.startswith("file:"),
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open {self}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open {self}: {exc}") from None
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            "version INTEGER NOT NULL PRIMARY KEY, description TEXT NOT NULL, "
            "applied_at TEXT NOT NULL)"
        )
        (current,) = conn.execute(
            f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
        ).fetchone()
        for migration in pending_migrations(current, str(self)):
            for statement in migration.sqlite:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, description, applied_at) "
                f"VALUES (?, ?, {_NOW})",
                (migration.version, migration.description),
            )
        conn.execute("COMMIT")

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@attrs.define(eq=False)
class SQLiteStorage(SQLRoomWrites):
    """One room's snapshot in a :class:`SQLiteDatabase`; an incremental storage.

    :meth:`save` replaces the room's rows; :meth:`save_changes` upserts only the keys
    that changed and the room timestamp. Either is one transaction. :meth:`commit` (for
    durable acks) is :meth:`save_changes` sharing a transaction with other rooms. Its
    versions (:class:`~canvas_store_trio.HistoryStorage`) are rows of
    ``canvas_store_history``; :meth:`save_version` writes one and prunes in one
    transaction.
    """

    database: SQLiteDatabase
    room_id: str

    async def load(self) -> Snapshot | None:
        """The room's snapshot from the database, or None if it was never saved."""
        room_id, where = self.room_id, f"room {self.room_id!r} in {self.database}"

        def load(conn: sqlite3.Connection) -> Snapshot | None:
            conn.execute("BEGIN")  # one read snapshot for both queries
            row = conn.execute(
                f"SELECT timestamp FROM {ROOMS_TABLE} WHERE id = ?", (room_id,)
            ).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None
            rows = conn.execute(
                f"SELECT key, record, timestamps FROM {RECORDS_TABLE} WHERE room = ? ORDER BY key",
                (room_id,),
            ).fetchall()
            conn.execute("COMMIT")
            return snapshot_from_rows(row[0], rows, where)

        return await self.database._run(load, f"cannot load room {room_id!r}")

    async def save(self, snapshot: Snapshot) -> None:
        """Replace the room's rows with ``snapshot``, in one transaction."""
        room_id = self.room_id

        def save(conn: sqlite3.Connection) -> None:
            rows = snapshot_rows(snapshot)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_UPSERT_ROOM, (room_id, snapshot.timestamp))
            conn.execute(f"DELETE FROM {RECORDS_TABLE} WHERE room = ?", (room_id,))
            conn.executemany(_INSERT_RECORD, _with_room(room_id, rows))
            _commit(conn)

        await self.database._run(save, f"cannot save room {room_id!r}")

    async def save_version(self, version: int, parts: Sequence[bytes], *, keep: int) -> None:
        """Store the encoded snapshot ``parts`` as ``version`` of the room (replacing one
        with that id) and drop all but its ``keep`` newest versions, in one transaction."""
        room_id = self.room_id

        def save(conn: sqlite3.Connection) -> None:
            data = b"".join(parts)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_UPSERT_VERSION, (room_id, version, data))
            conn.execute(_PRUNE_VERSIONS, (room_id, room_id, keep))
            _commit(conn)

        await self.database._run(save, f"cannot keep version {version} of room {room_id!r}")

    async def list_versions(self) -> list[VersionInfo]:
        """The room's versions, oldest first."""
        room_id = self.room_id

        def query(conn: sqlite3.Connection) -> list[VersionInfo]:
            rows = conn.execute(
                f"SELECT version, saved_at FROM {HISTORY_TABLE} WHERE room = ? ORDER BY version",
                (room_id,),
            ).fetchall()
            return [VersionInfo(version, datetime.fromisoformat(at)) for version, at in rows]

        return await self.database._run(query, f"cannot list the versions of room {room_id!r}")

    async def load_version(self, version: int) -> Snapshot | None:
        """The snapshot kept as ``version``, or None if the room keeps no such version."""
        room_id = self.room_id
        where = f"version {version} of room {room_id!r} in {self.database}"

        def query(conn: sqlite3.Connection) -> Snapshot | None:
            row = conn.execute(
                f"SELECT snapshot FROM {HISTORY_TABLE} WHERE room = ? AND version = ?",
                (room_id, version),
            ).fetchone()
            return None if row is None else version_snapshot(row[0], where)

        return await self.database._run(query, f"cannot load {where}")



def _with_room(
    room_id: str, rows: Iterable[tuple[str, str | None, str | None]]
) -> Iterable[tuple[str, str, str | None, str | None]]:
    for key, record, field_ts in rows:
        yield room_id, key, record, field_ts
