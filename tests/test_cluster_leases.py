"""Room leases in PostgreSQL, in-process (issue 15): taking, refusing, releasing,
renewing, self-fencing, and the fence on every write of room data."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from unittest.mock import ANY

import pytest
import trio

from canvas_store_trio import Document
from canvas_store_trio.cluster import (
    FencedWriteError,
    Lease,
    NodeIdInUseError,
    NotOwnerError,
    Owner,
    PostgresLeases,
    _leases,
    cluster_status,
)
from canvas_store_trio.storage._postgres import PostgresDatabase

from .storage_helpers import new_document, postgres_schema


@pytest.fixture
def conninfo() -> Iterator[str]:
    with postgres_schema() as conninfo:
        yield conninfo


@asynccontextmanager
async def node(conninfo: str, node_id: str, *, ttl: float = 5.0) -> AsyncIterator[PostgresLeases]:
    async with PostgresDatabase(conninfo) as database, PostgresLeases(database, ttl=ttl) as leases:
        await leases.join(node_id, f"{node_id}.example:8087")
        yield leases


def never_lost(reason: str) -> None:
    raise AssertionError(f"lost: {reason}")


async def expire(conninfo: str, room: str) -> None:
    """As if the owner had stopped renewing long ago."""
    async with PostgresDatabase(conninfo) as database:
        await database.run(
            lambda conn: conn.execute(
                "UPDATE canvas_store_leases SET expires_at = now() - interval '1 s' "
                "WHERE room = %s", (room,)),
            "expire",
        )


def edit(document: Document, key: str, value: int) -> None:
    document.apply([{key: {"_exists": True, "v": value}}])


async def test_one_owner_and_the_refusal_names_it(conninfo: str) -> None:
    async with node(conninfo, "a") as a, node(conninfo, "b") as b:
        lease = await a.acquire("room", never_lost)
        assert lease.epoch == 1
        with pytest.raises(NotOwnerError) as refused:
            await b.acquire("room", never_lost)
        assert (refused.value.owner, refused.value.address) == ("a", "a.example:8087")
        assert await b.owner_of("room") == Owner("a", "a.example:8087")
        assert await b.owner_of("elsewhere") is None
        # Released, the room is B's at once, at a higher epoch.
        await a.release(lease)
        assert (await b.acquire("room", never_lost)).epoch == 2
        assert a.held() == [] and b.held() == ["room"]


async def test_racing_takers_of_a_new_room_get_one_lease(conninfo: str) -> None:
    async with node(conninfo, "a") as a, node(conninfo, "b") as b, node(conninfo, "c") as c:
        won: list[str] = []
        refused: list[str | None] = []

        async def take(leases: PostgresLeases) -> None:
            try:
                await leases.acquire("new", never_lost)
                won.append(leases.node_id)
            except NotOwnerError as exc:
                refused.append(exc.owner)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                for leases in (a, b, c):
                    nursery.start_soon(take, leases)
    assert len(won) >= 1 and set(won) == {won[0]}  # a node may retake its own
    assert set(refused) <= {won[0]} and len(won) + len(refused) == 30


async def test_a_stale_epoch_writes_nothing(conninfo: str) -> None:
    async with node(conninfo, "a") as a, node(conninfo, "b") as b:
        await a.acquire("room", never_lost)
        storage_a = a.database.create_storage("room")
        document = new_document()
        edit(document, "k", 1)
        await storage_a.commit(document.take_changes())  # A holds the lease: written
        await expire(conninfo, "room")
        await b.acquire("room", never_lost)  # B takes over: epoch 2
        storage_b = b.database.create_storage("room")
        first = await storage_b.load()
        assert first is not None and first.state == {"k": {"_exists": True, "v": 1}}
        edit(document, "k", 2)
        with pytest.raises(FencedWriteError, match="no longer holds the lease of room"):
            await storage_a.commit(document.take_changes())
        with pytest.raises(FencedWriteError):
            await storage_a.save(document.snapshot())
        with pytest.raises(FencedWriteError):
            await storage_a.save_version(1, [b"{}"], keep=5)
        loaded = await storage_b.load()
        assert loaded is not None and loaded.state["k"]["v"] == 1
        assert await storage_b.list_versions() == []
        # The new owner writes.
        mine = Document.from_snapshot(loaded, track_changes=True)
        edit(mine, "k", 3)
        await storage_b.commit(mine.take_changes())
        loaded = await storage_b.load()
        assert loaded is not None and loaded.state["k"]["v"] == 3


async def test_a_room_without_a_lease_is_not_written(conninfo: str) -> None:
    async with node(conninfo, "a") as a:
        document = new_document()
        edit(document, "k", 1)
        with pytest.raises(FencedWriteError):
            await a.database.create_storage("never-leased").commit(document.take_changes())


async def test_a_live_node_id_is_refused_and_free_once_it_leaves(conninfo: str) -> None:
    async with node(conninfo, "a"):
        with pytest.raises(NodeIdInUseError, match="'a' is in use by a live node"):
            async with node(conninfo, "a"):
                pass
    async with node(conninfo, "a") as again:  # left: free at once
        assert again.node_id == "a"


async def test_renewals_keep_leases_and_a_failing_one_gives_them_up_in_time(
    conninfo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost: list[tuple[str, float]] = []
    async with node(conninfo, "a", ttl=0.8) as a:
        lease: Lease = await a.acquire("room", lambda why: lost.append((why, trio.current_time())))
        await trio.sleep(2.0)  # well past the TTL: renewed all along
        assert not lost and a.held() == ["room"]
        status = await cluster_status(a.database)
        assert status["nodes"][0]["rooms"] == 1
        renewed_until = lease.deadline
        assert not a.fenced
        monkeypatch.setattr(_leases, "_RENEW", "SELECT 1 / 0")  # PostgreSQL says no
        with trio.fail_after(2):
            while not lost:
                await trio.sleep(0.01)
        [(why, when)] = lost
        assert "not renewed" in why
        # Given up before the database could let anyone else take it.
        assert renewed_until - 0.8 < when < renewed_until
        assert a.held() == [] and lease.lost
        assert a.fenced  # /readyz answers 503 now (tests/test_ops.py)
        monkeypatch.undo()  # PostgreSQL is back: the next renewal ends the fence
        with trio.fail_after(2):
            while a.fenced:
                await trio.sleep(0.01)


async def test_renewals_go_on_while_room_data_fills_the_pool(conninfo: str) -> None:
    """Every pooled connection busy with room data for longer than a lease lasts (a burst
    of loads and commits): the renewals have a connection of their own, so the lease
    is kept."""
    lost: list[str] = []
    async with node(conninfo, "a", ttl=1.0) as a:
        await a.acquire("room", lost.append)
        busy = a.database.max_size

        def slow(conn: Any) -> None:
            conn.execute("SELECT pg_sleep(2.5)")

        async with trio.open_nursery() as nursery:
            for _ in range(busy):
                nursery.start_soon(a.database.run, slow, "a slow load")
            await trio.sleep(2.0)  # the pool has been full for twice the TTL
            assert not lost and a.held() == ["room"] and not a.fenced
        status = await cluster_status(a.database)
        assert status["leases"] == [
            {"room": "room", "owner": "a", "epoch": 1, "expires_at": ANY}
        ]


async def test_a_lease_taken_over_is_lost_at_the_next_renewal(conninfo: str) -> None:
    lost = trio.Event()
    async with node(conninfo, "a", ttl=1.0) as a, node(conninfo, "b", ttl=1.0) as b:
        await a.acquire("room", lambda why: lost.set())
        await expire(conninfo, "room")
        await b.acquire("room", never_lost)
        with trio.fail_after(a.interval + 0.5):
            await lost.wait()


async def test_status_lists_live_nodes_and_their_leases(conninfo: str) -> None:
    async with node(conninfo, "a") as a, node(conninfo, "b") as b:
        await a.acquire("r1", never_lost)
        await a.acquire("r2", never_lost)
        await b.acquire("r3", never_lost)
        status = await cluster_status(a.database)
    assert [(n["node_id"], n["address"], n["rooms"]) for n in status["nodes"]] == [
        ("a", "a.example:8087", 2), ("b", "b.example:8087", 1)]
    assert [(lease["room"], lease["owner"], lease["epoch"]) for lease in status["leases"]] == [
        ("r1", "a", 1), ("r2", "a", 1), ("r3", "b", 1)]
    async with PostgresDatabase(conninfo) as database:  # both left: nothing live
        assert await cluster_status(database) == {"nodes": [], "leases": []}
