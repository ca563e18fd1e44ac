"""Cluster nodes as real processes on one PostgreSQL (issue 15, the leases part).

Each test runs ``serve --cluster`` processes on one fresh schema, with raw protocol
clients on real sockets: a takeover after kill -9 that serves
every acked edit, a SIGSTOPped owner that wakes up fenced (it writes nothing and closes
its sessions 1012 within 1 s), an owner that missed its lease changing hands and is
stopped by the write fence alone, a SIGTERM that hands rooms over at once, and the CLI.
With the real npm client: tests/test_cluster_failures.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any
from urllib.request import urlopen

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio.testing import FrameClient

from .processes import Server, cluster_nodes, cluster_options
from .storage_helpers import postgres_schema, rows_locked, sql, stored_state

pytestmark = pytest.mark.processes


@pytest.fixture
def url() -> Iterator[str]:
    with postgres_schema(as_url=True) as url:
        yield url


async def join(stack: AsyncExitStack, server: Server, room: str, client_id: str
               ) -> tuple[FrameClient, list[dict[str, Any]]] | int:
    """A synced client of ``room`` on ``server``, with its sync frames; or the close code
    the server refused it with."""
    ws = await stack.enter_async_context(open_websocket_url(server.url(room, client_id)))
    client = FrameClient(ws)
    try:
        return client, await client.reconnect()
    except ConnectionClosed as exc:
        assert exc.reason is not None
        return exc.reason.code


async def join_when_served(stack: AsyncExitStack, server: Server, room: str, client_id: str,
                           timeout: float) -> tuple[FrameClient, list[dict[str, Any]]]:
    """:func:`join`, retried every 20 ms while the server answers 1013 (try again
    later) or 1001 (a node that is shutting down, forwarded to)."""
    deadline = trio.current_time() + timeout
    while True:  # no cancel scope around it: the client's nursery outlives the loop
        attempt = AsyncExitStack()
        joined = await join(attempt, server, room, client_id)
        if not isinstance(joined, int):
            stack.push_async_exit(attempt)
            return joined
        assert joined in (1013, 1001)
        await attempt.aclose()
        assert trio.current_time() < deadline, f"{room!r} not served within {timeout} s"
        await trio.sleep(0.02)


async def edit(client: FrameClient, key: str, value: int) -> None:
    """Send an edit and wait for its ack."""
    await client.send(type="patch", messageId=f"{key}-{value}",
                      documentPatches=[{key: {"_exists": True, "v": value}}])
    frames = await client.receive_until("ack")
    assert frames[-1]["messageId"] == f"{key}-{value}"


def synced_state(frames: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for frame in frames:
        for patch in frame.get("documentPatches") or ():
            state.update(patch)
    return state


async def test_kill_9_the_owner_and_another_node_serves_every_acked_edit(url: str) -> None:
    ttl = 2.0
    async with cluster_nodes(url, 2, ttl) as (a, b), AsyncExitStack() as stack:
        owner, _ = await join_when_served(stack, a, "room", "alice", 5)
        for value in range(1, 6):
            await edit(owner, "k", value)
        await join_when_served(stack, b, "room", "early", 5)  # forwarded to A
        a.process.kill()
        killed = trio.current_time()
        bob, frames = await join_when_served(stack, b, "room", "bob", ttl + 3)
        await edit(bob, "k", 6)
        assert trio.current_time() - killed < ttl + 2
        assert synced_state(frames)["k"]["v"] == 5


async def leases(url: str) -> list[tuple[str, str, int, bool]]:
    """Every row of the leases table: (room, owner, epoch, unexpired)."""
    rows = await sql(url, "SELECT room, owner, epoch, expires_at > now() "
                          "FROM canvas_store_leases ORDER BY room")
    return [(room, owner, epoch, live) for room, owner, epoch, live in rows]


async def renewed(url: str, node_id: str) -> None:
    """Return right after the node's next renewal (its row's expiry moves)."""
    query = "SELECT expires_at FROM canvas_store_nodes WHERE id = %s"
    before = await sql(url, query, (node_id,))
    with trio.fail_after(10):
        while await sql(url, query, (node_id,)) == before:
            await trio.sleep(0.01)


def renewals_held_up(url: str, node_id: str) -> AbstractAsyncContextManager[None]:
    """While the block runs, the node's renewals wait in PostgreSQL (its row is locked, as
    a slow database would hold them up): it cannot learn from them that a lease is gone."""
    return rows_locked(url, "SELECT 1 FROM canvas_store_nodes WHERE id = %s FOR UPDATE",
                       (node_id,))


async def frames_until_closed(clients: list[FrameClient], timeout: float
                              ) -> list[tuple[list[dict[str, Any]], int | None]]:
    """Every frame each client gets until its socket closes, and the close code; fails
    unless all have closed within ``timeout``."""
    results: list[tuple[list[dict[str, Any]], int | None]] = [([], None) for _ in clients]

    async def read(n: int, c: FrameClient) -> None:
        frames = results[n][0]
        try:
            while True:
                frames.append(orjson.loads(await c.socket.get_message()))
        except ConnectionClosed as exc:
            results[n] = (frames, None if exc.reason is None else exc.reason.code)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for n, c in enumerate(clients):
                nursery.start_soon(read, n, c)
    return results


def edit_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frames that tell of a document edit: acks, and anything with document patches."""
    return [f for f in frames if f["type"] == "ack" or f.get("documentPatches")]


