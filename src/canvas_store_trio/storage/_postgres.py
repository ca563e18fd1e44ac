"""Rooms in a PostgreSQL database: :class:`PostgresDatabase` and :class:`PostgresStorage`.

Built on psycopg 3 and a ``psycopg_pool.ConnectionPool``, used from worker threads
through ``trio.to_thread`` (psycopg's async side speaks asyncio only). Install with
``pip install 'canvas-store-trio[postgres]'``; psycopg is imported when a
:class:`PostgresDatabase` is made, not when ``canvas_store_trio`` is.

PostgreSQL text cannot hold a NUL character. Room ids and keys that contain one (or
that start with ``\\x01``, the escape mark) are stored as ``\\x01`` plus the hex of their
UTF-8, and turned back on the way out, so every id a client can send stays storable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

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

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

    Connection = psycopg.Connection[TupleRow]

__all__ = ["DedicatedConnection", "PostgresDatabase", "PostgresStorage", "WriteFence"]

T = TypeVar("T")


class WriteFence(Protocol):
    """What a cluster puts in front of every write of room data (see
    :class:`~canvas_store_trio.cluster.PostgresLeases`)."""

    def check(self, conn: Connection, room_ids: Sequence[str]) -> None:
        """Run first in the write's transaction, in its worker thread: raise (a
        :class:`StorageError`) unless this node still holds the lease of every room, and
        keep those leases from changing hands until the transaction ends."""
        ...

_UPSERT_ROOM = (
    f"INSERT INTO {ROOMS_TABLE} (id, timestamp, updated_at) VALUES (%s, %s, now()) "
    "ON CONFLICT (id) DO UPDATE SET timestamp = excluded.timestamp, "
    "updated_at = excluded.updated_at"
)
_UPSERT_RECORD = (
    f"INSERT INTO {RECORDS_TABLE} (room, key, record, timestamps) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (room, key) DO UPDATE SET record = excluded.record, "
    "timestamps = excluded.timestamps"
)
_UPSERT_VERSION = (
    f"INSERT INTO {HISTORY_TABLE} (room, version, saved_at, snapshot) "
    "VALUES (%s, %s, now(), %b) "
    "ON CONFLICT (room, version) DO UPDATE SET saved_at = excluded.saved_at, "
    "snapshot = excluded.snapshot"
)
_PRUNE_VERSIONS = (
    f"DELETE FROM {HISTORY_TABLE} WHERE room = %s AND version NOT IN "
    f"(SELECT version FROM {HISTORY_TABLE} WHERE room = %s ORDER BY version DESC LIMIT %s)"
)
_ESCAPE = "\x01"


def _to_pg(text: str) -> str:
    """``text`` in a form PostgreSQL can store (no NUL), reversibly."""
    if "\x00" in text or text.startswith(_ESCAPE):
        return _ESCAPE + text.encode().hex()
    return text


def _from_pg(text: str) -> str:
    if text.startswith(_ESCAPE):
        return bytes.fromhex(text[1:]).decode()
    return text


def _commit(conn: Connection) -> None:
    """Commit the open transaction. (A module function, so a crash test can replace it.)"""
    conn.commit()


def _describe(exc: BaseException) -> str:
    """One line out of a psycopg error, which often spans several."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _import_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StorageError(
            f"PostgreSQL storage needs psycopg 3 and psycopg_pool ({exc}); "
            "install them with: pip install 'canvas-store-trio[postgres]'"
        ) from None


