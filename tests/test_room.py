"""Rooms and the manager under autojump_clock: lifetime, saving, sessions, auth."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import trio

from canvas_store_trio import (
    AuthorizeInfo,
    AuthorizeResult,
    IncrementalStorage,
    Limits,
    MemoryStorage,
    RoomManager,
    Snapshot,
    Storage,
    StreamingStorage,
)
from canvas_store_trio.rooms._session import implements

from .conftest import connect, frames_of

NO_PINGS = Limits(ping_interval=None)


@attrs.define
class RecordingStorage:
    """A storage that records its calls, and fails or hangs on request."""

    snapshot: Snapshot | None = None
    loads: int = 0
    saves: list[Snapshot] = attrs.field(factory=list)
    fail_saves: int = 0
    hang_saves: bool = False
    load_error: Exception | None = None

    async def load(self) -> Snapshot | None:
        self.loads += 1
        await trio.sleep(0.5)  # a slow disk makes races between first connects real
        if self.load_error:
            raise self.load_error
        return self.snapshot

    async def save(self, snapshot: Snapshot) -> None:
        if self.hang_saves:
            await trio.sleep_forever()
        if self.fail_saves:
            self.fail_saves -= 1
            raise OSError("disk on fire")
        self.saves.append(snapshot)
        self.snapshot = snapshot


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


@pytest.fixture
def storage() -> RecordingStorage:
    return RecordingStorage()


@pytest.fixture
async def manager(storage: RecordingStorage) -> Any:
    # No pings: trio-websocket's client crashes when a ping crosses its close frame.
    async with RoomManager(idle_timeout=60.0, save_throttle=5.0, limits=NO_PINGS,
                           create_storage=lambda room_id: storage) as manager:
        yield manager


async def test_idle_room_closes_after_timeout_and_saves(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
        await a.send(type="patch", messageId="m1", documentPatches=[create("e/pos", x=1)])
        await a.receive_until("ack")
    start = trio.current_time()
    await trio.sleep(59)
    assert manager.room_ids() == ["r"]
    await trio.sleep(2)
    assert manager.room_ids() == []
    assert 60 <= trio.current_time() - start < 62
    assert storage.saves[-1].state == {"e/pos": {"_exists": True, "x": 1}}


async def test_a_join_during_the_idle_wait_keeps_the_room(
    autojump_clock: Any, manager: RoomManager
) -> None:
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
    await trio.sleep(50)
    room = manager.get_existing_room("r")
    async with connect(manager, "roomId=r&clientId=b") as b:
        await b.reconnect()
        await trio.sleep(120)
        assert manager.get_existing_room("r") is room
    await trio.sleep(61)
    assert manager.get_existing_room("r") is None


async def test_saves_are_throttled_and_coalesced(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
        for i in range(3):
            await a.send(type="patch", messageId=f"m{i}",
                         documentPatches=[create(f"e{i}/c", i=i)])
            await a.receive_until("ack")
            await trio.sleep(1)
        assert storage.saves == []
        await trio.sleep(3)
        assert len(storage.saves) == 1
        assert storage.saves[0].timestamp == 3
        assert set(storage.saves[0].state) == {"e0/c", "e1/c", "e2/c"}
        await trio.sleep(30)
        assert len(storage.saves) == 1  # nothing changed: nothing written
        await a.send(type="patch", messageId="m9", documentPatches=[create("e9/c")])
        await a.receive_until("ack")
        await trio.sleep(5.5)
        assert [s.timestamp for s in storage.saves] == [3, 4]


async def test_failed_saves_keep_the_changes_and_retry(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    storage.fail_saves = 3
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
        await a.send(type="patch", messageId="m", documentPatches=[create("e/c", v=1)])
        await a.receive_until("ack")
        await trio.sleep(5.5)
        room = manager.get_existing_room("r")
        assert room is not None and room.unsaved and room.save_error is not None
        # The session is not blocked while storage fails.
        await a.send(type="patch", messageId="m2", documentPatches=[{"e/c": {"v": 2}}])
        assert (await a.receive_until("ack"))[-1]["timestamp"] == 2
        await trio.sleep(1 + 2 + 4 + 0.5)  # backoff 1 s, 2 s, 4 s
        assert storage.saves[-1].state["e/c"]["v"] == 2
        assert not room.unsaved and room.save_error is None


async def test_close_all_closes_sessions_before_flushing(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
        await a.send(type="patch", messageId="m1", documentPatches=[create("e/c", v=1)])
        await a.receive_until("ack")
        failed = await manager.close_all()
        assert failed == []
        assert await a.closed() == (1001, "room closed")
    assert storage.saves[-1].state == {"e/c": {"_exists": True, "v": 1}}
    assert manager.room_ids() == []


async def test_close_all_bounds_a_hanging_flush_and_reports_it(
    autojump_clock: Any, storage: RecordingStorage
) -> None:
    storage.hang_saves = True
    async with (
        RoomManager(save_throttle=5.0, flush_timeout=3.0,
                    create_storage=lambda room_id: storage) as manager,
        connect(manager, "roomId=stuck&clientId=a") as a,
    ):
        await a.reconnect()
        await a.send(type="patch", messageId="m", documentPatches=[create("e/c")])
        await a.receive_until("ack")
        start = trio.current_time()
        assert await manager.close_all() == ["stuck"]
        assert trio.current_time() - start <= 3.5


async def test_racing_first_connects_share_one_room(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    frames: dict[str, list[dict[str, Any]]] = {}

    async def join(client_id: str) -> None:
        async with connect(manager, f"roomId=race&clientId={client_id}") as client:
            frames[client_id] = await client.reconnect()
            await trio.sleep(1)
            frames[client_id] += await client.drain()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, "a")
        nursery.start_soon(join, "b")
    assert storage.loads == 1
    for client_id in "ab":
        counts = [f["count"] for f in frames_of(frames[client_id], "clientCount")]
        assert 2 in counts, (client_id, frames[client_id])


async def test_disconnect_while_authorize_runs_never_joins(
    autojump_clock: Any, manager: RoomManager
) -> None:
    async def slow_authorize(info: AuthorizeInfo) -> AuthorizeResult:
        await trio.sleep(10)
        return AuthorizeResult("readwrite")

    async with connect(manager, "roomId=r&clientId=watcher") as watcher:
        await watcher.reconnect()
        async with connect(manager, "roomId=r&clientId=quitter", authorize=slow_authorize):
            await trio.sleep(1)
        await trio.sleep(20)
        room = manager.get_existing_room("r")
        assert room is not None
        assert [s.client_id for s in room.get_sessions()] == ["watcher"]
        assert frames_of(await watcher.drain(), "clientCount") == []


async def test_a_room_that_cannot_load_refuses_and_is_not_overwritten(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    storage.load_error = ValueError("cannot read /srv/secret/bad.json: corrupt snapshot")
    async with connect(manager, "roomId=bad&clientId=a") as a:
        code, reason = await a.closed()
    assert code == 1011
    assert reason == "Room could not be loaded"  # the cause, with its path, is only logged
    assert storage.saves == []
    assert manager.room_ids() == []


async def test_readonly_sessions_are_acked_but_change_nothing(
    autojump_clock: Any, manager: RoomManager
) -> None:
    def authorize(info: AuthorizeInfo) -> dict[str, Any]:
        return {"permissions": "readonly" if info.token == "ro" else "readwrite"}

    async with connect(manager, "roomId=r&clientId=w", authorize=authorize) as writer, \
            connect(manager, "roomId=r&clientId=r&token=ro", authorize=authorize) as reader:
        await writer.reconnect()
        await reader.reconnect()
        await writer.drain()
        await reader.send(type="patch", messageId="r1", documentPatches=[create("e/c", v=1)],
                          ephemeralPatches=[create("cursor/r", x=1)])
        assert (await reader.receive_until("ack"))[-1] == {
            "type": "ack", "messageId": "r1", "timestamp": 0}
        assert await writer.drain() == []
        room = manager.get_existing_room("r")
        assert room is not None and room.get_snapshot().state == {}


async def test_auth_refresh_updates_permissions_or_closes(
    autojump_clock: Any, manager: RoomManager
) -> None:
    async def authorize(info: AuthorizeInfo) -> AuthorizeResult:
        await trio.sleep(1)
        if info.token == "bad":
            raise PermissionError("token expired")
        return AuthorizeResult("readonly" if info.token == "ro" else "readwrite",
                               metadata={"token": info.token})

    async with connect(manager, "roomId=r&clientId=a&token=t1", authorize=authorize) as a:
        await a.reconnect()
        room = manager.get_existing_room("r")
        assert room is not None
        [session] = room.get_sessions()
        assert (session.permissions, session.metadata) == ("readwrite", {"token": "t1"})
        await a.send(type="auth-refresh", token="ro")
        await trio.sleep(2)
        [session] = room.get_sessions()
        assert (session.permissions, session.metadata) == ("readonly", {"token": "ro"})
        await a.send(type="auth-refresh", token="bad")
        assert (await a.closed())[0] == 1008
        assert room.session_count() == 0


async def test_permissions_and_metadata_can_change_while_connected(
    autojump_clock: Any, manager: RoomManager
) -> None:
    async with connect(manager, "roomId=r&clientId=a") as a:
        await a.reconnect()
        room = manager.get_existing_room("r")
        assert room is not None
        [session] = room.get_sessions()
        room.set_session_permissions(session.session_id, "readonly")
        room.set_session_metadata(session.session_id, {"user": 7})
        assert room.get_session_permissions(session.session_id) == "readonly"
        assert room.get_session_metadata(session.session_id) == {"user": 7}
        await a.send(type="patch", messageId="m", documentPatches=[create("e/c")])
        await a.receive_until("ack")
        assert room.get_snapshot().state == {}
        with pytest.raises(ValueError):
            room.set_session_permissions(session.session_id, "admin")  # type: ignore[arg-type]


async def test_memory_storage_keeps_rooms_across_reopen(autojump_clock: Any) -> None:
    stores: dict[str, MemoryStorage] = {}
    async with RoomManager(idle_timeout=1.0, save_throttle=math.inf,
                           create_storage=lambda r: stores.setdefault(r, MemoryStorage())
                           ) as manager:
        async with connect(manager, "roomId=r&clientId=a") as a:
            await a.reconnect()
            await a.send(type="patch", messageId="m", documentPatches=[create("e/c", v=3)])
            await a.receive_until("ack")
        await trio.sleep(2)
        assert manager.room_ids() == []
        async with connect(manager, "roomId=r&clientId=b") as b:
            frames = await b.reconnect()
        patch = frames_of(frames, "patch")[0]
        assert patch["documentPatches"] == [{"e/c": {"_exists": True, "v": 3}}]


async def test_a_refused_token_closes_with_the_hooks_message(
    autojump_clock: Any, manager: RoomManager
) -> None:
    async def authorize(info: AuthorizeInfo) -> AuthorizeResult:
        await trio.sleep(1)
        raise PermissionError("token expired")

    async with connect(manager, "roomId=r&clientId=a&token=old", authorize=authorize) as a:
        assert await a.closed() == (1008, "token expired")
    assert manager.room_ids() == []


async def test_frames_sent_before_the_session_is_ready_are_kept_in_order(
    autojump_clock: Any, manager: RoomManager, storage: RecordingStorage
) -> None:
    async def slow_authorize(info: AuthorizeInfo) -> AuthorizeResult:
        await trio.sleep(5)
        return AuthorizeResult("readwrite")

    async with connect(manager, "roomId=early&clientId=a", authorize=slow_authorize) as a:
        # Sent at once, while authorize runs and the room loads.
        await a.send(type="reconnect", lastTimestamp=0, protocolVersion=2,
                     documentPatches=[create("e/c", v=1)])
        await a.send(type="patch", messageId="m1", documentPatches=[{"e/c": {"v": 2}}])
        await a.send(type="patch", messageId="m2", documentPatches=[{"e/c": {"v": 3}}])
        frames = await a.receive_until("ack", timeout=30)
        frames += await a.receive_until("ack")
    assert [f["type"] for f in frames] == ["clientCount", "patch", "synced", "ack", "ack"]
    assert [f.get("messageId") for f in frames_of(frames, "ack")] == ["m1", "m2"]
    assert frames_of(frames, "ack")[-1]["timestamp"] == 3


def test_implements_answers_like_isinstance_for_each_class() -> None:
    class Streaming:
        async def load(self) -> None: ...
        async def save(self, snapshot: object) -> None: ...
        async def save_encoded(self, parts: object) -> None: ...

    class Plain:
        async def load(self) -> None: ...
        async def save(self, snapshot: object) -> None: ...

    for obj in (Streaming(), Plain(), Streaming(), Plain(), MemoryStorage()):
        for protocol in (StreamingStorage, IncrementalStorage, Storage):
            assert implements(obj, protocol) == isinstance(obj, protocol), (obj, protocol)
