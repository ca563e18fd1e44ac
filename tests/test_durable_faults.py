"""Durable acks against a storage that blocks or fails its commits on command (issue 14).

With ``RoomManager(durable_acks=True)`` no frame that tells of an edit (its ack, its
broadcast, a diff) leaves before a ``commit`` holding the edit has returned. Commits are
grouped: the edits that arrive while one is in flight go into the next, one. Presence is
never held. A failed commit acks nothing of its edits, closes the room's sessions with 1013
and leaves the room as last committed.

In process, under ``autojump_clock``: a "nothing arrives within 5 s" check takes no time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed

from canvas_store_trio import (
    Limits,
    MemoryStorage,
    RoomManager,
    StorageError,
)
from canvas_store_trio.testing import FrameClient

from .conftest import connect, frames_of, joined
from .storage_helpers import CommandedStorage, LosableOwnership, durable_manager

NO_PINGS = Limits(ping_interval=None)
QUIET = 5.0
"""Seconds (virtual) in which a held frame must not arrive; well under ``flush_timeout``."""


def create(key: str, v: Any) -> dict[str, Any]:
    return {key: {"_exists": True, "v": v}}


async def edit(client: FrameClient, key: str, v: Any = 1) -> None:
    await client.send(type="patch", messageId=key, documentPatches=[create(key, v)])


async def take(client: FrameClient, kind: str, n: int) -> list[dict[str, Any]]:
    """The next ``n`` frames of ``kind`` (the others are dropped)."""
    found: list[dict[str, Any]] = []
    while len(found) < n:
        frame = await client.receive(timeout=10)
        if frame["type"] == kind:
            found.append(frame)
    return found


def edits_in(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frames that tell of document edits: acks and patches with documentPatches."""
    return [f for f in frames
            if f["type"] == "ack" or (f["type"] == "patch" and f.get("documentPatches"))]


def keys_in(frames: list[dict[str, Any]]) -> set[str]:
    return {key for f in frames for patch in f.get("documentPatches") or () for key in patch}


async def until_closed(client: FrameClient) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame up to the server's close, and the close code."""
    frames = []
    with trio.fail_after(10):
        try:
            while True:
                frames.append(await client.receive(timeout=10))
        except ConnectionClosed as exc:
            return frames, exc.reason.code


@pytest.fixture
def storage() -> Iterator[CommandedStorage]:
    storage = CommandedStorage()
    yield storage
    assert not storage.early_saves, "a save held edits that were never committed"


# --- held until committed --------------------------------------------------------------------


