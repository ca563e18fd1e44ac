"""The contract every storage keeps, checked on each backend.

MemoryStorage, FileStorage, SQLiteStorage and PostgresStorage all: round-trip a
snapshot exactly, keep tombstones, end up with the full snapshot after a room's
incremental saves, stay whole under concurrent saves and loads, keep the previous state
when a save dies before it commits (even by a killed process), and treat any room id
as data, never as a path or as SQL. All but memory keep a room's versions (history):
listed oldest first, pruned to the newest N, kept by rooms that change, and restored.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import attrs
import orjson
import pytest
import trio

from canvas_store_trio import (
    Changes,
    HistoryStorage,
    IncrementalStorage,
    RecordChange,
    RoomManager,
    Snapshot,
    StorageError,
    encode_snapshot,
    restore_version,
)
from canvas_store_trio._document import encode_snapshot_parts
from canvas_store_trio.storage._backends import FileBackend, MemoryBackend, StorageBackend
from canvas_store_trio.storage._postgres import PostgresDatabase
from canvas_store_trio.storage._sqlite import SQLiteDatabase

from .storage_helpers import (
    ODD_VALUES,
    new_document,
    postgres_schema,
    random_patch,
    save_like_a_room,
)

T = TypeVar("T")
SRC = str(Path(__file__).resolve().parent.parent / "src")


@attrs.define
class Harness:
    """One backend under test, and how to reopen it as a restarted process would."""

    kind: str
    make: Callable[[], StorageBackend]
    child_backend: str | None
    """Python code that builds the same backend in a child process (None: memory)."""
    backend: StorageBackend = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.backend = self.make()

    async def restart(self) -> None:
        await self.backend.aclose()
        self.backend = self.make()


@pytest.fixture(params=["MemoryStorage", "FileStorage", "SQLiteStorage", "PostgresStorage"])
def backend_kind(request: pytest.FixtureRequest) -> Iterator[tuple[str, str | None]]:
    """Which backend, and for PostgreSQL a fresh schema. (Sync, so a skip keeps its reason.)"""
    kind: str = request.param
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("incremental") and kind in WHOLE_ONLY:
        pytest.skip(f"{kind} only saves whole snapshots")
    if kind == "MemoryStorage" and getattr(request.function, "durable", False):
        pytest.skip("memory does not outlive its process, and its saves cannot fail")
    if kind == "MemoryStorage" and getattr(request.function, "history", False):
        pytest.skip("memory keeps no history")
    if kind == "PostgresStorage":
        with postgres_schema() as conninfo:
            yield kind, conninfo
    else:
        yield kind, None


WHOLE_ONLY = ("MemoryStorage", "FileStorage")


def durable(test: T) -> T:
    """For tests of what survives a crash or a failed write: not for memory."""
    test.durable = True  # type: ignore[attr-defined]
    return test


@pytest.fixture
async def harness(
    backend_kind: tuple[str, str | None], tmp_path: Path
) -> AsyncIterator[Harness]:
    kind, conninfo = backend_kind
    if kind == "MemoryStorage":
        memory = MemoryBackend()
        h = Harness(kind, lambda: memory, None)
    elif kind == "FileStorage":
        data = tmp_path / "data"
        h = Harness(kind, lambda: FileBackend(data), f"FileBackend({str(data)!r})")
    elif kind == "SQLiteStorage":
        path = tmp_path / "db" / "rooms.db"
        h = Harness(kind, lambda: SQLiteDatabase(path), f"SQLiteDatabase({str(path)!r})")
    else:
        assert conninfo is not None
        h = Harness(
            kind,
            lambda: PostgresDatabase(conninfo, timeout=5.0),
            f"PostgresDatabase({conninfo!r})",
        )
    try:
        yield h
    finally:
        await h.backend.aclose()


def as_json(snapshot: Snapshot | None) -> Any:
    """A snapshot as plain JSON data, so equality ignores key order and container types."""
    return None if snapshot is None else orjson.loads(encode_snapshot(snapshot))


async def test_a_room_never_saved_loads_as_none(harness: Harness) -> None:
    assert await harness.backend.create_storage("never").load() is None
    assert await harness.backend.list_room_ids() == []


async def test_a_snapshot_round_trips_exactly(harness: Harness) -> None:
    state = {f"e{i}/c": {"_exists": True, "v": value} for i, value in enumerate(ODD_VALUES)}
    state["SINGLETON/camera"] = {"_exists": True, "zoom": 1.5}
    state["key with\x00nul/and ' quote"] = {"_exists": True}
    timestamps = {key: {field: 3 for field in record} for key, record in state.items()}
    # A snapshot file may hold keys with no timestamps, or timestamps with no record;
    # a full save keeps them as they were.
    state["no/timestamps"] = {"_exists": True}
    timestamps["only/timestamps"] = {"x": 2}
    snapshot = Snapshot(7, state, timestamps)
    await harness.backend.create_storage("r").save(snapshot)
    assert as_json(await harness.backend.create_storage("r").load()) == as_json(snapshot)
    await harness.restart()
    loaded = await harness.backend.create_storage("r").load()
    assert as_json(loaded) == as_json(snapshot)
    assert loaded is not None and loaded.state["e2/c"]["v"] == 2**53 + 1


async def test_tombstones_are_kept(harness: Harness) -> None:
    storage = harness.backend.create_storage("r")
    doc = new_document()
    doc.apply([{"e/c": {"_exists": True, "x": 1}, "f/c": {"_exists": True}}])
    await save_like_a_room(storage, doc)
    doc.apply([{"e/c": {"_exists": False}}])
    await save_like_a_room(storage, doc)
    await harness.restart()
    loaded = await harness.backend.create_storage("r").load()
    assert loaded is not None
    assert loaded.state["e/c"] == {"_exists": False}
    assert loaded.timestamps["e/c"] == {"_exists": 2}
    assert as_json(loaded) == as_json(doc.snapshot())


@pytest.mark.parametrize("seed", range(3))
async def test_incremental_saves_then_load_equal_the_full_snapshot(
    harness: Harness, seed: int
) -> None:
    rng = random.Random(seed)
    keys = [f"e{i}/c{j}" for i in range(12) for j in range(2)] + ["SINGLETON/s"]
    storage = harness.backend.create_storage("r")
    doc = new_document()
    for _round in range(15):
        for _ in range(rng.randint(0, 5)):
            doc.apply([random_patch(rng, keys) for _ in range(rng.randint(1, 3))])
        await save_like_a_room(storage, doc)
        assert as_json(await storage.load()) == as_json(doc.snapshot())
    await harness.restart()
    loaded = await harness.backend.create_storage("r").load()
    assert as_json(loaded) == as_json(doc.snapshot())
    # The same document saved whole, elsewhere, loads the same.
    await harness.backend.create_storage("whole").save(doc.snapshot())
    assert as_json(await harness.backend.create_storage("whole").load()) == as_json(loaded)


async def test_a_full_save_replaces_every_key(harness: Harness) -> None:
    storage = harness.backend.create_storage("r")
    await storage.save(Snapshot(1, {"a/x": {"_exists": True}}, {"a/x": {"_exists": 1}}))
    await storage.save(Snapshot(2, {"b/x": {"_exists": True}}, {"b/x": {"_exists": 2}}))
    loaded = await storage.load()
    assert as_json(loaded) == as_json(
        Snapshot(2, {"b/x": {"_exists": True}}, {"b/x": {"_exists": 2}})
    )


async def test_the_room_timestamp_is_saved_even_without_changed_keys(harness: Harness) -> None:
    storage = harness.backend.create_storage("r")
    await storage.save(Snapshot(3, {}, {}))
    if isinstance(storage, IncrementalStorage):
        await storage.save_changes(Changes(4, {}))
        loaded = await storage.load()
        assert loaded is not None and loaded.timestamp == 4


async def test_concurrent_saves_of_many_rooms(harness: Harness) -> None:
    docs = {f"room-{i}": new_document() for i in range(12)}
    rng = random.Random(1)
    keys = [f"e{i}/c" for i in range(10)]

    async def writer(room_id: str) -> None:
        storage = harness.backend.create_storage(room_id)
        doc = docs[room_id]
        for _ in range(6):
            doc.apply([random_patch(rng, keys)])
            await save_like_a_room(storage, doc)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for room_id in docs:
            nursery.start_soon(writer, room_id)
    await harness.restart()
    assert await harness.backend.list_room_ids() == sorted(docs)
    for room_id, doc in docs.items():
        loaded = await harness.backend.create_storage(room_id).load()
        assert as_json(loaded) == as_json(doc.snapshot()), room_id


def _tagged_snapshot(tag: int, keys: int = 200) -> Snapshot:
    state = {f"e{i}/c": {"_exists": True, "tag": tag, "i": i} for i in range(keys)}
    return Snapshot(tag, state, {key: {"_exists": 1, "tag": tag} for key in state})


@pytest.mark.parametrize("incremental", [False, True], ids=["save", "save_changes"])
async def test_concurrent_saves_to_one_room_are_never_seen_half_done(
    harness: Harness, incremental: bool
) -> None:
    storage = harness.backend.create_storage("r")
    await storage.save(_tagged_snapshot(0))
    tags = range(1, 9)
    seen: list[int] = []
    writers_done = trio.Event()

    async def writer(tag: int) -> None:
        snapshot = _tagged_snapshot(tag)
        if incremental:
            assert isinstance(storage, IncrementalStorage)
            records = {
                key: RecordChange(record, dict(snapshot.timestamps[key]))
                for key, record in snapshot.state.items()
            }
            await storage.save_changes(Changes(tag, records))
        else:
            await storage.save(snapshot)

    async def reader() -> None:
        # Another storage object for the same room, as another process would have.
        other = harness.backend.create_storage("r")
        while not writers_done.is_set():
            loaded = await other.load()
            assert loaded is not None
            found = {record["tag"] for record in loaded.state.values()}
            found |= {ts["tag"] for ts in loaded.timestamps.values()}
            assert found == {loaded.timestamp}, "a load saw half of a save"
            assert len(loaded.state) == 200
            seen.append(loaded.timestamp)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        async with trio.open_nursery() as writers:
            for tag in tags:
                writers.start_soon(writer, tag)
        writers_done.set()
    final = await storage.load()
    assert final is not None and final.timestamp in tags
    assert as_json(final) == as_json(_tagged_snapshot(final.timestamp))
    assert seen, "the reader never ran"


CHILD = """
import os, sys, trio
sys.path.insert(0, {src!r})
import canvas_store_trio.storage._postgres, canvas_store_trio.storage._sqlite
from canvas_store_trio import Changes, RecordChange, decode_snapshot
from canvas_store_trio.storage._backends import FileBackend
from canvas_store_trio.storage._postgres import PostgresDatabase
from canvas_store_trio.storage._sqlite import SQLiteDatabase