async def test_a_paused_owner_wakes_fenced_writes_nothing_and_closes_1012(url: str) -> None:
    """A sleeps (SIGSTOP) past its lease; B takes the room. When A wakes, its renewals
    are held up (the database is slow), so only its own reckoning of the lease can stop
    it: it must close both its clients with 1012 within 1 s, tell neither of the edit
    that waited in its socket, and write nothing.

    Fails when the self-fencing is skipped (A then commits the waiting edit and only the
    fence refuses it, which takes longer and logs another reason; without the fence too,
    the edit is acked and written)."""
    ttl = 2.0
    async with cluster_nodes(url, 2, ttl) as (a, b), AsyncExitStack() as stack:
        stale, _ = await join_when_served(stack, a, "room", "alice", 5)
        watcher, _ = await join_when_served(stack, a, "room", "carol", 5)
        await edit(stale, "k", 1)
        assert edit_frames(await watcher.drain(0.2))  # carol hears of A's edits
        os.kill(a.process.pid, signal.SIGSTOP)
        try:
            # Sent while A sleeps: A reads it when it wakes, and must not commit it.
            await stale.send(type="patch", messageId="late",
                             documentPatches=[{"stale": {"_exists": True, "v": 1}}])
            bob, frames = await join_when_served(stack, b, "room", "bob", ttl + 3)
            assert synced_state(frames)["k"]["v"] == 1
            await edit(bob, "k", 2)
            held = await stack.enter_async_context(AsyncExitStack())
            await held.enter_async_context(renewals_held_up(url, "n0"))
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
        woke = trio.current_time()
        (alice_saw, alice_code), (carol_saw, carol_code) = await frames_until_closed(
            [stale, watcher], timeout=1.0)
        assert trio.current_time() - woke < 1.0
        assert (alice_code, carol_code) == (1012, 1012), a.log.decode(errors="replace")
        assert not edit_frames(alice_saw) and not edit_frames(carol_saw), (alice_saw, carol_saw)
        await trio.sleep(0.5)  # anything A still tried to write would have landed
        assert await stored_state(url, "room") == {"k": {"_exists": True, "v": 2}}
        assert await leases(url) == [("room", "n1", 2, True)]  # A let B's lease be
        await held.aclose()
        await edit(bob, "k", 3)  # B still owns it
        assert b"lost its lease (not renewed" in a.log


async def test_an_owner_that_missed_its_lease_changing_hands_writes_nothing(url: str) -> None:
    """The write fence, on its own: A sleeps only briefly, too briefly to notice, but the
    database has meanwhile let its lease go (expired here by hand) and B has taken the
    room. A wakes still thinking it owns the room, with renewals held up, and reads an
    edit: the fence must refuse its commit, so nothing is acked, broadcast or written.

    Fails when the fence is off (``PostgresLeases.check`` a no-op): A then acks the edit
    and writes it over B's room."""
    ttl = 10.0  # A's own reckoning cannot run out during the test
    async with cluster_nodes(url, 2, ttl) as (a, b), AsyncExitStack() as stack:
        stale, _ = await join_when_served(stack, a, "room", "alice", 5)
        watcher, _ = await join_when_served(stack, a, "room", "carol", 5)
        await edit(stale, "k", 1)
        await watcher.drain(0.2)
        await renewed(url, "n0")  # the next renewal is ttl / 4 away
        os.kill(a.process.pid, signal.SIGSTOP)
        try:
            paused = trio.current_time()
            await sql(url, "UPDATE canvas_store_leases SET expires_at = now() WHERE room = %s",
                      ("room",))
            bob, _ = await join_when_served(stack, b, "room", "bob", 3)
            await edit(bob, "k", 2)
            await stale.send(type="patch", messageId="late",
                             documentPatches=[{"stale": {"_exists": True, "v": 1}}])
            held = await stack.enter_async_context(AsyncExitStack())
            await held.enter_async_context(renewals_held_up(url, "n0"))
            assert trio.current_time() - paused < ttl / 4  # no renewal was due meanwhile
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
        (alice_saw, alice_code), (carol_saw, carol_code) = await frames_until_closed(
            [stale, watcher], timeout=2.0)
        # The refused commit tells A it lost the lease: the room moved, reconnect.
        assert (alice_code, carol_code) == (1012, 1012), a.log.decode(errors="replace")
        assert not edit_frames(alice_saw) and not edit_frames(carol_saw), (alice_saw, carol_saw)
        assert b"lost its lease (not written: node 'n0' no longer holds the lease" in a.log
        assert await stored_state(url, "room") == {"k": {"_exists": True, "v": 2}}
        assert await leases(url) == [("room", "n1", 2, True)]
        await held.aclose()
        await edit(bob, "k", 3)