@attrs.define(eq=False)
class PostgresDatabase:
    """A PostgreSQL database holding any number of rooms.

    ``conninfo`` is a libpq connection string or URL
    (``postgresql://user:password@host:5432/dbname``); tables are created in the first
    schema of the ``search_path``, which ``?options=-csearch_path%3Dmyschema`` sets.
    Nothing connects yet: the first operation connects once directly (so a database that
    is down gives its real error at once), applies the schema migrations, then opens a
    pool of ``min_size`` to ``max_size`` connections. :meth:`create_storage` gives the
    storage for one room. Call :meth:`aclose` (or use ``async with``) at the end.

    An operation waits at most ``timeout`` seconds for a pooled connection (the pool
    reconnects in the background after the server went away), then raises
    :class:`StorageError`; so does a query that fails. Worker threads are never
    abandoned: a cancelled caller waits until its transaction has committed or rolled
    back.
    """

    conninfo: str
    min_size: int = 1
    max_size: int = 4
    timeout: float = 10.0
    connect_timeout: float = 5.0
    application_name: str = "canvas-store-trio"
    idle_in_transaction_timeout: float | None = None
    """Seconds after which PostgreSQL ends a session left idle inside a transaction (one
    whose process was paused mid-write), so that its row locks cannot hold others up.
    Read when the pool opens."""
    write_fence: WriteFence | None = attrs.field(default=None, kw_only=True)
    """Checked in the transaction of every write of room data (commits, saves, versions)."""
    _pool: ConnectionPool[Connection] | None = attrs.field(default=None, init=False, repr=False)
    _setup_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)
    _limiter: trio.CapacityLimiter = attrs.field(init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False, repr=False)
    group_commit: GroupCommit = attrs.field(init=False, repr=False)
    """Where the rooms' durable-ack commits meet, to share transactions."""

    @group_commit.default
    def _default_group_commit(self) -> GroupCommit:
        return GroupCommit(self.write_changes)

    @_limiter.default
    def _default_limiter(self) -> trio.CapacityLimiter:
        return trio.CapacityLimiter(self.max_size)

    def __attrs_post_init__(self) -> None:
        _import_psycopg()

    def create_storage(self, room_id: str) -> PostgresStorage:
        """The storage for one room in this database."""
        return PostgresStorage(self, room_id)

    async def list_room_ids(self) -> list[str]:
        """Every room saved in this database, sorted."""

        def query(conn: Connection) -> list[str]:
            rows = conn.execute(f"SELECT id FROM {ROOMS_TABLE}").fetchall()
            return sorted(_from_pg(row[0]) for row in rows)

        return await self._run(query, "cannot list rooms")

    async def aclose(self) -> None:
        """Close the pool. Safe to call twice."""
        self._closed = True
        async with self._setup_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(pool.close)

    async def __aenter__(self) -> PostgresDatabase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __str__(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self.conninfo)
        except Exception:
            return "PostgreSQL database (invalid connection string)"
        host = params.get("host") or "local socket"
        port = params.get("port")
        dbname = params.get("dbname") or params.get("user") or ""
        return f"PostgreSQL database {host}{f':{port}' if port else ''}/{dbname}"

    async def write_changes(self, batch: list[RoomChanges]) -> None:
        """Upsert the changed records and timestamps of some rooms, in one transaction
        and one round trip (a pipeline)."""

        def write(conn: Connection) -> None:
            self.fence(conn, [room_id for room_id, _ in batch])
            with conn.pipeline(), conn.cursor() as cur:
                for room_id, changes in batch:
                    pg_id = _to_pg(room_id)
                    cur.execute(_UPSERT_ROOM, (pg_id, changes.timestamp))
                    rows = [(pg_id, _to_pg(key), *row) for key, *row in change_rows(changes)]
                    if rows:
                        cur.executemany(_UPSERT_RECORD, rows)
                _commit(conn)

        rooms = ", ".join(repr(room_id) for room_id, _ in batch[:3])
        more = f" and {len(batch) - 3} more" if len(batch) > 3 else ""
        await self._run(write, f"cannot save room{'s' if len(batch) > 1 else ''} {rooms}{more}")

    async def run(self, fn: Callable[[Connection], T], what: str) -> T:
        """``fn(conn)`` in a worker thread, in one transaction of a pooled connection
        (committed when it returns, rolled back if it raises). A failure is a
        :class:`StorageError` naming ``what``. Cancelled, it waits for ``fn`` to end."""
        return await self._run(fn, what)

    # --- worker-thread side -----------------------------------------------------

    def fence(self, conn: Connection, room_ids: Sequence[str]) -> None:
        """The :attr:`write_fence` check for these rooms, if there is a fence."""
        if self.write_fence is not None:
            self.write_fence.check(conn, room_ids)

    async def _run(self, fn: Callable[[Connection], T], what: str) -> T:
        if self._closed:
            raise StorageError(f"{self}: {what}: the database is closed")
        pool = self._pool
        if pool is None:
            async with self._setup_lock:
                if self._closed:
                    raise StorageError(f"{self}: {what}: the database is closed")
                if self._pool is None:
                    self._pool = await trio.to_thread.run_sync(self._setup)
                pool = self._pool
        return await trio.to_thread.run_sync(self._call, pool, fn, what, limiter=self._limiter)

    def _connect_kwargs(self) -> dict[str, Any]:
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self.conninfo)
        kwargs: dict[str, Any] = {}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(2, math.ceil(self.connect_timeout))
        if "application_name" not in given:
            kwargs["application_name"] = self.application_name
        if self.idle_in_transaction_timeout is not None:
            ms = max(1, math.ceil(self.idle_in_transaction_timeout * 1000))
            option = f"-c idle_in_transaction_session_timeout={ms}"
            kwargs["options"] = f"{given.get('options', '')} {option}".strip()
        return kwargs

    def _setup(self) -> ConnectionPool[Connection]:
        """Connect once, migrate, and open the pool (in a worker thread)."""
        import psycopg
        from psycopg_pool import ConnectionPool

        try:
            with psycopg.connect(self.conninfo, **self._connect_kwargs()) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StorageError(f"cannot use {self}: {_describe(exc)}") from None
        pool: ConnectionPool[Connection] = ConnectionPool(
            self.conninfo,
            kwargs=self._connect_kwargs(),
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=self.timeout,
            check=ConnectionPool.check_connection,
            name="canvas-store-trio",
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _migrate(self, conn: Connection) -> None:
        # One migrator at a time per schema, even across processes.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || %s))",
            ("." + MIGRATIONS_TABLE,),
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            "version INTEGER NOT NULL PRIMARY KEY, description TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}").fetchone()
        assert row is not None
        for migration in pending_migrations(row[0], str(self)):
            for statement in migration.postgres:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
        conn.commit()

    def _call(
        self, pool: ConnectionPool[Connection], fn: Callable[[Connection], T], what: str
    ) -> T:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            # On leaving the block the pool commits, or rolls back after an error, and
            # replaces a connection that broke.
            with pool.connection() as conn:
                return fn(conn)
        except PoolTimeout:
            raise StorageError(f"{self}: {what}: {self._diagnose()}") from None
        except (psycopg.Error, UnicodeError) as exc:
            raise StorageError(f"{self}: {what}: {_describe(exc)}") from None

    def _diagnose(self) -> str:
        """Why no pooled connection came: try a direct one for the server's own words."""
        import psycopg

        try:
            psycopg.connect(self.conninfo, **self._connect_kwargs()).close()
        except psycopg.Error as exc:
            return f"cannot connect: {_describe(exc)}"
        return (
            f"no connection was free within {self.timeout:g} s "
            f"(all {self.max_size} in use, or the server is recovering)"
        )


