"""What the SQL backends share: the schema, its versioned migrations, row encoding.

Both SQLite (:mod:`._sqlite`) and PostgreSQL (:mod:`._postgres`) keep rooms in the
same tables:

``canvas_store_rooms``
    one row per room: ``id``, the room ``timestamp`` and ``updated_at``.
``canvas_store_records``
    one row per key: ``room``, ``key``, ``record`` (the record as JSON) and
    ``timestamps`` (its field timestamps as JSON), primary key ``(room, key)``.
    Tombstones are rows like any other (``{"_exists": false}``).
``canvas_store_history``
    the kept versions (schema version 2): ``room``, ``version`` (the room timestamp of
    the snapshot it holds), ``saved_at`` and ``snapshot`` (the whole snapshot, encoded
    in the Node file format), primary key ``(room, version)``. No foreign key: a room
    may keep a version before its first save.
``canvas_store_nodes``, ``canvas_store_leases``
    cluster mode (schema version 3, PostgreSQL only): one row per node (``id``,
    ``address``, ``expires_at``) and one per room ever leased (``room``, ``owner``,
    ``address``, ``epoch``, ``expires_at``); see :mod:`canvas_store_trio.cluster`.

``canvas_store_schema_migrations`` lists the migrations applied to a database, one row
per version. A backend applies the missing ones, in one transaction, the first time it
is used, and refuses a database whose version is newer than the release it runs.
To change the schema later, append a :class:`Migration` to :data:`MIGRATIONS`; never
edit one that has shipped.

Room ids and keys only ever travel as bound parameters; the table names above are the
only identifiers in the SQL text, and they are constants.

With durable acks, the commits of every room of one database go through one
:class:`GroupCommit`: the rooms' pending changes are written in one transaction, and
those that arrive meanwhile wait for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
import orjson
import trio

from .._document import Changes, Snapshot, SnapshotError, decode_snapshot, snapshot_from_json
from .._logs import log_event
from ._base import StorageError

ROOMS_TABLE = "canvas_store_rooms"
RECORDS_TABLE = "canvas_store_records"
MIGRATIONS_TABLE = "canvas_store_schema_migrations"
HISTORY_TABLE = "canvas_store_history"
NODES_TABLE = "canvas_store_nodes"
LEASES_TABLE = "canvas_store_leases"


@attrs.frozen
class Migration:
    """One schema step, spelled once per dialect."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="rooms and records",
        sqlite=(
            f"""CREATE TABLE {ROOMS_TABLE} (
                id TEXT NOT NULL PRIMARY KEY,
                timestamp INTEGER NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            f"""CREATE TABLE {RECORDS_TABLE} (
                room TEXT NOT NULL REFERENCES {ROOMS_TABLE} (id) ON DELETE CASCADE,
                key TEXT NOT NULL,
                record TEXT,
                timestamps TEXT,
                PRIMARY KEY (room, key)
            )""",
        ),
        postgres=(
            f"""CREATE TABLE {ROOMS_TABLE} (
                id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
                timestamp BIGINT NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""",
            f"""CREATE TABLE {RECORDS_TABLE} (
                room TEXT COLLATE "C" NOT NULL
                    REFERENCES {ROOMS_TABLE} (id) ON DELETE CASCADE,
                key TEXT COLLATE "C" NOT NULL,
                record JSON,
                timestamps JSON,
                PRIMARY KEY (room, key)
            )""",
        ),
    ),
    Migration(
        version=2,
        description="history: kept versions of rooms",
        sqlite=(
            f"""CREATE TABLE {HISTORY_TABLE} (
                room TEXT NOT NULL,
                version INTEGER NOT NULL,
                saved_at TEXT NOT NULL,
                snapshot BLOB NOT NULL,
                PRIMARY KEY (room, version)
            )""",
        ),
        postgres=(
            f"""CREATE TABLE {HISTORY_TABLE} (
                room TEXT COLLATE "C" NOT NULL,
                version BIGINT NOT NULL,
                saved_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                snapshot BYTEA NOT NULL,
                PRIMARY KEY (room, version)
            )""",
        ),
    ),
    Migration(
        version=3,
        description="cluster: nodes and room leases",
        sqlite=(),  # a cluster needs PostgreSQL
        postgres=(
            f"""CREATE TABLE {NODES_TABLE} (
                id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
                address TEXT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL,
                started_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )""",
            f"""CREATE TABLE {LEASES_TABLE} (
                room TEXT COLLATE "C" NOT NULL PRIMARY KEY,
                owner TEXT COLLATE "C" NOT NULL,
                address TEXT NOT NULL,
                epoch BIGINT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            f"CREATE INDEX {LEASES_TABLE}_owner ON {LEASES_TABLE} (owner)",
        ),
    ),
)
"""Every schema step, oldest first. Append only."""

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this release writes."""


def pending_migrations(current: int, where: str) -> list[Migration]:
    """The migrations a database at version ``current`` still needs.

    Raise :class:`StorageError` when the database is newer than this release: writing
    to it with an older schema in mind could lose data.
    """
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"{where} has canvas-store schema version {current}, but this release of "
            f"canvas-store-trio only knows versions up to {SCHEMA_VERSION}; upgrade it"
        )
    return [m for m in MIGRATIONS if m.version > current]


def dump_json(value: object) -> str:
    """JSON text for a record or field-timestamp map (compact, as the Node server writes)."""
    return orjson.dumps(value).decode()


def snapshot_from_rows(
    timestamp: int,
    rows: Iterable[tuple[str, str | bytes | None, str | bytes | None]],
    where: str,
) -> Snapshot:
    """Rebuild a snapshot from the room timestamp and its ``(key, record, timestamps)`` rows.

    A NULL ``record`` or ``timestamps`` means the key had none in the snapshot that was
    saved (a full save keeps a snapshot exactly as it was). Raise :class:`SnapshotError`
    if a row does not hold what a snapshot needs: the room must not start from it.
    """
    state: dict[str, Any] = {}
    timestamps: dict[str, Any] = {}
    for key, record, field_ts in rows:
        try:
            if record is not None:
                state[key] = orjson.loads(record)
            if field_ts is not None:
                timestamps[key] = orjson.loads(field_ts)
        except orjson.JSONDecodeError as exc:
            raise SnapshotError(f"{where}: key {key!r} is not valid JSON ({exc})") from None
    try:
        return snapshot_from_json(
            {"timestamp": timestamp, "state": state, "timestamps": timestamps}
        )
    except SnapshotError as exc:
        raise SnapshotError(f"{where} is not a valid snapshot ({exc})") from None


def snapshot_rows(snapshot: Snapshot) -> list[tuple[str, str | None, str | None]]:
    """A snapshot as ``(key, record JSON, timestamps JSON)`` rows, for a full save."""
    state, timestamps = snapshot.state, snapshot.timestamps
    rows: list[tuple[str, str | None, str | None]] = []
    for key, record in state.items():
        field_ts = timestamps.get(key)
        rows.append((key, dump_json(record), None if field_ts is None else dump_json(field_ts)))
    for key, field_ts in timestamps.items():
        if key not in state:
            rows.append((key, None, dump_json(field_ts)))
    return rows


def version_snapshot(data: bytes, where: str) -> Snapshot:
    """The snapshot a history row holds. Raise :class:`SnapshotError` naming ``where``."""
    try:
        return decode_snapshot(data)
    except SnapshotError as exc:
        raise SnapshotError(f"{where} is not a valid snapshot ({exc})") from None


def change_rows(changes: Changes) -> list[tuple[str, str, str]]:
    """The changed keys as ``(key, record JSON, timestamps JSON)`` rows, to upsert."""
    return [
        (key, dump_json(change.record), dump_json(change.timestamps))
        for key, change in changes.records.items()
    ]


RoomChanges = tuple[str, Changes]
"""A room id and the changes to write for it."""


@attrs.define(eq=False)
class _QueuedCommit:
    room_id: str
    changes: Changes
    done: trio.Event = attrs.Factory(trio.Event)
    error: Exception | None = None


class _RoomStorage(Protocol):
    @property
    def room_id(self) -> str: ...


class GroupCommit:
    """Writes the commits of many rooms of one database together, one batch at a time.

    ``write(batch)`` is the database's: it writes a list of room changes (sorted by
    room id, so that two writers never wait on each other's rows) in one transaction.
    A system task writes one batch at a time; every commit queued meanwhile goes into
    the next batch. When a batch of several rooms fails, each room is tried again on
    its own, so that one room's bad write fails that room alone.

    A caller cancelled while it waits only stops waiting: its changes are still written.
    """

    def __init__(self, write: Callable[[list[RoomChanges]], Awaitable[None]]) -> None:
        self._write = write
        self._queued: list[_QueuedCommit] = []
        self._wakeup = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self.batches = 0
        """How many transactions have been written (for the bench and the tests)."""

    async def commit(self, room_id: str, changes: Changes) -> None:
        """Write ``changes`` of ``room_id``, in a transaction with other rooms' changes.

        Return once committed; raise what the write raised if it failed.
        """
        [error] = await self._commit([_QueuedCommit(room_id, changes)])
        if error is not None:
            raise error

    async def commit_many(
        self, commits: Sequence[tuple[_RoomStorage, Changes]]
    ) -> list[Exception | None]:
        """:meth:`commit` for several rooms (:class:`CommitGroup`), in one transaction
        unless that fails; each room's error, or None, in order."""
        return await self._commit(
            [_QueuedCommit(storage.room_id, changes) for storage, changes in commits]
        )

    async def _commit(self, jobs: list[_QueuedCommit]) -> list[Exception | None]:
        if not jobs:
            return []
        self._queued.extend(jobs)  # queued together, so written in one batch
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:  # first use in this Trio run
            self._token = token
            trio.lowlevel.spawn_system_task(self._run, name="canvas-store group commit")
        self._wakeup.set()
        await jobs[-1].done.wait()
        return [job.error for job in jobs]

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._queued:
                batch, self._queued = self._queued, []
                await self._write_batch(batch)

    async def _write_batch(self, batch: list[_QueuedCommit]) -> None:
        try:
            try:
                await self._write(_sorted_batch(batch))
                self.batches += 1
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                log_event(
                    logging.WARNING,
                    "group_commit_failed",
                    "a commit of %d rooms failed (%s); committing each on its own",
                    len(batch),
                    exc,
                    error=str(exc),
                )
                for job in batch:
                    try:
                        await self._write([(job.room_id, job.changes)])
                        self.batches += 1
                    except Exception as room_exc:
                        job.error = room_exc
        finally:
            for job in batch:
                job.done.set()


