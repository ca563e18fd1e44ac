"""The embedding API's write side: server-side edits, rooms held open, the change feed.

``Room.apply_patch`` edits a room as a client would, ``RoomManager.open_room`` holds a
room open with no client, ``Room.subscribe`` follows every accepted edit. Sessions run
over real WebSocket framing (``conftest.connect``), under ``autojump_clock``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio import (
    SERVER_CLIENT_ID,
    Change,
    ChangeFeedOverflow,
    CommitError,
    FileStorage,
    Limits,
    ManagerClosedError,
    MemoryStorage,
    ProtocolError,
    Room,
    RoomClosedError,
    RoomLoadError,
    RoomManager,
    Snapshot,
    TooManyRoomsError,
    decode_snapshot,
)

from .conftest import connect, frames_of, joined
from .storage_helpers import CommandedStorage, durable_manager
from .test_front_door import ROOT, free_port, start_server

NO_PINGS = Limits(ping_interval=None)


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


def patches_in(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames_of(frames, "patch") if f.get("documentPatches")]


# --- apply_patch --------------------------------------------------------------------------


async def test_a_server_edit_reaches_every_session_is_saved_and_returns_its_timestamp(
    tmp_path: Path,
) -> None:
    async with RoomManager(
        create_storage=lambda room_id: FileStorage(dir=tmp_path, room_id=room_id),
        save_throttle=600.0,
        limits=NO_PINGS,
    ) as manager:
        async with joined(manager, "a") as a, joined(manager, "b") as b:
            await a.send(type="patch", messageId="m1", documentPatches=[create("e/c", x=1)])
            await a.receive_until("ack")
            room = manager.get_existing_room("r")
            assert room is not None
            timestamp = await room.apply_patch(create("e/c", x=2) | create("e2/c", y=3))
            assert timestamp == 2 == room.document.timestamp
            for client in (a, b):
                edits = patches_in(await client.drain())
                assert [(f["clientId"], f["timestamp"]) for f in edits][-1:] == [
                    (SERVER_CLIENT_ID, 2)
                ]
                assert edits[-1]["documentPatches"] == [create("e/c", x=2) | create("e2/c", y=3)]
            await room.flush()  # saves only what was marked unsaved
        saved = decode_snapshot((tmp_path / "r.json").read_bytes())
        assert saved.timestamp == 2
        assert saved.state == create("e/c", x=2) | create("e2/c", y=3)


async def test_a_joiner_gets_server_edits_in_its_diff(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, manager.open_room("r") as room:
        await room.apply_patch(create("k/c", v=1))
        async with connect(manager, "roomId=r&clientId=late") as late:
            frames = await late.reconnect()
        (diff,) = patches_in(frames)
        assert diff["documentPatches"] == [create("k/c", v=1)]
        assert frames_of(frames, "synced")[0]["timestamp"] == 1


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"k/c": {"_exists": "yes"}}, "invalid-component"),
        ({"k/c": 5}, "invalid-component"),
        ([{"k/c": {"x": 1}}], "invalid-frame"),
        ({"k/c": {"x": {1, 2}}}, "invalid-component"),
        ({f"k{i}/c": {"x": i} for i in range(41)}, "too-many-keys"),
        ({"k/c": {"b": {"__buf": 1, "len": 10**9, "runs": []}}}, "invalid-buffer-delta"),
    ],
)
async def test_a_bad_server_edit_is_refused_whole_as_a_client_frame_would_be(
    autojump_clock: Any, patch: Any, code: str
) -> None:
    limits = Limits(ping_interval=None, max_keys_per_frame=40, max_buffer_length=1000)
    async with RoomManager(limits=limits) as manager, joined(manager, "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        await room.apply_patch(create("keep/c", v=1))
        before = room.get_snapshot()
        await a.drain()
        with pytest.raises(ProtocolError) as refused:
            await room.apply_patch(patch)
        assert refused.value.code == code
        assert room.get_snapshot() == before
        assert await a.drain(quiet=1.0) == []  # nothing was broadcast
        try:
            orjson.dumps(patch)
        except TypeError:
            return  # no client could send it
        # The same patch from a client gets the same refusal code.
        await a.send(type="patch", messageId="m", documentPatches=[patch])
        (error,) = frames_of(await a.receive_until("error"), "error")
        assert error["code"] == code


async def test_the_caller_keeps_its_own_patch(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, manager.open_room("r") as room:
        mine = create("k/c", points=[1, 2])
        await room.apply_patch(mine)
        mine["k/c"]["points"].append(3)
        assert room.get_snapshot().state["k/c"]["points"] == [1, 2]


async def test_server_presence_reaches_clients_under_the_server_id(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, joined(manager, "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        timestamp = await room.apply_patch({}, ephemeral=create("bot/Cursor", x=4))
        assert timestamp == 0  # presence alone changes no document
        (frame,) = frames_of(await a.drain(), "patch")
        assert frame["clientId"] == SERVER_CLIENT_ID
        assert frame["ephemeralPatches"] == [create("bot/Cursor", x=4)]
        assert not frame.get("documentPatches")
        async with connect(manager, "roomId=r&clientId=c") as c:
            frames = await c.reconnect()
        presence = [f for f in frames if f.get("ephemeralPatches")]
        assert presence and presence[0]["ephemeralPatches"] == [create("bot/Cursor", x=4)]


async def test_no_client_may_take_the_server_client_id(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager:
        async with connect(manager, f"roomId=r&clientId={SERVER_CLIENT_ID}") as impostor:
            code, reason = await impostor.closed()
        assert code == 1008
        assert reason is not None and "reserved" in reason
        assert manager.room_ids() == []


async def test_a_closed_room_takes_no_server_edit(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, manager.open_room("r") as room:
        await manager.close_room("r")
        with pytest.raises(RoomClosedError):
            await room.apply_patch(create("k/c", v=1))
        with pytest.raises(RoomClosedError):
            async with room.subscribe():
                pass


# --- with durable acks -----------------------------------------------------------------------


async def test_with_durable_acks_a_server_edit_returns_and_is_broadcast_once_committed(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage()
    async with durable_manager(storage) as manager, joined(manager, "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        storage.block()
        returned: list[int] = []

        async def edit() -> None:
            returned.append(await room.apply_patch(create("k/c", v=1)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(edit)
            await storage.wait_attempts(1)
            await trio.sleep(5)
            assert returned == []
            assert patches_in(await a.drain()) == []
            storage.release()
        assert returned == [1]
        assert storage.committed_keys() == [{"k/c"}]
        (frame,) = patches_in(await a.drain())
        assert frame["timestamp"] == 1


async def test_with_durable_acks_a_failed_commit_raises_and_closes_the_room(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage(fail_next=True)
    async with durable_manager(storage) as manager, joined(manager, "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        with pytest.raises(CommitError):
            await room.apply_patch(create("k/c", v=1))
        code, _ = await a.closed()
        assert code == 1013
        assert storage.commits == []


# --- open_room ------------------------------------------------------------------------------


async def test_open_room_holds_a_room_without_clients_past_its_idle_timeout(
    autojump_clock: Any,
) -> None:
    storage = MemoryStorage()
    async with RoomManager(idle_timeout=30.0, save_throttle=5.0, limits=NO_PINGS,
                           create_storage=lambda room_id: storage) as manager:
        async with manager.open_room("r") as room:
            await room.apply_patch(create("k/c", v=1))
            await trio.sleep(300)
            assert manager.get_existing_room("r") is room
            async with joined(manager, "a"):
                pass  # a session that comes and goes does not end the hold
            await trio.sleep(60)
            assert not room.closed
            async with manager.open_room("r") as again:
                assert again is room  # holds nest
        await trio.sleep(29)
        assert not room.closed
        await trio.sleep(2)
        assert room.closed
        assert manager.room_ids() == []
        assert storage.snapshot is not None and storage.snapshot.state == create("k/c", v=1)


async def test_open_room_raises_what_a_connecting_session_would(autojump_clock: Any) -> None:
    class Unreadable(MemoryStorage):
        async def load(self) -> Snapshot | None:
            raise ValueError("truncated JSON")

    async with RoomManager(create_storage=lambda room_id: Unreadable(), limits=NO_PINGS) as manager:
        with pytest.raises(RoomLoadError):
            async with manager.open_room("bad"):
                pytest.fail("a room that cannot load is never handed out")
    one_room = Limits(ping_interval=None, max_rooms=1)
    async with RoomManager(limits=one_room) as manager, manager.open_room("one"):
        with pytest.raises(TooManyRoomsError):
            async with manager.open_room("two"):
                pass
    with pytest.raises(ManagerClosedError):
        async with manager.open_room("late"):
            pass


# --- subscribe ---------------------------------------------------------------------------------


async def test_the_feed_yields_client_and_server_edits_in_order(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, manager.open_room("r") as room:
        async with joined(manager, "a") as a, room.subscribe() as changes:
            await a.send(type="patch", messageId="m1", documentPatches=[create("e/c", x=1)])
            await a.receive_until("ack")
            await a.send(type="patch", messageId="m2", ephemeralPatches=[{"a/Cursor": {"x": 1}}])
            await a.receive_until("ack")
            await room.apply_patch(create("e/c", x=2))
            await a.send(type="reconnect", lastTimestamp=2, protocolVersion=2,
                         documentPatches=[create("offline/c", z=1)])
            await a.receive_until("synced")
            session_id = room.get_sessions()[0].session_id
            got = [await changes.__anext__() for _ in range(3)]
        assert got == [
            Change(1, [create("e/c", x=1)], session_id, "a"),
            Change(2, [create("e/c", x=2)], None, None),
            Change(3, [create("offline/c", z=1)], session_id, "a"),
        ]


async def test_a_reader_that_falls_behind_gets_an_overflow_and_never_slows_the_room(
    autojump_clock: Any,
) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, manager.open_room("r") as room:
        async with room.subscribe(max_buffer=3) as changes:
            await room.apply_patch(create("k/c", v=0))
            assert (await changes.__anext__()).timestamp == 1
            for v in range(1, 6):
                await room.apply_patch(create("k/c", v=v))  # returns though nobody reads
            with pytest.raises(ChangeFeedOverflow) as overflow:
                await changes.__anext__()
            assert overflow.value.last_timestamp == 1
            assert "3 changes" in str(overflow.value)
            diff = room.document.diff_since(overflow.value.last_timestamp)
            assert diff == create("k/c", v=5)
            with pytest.raises(ChangeFeedOverflow):
                await changes.__anext__()
        with pytest.raises(ValueError, match="max_buffer"):
            async with room.subscribe(max_buffer=0):
                pass


async def test_the_feed_ends_cleanly_when_the_room_closes_and_on_cancellation(
    autojump_clock: Any,
) -> None:
    async with RoomManager(limits=NO_PINGS) as manager:
        seen: list[int] = []
        ended = trio.Event()

        async def follow(room: Room) -> None:
            async with room.subscribe() as changes:
                async for change in changes:
                    seen.append(change.timestamp)
            ended.set()

        async with manager.open_room("r") as room, trio.open_nursery() as nursery:
            nursery.start_soon(follow, room)
            await trio.sleep(1)
            await room.apply_patch(create("k/c", v=1))
            await trio.sleep(1)
            await manager.close_room("r")
            with trio.fail_after(1):
                await ended.wait()
        assert seen == [1]

        async with manager.open_room("r") as room:
            with trio.move_on_after(1) as waited:
                async with room.subscribe() as changes:
                    await changes.__anext__()
            assert waited.cancelled_caught
            assert room._feeds == []
            await room.apply_patch(create("k/c", v=2))  # no feed left to push to


async def test_with_durable_acks_the_feed_yields_only_committed_edits(
    autojump_clock: Any,
) -> None:
    storage = CommandedStorage()
    async with durable_manager(storage) as manager, joined(manager, "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        async with room.subscribe() as changes:
            storage.block()
            await a.send(type="patch", messageId="m1", documentPatches=[create("e/c", x=1)])
            await storage.wait_attempts(1)
            await a.send(type="patch", messageId="m2", documentPatches=[create("e/c", x=2)])
            with trio.move_on_after(5) as early:
                await changes.__anext__()
            assert early.cancelled_caught, "a change was yielded before its commit"
            storage.release()
            got = [(await changes.__anext__()).timestamp for _ in range(2)]
            assert got == [1, 2]
            assert [set(c.records) for c in storage.commits] == [{"e/c"}, {"e/c"}]

        storage.fail_next = True
        async with room.subscribe() as changes:
            await a.send(type="patch", messageId="m3", documentPatches=[create("e/c", x=3)])
            # The commit fails: the room closes, and the uncommitted edit never shows.
            with trio.fail_after(5):
                assert [change async for change in changes] == []


# --- the example ------------------------------------------------------------------------------


async def test_the_example_sums_up_each_edit_and_posts_it_to_its_webhook(tmp_path: Path) -> None:
    posted, received = trio.open_memory_channel[dict[str, Any]](10)

    async def webhook(stream: trio.SocketStream) -> None:
        connection, body = h11.Connection(h11.SERVER), b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        answer = h11.Response(status_code=204, headers=[("Connection", "close")])
        await stream.send_all(connection.send(answer) + connection.send(h11.EndOfMessage()))
        await stream.aclose()
        posted.send_nowait(orjson.loads(body))

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, webhook, 0, host="127.0.0.1")
        )
        hook = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/hooks/canvas"
        port = free_port()
        os.environ["WEBHOOK_URL"] = hook
        try:
            process = start_server([sys.executable, str(ROOT / "examples" / "server_edits.py")],
                                   tmp_path, port)
        finally:
            del os.environ["WEBHOOK_URL"]
        try:
            url = f"ws://127.0.0.1:{port}/?roomId=board&clientId=alice"
            async with open_websocket_url(url) as ws:
                shape = create("e1/Shape", kind="rect")
                await ws.send_message(orjson.dumps(
                    {"type": "patch", "messageId": "m", "documentPatches": [shape]}).decode())
                with trio.fail_after(10):
                    while True:
                        frame = orjson.loads(await ws.get_message())
                        if frame.get("clientId") == SERVER_CLIENT_ID:
                            break
                assert frame["documentPatches"] == [
                    create("SINGLETON/Stats", edits=1, lastEditor="alice")
                ]
                with trio.fail_after(10):
                    delivery = await received.receive()
                assert delivery == {"room": "board", "timestamp": 1, "clientId": "alice",
                                    "documentPatches": [shape]}
        finally:
            process.terminate()
            output, _ = await trio.to_thread.run_sync(process.communicate, None, 15)
        nursery.cancel_scope.cancel()
    assert process.returncode == 0, output
    saved = decode_snapshot((tmp_path / "app-data" / "board.json").read_bytes())
    assert saved.state == shape | create("SINGLETON/Stats", edits=1, lastEditor="alice")
