"""Storage that fails, hangs or crawls: nothing acked is lost and no session waits for it.

Everything runs under ``autojump_clock`` with a fault-injecting storage, so minutes of
retries and backoff take milliseconds.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from canvas_store_trio import Changes, Limits, RoomManager, Snapshot
from canvas_store_trio.testing import FrameClient

from .conftest import connect, frames_of

NO_PINGS = Limits(ping_interval=None)


@attrs.define
class FaultyStorage:
    """A storage whose saves fail, hang or take time, on request; it records everything.

    - ``fail_saves``: how many saves (from now) raise OSError;
    - ``hang``: while set, saves block until it is cleared (``release()``);
    - ``save_delay``: seconds every save takes;
    - ``load_error`` / ``load_delay``: what ``load`` does.
    """

    snapshot: Snapshot | None = None
    fail_saves: int = 0
    hang: bool = False
    save_delay: float = 0.0
    load_error: Exception | None = None
    load_delay: float = 0.0
    loads: int = 0
    attempts: list[float] = attrs.field(factory=list)
    saves: list[Snapshot] = attrs.field(factory=list)
    running: int = 0
    most_at_once: int = 0
    _released: trio.Event = attrs.field(factory=trio.Event)

    async def load(self) -> Snapshot | None:
        self.loads += 1
        await trio.sleep(self.load_delay)
        if self.load_error is not None:
            raise self.load_error
        return self.snapshot

    def release(self) -> None:
        self.hang = False
        self._released.set()
        self._released = trio.Event()

    async def save(self, snapshot: Snapshot) -> None:
        self.attempts.append(trio.current_time())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.hang:
                await self._released.wait()
            await trio.sleep(self.save_delay)
            if self.fail_saves:
                self.fail_saves -= 1
                raise OSError("disk on fire")
            self.saves.append(snapshot)
            self.snapshot = snapshot
        finally:
            self.running -= 1


@attrs.define
class FaultyIncrementalStorage(FaultyStorage):
    """The same faults, for a storage that saves only the keys that changed."""

    records: dict[str, Any] = attrs.field(factory=dict)
    timestamp: int = 0

    async def save_changes(self, changes: Changes) -> None:
        self.attempts.append(trio.current_time())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.hang:
                await self._released.wait()
            await trio.sleep(self.save_delay)
            if self.fail_saves:
                self.fail_saves -= 1
                raise OSError("disk on fire")
            for key, change in changes.records.items():
                self.records[key] = (change.record, change.timestamps)
            self.timestamp = changes.timestamp
        finally:
            self.running -= 1

    def as_snapshot(self) -> Snapshot:
        return Snapshot(self.timestamp, {k: r for k, (r, _) in self.records.items()},
                        {k: t for k, (_, t) in self.records.items()})


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


@asynccontextmanager
async def manager_for(stores: dict[str, FaultyStorage], **kwargs: Any
                      ) -> AsyncIterator[RoomManager]:
    options: dict[str, Any] = {"idle_timeout": 60.0, "save_throttle": 5.0, "limits": NO_PINGS}
    options.update(kwargs)
    async with RoomManager(create_storage=lambda room_id: stores[room_id],
                           **options) as manager:
        yield manager


class Editor:
    """Edits a room and remembers every acked edit (key -> value)."""

    def __init__(self, client: FrameClient, name: str) -> None:
        self.client = client
        self.name = name
        self.acked: dict[str, int] = {}
        self.n = 0

    async def edit(self, max_wait: float = 0.1) -> int:
        """One edit; assert its ack comes within ``max_wait`` (virtual) seconds."""
        self.n += 1
        key = f"{self.name}{self.n}/c"
        start = trio.current_time()
        await self.client.send(type="patch", messageId=key,
                               documentPatches=[create(key, v=self.n)])
        ack = (await self.client.receive_until("ack"))[-1]
        assert ack["messageId"] == key
        assert trio.current_time() - start <= max_wait, "the ack waited for storage"
        self.acked[key] = self.n
        return int(ack["timestamp"])

    def all_in(self, snapshot: Snapshot | None) -> None:
        assert snapshot is not None
        missing = {k: v for k, v in self.acked.items()
                   if snapshot.state.get(k, {}).get("v") != v}
        assert not missing, f"acked edits missing from storage: {sorted(missing)}"


@asynccontextmanager
async def editor(manager: RoomManager, room: str, name: str) -> AsyncIterator[Editor]:
    async with connect(manager, f"roomId={room}&clientId={name}") as client:
        await client.reconnect()
        yield Editor(client, name)


async def slow_reconnect(client: FrameClient, timeout: float) -> list[dict[str, Any]]:
    """Reconnect with lastTimestamp 0, allowing ``timeout`` seconds for the room to load."""
    await client.send(type="reconnect", lastTimestamp=0, protocolVersion=2)
    return await client.receive_until("synced", timeout=timeout)


def warnings_about(caplog: pytest.LogCaptureFixture, room: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if f"{room!r}" in r.getMessage() and text in r.getMessage()]


# --- failing, hanging and slow saves -------------------------------------------------


@pytest.mark.parametrize("storage_class", [FaultyStorage, FaultyIncrementalStorage])
async def test_failing_saves_keep_the_room_dirty_retry_with_backoff_and_lose_nothing(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, storage_class: type[FaultyStorage]
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    storage = storage_class(fail_saves=9)
    async with manager_for({"r": storage}) as manager, editor(manager, "r", "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        await a.edit()
        start = trio.current_time()
        # Keep editing through ~4 minutes of failures: every ack comes at once.
        while len(storage.attempts) < 9:
            await a.edit()
            assert room.unsaved or storage.running
            await trio.sleep(0.7)
        assert room.save_error is not None and room.unsaved
        await trio.sleep(70)  # the tenth try succeeds
        tries = storage.attempts
        gaps = [round(b - a_, 1) for a_, b in itertools.pairwise(tries)]
        assert round(storage.attempts[0] - start, 1) == 5.0  # the save throttle
        assert gaps[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]  # doubling, at most 60 s
        assert not room.unsaved and room.save_error is None
        saved = (storage.as_snapshot() if isinstance(storage, FaultyIncrementalStorage)
                 else storage.snapshot)
        a.all_in(saved)
        assert saved is not None and saved.timestamp == room.document.timestamp
        logged = warnings_about(caplog, "r", "save failed")
        assert len(logged) == 9 and "disk on fire" in logged[0]
        assert storage.most_at_once == 1


@pytest.mark.parametrize("storage_class", [FaultyStorage, FaultyIncrementalStorage])
async def test_a_hanging_save_blocks_no_session_and_loses_nothing(
    autojump_clock: Any, storage_class: type[FaultyStorage]
) -> None:
    storage = storage_class(hang=True)
    async with manager_for({"r": storage}) as manager, editor(manager, "r", "a") as a:
        room = manager.get_existing_room("r")
        assert room is not None
        await a.edit()
        for _ in range(200):  # 100 s of edits while the first save hangs
            await a.edit()
            await trio.sleep(0.5)
        assert storage.saves == [] and storage.most_at_once == 1
        assert room.unsaved or storage.running
        storage.release()
        await trio.sleep(30)
        saved = (storage.as_snapshot() if isinstance(storage, FaultyIncrementalStorage)
                 else storage.snapshot)
        a.all_in(saved)
        assert not room.unsaved


async def test_a_hanging_save_is_logged_and_retried(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A save that never returns must not be silent: once it has run for
    ``flush_timeout`` the room says so (and tries again), as it does for a failure."""
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    storage = FaultyStorage(hang=True)
    async with (
        manager_for({"r": storage}, flush_timeout=10.0) as manager,
        editor(manager, "r", "a") as a,
    ):
        await a.edit()
        await trio.sleep(5 + 10 + 5)  # throttle, flush_timeout, a margin
        assert warnings_about(caplog, "r", "save"), [r.getMessage() for r in caplog.records]
        await trio.sleep(60)
        assert len(storage.attempts) >= 2  # tried again
        await a.edit()  # and the session never waited
        storage.release()
        await trio.sleep(120)
        a.all_in(storage.snapshot)


