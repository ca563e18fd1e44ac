"""Export and import: Node snapshot files in and out of every backend."""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio import Snapshot, decode_snapshot, encode_snapshot
from canvas_store_trio.storage._backends import (
    FileBackend,
    MemoryBackend,
    StorageBackend,
    open_storage_backend,
)
from canvas_store_trio.storage._postgres import PostgresDatabase
from canvas_store_trio.storage._sqlite import SQLiteDatabase
from canvas_store_trio.storage._transfer import (
    TransferError,
    add_transfer_commands,
    copy_rooms,
    export_room,
    export_room_to_file,
    import_directory,
    import_file,
    import_room,
    room_id_for_file,
    run_transfer_command,
)

from .conftest import NODE_DIR, require_node
from .storage_helpers import postgres_schema

NODE_FILE = Path(__file__).parent / "data" / "node-room.json"


@pytest.fixture(params=["file", "sqlite", "postgres"])
def target_place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL for the target backend (a fresh PostgreSQL schema for postgres)."""
    if request.param == "file":
        yield f"file://{tmp_path / 'target'}"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'target.db'}"
    else:
        with postgres_schema() as conninfo:
            yield conninfo


@pytest.fixture
async def target(target_place: str) -> AsyncIterator[StorageBackend]:
    backend: StorageBackend
    if target_place.startswith(("file:", "sqlite:")):
        backend = open_storage_backend(target_place)
    else:
        backend = PostgresDatabase(target_place)
    async with backend:
        yield backend


def json_of(data: bytes | Snapshot) -> Any:
    return orjson.loads(encode_snapshot(data) if isinstance(data, Snapshot) else data)


async def test_a_node_file_imports_and_exports_unchanged(
    target: StorageBackend, tmp_path: Path
) -> None:
    room_id = await import_file(target, NODE_FILE)
    assert room_id == "node-room"
    assert await target.list_room_ids() == ["node-room"]
    out = tmp_path / "exported.json"
    await export_room_to_file(target, "node-room", out)
    assert json_of(out.read_bytes()) == json_of(NODE_FILE.read_bytes())
    if isinstance(target, FileBackend):  # same order, same bytes as JSON.stringify wrote
        assert out.read_bytes() == NODE_FILE.read_bytes()


async def test_import_refuses_to_replace_a_room_unless_told(target: StorageBackend) -> None:
    await import_file(target, NODE_FILE, room_id="r")
    with pytest.raises(TransferError, match="already exists"):
        await import_room(target, "r", Snapshot(1, {}, {}))
    await import_room(target, "r", b'{"timestamp":9,"state":{},"timestamps":{}}', overwrite=True)
    assert await target.create_storage("r").load() == Snapshot(9, {}, {})


async def test_import_rejects_what_is_not_a_snapshot(target: StorageBackend) -> None:
    for bad in [b"", b"null", b"[]", b'{"timestamp":-1,"state":{}}', b'{"state":{"a":1}}']:
        with pytest.raises(TransferError, match="not a valid snapshot"):
            await import_room(target, "r", bad)
    assert await target.list_room_ids() == []


async def test_a_node_data_folder_moves_in_with_one_call(
    target: StorageBackend, tmp_path: Path
) -> None:
    data = tmp_path / "node-data"
    data.mkdir()
    shutil.copy(NODE_FILE, data / "node-room.json")
    shutil.copy(NODE_FILE, data / "my room.json")  # Node names files <roomId>.json as is
    (data / "b.json.1b2c.tmp").write_text("{half a sav")  # a Node save in progress
    (data / "notes.txt").write_text("not a room")
    (data / "sub").mkdir()
    assert await import_directory(target, data) == ["my room", "node-room"]
    assert await target.list_room_ids() == ["my room", "node-room"]
    for room_id in ["my room", "node-room"]:
        assert json_of(await export_room(target, room_id)) == json_of(NODE_FILE.read_bytes())


async def test_a_folder_with_a_bad_file_imports_nothing(
    target: StorageBackend, tmp_path: Path
) -> None:
    data = tmp_path / "node-data"
    data.mkdir()
    shutil.copy(NODE_FILE, data / "good.json")
    (data / "broken.json").write_text('{"timestamp": 1, "state": ')
    with pytest.raises(TransferError, match=r"nothing was imported:\n.*broken.json"):
        await import_directory(target, data)
    assert await target.list_room_ids() == []
    await import_file(target, NODE_FILE, room_id="good")
    (data / "broken.json").unlink()
    with pytest.raises(TransferError, match=r"'good' .* already exists"):
        await import_directory(target, data)
    assert await import_directory(target, data, overwrite=True) == ["good"]


async def test_rooms_move_between_any_two_backends(tmp_path: Path) -> None:
    snapshots = {
        "plain": decode_snapshot(NODE_FILE.read_bytes()),
        "../../escape": Snapshot(3, {"a/b": {"_exists": False}}, {"a/b": {"_exists": 3}}),
        "'; DROP TABLE canvas_store_rooms; --": Snapshot(1, {"k/v": {"_exists": True}}, {}),
        "ünïcode 🎨": Snapshot(0, {}, {}),
    }
    memory = MemoryBackend()
    for room_id, snapshot in snapshots.items():
        await memory.create_storage(room_id).save(snapshot)
    chain: list[StorageBackend] = [
        memory,
        FileBackend(tmp_path / "files"),
        SQLiteDatabase(tmp_path / "rooms.db"),
    ]
    with postgres_schema() as conninfo:
        chain.append(PostgresDatabase(conninfo))
        chain.append(FileBackend(tmp_path / "files-again"))
        for source, target in itertools.pairwise(chain):
            assert await copy_rooms(source, target) == sorted(snapshots)
        last = chain[-1]
        for room_id, snapshot in snapshots.items():
            assert json_of(await export_room(last, room_id)) == json_of(snapshot)
        with pytest.raises(TransferError, match="already exist"):
            await copy_rooms(chain[0], last)
        for backend in chain:
            await backend.aclose()


async def test_exporting_a_missing_room_says_so(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="room 'nope' not found in folder"):
        await export_room(FileBackend(tmp_path), "nope")


def test_room_ids_come_from_file_names() -> None:
    assert room_id_for_file("data/room-1.json") == "room-1"
    assert room_id_for_file("my room.json") == "my room"  # the Node server's naming
    assert room_id_for_file("~bXkgcm9vbQ.json") == "my room"  # ours, for odd ids
    assert room_id_for_file("~bad!.json") == "~bad!"
    assert room_id_for_file("room.json.abc.tmp") is None
    assert room_id_for_file(".json") is None


def test_storage_urls(tmp_path: Path) -> None:
    db = open_storage_backend("sqlite:///rel/rooms.db")
    assert isinstance(db, SQLiteDatabase) and db.path == "rel/rooms.db"
    db = open_storage_backend("sqlite:////abs/rooms.db")
    assert isinstance(db, SQLiteDatabase) and db.path == "/abs/rooms.db"
    db = open_storage_backend("sqlite:///:memory:")
    assert isinstance(db, SQLiteDatabase) and db.path == ":memory:"
    files = open_storage_backend(f"file://{tmp_path}")
    assert isinstance(files, FileBackend) and files.dir == tmp_path
    files = open_storage_backend("./data")
    assert isinstance(files, FileBackend) and files.dir == Path("data")
    assert isinstance(open_storage_backend("memory:"), MemoryBackend)
    for bad in ["mysql://x/y", "sqlite://host/x.db", "sqlite:///", "file://elsewhere/x"]:
        with pytest.raises(ValueError):
            open_storage_backend(bad)
    pytest.importorskip("psycopg")
    pg = open_storage_backend("postgresql://u:secret@db.example:6543/rooms?sslmode=require")
    assert isinstance(pg, PostgresDatabase)
    assert str(pg) == "PostgreSQL database db.example:6543/rooms"  # no password
    assert isinstance(open_storage_backend("postgres://h/db"), PostgresDatabase)


# --- files the Node server itself wrote ------------------------------------------------


async def run_node_server(data: Path, rooms: dict[str, list[dict[str, Any]]]) -> None:
    """Run the Node reference server, send each room its patches, then stop it (it saves)."""
    async with trio.open_nursery() as nursery:
        command = ["node", str(Path(NODE_DIR) / "reference-server.mjs"), "--port", "0",
                   "--data-dir", str(data), "--save-throttle", "0.1"]
        process: trio.Process = await nursery.start(
            functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(20):
            while b"\n" not in buffer:
                buffer += await process.stdout.receive_some()
        url = buffer.split()[2].decode()  # "Listening on ws://127.0.0.1:PORT"
        for room_id, patches in rooms.items():
            async with open_websocket_url(
                f"{url}/?roomId={quote(room_id)}&clientId=writer"
            ) as ws:
                await ws.send_message(
                    orjson.dumps({"type": "reconnect", "lastTimestamp": 0, "protocolVersion": 2})
                )
                for n, patch in enumerate(patches):
                    await ws.send_message(
                        orjson.dumps({"type": "patch", "messageId": n, "documentPatches": [patch]})
                    )
                with trio.fail_after(10):
                    acks = 0
                    while acks < len(patches):
                        frame = orjson.loads(await ws.get_message())
                        acks += frame["type"] == "ack"
        process.send_signal(signal.SIGTERM)  # closes every room, which saves
        with trio.fail_after(10):
            await process.wait()


@pytest.mark.node
async def test_a_data_folder_written_by_the_node_server_moves_into_sqlite(
    tmp_path: Path,
) -> None:
    require_node()
    data = tmp_path / "data"
    patches: list[dict[str, Any]] = [
        {"e1/pos": {"_exists": True, "x": 1.5, "y": -2, "label": "héllo ✓ 🎨"}},
        {"e2/stroke": {"_exists": True, "points": [1, 2, 3]}},
        {"e2/stroke": {"points": {"__buf": 1, "len": 5, "runs": [[3, [8, 9]]]}}},
        {"e1/pos": {"_exists": False}, "SINGLETON/camera": {"_exists": True, "zoom": 0.25}},
    ]
    await run_node_server(data, {"room-1": patches, "my room": patches[:2]})
    assert sorted(os.listdir(data)) == ["my room.json", "room-1.json"]
    node_json = json_of((data / "room-1.json").read_bytes())
    assert node_json["timestamp"] == 4
    assert node_json["state"]["e2/stroke"]["points"] == [1, 2, 3, 8, 9]
    async with SQLiteDatabase(tmp_path / "rooms.db") as db:
        assert await import_directory(db, data) == ["my room", "room-1"]
        for name, room_id in [("room-1.json", "room-1"), ("my room.json", "my room")]:
            exported = await export_room(db, room_id)
            assert json_of(exported) == json_of((data / name).read_bytes())
        # And back out to a folder the Node server can load again.
        out = tmp_path / "out"
        await copy_rooms(db, FileBackend(out), ["room-1"])
        assert json_of((out / "room-1.json").read_bytes()) == node_json


# --- the export and import commands ---------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="canvas-store-trio")
    add_transfer_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


async def test_the_commands_move_a_node_folder_into_sqlite_and_back(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    node_data = tmp_path / "node-data"
    node_data.mkdir()
    shutil.copy(NODE_FILE, node_data / "a.json")
    shutil.copy(NODE_FILE, node_data / "b b.json")
    db = "sqlite:///rooms.db"  # relative to the working folder
    message = await run_transfer_command(
        parse("import", "--from-dir", "node-data", "--storage", db)
    )
    assert message == "imported 2 room(s) from node-data into SQLite database rooms.db"
    with pytest.raises(TransferError, match="already exist"):
        await run_transfer_command(parse("import", "--from-dir", "node-data", "--storage", db))
    await run_transfer_command(parse("import", str(NODE_FILE), "--room", "c", "--storage", db))
    await run_transfer_command(parse("export", "b b", "--storage", db))
    assert json_of(capsysbinary.readouterr().out) == json_of(NODE_FILE.read_bytes())
    await run_transfer_command(parse("export", "c", "--storage", db, "-o", "c.json"))
    assert json_of((tmp_path / "c.json").read_bytes()) == json_of(NODE_FILE.read_bytes())
    message = await run_transfer_command(parse("export", "--all", "-o", "out", "--storage", db))
    assert message == "exported 3 room(s) from SQLite database rooms.db to out"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "c.json", "~YiBi.json"]
    # The default place is ./data, as for `serve`.
    await run_transfer_command(parse("import", "out/~YiBi.json"))
    assert await FileBackend("data").list_room_ids() == ["b b"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(NODE_FILE.read_bytes())))
    await run_transfer_command(parse("import", "-", "--room", "from stdin", "--data-dir", "d2"))
    assert await FileBackend("d2").list_room_ids() == ["from stdin"]


@pytest.mark.parametrize(
    "argv",
    [
        ["export"],
        ["export", "--all"],
        ["export", "r", "--all", "-o", "x"],
        ["import"],
        ["import", "-"],
        ["import", "f.json", "--from-dir", "d"],
        ["export", "r", "--storage", "ftp://x"],
    ],
)
async def test_the_commands_explain_wrong_arguments(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await run_transfer_command(parse(*argv, *([] if "--storage" in argv else
                                                   ["--data-dir", str(tmp_path)])))
