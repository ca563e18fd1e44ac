"""Cluster nodes failing under load, with the real npm client (issue 15, the leases part).

Real ``serve --cluster`` processes, real PostgreSQL, and tests/node/durable_editor.mjs:
``WebsocketAdapter``s of @woven-ecs/canvas-store editing without pause, reconnecting by
themselves, reporting every ack (and from which node it came). Without forwarding, a
client only gets served by the room's owner (other nodes close it with 1013 and it
retries), so the tests point the clients where a room can be served.

- kill -9 the owner mid-edit: its rooms are served again on the other nodes within the
  lease TTL plus 2 s, and nothing acked is lost;
- a rolling restart of all three nodes (SIGTERM, start again on the same port): nothing
  acked is lost, no two nodes ever serve a room at once, every client converges;
- a PostgreSQL restart (a private server of the test's own): service stops (1012/1013),
  resumes by itself, and nothing acked is lost.

After each, every client's document (its adapter's view) is compared with what
PostgreSQL holds, and no ack may have been given twice for one room timestamp: two
nodes serving one room would each hand out the same next timestamps.
"""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest
import trio

from .conftest import node_modules
from .processes import (
    EditorLog,
    Server,
    cluster_nodes,
    cluster_options,
    editor_processes,
    lost_edits,
    read_room,
    server_process,
)
from .storage_helpers import postgres_schema, private_postgres, sql, stored_state

pytestmark = [pytest.mark.processes, pytest.mark.node]


@pytest.fixture
def url() -> Iterator[str]:
    with postgres_schema(as_url=True) as url:
        yield url


@pytest.fixture
def modules() -> str:
    return node_modules()


def one_server_per_timestamp(log: EditorLog) -> None:
    """No two acks of one room carry the same room timestamp: each edit a room applies
    gets the next timestamp, so two nodes serving the room at once would repeat them."""
    for room in {ack.room for ack in log.ack_list}:
        counts = Counter(ack.timestamp for ack in log.ack_list if ack.room == room)
        repeated = sorted(t for t, n in counts.items() if n > 1)
        assert not repeated, (
            f"room {room!r}: timestamps acked twice (two nodes served it?): "
            + str([(a.timestamp, a.server, a.client) for a in log.ack_list
                   if a.room == room and a.timestamp in repeated[:3]]))


async def check_nothing_lost(storage: str, log: EditorLog,
                             states: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Storage holds every acked value of every room, and each client's view of its room
    is what storage holds: the same keys, and for every key another client writes, the
    same record.

    For a client's own keys its view may be ahead of storage: the npm adapter sometimes
    sends an older edit of its own after a newer one (one it had queued but not sent when
    a socket closed goes out after the ``reconnect`` that carried the newer one), and
    then believes the newer value while the room holds the older. Never behind."""
    for room in sorted(log.acked):
        state = await stored_state(storage, room)
        lost = lost_edits(log.acked[room], state)
        assert not lost, f"room {room!r} lost acked edits (key: (acked, stored)): {lost}"
        for client, (its_room, view) in states.items():
            if its_room != room:
                continue
            assert set(view) == set(state), (client, sorted(set(view) ^ set(state))[:5])
            others = {k: (view[k], state[k]) for k in view
                      if not k.startswith(f"{client}/") and view[k] != state[k]}
            assert not others, f"{client} sees other clients' keys unlike storage: {others}"
            own = {k: (view[k], state[k]) for k in view
                   if k.startswith(f"{client}/") and view[k] != state[k]}
            assert all(mine["v"] > held["v"] for mine, held in own.values()), (client, own)
            if own:
                print(f"{client}: the npm adapter reordered its own edits of {own}")
    assert not log.resyncs, f"a node went back in time: {log.resyncs[:3]}"
    assert not log.still_in_flight, log.still_in_flight[:3]


async def test_kill_9_the_owner_mid_edit_and_its_rooms_are_served_within_the_ttl_plus_2_s(
    url: str, modules: str
) -> None:
    ttl = 2.0
    rooms = ["a", "b"]
    with trio.fail_after(50):
        async with cluster_nodes(url, 3, ttl) as (owner, b, c):
            survivors = dict(zip(rooms, (b, c), strict=True))
            async with editor_processes([owner.base_url], rooms, 2, modules) as editors:
                log = editors.log
                await log.wait_for("acks from the owner in both rooms", lambda: all(
                    len(log.acks_since(0, room, owner.address)) >= 10 for room in rooms), 15)
                owner.process.kill()
                killed = trio.current_time()
                for room, survivor in survivors.items():  # where a balancer would send them
                    await editors.point(room, survivor)
                await log.wait_for("an ack from a survivor in each room", lambda: all(
                    log.acks_since(killed, room, s.address) for room, s in survivors.items()),
                    ttl + 5)
                served_after = {room: log.acks_since(killed, room, s.address)[0].at - killed
                                for room, s in survivors.items()}
                print(f"kill -9 to the first ack on a survivor (ttl {ttl:g} s): {served_after}")
                assert all(t < ttl + 2 for t in served_after.values()), served_after
                await owner.process.wait()
                assert owner.process.returncode == -signal.SIGKILL
                await trio.sleep(1)  # more edits, on the survivors
                states = await editors.settle(10)
            await check_nothing_lost(url, log, states)
            for room, survivor in survivors.items():  # and a fresh client syncs them all
                diff, timestamp = await read_room(survivor, room)
                assert not lost_edits(log.acked[room], diff)
                assert timestamp >= log.top_ack[room]
            one_server_per_timestamp(log)


async def test_a_rolling_restart_under_load_loses_nothing_and_never_splits_a_room(
    url: str, modules: str
) -> None:
    """Each room has a client on each of the three nodes: whichever node holds the lease
    serves it, the other two forward their clients to it, so at each SIGTERM the room is
    taken by one of the others, raced for by their clients' reconnects."""
    ttl = 2.0
    rooms = ["r0", "r1", "r2"]
    with trio.fail_after(55):
        async with AsyncExitStack() as stack:
            nodes: list[Server] = [await stack.enter_async_context(
                server_process(*cluster_options(url, f"n{n}", ttl))) for n in range(3)]
            ports = [node.port for node in nodes]
            editors = await stack.enter_async_context(
                editor_processes([node.base_url for node in nodes], rooms, 3, modules))
            log = editors.log
            seen: list[tuple[str, str, int]] = []  # (room, owner, epoch), as first seen

            async def watch_leases() -> None:
                while True:
                    for row in await sql(url, "SELECT room, owner, epoch FROM "
                                         "canvas_store_leases WHERE expires_at > now()"):
                        if tuple(row) not in seen:
                            seen.append((row[0], row[1], row[2]))
                    await trio.sleep(0.02)

            watcher = await stack.enter_async_context(trio.open_nursery())
            watcher.start_soon(watch_leases)
            began = trio.current_time()
            await log.wait_for("acks in every room", lambda: all(
                log.acks_since(began, room) for room in rooms), 15)
            for n in range(3):
                nodes[n].process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await nodes[n].process.wait() == 0
                nodes[n] = await stack.enter_async_context(
                    server_process(*cluster_options(url, f"n{n}", ttl), port=ports[n]))
                back = trio.current_time()
                await log.wait_for(f"acks in every room once n{n} is back", lambda back=back: all(
                    log.acks_since(back, room) for room in rooms), 15)

            # The end: every client served (directly or forwarded), to compare what they
            # all hold.
            clients = [f"{room}-c{i}" for room in rooms for i in range(3)]
            await log.wait_for("every client served", lambda: all(
                log.serving.get(c) is not None for c in clients), 15)
            states = await editors.settle(10)
            watcher.cancel_scope.cancel()
        await check_nothing_lost(url, log, states)
        one_server_per_timestamp(log)
        owner_of_epoch: dict[tuple[str, int], str] = {}
        epochs: dict[str, list[int]] = defaultdict(list)
        for room, owner, epoch in seen:
            assert owner_of_epoch.setdefault((room, epoch), owner) == owner, (room, epoch, seen)
            epochs[room].append(epoch)
        for room in rooms:
            assert epochs[room] == sorted(epochs[room]), seen  # epochs only grow
            assert len(epochs[room]) >= 2, f"room {room!r} never changed hands: {seen}"
        print(f"leases seen: {seen}")


def readyz(server: Server) -> int:
    try:
        with urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=5) as answer:
            status: int = answer.status
            return status
    except HTTPError as exc:
        return exc.code