def die(*args):
    os._exit(17)  # killed at the last moment: after every write, before the commit

canvas_store_trio.storage._postgres._commit = die
canvas_store_trio.storage._sqlite._commit = die
os.replace = die  # FileStorage: the temp file is written, the rename never happens

async def main():
    backend = {backend}
    snapshot = decode_snapshot(sys.stdin.buffer.read())
    storage = backend.create_storage({room_id!r})
    if {incremental!r}:
        await storage.save_changes(Changes(snapshot.timestamp, {{
            k: RecordChange(v, snapshot.timestamps[k]) for k, v in snapshot.state.items()
        }}))
    else:
        await storage.save(snapshot)
    os._exit(0)

trio.run(main)
"""


@durable
@pytest.mark.parametrize("incremental", [False, True], ids=["save", "save_changes"])
async def test_a_save_killed_before_commit_leaves_the_previous_state(
    harness: Harness, incremental: bool
) -> None:
    assert harness.child_backend is not None
    storage = harness.backend.create_storage("r")
    doc = new_document()
    doc.apply([{f"e{i}/c": {"_exists": True, "v": i} for i in range(50)}])
    await save_like_a_room(storage, doc)
    before = doc.snapshot()
    # The doomed save rewrites every key and adds many more: more than SQLite's page
    # cache holds, so uncommitted pages spill into the WAL before the process dies.
    doomed = _tagged_snapshot(99, keys=30_000)
    code = CHILD.format(
        src=SRC, backend=harness.child_backend, room_id="r", incremental=incremental
    )
    result = await trio.run_process(
        [sys.executable, "-c", code],
        stdin=encode_snapshot(doomed),
        check=False,
        capture_stderr=True,
    )
    assert result.returncode == 17, result.stderr.decode()
    assert as_json(await storage.load()) == as_json(before)
    await harness.restart()
    storage = harness.backend.create_storage("r")
    assert as_json(await storage.load()) == as_json(before)
    assert await harness.backend.list_room_ids() == ["r"]
    # Nothing of the dead save is in the way of the next one.
    doc.apply([{"e1/c": {"v": "after"}}])
    await save_like_a_room(storage, doc)
    assert as_json(await storage.load()) == as_json(doc.snapshot())


@durable
async def test_a_failed_commit_raises_storage_error_and_keeps_the_previous_state(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = harness.backend.create_storage("r")
    doc = new_document()
    doc.apply([{"e/c": {"_exists": True, "v": 1}}])
    await save_like_a_room(storage, doc)
    before = doc.snapshot()

    if harness.kind == "FileStorage":

        def fail(*args: object) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "replace", fail)
    elif harness.kind == "SQLiteStorage":
        import canvas_store_trio.storage._sqlite

        def fail_sqlite(conn: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(canvas_store_trio.storage._sqlite, "_commit", fail_sqlite)
    else:
        import psycopg

        import canvas_store_trio.storage._postgres

        def fail_postgres(conn: object) -> None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(canvas_store_trio.storage._postgres, "_commit", fail_postgres)

    doc.apply([{"e/c": {"v": 2}, "f/c": {"_exists": True}}])
    changes = doc.take_changes()
    with pytest.raises(StorageError, match=r"cannot save room 'r'|Input/output error"):
        if isinstance(storage, IncrementalStorage):
            await storage.save_changes(changes)
        else:
            await storage.save(doc.snapshot())
    doc.restore_changes(changes)  # what the room does
    monkeypatch.undo()
    assert as_json(await storage.load()) == as_json(before)
    await save_like_a_room(storage, doc)  # the room's retry
    await harness.restart()
    loaded = await harness.backend.create_storage("r").load()
    assert as_json(loaded) == as_json(doc.snapshot())


HOSTILE_ROOM_IDS = [
    "../../x",
    "../x.json",
    "/etc/passwd",
    "'; DROP TABLE canvas_store_rooms; --",
    "Robert'); DROP TABLE canvas_store_records;--",
    '" OR 1=1 --',
    "%s %(x)s ? :1 $1 {}",
    "комната 🎨",
    "a/b\\c",
    "tab\tnew\nline\rret",
    "\u202e\ufeffbidi",
    "\x01starts with the escape mark",
    "~YQ",
    ".",
    "..",
    "",
    " ",
    "x" * 200,
    "CON",
    "nul\x00inside",
]


async def test_hostile_room_ids_stay_data(harness: Harness, tmp_path: Path) -> None:
    for n, room_id in enumerate(HOSTILE_ROOM_IDS):
        state = {"e/id": {"_exists": True, "id": room_id}}
        await harness.backend.create_storage(room_id).save(
            Snapshot(n + 1, state, {"e/id": {"_exists": n + 1, "id": n + 1}})
        )
    await harness.restart()
    assert await harness.backend.list_room_ids() == sorted(HOSTILE_ROOM_IDS)
    for n, room_id in enumerate(HOSTILE_ROOM_IDS):
        loaded = await harness.backend.create_storage(room_id).load()
        assert loaded is not None, room_id
        assert loaded.timestamp == n + 1
        assert loaded.state["e/id"]["id"] == room_id
    # Nothing was written outside the backend's own place.
    assert sorted(os.listdir(tmp_path)) in (["data"], ["db"], [])
    if harness.kind == "FileStorage":
        assert len(os.listdir(tmp_path / "data")) == len(HOSTILE_ROOM_IDS)
    assert not Path("x.json").exists()


# --- history ------------------------------------------------------------------------


def history(test: T) -> T:
    """For tests of the kept versions: not for memory, which keeps none."""
    test.history = True  # type: ignore[attr-defined]
    return test


def history_of(harness: Harness, room_id: str) -> HistoryStorage:
    storage = harness.backend.create_storage(room_id)
    assert isinstance(storage, HistoryStorage)
    return storage


def version_snapshot(n: int, room_id: str = "r") -> Snapshot:
    state = {f"e{i}/c": {"_exists": True, "v": value, "n": n}
             for i, value in enumerate(ODD_VALUES)}
    state["gone/c"] = {"_exists": False}
    state["room/c"] = {"_exists": True, "id": room_id}
    return Snapshot(n, state, {key: {"_exists": n} for key in state})


async def save_version(storage: HistoryStorage, snapshot: Snapshot, keep: int = 10) -> None:
    await storage.save_version(snapshot.timestamp, list(encode_snapshot_parts(snapshot, 7)),
                               keep=keep)


@history
async def test_versions_round_trip_and_are_listed_oldest_first(harness: Harness) -> None:
    storage = history_of(harness, "r")
    assert await storage.list_versions() == []
    assert await storage.load_version(1) is None
    before = datetime.now(UTC) - timedelta(seconds=5)
    for n in (30, 10, 20):
        await save_version(storage, version_snapshot(n))
    await harness.restart()
    storage = history_of(harness, "r")
    versions = await storage.list_versions()
    assert [v.version for v in versions] == [10, 20, 30]
    for v in versions:
        assert before <= v.saved_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert as_json(await storage.load_version(20)) == as_json(version_snapshot(20))
    assert await storage.load_version(25) is None
    # Versions are no room: the room itself was never saved.
    assert await storage.load() is None
    assert await harness.backend.list_room_ids() == []


@history
async def test_a_version_saved_again_is_replaced_and_the_oldest_are_dropped(
    harness: Harness,
) -> None:
    storage = history_of(harness, "r")
    for n in range(1, 6):
        await save_version(storage, version_snapshot(n), keep=3)
        assert [v.version for v in await storage.list_versions()] == list(
            range(max(1, n - 2), n + 1))
    again = Snapshot(5, {"a/c": {"_exists": True}}, {})
    await save_version(storage, again, keep=3)
    assert [v.version for v in await storage.list_versions()] == [3, 4, 5]
    assert as_json(await storage.load_version(5)) == as_json(again)
    await save_version(storage, version_snapshot(6), keep=1)
    assert [v.version for v in await storage.list_versions()] == [6]


@history
async def test_each_room_keeps_its_own_versions(harness: Harness) -> None:
    ids = ["a", "a.history", *HOSTILE_ROOM_IDS]
    for n, room_id in enumerate(ids, start=1):
        await save_version(history_of(harness, room_id), version_snapshot(n, room_id), keep=1)
    await harness.restart()
    for n, room_id in enumerate(ids, start=1):
        storage = history_of(harness, room_id)
        assert [v.version for v in await storage.list_versions()] == [n], room_id
        kept = await storage.load_version(n)
        assert kept is not None and kept.state["room/c"]["id"] == room_id
    assert await harness.backend.list_room_ids() == []


@history
async def test_a_room_keeps_versions_as_it_changes_and_one_is_restored(
    harness: Harness,
) -> None:
    storage = history_of(harness, "board")
    async with RoomManager(create_storage=harness.backend.create_storage, save_throttle=0.01,
                           history_interval=0.05) as manager, \
            manager.open_room("board") as room:
        for n in range(3):
            await room.apply_patch({"note/c": {"_exists": True, "text": f"v{n}"}}
                                   | ({} if n else {"first/c": {"_exists": True}}))
            with trio.fail_after(5):
                while len(await storage.list_versions()) < n:
                    await trio.sleep(0.01)
            await trio.sleep(0.06)
        await room.apply_patch({"first/c": {"_exists": False}})
        with trio.fail_after(5):
            while len(await storage.list_versions()) < 3:
                await trio.sleep(0.01)
    # The state before each edit (the empty room aside) became a version.
    assert [v.version for v in await storage.list_versions()] == [1, 2, 3]
    one = await storage.load_version(1)
    assert one is not None
    assert one.state == {"note/c": {"_exists": True, "text": "v0"}, "first/c": {"_exists": True}}
    assert (await storage.load_version(3) or Snapshot()).state["note/c"]["text"] == "v2"

    restored = await restore_version(harness.backend, "board", 1)
    await harness.restart()
    loaded = await harness.backend.create_storage("board").load()
    assert as_json(loaded) == as_json(restored)
    assert loaded is not None and loaded.timestamp == 5  # an edit over timestamp 4
    assert loaded.state == one.state
    assert loaded.timestamps["note/c"]["text"] == 5
    assert loaded.timestamps["first/c"]["_exists"] == 5