async def test_slow_saves_never_overlap_and_never_delay_acks(autojump_clock: Any) -> None:
    storage = FaultyStorage(save_delay=3.0)
    async with (
        manager_for({"r": storage}, save_throttle=0.5) as manager,
        editor(manager, "r", "a") as a,
        editor(manager, "r", "b") as b,
    ):
        for _ in range(100):
            await a.edit()
            await b.edit()
            await trio.sleep(0.25)
        await trio.sleep(10)
        assert storage.most_at_once == 1
        stamps = [s.timestamp for s in storage.saves]
        assert stamps == sorted(set(stamps)) and len(stamps) >= 5
        a.all_in(storage.snapshot)
        b.all_in(storage.snapshot)


# --- failing loads -----------------------------------------------------------------------


async def test_a_failing_load_refuses_the_room_1011_and_never_writes(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    old = Snapshot(3, {"e/c": {"_exists": True, "v": 1}}, {"e/c": {"_exists": 3, "v": 3}})
    bad = FaultyStorage(snapshot=old, load_error=OSError("unreadable"), load_delay=0.5)
    good = FaultyStorage()
    async with manager_for({"bad": bad, "good": good}) as manager:

        async def refused(name: str) -> None:
            async with connect(manager, f"roomId=bad&clientId={name}") as client:
                # The client sends at once, before the room has loaded.
                await client.send(type="reconnect", lastTimestamp=0, protocolVersion=2,
                                  documentPatches=[create("x/c")])
                await client.send(type="patch", messageId="m", documentPatches=[create("y/c")])
                code, reason = await client.closed()
                assert code == 1011
                assert reason == "Room could not be loaded"  # the cause is only logged

        async with editor(manager, "good", "g") as g, trio.open_nursery() as nursery:
            for i in range(3):  # racing first connections share one failed load
                nursery.start_soon(refused, f"c{i}")
            for _ in range(5):
                await g.edit()
        assert bad.loads == 1
        async with connect(manager, "roomId=bad&clientId=later") as later:
            assert (await later.closed())[0] == 1011
        assert bad.loads == 2  # a later connection tries again
        await trio.sleep(120)
        assert bad.attempts == [] and bad.snapshot is old  # never written
        assert "bad" not in manager.room_ids()
        assert warnings_about(caplog, "bad", "could not be loaded")
        # Once storage reads again, the room serves what it had.
        bad.load_error = None
        async with connect(manager, "roomId=bad&clientId=ok") as ok:
            frames = await ok.reconnect()
        assert frames_of(frames, "patch")[0]["documentPatches"] == [{"e/c": {"_exists": True,
                                                                             "v": 1}}]
        assert frames[-1] == {"type": "synced", "timestamp": 3}
        g.all_in(good.snapshot)


# --- shutdown ---------------------------------------------------------------------------


async def test_close_all_bounds_its_flush_and_reports_the_rooms_it_could_not_save(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    stores = {"hangs": FaultyStorage(), "fails": FaultyStorage(), "fine": FaultyStorage(),
              "slow": FaultyStorage(save_delay=2.0)}
    async with manager_for(stores, save_throttle=1000.0, flush_timeout=3.0) as manager:
        editors = {}
        async with (
            editor(manager, "hangs", "h") as editors["hangs"],
            editor(manager, "fails", "f") as editors["fails"],
            editor(manager, "fine", "o") as editors["fine"],
            editor(manager, "slow", "s") as editors["slow"],
        ):
            for e in editors.values():
                for _ in range(3):
                    await e.edit()
            stores["hangs"].hang = True
            stores["fails"].fail_saves = 100
            start = trio.current_time()
            failed = await manager.close_all()
            took = trio.current_time() - start
            for e in editors.values():  # every session was closed first
                assert await e.client.closed() == (1001, "room closed")
        assert sorted(failed) == ["fails", "hangs"]
        assert took <= 3.0 + 0.5  # the rooms flush in parallel, each for 3 s at most
        editors["fine"].all_in(stores["fine"].snapshot)
        editors["slow"].all_in(stores["slow"].snapshot)
        [line] = [r.getMessage() for r in caplog.records if "unsaved changes in" in r.getMessage()]
        assert "'fails'" in line and "'hangs'" in line
        assert manager.room_ids() == []
        async with connect(manager, "roomId=fine&clientId=late") as late:
            assert (await late.closed())[0] == 1001  # shutting down: no new rooms


# --- a room closing for idleness while someone arrives ----------------------------------


async def test_a_newcomer_during_a_slow_idle_close_sees_every_acked_edit(
    autojump_clock: Any,
) -> None:
    storage = FaultyStorage(save_delay=3.0)
    # The throttle is longer than the idle timeout: the last edits are saved by the
    # closing flush, which is slow, and the newcomer arrives in the middle of it.
    async with manager_for({"r": storage}, idle_timeout=2.0, save_throttle=30.0) as manager:
        for rnd in range(3):
            async with editor(manager, "r", f"a{rnd}-") as a:
                for _ in range(5):
                    await a.edit()
            await trio.sleep(2.0 + 1.0)  # idle close began 1 s ago; its save takes 3 s
            assert storage.running == 1
            async with connect(manager, f"roomId=r&clientId=b{rnd}") as b:
                frames = await slow_reconnect(b, 10)
                [patch] = frames_of(frames, "patch")
                diff = patch["documentPatches"][0]
                for key, value in a.acked.items():
                    assert diff[key]["v"] == value
                assert frames[-1]["timestamp"] == 5 * (rnd + 1)
            await trio.sleep(10)
        assert storage.most_at_once == 1
        assert storage.snapshot is not None and storage.snapshot.timestamp == 15


@attrs.define
class GatedStorage:
    """A storage whose saves wait until the test lets them through (:meth:`allow`).

    The wait is shielded from cancellation, as a save in a worker thread is.
    """

    snapshot: Snapshot | None = None
    permits: int = 0
    waiting: int = 0
    saves: list[Snapshot] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def load(self) -> Snapshot | None:
        return self.snapshot

    def allow(self, saves: int) -> None:
        self.permits += saves
        self._changed.set()
        self._changed = trio.Event()

    async def save(self, snapshot: Snapshot) -> None:
        self.waiting += 1
        with trio.CancelScope(shield=True):
            while not self.permits:
                await self._changed.wait()
        self.permits -= 1
        self.waiting -= 1
        self.saves.append(snapshot)
        self.snapshot = snapshot


async def test_a_join_racing_an_idle_close_gets_a_fresh_room_and_is_never_kicked(
    autojump_clock: Any,
) -> None:
    """Once a room has decided to close for idleness it takes nobody: a join that
    arrives while it saves and flushes waits, then gets a fresh room that loads what
    the closing one saved. A join that got into the closing room was kicked with
    1001 "room closed" when the room ended."""
    storage = GatedStorage()
    async with manager_for({"r": storage}, idle_timeout=2.0, save_throttle=5.0) as manager:
        try:
            await _join_racing_an_idle_close(manager, storage)
        finally:
            storage.allow(1000)  # a failure must not leave the manager's flush waiting


async def _join_racing_an_idle_close(manager: RoomManager, storage: GatedStorage) -> None:
    start = trio.current_time()

    async def at(t: float) -> None:
        await trio.sleep_until(start + t)

    async with editor(manager, "r", "a") as a:
        await a.edit()
    closing = manager.get_existing_room("r")
    acked = dict(a.acked)

    async def b_joins_during_the_idle_save() -> None:
        await at(2.5)
        assert storage.waiting == 1  # the idle close is saving
        async with connect(manager, "roomId=r&clientId=b") as client:
            frames = await slow_reconnect(client, 10)
            assert manager.get_existing_room("r") is not closing
            diff = frames_of(frames, "patch")[0]["documentPatches"][0]
            assert {k: diff[k]["v"] for k in acked} == acked
            b = Editor(client, "b")
            await b.edit()
            acked.update(b.acked)

    async def c_joins_while_the_room_ends() -> None:
        # By now a throttled save may be running, which cancellation cannot stop.
        await at(7)
        async with connect(manager, "roomId=r&clientId=c") as client:
            frames = await slow_reconnect(client, 10)
            diff = frames_of(frames, "patch")[0]["documentPatches"][0]
            assert {k: diff[k]["v"] for k in acked} == acked
            c = Editor(client, "c")
            await c.edit()
            await at(12)
            assert client.socket.closed is None, f"c was closed: {client.socket.closed}"
            await c.edit()
            acked.update(c.acked)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(b_joins_during_the_idle_save)
        nursery.start_soon(c_joins_while_the_room_ends)
        await at(6)
        storage.allow(1)
        await at(8)
        storage.allow(100)
    await trio.sleep(30)
    assert manager.room_ids() == []
    assert storage.snapshot is not None
    assert {k: storage.snapshot.state[k]["v"] for k in acked} == acked
    assert len(acked) == 4


async def test_a_join_waiting_on_an_idle_close_whose_save_fails_joins_the_room_kept_open(
    autojump_clock: Any,
) -> None:
    storage = FaultyStorage(save_delay=3.0, fail_saves=1)
    async with manager_for({"r": storage}, idle_timeout=2.0, save_throttle=30.0) as manager:
        async with editor(manager, "r", "a") as a:
            await a.edit()
        room = manager.get_existing_room("r")
        assert room is not None
        await trio.sleep(3.0)  # the idle close saves, from 2 s to 5 s, and fails
        assert storage.running == 1 and not room.accepting
        arrived = trio.current_time()
        async with connect(manager, "roomId=r&clientId=b") as b:
            frames = await slow_reconnect(b, 10)
            # In as the failed save reopens the room, not at the close after the next one.
            assert 2.0 <= trio.current_time() - arrived < 2.5
            assert manager.get_existing_room("r") is room and room.session_count() == 1
        assert frames_of(frames, "patch")[0]["documentPatches"] == [create("a1/c", v=1)]
        await trio.sleep(60)
        a.all_in(storage.snapshot)
        assert manager.room_ids() == []


@pytest.mark.parametrize("fault", ["fails", "hangs"])
async def test_an_idle_room_whose_save_fails_keeps_its_edits(
    autojump_clock: Any, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A room must not close for idleness (and forget its document) while its edits
    are not saved: a newcomer would load the stale snapshot, and the acked edits
    would be gone for good once storage recovers."""
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    base = Snapshot(1, {"old/c": {"_exists": True, "v": 0}}, {"old/c": {"_exists": 1, "v": 1}})
    storage = FaultyStorage(snapshot=base)
    async with manager_for({"r": storage}, idle_timeout=10.0, save_throttle=1.0,
                           flush_timeout=3.0) as manager:
        if fault == "fails":
            storage.fail_saves = 10**6
        else:
            storage.hang = True
        async with editor(manager, "r", "a") as a:
            for _ in range(5):
                await a.edit()
        await trio.sleep(300)  # many idle timeouts, while storage is down
        # Storage comes back; a newcomer must see every acked edit.
        storage.fail_saves = 0
        storage.release()
        async with connect(manager, "roomId=r&clientId=b") as b:
            frames = await slow_reconnect(b, 30)
        diff = frames_of(frames, "patch")[0]["documentPatches"][0]
        assert {k: diff.get(k, {}).get("v") for k in a.acked} == a.acked
        assert frames[-1]["timestamp"] == 6
        await trio.sleep(300)
        a.all_in(storage.snapshot)
        assert manager.room_ids() == []  # and, once saved, it closes for idleness
