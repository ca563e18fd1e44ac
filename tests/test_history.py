"""History (issue 16): versions kept while a room changes, and restored.

In-process with a mock clock for the timing (at most one version per interval, the
oldest dropped, none holding an uncommitted edit), then the real thing: rooms on file,
SQLite and PostgreSQL storage, the ``history`` commands, and a real server whose
connected client sees a restore arrive as ordinary patches.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from canvas_store_trio import (
    Changes,
    CommitError,
    HistoryStorage,
    MemoryStorage,
    RecordChange,
    Room,
    RoomManager,
    Snapshot,
    decode_snapshot,
    encode_snapshot,
)
from canvas_store_trio.storage._backends import FileBackend, open_storage_backend
from canvas_store_trio.storage._transfer import import_directory

from .processes import client, server_process
from .storage_helpers import CommandedStorage, postgres_schema
from .test_front_door import assert_one_line_error, run_cli


def note(value: Any) -> dict[str, Any]:
    return {"n/Note": {"_exists": True, "v": value}}


def live(snapshot: Snapshot | None) -> dict[str, Any]:
    assert snapshot is not None
    return {k: r for k, r in snapshot.state.items() if r.get("_exists") is not False}


@asynccontextmanager
async def manager_on(storage: CommandedStorage, **options: Any) -> AsyncIterator[RoomManager]:
    async with RoomManager(create_storage=lambda room_id: storage, save_throttle=1000,
                           **options) as manager:
        yield manager


# --- when versions are kept -----------------------------------------------------------


async def test_a_version_is_kept_at_most_once_per_interval_while_edits_keep_coming(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage()
    await storage.save(Snapshot(5, note("seed"), {"n/Note": {"_exists": 5, "v": 5}}))
    async with manager_on(storage, history_interval=10.25, history_keep=100) as manager, \
            manager.open_room("r") as room:
        start = trio.current_time()
        for i in range(35):  # an edit every second, for 35 s
            await trio.sleep_until(start + 0.5 + i)
            await room.apply_patch(note(i))
        await trio.sleep(60)
        assert [v for v, _, _ in storage.version_saves] == [5, 16, 27, 38]
        times = [at - start for _, _, at in storage.version_saves]
        assert times == [0.5, 11.5, 22.5, 33.5]  # the first edit due after each interval
        # Each holds the document as it was just before the edit that began it.
        assert live(storage.versions[5]) == note("seed")
        assert [live(storage.versions[v]) for v in (16, 27, 38)] == [note(10), note(21),
                                                                    note(32)]
        assert storage.versions[16].timestamp == 16
        # After a quiet spell, the next edit keeps the state the room rested in.
        await room.apply_patch(note("later"))
        await trio.sleep(1)
        assert storage.version_saves[-1][0] == 40
        assert live(storage.versions[40]) == note(34)


async def test_a_big_room_is_kept_a_piece_at_a_time_as_it_was(autojump_clock: Any) -> None:
    storage = CommandedStorage()
    state = {f"e{i}/c": {"_exists": True, "text": "x" * 100} for i in range(20_000)}
    await storage.save(Snapshot(1, state, {key: {"_exists": 1} for key in state}))
    edits = 0
    async with manager_on(storage, history_interval=60) as manager, \
            manager.open_room("r") as room:
        # The first edit begins a version; the next ones run while it is encoded.
        while not storage.version_saves:
            await room.apply_patch({f"e{edits}/c": {"text": "changed"}})
            edits += 1
    assert edits > 20  # the room went on between pieces (2 MB, 32 KiB a step)
    assert storage.versions[1].state == state  # yet the version is the room as it was


async def test_the_oldest_versions_beyond_keep_are_dropped(autojump_clock: Any) -> None:
    storage = CommandedStorage()
    async with manager_on(storage, history_interval=1, history_keep=3) as manager, \
            manager.open_room("r") as room:
        for i in range(10):
            await room.apply_patch(note(i))
            await trio.sleep(2)
    # The empty room before the first edit is no version; then one per edit.
    assert [v for v, _, _ in storage.version_saves] == list(range(1, 10))
    assert sorted(storage.versions) == [7, 8, 9]
    assert live(storage.versions[9]) == note(8)


async def test_a_room_that_is_not_edited_keeps_no_version(autojump_clock: Any) -> None:
    storage = CommandedStorage()
    await storage.save(Snapshot(3, note(1), {}))
    async with manager_on(storage, history_interval=1) as manager, \
            manager.open_room("r") as room:
        await room.apply_patch({})  # no edit
        await trio.sleep(5)
        await room.replace_state(note(1))  # the same state: no edit
        await trio.sleep(5)
    assert storage.version_saves == []
    assert storage.timestamp == 3


async def test_with_durable_acks_a_version_never_holds_an_uncommitted_edit(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage()
    async with manager_on(storage, durable_acks=True, history_interval=5,
                          flush_timeout=100) as manager, \
            manager.open_room("r") as room, trio.open_nursery() as nursery:
        storage.block()
        nursery.start_soon(room.apply_patch, note(0))  # timestamp 1, its commit held
        await storage.wait_attempts(1)
        # This edit begins a version of timestamp 1, not committed yet.
        nursery.start_soon(room.apply_patch, note(1))
        await trio.sleep(10)
        assert storage.version_saves == []
        storage.release()
        await trio.sleep(1)
        [(version, committed, _)] = storage.version_saves
        assert version == 1 and committed >= 1
        assert live(storage.versions[1]) == note(0)


async def test_a_version_whose_edits_are_never_committed_is_not_kept(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage()
    async with manager_on(storage, durable_acks=True, history_interval=5) as manager, \
            manager.open_room("r") as room, trio.open_nursery() as nursery:
        storage.block()
        storage.fail_next = True

        async def edit(value: int) -> None:
            with pytest.raises(CommitError):
                await room.apply_patch(note(value))

        nursery.start_soon(edit, 0)  # timestamp 1: its commit will fail
        await storage.wait_attempts(1)
        nursery.start_soon(edit, 1)  # begins a version of timestamp 1
        await trio.sleep(1)
        storage.release()
        await room.wait_closed()
    assert storage.version_saves == []
    assert storage.timestamp == 0


async def test_history_needs_a_storage_that_keeps_versions() -> None:
    with pytest.raises(ValueError, match="history_interval"):
        RoomManager(create_storage=lambda r: CommandedStorage(), history_interval=0)
    with pytest.raises(ValueError, match="history_keep"):
        RoomManager(create_storage=lambda r: CommandedStorage(), history_keep=0)
    with pytest.raises(ValueError, match="storage"):
        RoomManager(history_interval=5)
    with pytest.raises(TypeError, match="HistoryStorage"):
        Room("r", storage=MemoryStorage(), history_interval=5)


# --- on files: the history folder is no room ----------------------------------------


async def test_the_history_folder_is_invisible_to_listing_folding_and_import(
    tmp_path: Path,
) -> None:
    backend = FileBackend(tmp_path)
    storage = backend.create_storage("a")
    await storage.save(Snapshot(2, note(2), {}))
    await storage.save_version(1, [encode_snapshot(Snapshot(1, note(1), {}))], keep=5)
    await storage.commit(Changes(3, {"n/Note": RecordChange(note(3)["n/Note"], {"v": 3})}))
    (tmp_path / "b.history").mkdir()  # a history with no room
    assert sorted(os.listdir(tmp_path)) == ["a.history", "a.journal", "a.json", "b.history"]
    assert await backend.list_room_ids() == ["a"]
    assert await backend.fold_journals() == 1
    assert sorted(os.listdir(tmp_path)) == ["a.history", "a.json", "b.history"]
    assert os.listdir(tmp_path / "a.history") == ["1.json"]
    target = FileBackend(tmp_path / "copy")
    assert await import_directory(target, tmp_path) == ["a"]
    assert [v.version for v in await storage.list_versions()] == [1]



# --- the history commands ------------------------------------------------------------


@pytest.fixture(params=["folder", "sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """Where the commands look (their options), on each storage."""
    if request.param == "folder":
        yield ["--data-dir", str(tmp_path / "data")]
    elif request.param == "sqlite":
        yield ["--storage", f"sqlite:///{tmp_path / 'rooms.db'}"]
    else:
        with postgres_schema(as_url=True) as url:
            yield ["--storage", url]


async def test_the_commands_list_and_restore_a_version(place: list[str], tmp_path: Path) -> None:
    backend = open_storage_backend(place[1])
    async with backend:
        storage = backend.create_storage("plans/2026")
        assert isinstance(storage, HistoryStorage)
        await storage.save(Snapshot(9, note("now") | {"extra/c": {"_exists": True}},
                                    {"n/Note": {"_exists": 1, "v": 9}, "extra/c": {"_exists": 9}}))
        for version in (4, 7):
            kept = Snapshot(version, note(version), {"n/Note": {"_exists": 1, "v": version}})
            await storage.save_version(version, [encode_snapshot(kept)], keep=5)

    listed = run_cli("history", "list", "plans/2026", *place, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [version for version, _ in lines] == ["4", "7"]
    assert "keeps 2 version(s)" in listed.stderr
    as_json = run_cli("history", "list", "plans/2026", "--json", *place, cwd=tmp_path)
    body = orjson.loads(as_json.stdout)
    assert body["room_id"] == "plans/2026"
    assert [(v["version"], v["timestamp"]) for v in body["versions"]] == [(4, 4), (7, 7)]
    saved_at = datetime.fromisoformat(body["versions"][0]["saved_at"])
    assert abs((datetime.now(UTC) - saved_at).total_seconds()) < 60
    assert lines[0][1] == f"{saved_at:%Y-%m-%d %H:%M:%S}"

    restored = run_cli("history", "restore", "plans/2026", "4", *place, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "restored room 'plans/2026' to version 4" in restored.stderr
    assert "timestamp is now 10" in restored.stderr
    async with open_storage_backend(place[1]) as backend:
        snapshot = await backend.create_storage("plans/2026").load()
    assert snapshot is not None and snapshot.timestamp == 10  # an edit above 9
    assert live(snapshot) == note(4)
    assert snapshot.state["extra/c"] == {"_exists": False}
    assert snapshot.timestamps["n/Note"]["v"] == 10
    # A client that reconnects with the timestamp it had gets the restore as a diff.
    async with server_process(*place) as server, \
            client(server, "plans%2F2026", "late") as late:
        frames = await late.reconnect(last_timestamp=9)
        (patch,) = [f for f in frames if f["type"] == "patch"]
        assert patch["documentPatches"] == [note(4) | {"extra/c": {"_exists": False}}]
        assert frames[-1] == {"type": "synced", "timestamp": 10}


def run_all(tmp_path: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """``run_cli`` for each command, side by side."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda argv: run_cli(*argv, cwd=tmp_path), commands))


