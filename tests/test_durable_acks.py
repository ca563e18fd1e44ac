"""Durable acks on a real SQLite file: group commit across rooms, acks in order.

The fault cases (a commit that hangs or fails) are in test_durable_faults.py, and the
real-process crash loops in test_durable_crash.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from canvas_store_trio import Limits, RoomManager, SQLiteDatabase
from canvas_store_trio.testing import FrameClient

from .conftest import connect, frames_of

NO_PINGS = Limits(ping_interval=None)


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


async def test_pipelined_edits_of_many_rooms_share_commits_and_keep_their_order(
    tmp_path: Path,
) -> None:
    rooms, editors, edits = 4, 3, 30
    async with (
        SQLiteDatabase(tmp_path / "rooms.db") as database,
        RoomManager(create_storage=database.create_storage, durable_acks=True,
                    limits=NO_PINGS) as manager,
    ):
        received: dict[tuple[int, int], list[dict[str, Any]]] = {}

        async def editor(room: int, n: int) -> None:
            async with connect(manager, f"roomId=r{room}&clientId=c{n}") as client:
                await client.reconnect(0)
                for i in range(edits):  # all sent at once, no waiting for acks
                    await client.send(type="patch", messageId=f"m{i}",
                                      documentPatches=[create(f"c{n}/k", v=i)])
                frames: list[dict[str, Any]] = []
                while len(frames_of(frames, "ack")) < edits:
                    frames.append(await client.receive())
                received[room, n] = frames

        async with trio.open_nursery() as nursery:
            for room in range(rooms):
                for n in range(editors):
                    nursery.start_soon(editor, room, n)
        commits = sum(manager.get_existing_room(f"r{r}").committer.commits  # type: ignore[union-attr]
                      for r in range(rooms))
        batches = database.group_commit.batches

    # every session sees the room's edits in one order: its timestamps only go up
    for frames in received.values():
        acks = frames_of(frames, "ack")
        assert [a["messageId"] for a in acks] == [f"m{i}" for i in range(edits)]
        stamps = [f["timestamp"] for f in frames if f["type"] in ("ack", "patch")]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    # group commit: fewer commits than edits, and fewer transactions than commits
    assert commits < rooms * editors * edits
    assert batches < commits
    async with SQLiteDatabase(tmp_path / "rooms.db") as database:
        for room in range(rooms):
            snapshot = await database.create_storage(f"r{room}").load()
            assert snapshot is not None
            assert snapshot.timestamp == editors * edits
            for n in range(editors):
                assert snapshot.state[f"c{n}/k"]["v"] == edits - 1


async def test_acks_never_tell_of_a_timestamp_not_yet_committed(tmp_path: Path) -> None:
    async with (
        SQLiteDatabase(tmp_path / "rooms.db") as database,
        RoomManager(create_storage=database.create_storage, durable_acks=True,
                    limits=NO_PINGS) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
    ):
        await a.reconnect(0)
        await a.send(type="patch", messageId="e", documentPatches=[create("a/k", v=1)])
        await a.send(type="patch", messageId="p", ephemeralPatches=[{"cursor": {"x": 1}}])
        acks = frames_of(await a.drain(0.5), "ack")
        assert [ack["messageId"] for ack in acks] == ["e", "p"]  # in the order sent
        assert acks[0]["timestamp"] == 1
        assert acks[1]["timestamp"] == 1  # behind the held ack: what that ack tells


@pytest.mark.parametrize("storage", ["memory", "none"])
async def test_durable_acks_need_a_journal_storage(storage: str) -> None:
    from canvas_store_trio import MemoryStorage

    if storage == "none":
        with pytest.raises(ValueError, match="durable acks need a storage"):
            RoomManager(durable_acks=True)
        return
    async with RoomManager(create_storage=lambda _: MemoryStorage(),
                           durable_acks=True) as manager:
        with pytest.raises(TypeError, match="JournalStorage"):
            await manager.get_or_create_room("r")


async def test_a_joining_client_gets_only_committed_edits(tmp_path: Path) -> None:
    async with (
        SQLiteDatabase(tmp_path / "rooms.db") as database,
        RoomManager(create_storage=database.create_storage, durable_acks=True,
                    limits=NO_PINGS) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
    ):
        await a.reconnect(0)
        await a.send(type="patch", messageId="e", documentPatches=[create("a/k", v=1)])
        async with connect(manager, "roomId=r&clientId=b") as b:
            frames = await b.reconnect(0)
            (diff,) = frames_of(frames, "patch")
            assert diff["documentPatches"][0]["a/k"]["v"] == 1
            room = manager.get_existing_room("r")
            assert room is not None and room.committer is not None
            assert room.committer.committed >= diff["timestamp"]
        assert isinstance(a, FrameClient)
