"""SQLite and PostgreSQL beyond the shared contract: migrations, failures, rooms on them."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from canvas_store_trio import (
    Limits,
    RoomLoadError,
    RoomManager,
    Snapshot,
    SnapshotError,
    StorageError,
)
from canvas_store_trio.storage._backends import StorageBackend
from canvas_store_trio.storage._postgres import PostgresDatabase, _from_pg, _to_pg
from canvas_store_trio.storage._sql import MIGRATIONS_TABLE, RECORDS_TABLE, SCHEMA_VERSION
from canvas_store_trio.storage._sqlite import SQLiteDatabase

from .conftest import connect
from .storage_helpers import new_document, postgres_schema

NO_PINGS = Limits(ping_interval=None)


@pytest.fixture
def pg_conninfo() -> Iterator[str]:
    with postgres_schema() as conninfo:
        yield conninfo


def pg_execute(conninfo: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


# --- migrations ------------------------------------------------------------------------


async def test_sqlite_migrates_once_and_records_the_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "rooms.db"
    async with SQLiteDatabase(path) as db:
        assert await db.list_room_ids() == []
    async with SQLiteDatabase(path) as db:  # a second start applies nothing
        await db.create_storage("r").save(Snapshot(1, {}, {}))
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall()
        assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_sqlite_refuses_a_database_from_a_newer_release(tmp_path: Path) -> None:
    path = tmp_path / "rooms.db"
    async with SQLiteDatabase(path) as db:
        await db.list_room_ids()
    with sqlite3.connect(path) as conn:
        conn.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, 'from the future', 'now')",
            (SCHEMA_VERSION + 1,),
        )
    conn.close()
    async with SQLiteDatabase(path) as db:
        with pytest.raises(StorageError, match=r"schema version .* upgrade"):
            await db.create_storage("r").load()


async def test_postgres_migrates_once_even_when_many_start_together(pg_conninfo: str) -> None:
    databases = [PostgresDatabase(pg_conninfo) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for db in databases:
            nursery.start_soon(db.list_room_ids)
    for db in databases:
        await db.aclose()
    rows = pg_execute(pg_conninfo, f"SELECT version FROM {MIGRATIONS_TABLE}")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_postgres_refuses_a_database_from_a_newer_release(pg_conninfo: str) -> None:
    async with PostgresDatabase(pg_conninfo) as db:
        await db.list_room_ids()
    pg_execute(
        pg_conninfo,
        f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES (%s, 'future')",
        (SCHEMA_VERSION + 1,),
    )
    async with PostgresDatabase(pg_conninfo) as db:
        with pytest.raises(StorageError, match=r"schema version .* upgrade"):
            await db.create_storage("r").load()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_database_of_schema_1_gains_the_history_table_and_keeps_its_rooms(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import canvas_store_trio.storage._sql as sql

    def database() -> SQLiteDatabase | PostgresDatabase:
        if kind == "sqlite":
            return SQLiteDatabase(tmp_path / "rooms.db")
        return PostgresDatabase(conninfo)

    with postgres_schema() if kind == "postgres" else contextlib.nullcontext("") as conninfo:
        monkeypatch.setattr(sql, "MIGRATIONS", sql.MIGRATIONS[:1])  # an older release
        monkeypatch.setattr(sql, "SCHEMA_VERSION", 1)
        async with database() as db:
            await db.create_storage("r").save(Snapshot(4, {"a/c": {"_exists": True}}, {}))
            with pytest.raises(StorageError, match="canvas_store_history"):
                await db.create_storage("r").list_versions()
        monkeypatch.undo()
        async with database() as db:
            storage = db.create_storage("r")
            assert (await storage.load()) == Snapshot(4, {"a/c": {"_exists": True}}, {})
            await storage.save_version(4, [b'{"timestamp":4,"state":{},"timestamps":{}}'],
                                       keep=5)
            assert [v.version for v in await storage.list_versions()] == [4]


# --- failures --------------------------------------------------------------------------


async def test_sqlite_that_cannot_be_opened_refuses_to_load(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    async with SQLiteDatabase(tmp_path / "file" / "rooms.db") as db:
        with pytest.raises(StorageError, match="cannot open SQLite database"):
            await db.create_storage("r").load()
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    async with SQLiteDatabase(tmp_path / "garbage.db") as db:
        with pytest.raises(StorageError, match="not a database"):
            await db.create_storage("r").load()


async def test_a_closed_database_raises_and_closes_twice(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "rooms.db")
    await db.create_storage("r").save(Snapshot(1, {}, {}))
    await db.aclose()
    await db.aclose()
    with pytest.raises(StorageError, match="closed"):
        await db.create_storage("r").load()


async def test_corrupt_rows_refuse_to_load(tmp_path: Path) -> None:
    path = tmp_path / "rooms.db"
    async with SQLiteDatabase(path) as db:
        await db.create_storage("r").save(Snapshot(1, {"a/b": {"_exists": True}}, {}))
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE {RECORDS_TABLE} SET record = '{{broken'")
    conn.close()
    async with SQLiteDatabase(path) as db:
        with pytest.raises(SnapshotError, match="'a/b' is not valid JSON"):
            await db.create_storage("r").load()
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE {RECORDS_TABLE} SET record = '[1, 2]'")
    conn.close()
    async with SQLiteDatabase(path) as db:
        with pytest.raises(SnapshotError, match="not a valid snapshot"):
            await db.create_storage("r").load()


async def test_postgres_down_at_start_refuses_to_load_at_once() -> None:
    pytest.importorskip("psycopg")
    async with PostgresDatabase("postgresql://postgres@127.0.0.1:1/nowhere") as db:
        with trio.fail_after(10):
            with pytest.raises(StorageError) as info:
                await db.create_storage("r").load()
    message = str(info.value)
    assert "PostgreSQL database 127.0.0.1:1/nowhere" in message
    assert "refused" in message


@attrs.define
class TcpProxy:
    """Forwards a local port to PostgreSQL, and can play a server that went away."""

    target_host: str
    target_port: int
    port: int = 0
    _scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        """Drop every connection and stop listening."""
        assert self._scope is not None
        self._scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream(self.target_host, self.target_port)
        async with client, up, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, up, nursery.cancel_scope)
            nursery.start_soon(self._pump, up, client, nursery.cancel_scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def test_postgres_down_mid_save_raises_then_the_retry_loses_nothing(
    pg_conninfo: str,
) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(pg_conninfo)
    proxy = TcpProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    async with trio.open_nursery() as nursery:
        await proxy.start(nursery)
        proxied = make_conninfo(pg_conninfo, host="127.0.0.1", port=str(proxy.port))
        async with PostgresDatabase(proxied, timeout=1.0, connect_timeout=2.0) as db:
            storage = db.create_storage("r")
            doc = new_document()
            doc.apply([{"e/c": {"_exists": True, "v": 1}}])
            await storage.save_changes(doc.take_changes())

            proxy.stop()  # the server goes away, with our pooled connection
            doc.apply([{"e/c": {"v": 2}, "f/c": {"_exists": True}}])
            changes = doc.take_changes()
            with trio.fail_after(15), pytest.raises(StorageError) as info:
                await storage.save_changes(changes)
            assert "cannot save room 'r'" in str(info.value)
            assert "refused" in str(info.value)
            doc.restore_changes(changes)  # as the room does

            await proxy.start(nursery)  # the server is back, on the same port
            with trio.fail_after(30):
                while True:  # the room retries with backoff
                    changes = doc.take_changes()
                    try:
                        await storage.save_changes(changes)
                        break
                    except StorageError:
                        doc.restore_changes(changes)
                        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    async with PostgresDatabase(pg_conninfo) as direct:
        loaded = await direct.create_storage("r").load()
    assert loaded == doc.snapshot()


async def test_postgres_recovers_when_its_connections_are_killed(pg_conninfo: str) -> None:
    async with PostgresDatabase(pg_conninfo, max_size=2) as db:
        storage = db.create_storage("r")
        doc = new_document()
        doc.apply([{"e/c": {"_exists": True}}])
        await storage.save_changes(doc.take_changes())
        from psycopg.conninfo import conninfo_to_dict

        app = conninfo_to_dict(pg_conninfo)["application_name"]
        killed = pg_execute(
            pg_conninfo,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (app,),
        )
        assert killed
        doc.apply([{"e/c": {"x": 1}}])
        await storage.save_changes(doc.take_changes())  # the pool checks and reconnects
        assert await storage.load() == doc.snapshot()


def test_postgres_escapes_what_text_cannot_hold() -> None:
    for text in ["", "plain", "a\x00b", "\x01x", "\x01", "é\x00🎨", "x\x01"]:
        stored = _to_pg(text)
        assert "\x00" not in stored
        assert _from_pg(stored) == text
    assert _to_pg("plain/key") == "plain/key"


# --- rooms on real databases -----------------------------------------------------------


@asynccontextmanager
async def sql_backend(kind: str, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    if kind == "sqlite":
        async with SQLiteDatabase(tmp_path / "rooms.db") as db:
            yield db
    else:
        with postgres_schema() as conninfo:
            async with PostgresDatabase(conninfo) as pg:
                yield pg


@pytest.fixture(params=["sqlite", "postgres"])
def sql_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        from .storage_helpers import require_postgres

        require_postgres()
    return str(request.param)


async def test_a_room_saves_incrementally_and_a_restart_loads_it(
    sql_kind: str, tmp_path: Path
) -> None:
    async with sql_backend(sql_kind, tmp_path) as backend:
        async with RoomManager(
            save_throttle=0.01, create_storage=backend.create_storage, limits=NO_PINGS
        ) as manager, connect(manager, "roomId=r&clientId=a") as a:
            await a.reconnect()
            for n in range(5):
                await a.send(
                    type="patch",
                    messageId=n,
                    documentPatches=[{f"e{n}/c": {"_exists": True, "n": n}}],
                )
                await a.receive_until("ack")
                await trio.sleep(0.05)  # let several throttled saves happen
            await a.send(type="patch", messageId=9, documentPatches=[{"e0/c": {"_exists": False}}])
            await a.receive_until("ack")
        # The manager flushed on close; a new one loads what was saved.
        async with RoomManager(
            save_throttle=0.01, create_storage=backend.create_storage, limits=NO_PINGS
        ) as manager, connect(manager, "roomId=r&clientId=b") as b:
            frames = await b.reconnect()
            patch = next(f for f in frames if f["type"] == "patch")
            assert patch["timestamp"] == 6
            assert patch["documentPatches"][0] == {
                "e0/c": {"_exists": False},
                **{f"e{n}/c": {"_exists": True, "n": n} for n in range(1, 5)},
            }


async def test_a_room_on_an_unreachable_database_refuses_to_start() -> None:
    pytest.importorskip("psycopg")
    db = PostgresDatabase("postgresql://postgres@127.0.0.1:1/nowhere")
    async with db, RoomManager(create_storage=db.create_storage, limits=NO_PINGS) as manager:
        with pytest.raises(RoomLoadError) as info:
            await manager.get_or_create_room("r")
        assert isinstance(info.value.__cause__, StorageError)