@attrs.define(eq=False)
class DedicatedConnection:
    """One connection of its own to ``database``, outside its pool, for work that must
    never queue behind the pool's (a cluster node's lease renewals).

    Connected on first use, and again on the next use after it broke, at once: a pool
    backs off between reconnection attempts, and this connection's user paces its own.
    A new connection applies pending schema migrations first, as the pool's first does.
    :meth:`run` is :meth:`PostgresDatabase.run` on this connection, one call at a time;
    :meth:`aclose` closes it (the database's pool is not touched).
    """

    database: PostgresDatabase
    _conn: Connection | None = attrs.field(default=None, init=False, repr=False)
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False, repr=False
    )

    async def run(self, fn: Callable[[Connection], T], what: str) -> T:
        """``fn(conn)`` in a worker thread, in one transaction (committed when it
        returns, rolled back if it raises); a failure is a :class:`StorageError`
        naming ``what``. Cancelled, it waits for ``fn`` to end."""
        return await trio.to_thread.run_sync(self._call, fn, what, limiter=self._limiter)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

    def _call(self, fn: Callable[[Connection], T], what: str) -> T:
        import psycopg

        try:
            if self._conn is None or self._conn.broken:
                self._conn = self._connect()
            with self._conn.transaction():
                return fn(self._conn)
        except (psycopg.Error, UnicodeError) as exc:
            raise StorageError(f"{self.database}: {what}: {_describe(exc)}") from None

    def _connect(self) -> Connection:
        import psycopg

        if self._conn is not None:
            self._conn.close()
            self._conn = None
        conn = psycopg.connect(self.database.conninfo, **self.database._connect_kwargs())
        try:
            self.database._migrate(conn)
        except BaseException:
            conn.close()
            raise
        conn.autocommit = True  # each call is one explicit transaction
        return conn