def test_the_commands_explain_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    results = run_all(
        tmp_path,
        ["history", "list", "r", "--data-dir", missing],
        ["history", "restore", "r", "1", "--data-dir", missing],
        ["history", "list", "r", "--storage", "sqlite:///missing.db"],
        ["history", "restore", "r", "1", "--storage", "sqlite:///missing.db"],
        ["history", "list", "r", "--storage", "memory:"],
    )
    assert_one_line_error(results[0], "history list", "no folder")
    assert_one_line_error(results[1], "history restore", "no folder")
    assert_one_line_error(results[2], "no SQLite database")
    assert_one_line_error(results[3], "no SQLite database")
    assert_one_line_error(results[4], "keeps no history")
    assert sorted(os.listdir(tmp_path)) == []  # only reads: nothing was created
    (tmp_path / "data").mkdir()
    empty, unknown, negative, word = run_all(
        tmp_path,
        ["history", "list", "r"],
        ["history", "restore", "r", "3"],
        ["history", "restore", "r", "-3"],
        ["history", "restore", "r", "x"],
    )
    assert (empty.returncode, empty.stdout) == (0, "")
    assert_one_line_error(unknown, "room 'r' has no version 3")
    assert_one_line_error(negative, "VERSION")
    assert_one_line_error(word, "'x'")
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--memory", "--history-interval", "5"], ["--history-interval", "memory"]),
        (["--storage", "memory:", "--history-interval", "5"], ["memory"]),
        (["--memory", "--history-interval", "0"], ["--history-interval", "above 0"]),
        (["--memory", "--history-keep", "0"], ["--history-keep", "at least 1"]),
    ],
)
def test_serve_refuses_history_it_cannot_keep(
    tmp_path: Path, options: list[str], words: list[str]
) -> None:
    assert_one_line_error(run_cli("serve", "--port", "0", *options, cwd=tmp_path), *words)


async def test_a_clean_shutdown_leaves_snapshots_and_their_history_only(tmp_path: Path) -> None:
    async with server_process("--data-dir", str(tmp_path), "--durable-acks",
                              "--history-interval", "0.05", "--history-keep", "3") as server:
        async with client(server, "r", "alice") as alice, client(server, "s", "bob") as bob:
            await alice.reconnect()
            await bob.reconnect()
            for n in range(6):
                for c in (alice, bob):
                    await c.send(type="patch", messageId=f"m{n}", documentPatches=[note(n)])
                    await c.receive_until("ack")
                await trio.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await server.process.wait() == 0
    assert sorted(os.listdir(tmp_path)) == ["r.history", "r.json", "s.history", "s.json"]
    for room in ("r", "s"):
        # Versions 1 to 5 (the state before each edit but the first), the newest 3 kept.
        assert sorted(os.listdir(tmp_path / f"{room}.history")) == ["3.json", "4.json", "5.json"]
        for version in (3, 4, 5):
            kept = decode_snapshot((tmp_path / f"{room}.history" / f"{version}.json").read_bytes())
            assert kept.timestamp == version and live(kept) == note(version - 1)
        assert live(decode_snapshot((tmp_path / f"{room}.json").read_bytes())) == note(5)
