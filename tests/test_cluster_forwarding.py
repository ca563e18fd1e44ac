"""Any node serves any room: a node that does not own a room forwards to the one that does.

Real ``serve --cluster`` processes on one PostgreSQL schema. The npm client on three
nodes converges in one room whose every edit the owner applied (the others only
forwarded, as their metrics show); a forwarded request is never forwarded again; and
when the owner dies, the forwarded clients are closed, reconnect, and find the room
served by a node that took it over, with every acked edit.
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from typing import Any
from urllib.request import urlopen

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio import open_storage_backend
from canvas_store_trio.cluster import cluster_status

from .processes import Server, cluster_nodes, npm_peer, npm_until
from .test_cluster import edit, join, join_when_served, synced_state, url

__all__ = ["url"]  # the fixture


async def metric(server: Server, name: str) -> float:
    """One unlabelled sample of ``server``'s ``/metrics``."""
    def scrape() -> str:
        with urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    found = re.search(rf"^{name} (\S+)$", await trio.to_thread.run_sync(scrape), re.M)
    assert found is not None, f"no {name} in /metrics"
    return float(found.group(1))


async def owners(url: str) -> dict[str, str]:
    """Room -> the node whose lease on it is live."""
    async with open_storage_backend(url) as backend:
        status = await cluster_status(backend)  # type: ignore[arg-type]
    return {lease["room"]: lease["owner"] for lease in status["leases"]}


def live(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


@pytest.mark.node
async def test_npm_clients_on_three_nodes_converge_through_the_owner(url: str) -> None:
    async with cluster_nodes(url, 3, ttl=5) as servers, AsyncExitStack() as stack:
        peers = []
        for n, server in enumerate(servers):  # n0 first: it takes the room's lease
            peer = await stack.enter_async_context(
                npm_peer(f"ws://127.0.0.1:{server.port}/", "board", f"p{n}"))
            await npm_until(peer, lambda report: report["synced"] > 0)
            peers.append(peer)
        assert await owners(url) == {"board": "n0"}
        for round_ in range(5):
            for n, peer in enumerate(peers):
                # One shared key, a field per client: the npm client's mirror diverges
                # on same-field races within one of its frames, whatever the server.
                await peer.send(edit={**live(f"p{n}/shape", x=round_),
                                      **live("shared/title", **{f"p{n}": round_})})
        for peer in peers:  # every edit in, before one that races none of them
            await npm_until(peer, lambda report: report["state"].get("p1/shape", {}).get("x") == 4)
        await peers[0].send(edit={"p1/shape": {"_exists": False}})

        reports = [await npm_until(peer, lambda report: report["unsent"] == 0
                                   and len(report["state"]) == 4) for peer in peers]
        for _ in range(50):  # the last broadcasts may still be on their way
            if all(report["state"] == reports[0]["state"] for report in reports):
                break
            await trio.sleep(0.05)
            reports = [await peer.report() for peer in peers]
        state = reports[0]["state"]
        assert all(report["state"] == state for report in reports), reports
        assert state["p1/shape"] == {"_exists": False}
        assert state["p0/shape"] == state["p2/shape"] | {"x": 4} == {"_exists": True, "x": 4}
        assert state["shared/title"] == {"_exists": True, "p0": 4, "p1": 4, "p2": 4}

        # Every edit went through n0: the others applied none, and forwarded their client.
        assert await metric(servers[0], "canvas_store_edits_total") > 0
        for server in servers[1:]:
            assert await metric(server, "canvas_store_edits_total") == 0
            assert await metric(server, "canvas_store_forwarded_connections_total") >= 1
            assert await metric(server, "canvas_store_rooms") == 0
        assert await metric(servers[0], "canvas_store_sessions") == 3
        assert await owners(url) == {"board": "n0"}


async def test_a_forwarded_request_is_not_forwarded_again(url: str) -> None:
    async with cluster_nodes(url, 2, ttl=5) as (a, b), AsyncExitStack() as stack:
        owner, _ = await join_when_served(stack, a, "room", "alice", 5)
        # As if another node had forwarded it here: B must not pass it on to A.
        ws = await stack.enter_async_context(open_websocket_url(
            b.url("room", "looped"), extra_headers=[("X-Canvas-Store-Forwarded", "n9")]))
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            await ws.get_message()
        assert closed.value.reason.code == 1013
        assert await metric(b, "canvas_store_forwarded_connections_total") == 0
        # Without the mark the same request is forwarded, and served by A.
        bob, _ = await join_when_served(stack, b, "room", "bob", 5)
        await edit(bob, "k", 1)
        assert (await owner.receive_until("patch"))[-1]["documentPatches"] == [
            {"k": {"_exists": True, "v": 1}}]
        assert await metric(b, "canvas_store_forwarded_connections_total") == 1


async def test_when_the_owner_dies_forwarded_clients_reconnect_to_a_new_owner(
        url: str) -> None:
    ttl = 2.0
    async with cluster_nodes(url, 2, ttl) as (a, b), AsyncExitStack() as stack:
        await join_when_served(stack, a, "room", "alice", 5)
        bob, _ = await join_when_served(stack, b, "room", "bob", 5)  # forwarded to A
        for value in range(1, 4):
            await edit(bob, "k", value)
        a.process.kill()
        killed = trio.current_time()
        with pytest.raises(ConnectionClosed), trio.fail_after(2):
            await bob.socket.get_message()  # B closes the splice as soon as A is gone
        # Until A's lease expires B cannot reach the owner and answers 1013; then it
        # takes the room over, loads it from PostgreSQL and serves it itself.
        refused = await join(stack, b, "room", "carol")
        assert refused == 1013
        carol, frames = await join_when_served(stack, b, "room", "carol", ttl + 3)
        assert trio.current_time() - killed < ttl + 2
        assert synced_state(frames)["k"]["v"] == 3
        await edit(carol, "k", 4)
        assert await owners(url) == {"room": "n1"}
        assert await metric(b, "canvas_store_forward_failures_total") >= 1


async def test_fifty_clients_racing_on_three_nodes_all_reach_the_one_owner(url: str) -> None:
    async with cluster_nodes(url, 3, ttl=5) as servers:
        joined: list[int] = []
        seen: list[int] = []
        everyone_joined, counted, edited = trio.Event(), trio.Event(), trio.Event()

        async def connect(n: int) -> None:
            async with AsyncExitStack() as stack:  # each stays until every check is done
                client, _ = await join_when_served(stack, servers[n % 3], "race", f"c{n}", 10)
                joined.append(n)
                if len(joined) == 50:
                    everyone_joined.set()
                await counted.wait()
                if n == 0:
                    await edit(client, "k", 1)
                    edited.set()
                    return
                frames = await client.receive_until("patch", timeout=10)
                assert frames[-1]["documentPatches"] == [{"k": {"_exists": True, "v": 1}}]
                seen.append(n)
                await edited.wait()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(connect, n)
                await everyone_joined.wait()
                [owner] = set((await owners(url)).values())
                sessions = [await metric(server, "canvas_store_sessions") for server in servers]
                assert sessions == [50 if f"n{i}" == owner else 0 for i in range(3)]
                counted.set()
        assert sorted(seen) == list(range(1, 50))