@attrs.define(eq=False)
class PostgresStorage(SQLRoomWrites):
    """One room's snapshot in a :class:`PostgresDatabase`; an incremental storage.

    :meth:`save` replaces the room's rows (``DELETE`` then ``COPY``); :meth:`save_changes`
    upserts only the keys that changed and the room timestamp. Either is one
    transaction, so a reader never sees half a save. :meth:`commit` (for durable acks)
    is :meth:`save_changes` sharing a transaction with other rooms. Its versions
    (:class:`~canvas_store_trio.HistoryStorage`) are rows of ``canvas_store_history``;
    :meth:`save_version` writes one and prunes in one transaction.
    """

    database: PostgresDatabase
    room_id: str

    async def load(self) -> Snapshot | None:
        """The room's snapshot from the database, or None if it was never saved."""
        room_id = self.room_id
        where = f"room {room_id!r} in {self.database}"

        def load(conn: Connection) -> Snapshot | None:
            # Both queries read the same committed state.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            pg_id = _to_pg(room_id)
            row = conn.execute(
                f"SELECT timestamp FROM {ROOMS_TABLE} WHERE id = %s", (pg_id,)
            ).fetchone()
            if row is None:
                return None
            rows: list[tuple[str, str | None, str | None]] = conn.execute(
                f"SELECT key, record::text, timestamps::text FROM {RECORDS_TABLE} "
                "WHERE room = %s ORDER BY key",
                (pg_id,),
            ).fetchall()
            return snapshot_from_rows(row[0], ((_from_pg(k), r, t) for k, r, t in rows), where)

        return await self.database._run(load, f"cannot load room {room_id!r}")

    async def save(self, snapshot: Snapshot) -> None:
        """Replace the room's rows with ``snapshot``, in one transaction."""
        room_id = self.room_id

        def save(conn: Connection) -> None:
            rows = snapshot_rows(snapshot)
            pg_id = _to_pg(room_id)
            self.database.fence(conn, [room_id])
            conn.execute(_UPSERT_ROOM, (pg_id, snapshot.timestamp))
            conn.execute(f"DELETE FROM {RECORDS_TABLE} WHERE room = %s", (pg_id,))
            with (
                conn.cursor() as cur,
                cur.copy(
                    f"COPY {RECORDS_TABLE} (room, key, record, timestamps) FROM STDIN"
                ) as copy,
            ):
                for key, record, field_ts in rows:
                    copy.write_row((pg_id, _to_pg(key), record, field_ts))
            _commit(conn)

        await self.database._run(save, f"cannot save room {room_id!r}")

    async def save_version(self, version: int, parts: Sequence[bytes], *, keep: int) -> None:
        """Store the encoded snapshot ``parts`` as ``version`` of the room (replacing one
        with that id) and drop all but its ``keep`` newest versions, in one transaction."""
        room_id = self.room_id

        def save(conn: Connection) -> None:
            pg_id = _to_pg(room_id)
            self.database.fence(conn, [room_id])
            conn.execute(_UPSERT_VERSION, (pg_id, version, b"".join(parts)))
            conn.execute(_PRUNE_VERSIONS, (pg_id, pg_id, keep))
            _commit(conn)

        await self.database._run(save, f"cannot keep version {version} of room {room_id!r}")

    async def list_versions(self) -> list[VersionInfo]:
        """The room's versions, oldest first."""
        room_id = self.room_id

        def query(conn: Connection) -> list[VersionInfo]:
            rows = conn.execute(
                f"SELECT version, saved_at FROM {HISTORY_TABLE} WHERE room = %s "
                "ORDER BY version",
                (_to_pg(room_id),),
            ).fetchall()
            return [VersionInfo(version, at.astimezone(UTC)) for version, at in rows]

        return await self.database._run(query, f"cannot list the versions of room {room_id!r}")

    async def load_version(self, version: int) -> Snapshot | None:
        """The snapshot kept as ``version``, or None if the room keeps no such version."""
        room_id = self.room_id
        where = f"version {version} of room {room_id!r} in {self.database}"

        def query(conn: Connection) -> Snapshot | None:
            row = conn.execute(
                f"SELECT snapshot FROM {HISTORY_TABLE} WHERE room = %s AND version = %s",
                (_to_pg(room_id), version),
            ).fetchone()
            return None if row is None else version_snapshot(row[0], where)

        return await self.database._run(query, f"cannot load {where}")