async def test_a_blocked_commit_holds_acks_broadcasts_and_diffs_until_it_returns(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    async with (
        durable_manager(storage) as manager,
        joined(manager, "a") as a,
        joined(manager, "b") as b,
    ):
        await a.drain()
        storage.block()
        for n in range(3):
            await edit(a, f"a{n}/c", n)
        await storage.wait_attempts(1)
        assert edits_in(await a.drain(QUIET)) == []  # no ack
        assert edits_in(await b.drain(QUIET)) == []  # no broadcast
        async with connect(manager, "roomId=r&clientId=c") as c:
            # A newcomer's diff may not hold them either (it may wait, or leave them out).
            await c.send(type="reconnect", lastTimestamp=0, protocolVersion=2)
            early = await c.drain(QUIET)
            assert keys_in(early) == set() and edits_in(early) == []
            assert all(f.get("timestamp", 0) == 0 for f in early), early

            storage.release()
            acks = await take(a, "ack", 3)
            assert [(f["messageId"], f["timestamp"]) for f in acks] == [
                ("a0/c", 1), ("a1/c", 2), ("a2/c", 3)]
            broadcasts = await take(b, "patch", 3)
            assert [f["timestamp"] for f in broadcasts] == [1, 2, 3]
            assert [f["documentPatches"] for f in broadcasts] == [
                [create(f"a{n}/c", n)] for n in range(3)]
            # And the newcomer now has them all, in one increasing order.
            later = list(early)
            if not frames_of(early, "synced"):
                later += await c.receive_until("synced")
            later += await c.drain()
            seen = {key: patch[key]["v"]
                    for f in frames_of(later, "patch") for patch in f.get("documentPatches") or ()
                    for key in patch}
            assert seen == {f"a{n}/c": n for n in range(3)}
            stamps = [f["timestamp"] for f in later if "timestamp" in f]
            assert stamps == sorted(stamps) and stamps[-1] == 3
    assert storage.timestamp == 3


async def test_edits_that_arrive_during_a_commit_go_into_one_next_commit(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    async with (
        durable_manager(storage) as manager,
        joined(manager, "a") as a,
        joined(manager, "b") as b,
    ):
        storage.block()
        await edit(a, "first/c")
        await storage.wait_attempts(1)  # the commit of "first" is in flight
        for n in range(10):  # 20 edits from two sessions, while it is
            await edit(a, f"a{n}/c", n)
            await edit(b, f"b{n}/c", n)
        room = manager.get_existing_room("r")
        assert room is not None
        with trio.fail_after(5):
            while room.document.timestamp < 21:  # the room keeps applying meanwhile
                await trio.sleep(0.01)
        assert storage.attempts == 1
        storage.release()
        a_acks = await take(a, "ack", 11)
        b_acks = await take(b, "ack", 10)
        assert [f["messageId"] for f in a_acks] == ["first/c", *(f"a{n}/c" for n in range(10))]
        assert [f["messageId"] for f in b_acks] == [f"b{n}/c" for n in range(10)]
        a_stamps = [f["timestamp"] for f in a_acks]
        b_stamps = [f["timestamp"] for f in b_acks]
        assert a_stamps == sorted(set(a_stamps)) and b_stamps == sorted(set(b_stamps))
        assert sorted(a_stamps + b_stamps) == list(range(1, 22))
        assert storage.committed_keys() == [
            {"first/c"}, {f"{who}{n}/c" for who in "ab" for n in range(10)}]
        assert [changes.timestamp for changes in storage.commits] == [1, 21]
        assert storage.attempts == 2


async def test_presence_is_neither_held_nor_committed(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    async with (
        durable_manager(storage) as manager,
        joined(manager, "a") as a,
        joined(manager, "b") as b,
        joined(manager, "c") as c,
    ):
        await edit(a, "a/c")
        assert (await take(a, "ack", 1))[0]["timestamp"] == 1
        for client in (a, b, c):
            await client.drain()
        storage.block()
        await edit(a, "held/c")
        await storage.wait_attempts(2)
        cursor = {"c/cursor": {"_exists": True, "x": 1}}
        await c.send(type="patch", messageId="p", ephemeralPatches=[cursor])
        with trio.fail_after(1):  # at once, while the commit is blocked
            [ack] = await take(c, "ack", 1)
            for other in (a, b):
                [presence] = await take(other, "patch", 1)
                assert presence["ephemeralPatches"] == [cursor]
                assert "documentPatches" not in presence
        # Its ack tells of no timestamp that is not durable yet.
        assert ack == {"type": "ack", "messageId": "p", "timestamp": 1}
        assert edits_in(await b.drain(QUIET)) == []  # a's edit is still held
        storage.release()
        assert (await take(a, "ack", 1))[0]["timestamp"] == 2
        assert keys_in(await take(b, "patch", 1)) == {"held/c"}
    assert storage.committed_keys() == [{"a/c"}, {"held/c"}]


async def test_replies_and_presence_queue_behind_the_frames_of_a_commit_in_flight(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    def cursor(x: int) -> list[dict[str, Any]]:
        return [{"a/cursor": {"_exists": True, "x": x}}]

    async with (
        durable_manager(storage) as manager,
        joined(manager, "a") as a,
        joined(manager, "b") as b,
    ):
        for client in (a, b):
            await client.drain()
        storage.block()
        await a.send(type="patch", messageId="e1", documentPatches=[create("a/c", 1)],
                     ephemeralPatches=cursor(1))
        await storage.wait_attempts(1)  # e1 is in flight
        await a.send(type="patch", messageId="p2", ephemeralPatches=cursor(2))
        await edit(a, "e3", 3)  # into the next commit
        await a.send(type="patch", messageId="p4", ephemeralPatches=cursor(4))
        # Every reply waits behind a held ack of a's, every presence of a's behind e1's.
        assert await a.drain(QUIET) == []
        assert await b.drain(QUIET) == []
        storage.release()
        acks = await take(a, "ack", 4)
        patches = await take(b, "patch", 4)

    assert [(ack["messageId"], ack["timestamp"]) for ack in acks] == [
        ("e1", 1), ("p2", 1), ("e3", 2), ("p4", 2)]
    # b sees a's presence in the order a sent it, and each edit once it is durable.
    assert [p.get("ephemeralPatches") for p in patches if p.get("ephemeralPatches")] == [
        cursor(1), cursor(2), cursor(4)]
    assert [keys_in([p]) for p in patches if p.get("documentPatches")] == [{"a/c"}, {"e3"}]
    assert storage.committed_keys() == [{"a/c"}, {"e3"}]


# --- a commit that fails ---------------------------------------------------------------------


async def test_a_failed_commit_acks_nothing_closes_the_room_1013_and_keeps_what_was_committed(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    invalid = {"bad/c": {"_exists": True, "v": 1}, "worse/c": {"_exists": "yes"}}
    async with durable_manager(storage) as manager:
        async with joined(manager, "a") as a, joined(manager, "b") as b:
            for n in range(3):
                await edit(a, f"kept{n}/c", n)
            assert [f["timestamp"] for f in await take(a, "ack", 3)] == [1, 2, 3]
            await a.send(type="patch", messageId="bad", documentPatches=[invalid])
            [error] = await take(a, "error", 1)
            assert error["messageId"] == "bad"

            storage.block()
            await edit(a, "lost-a/c")
            await storage.wait_attempts(2)  # in flight: the commit that will fail
            await edit(b, "lost-b/c")  # waits for the next one
            await b.send(type="patch", messageId="bad", documentPatches=[invalid])
            with trio.fail_after(1):  # refused as ever, at once, commit or no commit
                [error] = await take(b, "error", 1)
            assert error["messageId"] == "bad"
            storage.fail_next = True
            storage.release()
            for client in (a, b):
                frames, code = await until_closed(client)
                assert code == 1013, frames
                # No ack of a lost edit, no broadcast of one.
                assert not keys_in(frames) & {"lost-a/c", "lost-b/c"}, frames
                assert not [f for f in frames if f["type"] == "ack"], frames
            assert storage.timestamp == 3

        # A client that reconnects gets the room as last committed...
        async with connect(manager, "roomId=r&clientId=c") as c:
            frames = await c.reconnect()
        [patch] = frames_of(frames, "patch")
        assert patch["documentPatches"] == [
            {f"kept{n}/c": {"_exists": True, "v": n} for n in range(3)}]
        assert frames[-1] == {"type": "synced", "timestamp": 3}
        # ... until the client whose edit failed resends it, as the npm client does.
        async with connect(manager, "roomId=r&clientId=a") as a:
            await a.send(type="reconnect", lastTimestamp=3, protocolVersion=2,
                         documentPatches=[create("lost-a/c", 1)])
            await a.receive_until("synced")
        async with connect(manager, "roomId=r&clientId=d") as d:
            frames = await d.reconnect()
        [patch] = frames_of(frames, "patch")
        assert set(patch["documentPatches"][0]) == {"kept0/c", "kept1/c", "kept2/c", "lost-a/c"}
    committed = set().union(*storage.committed_keys())
    assert committed == {"kept0/c", "kept1/c", "kept2/c", "lost-a/c"}
    assert not {"lost-b/c", "bad/c", "worse/c"} & set(storage.records)  # never applied


async def test_a_room_that_loses_its_lease_commits_nothing_more_and_acks_nothing(
    autojump_clock: Any, storage: CommandedStorage
) -> None:
    """Once a room hears that its lease is gone (another node may own the room now), the
    edits it applied but has not committed are never committed, nor acked: only a commit
    already in flight ends as the storage decides (in a cluster, the write fence)."""
    ownership = LosableOwnership()
    async with durable_manager(storage, ownership) as manager:
        async with joined(manager, "a") as a, joined(manager, "b") as b:
            await edit(a, "kept/c")
            await take(a, "ack", 1)
            storage.block()
            await edit(a, "in-flight/c")
            await storage.wait_attempts(2)
            await edit(b, "applied/c")  # applied, waiting for the next commit
            await b.drain(QUIET)
            ownership.leases["r"].lose("another node took it")
            storage.release()
            for client in (a, b):
                frames, code = await until_closed(client)
                assert code == 1012, frames
                assert edits_in(frames) == [], frames
            await trio.sleep(QUIET)
        assert storage.attempts == 2
        assert set().union(*storage.committed_keys()) == {"kept/c", "in-flight/c"}


# --- which storage --------------------------------------------------------------------------


async def test_durable_acks_need_a_storage_that_commits() -> None:
    with pytest.raises(ValueError, match="storage"):
        RoomManager(durable_acks=True)  # no storage at all: nothing could be durable
    async with RoomManager(durable_acks=True, create_storage=lambda room_id: MemoryStorage(),
                           limits=NO_PINGS) as manager:
        with pytest.raises(TypeError, match="commit"):
            await manager.get_or_create_room("r")


async def test_closing_a_room_commits_first_so_its_held_acks_go_out_before_the_1001(
    autojump_clock: trio.abc.Clock,
) -> None:
    storage = CommandedStorage()
    async with durable_manager(storage) as manager, joined(manager, "a") as a:
        storage.block()
        await edit(a, "a/k")
        await storage.wait_attempts(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.close_room, "r")
            await trio.sleep(1)
            storage.release()
        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(await a.receive())
        assert [f["messageId"] for f in frames_of(frames, "ack")] == ["a/k"]
        assert closed.value.reason.code == 1001
        assert storage.timestamp == 1


@attrs.define(eq=False)
class RecordingGroup:
    """A commit group that records each batch (its rooms), holds it while ``gate`` is
    set, and fails the rooms in ``failing``."""

    batches: list[list[str]] = attrs.Factory(list)
    failing: set[str] = attrs.Factory(set)
    gate: trio.Event | None = None

    async def commit_many(self, commits: Any) -> list[Exception | None]:
        self.batches.append([storage.room_id for storage, _ in commits])
        if self.gate is not None:
            await self.gate.wait()
        errors: list[Exception | None] = []
        for storage, changes in commits:
            if storage.room_id in self.failing:
                errors.append(StorageError("the disk is full"))
            else:
                await storage.commit(changes)
                errors.append(None)
        return errors


@attrs.define
class GroupedStorage(CommandedStorage):
    room_id: str = ""
    commit_group: RecordingGroup = attrs.Factory(RecordingGroup)


async def test_rooms_of_one_commit_group_commit_together_and_fail_alone(
    autojump_clock: Any,
) -> None:
    group = RecordingGroup(gate=trio.Event())
    storages = {room: GroupedStorage(room_id=room, commit_group=group)
                for room in ("r0", "r1", "r2")}
    async with (
        RoomManager(durable_acks=True, create_storage=storages.__getitem__,
                    save_throttle=1000.0, idle_timeout=600.0, flush_timeout=60.0,
                    limits=NO_PINGS) as manager,
        connect(manager, "roomId=r0&clientId=a") as a,
        connect(manager, "roomId=r1&clientId=b") as b,
        connect(manager, "roomId=r2&clientId=c") as c,
    ):
        for client in (a, b, c):
            await client.reconnect()
        await edit(a, "first/a")
        with trio.fail_after(5):
            while not group.batches:  # in flight, held at the gate
                await trio.sleep(0.001)
        await edit(b, "k/b")
        await edit(c, "k/c")
        await edit(a, "second/a")
        with trio.move_on_after(QUIET):  # nothing is acked while the batch is held
            frame = await a.receive()
            raise AssertionError(f"a frame came while its commit was held: {frame}")
        group.failing.add("r1")
        gate, group.gate = group.gate, None
        gate.set()
        assert [f["messageId"] for f in await take(a, "ack", 2)] == ["first/a", "second/a"]
        assert [f["messageId"] for f in await take(c, "ack", 1)] == ["k/c"]
        frames, code = await until_closed(b)
        assert code == 1013 and not frames_of(frames, "ack"), frames
    # The three rooms' edits applied while the first batch was held made one batch.
    assert group.batches[0] == ["r0"]
    assert sorted(group.batches[1]) == ["r0", "r1", "r2"]
    assert storages["r1"].commits == [] and storages["r2"].timestamp == 1