async def test_sigterm_hands_the_room_over_at_once(url: str) -> None:
    ttl = 10.0  # far longer than the hand-over may take
    async with cluster_nodes(url, 2, ttl) as (a, b), AsyncExitStack() as stack:
        alice, _ = await join_when_served(stack, a, "room", "alice", 5)
        await edit(alice, "k", 1)
        a.process.send_signal(signal.SIGTERM)
        stopped = trio.current_time()
        bob, frames = await join_when_served(stack, b, "room", "bob", 3)
        await edit(bob, "k", 2)
        assert trio.current_time() - stopped < 1.0
        assert synced_state(frames)["k"]["v"] == 1
        with trio.fail_after(5):
            assert await a.process.wait() == 0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "canvas_store_trio", *args],
                          capture_output=True, text=True, timeout=60)


async def test_cluster_status_and_a_second_live_node_with_the_same_id(url: str) -> None:
    async with cluster_nodes(url, 2, ttl=5) as (a, b), AsyncExitStack() as stack:
        await join_when_served(stack, a, "r1", "x", 5)
        await join_when_served(stack, a, "r2", "y", 5)
        await join_when_served(stack, b, "r3", "z", 5)
        done = await trio.to_thread.run_sync(cli, "cluster", "status", "--storage", url, "--json")
        assert done.returncode == 0, done.stderr
        status = orjson.loads(done.stdout)
        assert [(n["node_id"], n["address"], n["rooms"]) for n in status["nodes"]] == [
            ("n0", f"127.0.0.1:{a.port}", 2), ("n1", f"127.0.0.1:{b.port}", 1)]
        assert set(status) == {"nodes"} and all(n["lease_expires_at"] for n in status["nodes"])
        done = await trio.to_thread.run_sync(
            cli, "cluster", "status", "--storage", url, "--json", "--rooms")
        leases = orjson.loads(done.stdout)["leases"]
        assert [(x["room"], x["owner"], x["epoch"]) for x in leases] == [
            ("r1", "n0", 1), ("r2", "n0", 1), ("r3", "n1", 1)]
        done = await trio.to_thread.run_sync(cli, "cluster", "status", "--storage", url,
                                             "--rooms")
        nodes_part, rooms_part = done.stdout.split("\n\n")
        assert [line.split("\t")[:3] for line in nodes_part.splitlines()] == [
            ["n0", f"127.0.0.1:{a.port}", "2"], ["n1", f"127.0.0.1:{b.port}", "1"]]
        assert rooms_part.splitlines() == ["r1\tn0\t1", "r2\tn0\t1", "r3\tn1\t1"]
        metrics = await trio.to_thread.run_sync(
            lambda: urlopen(f"http://127.0.0.1:{a.port}/metrics", timeout=10).read().decode())
        assert "canvas_store_room_leases 2.0" in metrics
        # n0 is live: a second n0 refuses to start.
        done = await trio.to_thread.run_sync(
            cli, "serve", "--port", "0", *cluster_options(url, "n0", 5))
        assert done.returncode == 2
        [line] = done.stderr.strip().splitlines()[-1:]
        assert "--node-id" in line and "'n0' is in use by a live node" in line


@pytest.mark.parametrize(("options", "says"), [
    (("--memory", "--cluster"), "--cluster needs --storage postgresql://"),
    (("--storage", "sqlite:///x.db", "--cluster"), "--cluster needs --storage postgresql://"),
    (("--cluster", "--host", "0.0.0.0"), "--cluster needs --advertise HOST:PORT"),
    (("--cluster", "--no-durable-acks"), "--cluster --no-durable-acks"),
    (("--cluster", "--advertise", "nowhere"), "--advertise wants HOST:PORT"),
    (("--cluster", "--lease-ttl", "0"), "--lease-ttl 0: must be above 0"),
    (("--node-id", "x"), "--node-id: only with --cluster"),
])
def test_serve_refuses_cluster_options_that_do_not_fit(
    options: tuple[str, ...], says: str, tmp_path: Any
) -> None:
    args = options if "--memory" in options or "--storage" in options else (
        "--storage", "postgresql://nobody@127.0.0.1:1/none", *options)
    done = subprocess.run([sys.executable, "-m", "canvas_store_trio", "serve", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert says in line