async def test_a_postgresql_restart_under_load_stops_service_and_it_resumes_by_itself(
    modules: str
) -> None:
    """Two nodes on a PostgreSQL server of the test's own, one room each; the server is
    stopped (fast: every connection ends) for longer than the nodes keep unrenewed
    leases, then started again."""
    ttl = 2.0
    with private_postgres() as postgres, trio.fail_after(55):
        storage = postgres.url
        async with (
            cluster_nodes(storage, 2, ttl) as nodes,
            editor_processes([nodes[0].base_url], ["a"], 2, modules) as on_a,
            editor_processes([nodes[1].base_url], ["b"], 2, modules) as on_b,
        ):
            logs = {"a": on_a.log, "b": on_b.log}
            began = trio.current_time()
            for room, log in logs.items():
                await log.wait_for(f"acks in {room}",
                                   lambda log=log: len(log.acks_since(began)) >= 10, 15)
            await trio.to_thread.run_sync(postgres.stop)
            stopped = trio.current_time()
            await trio.sleep(ttl)  # longer than a lease is kept unrenewed: 3/4 of the ttl
            assert [await trio.to_thread.run_sync(readyz, node) for node in nodes] == [503, 503]
            for room, log in logs.items():
                closes = [(client, code) for at, client, _, code in log.closes if at >= stopped]
                assert {client for client, _ in closes} == {f"{room}-c0", f"{room}-c1"}, closes
                assert {code for _, code in closes} <= {1012, 1013}, closes
                print(f"room {room} while PostgreSQL is down: closes {Counter(closes)}")
                # Nothing is acked while PostgreSQL is down (an ack read in the first
                # instant may be of a commit that made it just before).
                assert not log.acks_since(stopped + 0.2), log.acks_since(stopped + 0.2)[:3]
            await trio.to_thread.run_sync(postgres.start)
            started = trio.current_time()
            for room, log in logs.items():
                await log.wait_for(f"acks in {room} again", lambda log=log: bool(
                    log.acks_since(started)), 20)
            resumed = {room: log.acks_since(started)[0].at - started
                       for room, log in logs.items()}
            print(f"PostgreSQL back to the first ack: {resumed}")
            assert [await trio.to_thread.run_sync(readyz, node) for node in nodes] == [200, 200]
            await trio.sleep(0.5)
            states = {**await on_a.settle(10), **await on_b.settle(10)}
        for log in logs.values():
            await check_nothing_lost(storage, log, states)
            one_server_per_timestamp(log)