def _sorted_batch(batch: list[_QueuedCommit]) -> list[RoomChanges]:
    """The batch's changes by room id; several commits of one room are merged in order."""
    merged: dict[str, Changes] = {}
    for job in batch:
        earlier = merged.get(job.room_id)
        if earlier is None:
            merged[job.room_id] = job.changes
        else:
            merged[job.room_id] = Changes(
                job.changes.timestamp, {**earlier.records, **job.changes.records}
            )
    return sorted(merged.items())


class _SQLDatabase(Protocol):
    group_commit: GroupCommit

    async def write_changes(self, batch: list[RoomChanges]) -> None: ...


class SQLRoomWrites:
    """What the SQL room storages share: their incremental saves and durable commits,
    both written by their database (``database``, for room ``room_id``)."""

    __slots__ = ()
    database: _SQLDatabase
    room_id: str

    async def save_changes(self, changes: Changes) -> None:
        await self.database.write_changes([(self.room_id, changes)])

    async def commit(self, changes: Changes) -> None:
        """:meth:`save_changes`, in one transaction with other rooms' commits."""
        await self.database.group_commit.commit(self.room_id, changes)

    @property
    def commit_group(self) -> GroupCommit:
        """Where the commits of this database's rooms meet (:class:`CommitGroup`)."""
        return self.database.group_commit
