"""Durable acks with real processes, real signals, the real npm client (issue 14).

``serve --durable-acks`` promises that an acked (or broadcast) edit is on disk. So:

- SIGKILL the server over and over while npm clients (tests/node/durable_editor.mjs) edit,
  on files, SQLite and PostgreSQL: after each kill, storage holds every value any client saw
  acked, and the room's timestamp is never behind the highest acked one; the restarted
  server serves them, and no client is ever asked to resync (the server never went back).
- Pipelined patches from several clients, grouped into commits: each client gets its acks in
  the order it sent them, and its acks and broadcasts together in one increasing order.
- SIGTERM leaves only ``R.json`` files in the data folder (no journal, no temp file), holding
  every acked edit; so does a restart after a SIGKILL, even for rooms nobody opens again.

Without durable acks and with a 5 s save throttle, the SIGKILL test finds acked edits lost:
that is how we know it can fail.
"""

from __future__ import annotations

import functools
import itertools
import random
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from canvas_store_trio import Snapshot, decode_snapshot, open_storage_backend
from canvas_store_trio.testing import FrameClient

from .conftest import frames_of, node_modules
from .processes import client, editors, lost_edits, read_room, server_process
from .storage_helpers import postgres_schema

DURABLE = ("--durable-acks",)
ROUNDS = 5


# --- where the rooms live ----------------------------------------------------------------


@attrs.frozen
class Place:
    """A storage: the options ``serve`` takes for it, and its URL for this process."""

    options: tuple[str, ...]
    url: str


@pytest.fixture(params=["file", "sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    if request.param == "file":
        folder = tmp_path / "rooms"
        yield Place(("--data-dir", str(folder)), str(folder))
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rooms.db'}"  # an absolute path: sqlite:////tmp/...
        yield Place(("--storage", url), url)
    else:
        with postgres_schema(as_url=True) as url:  # skips (or fails in CI) without a server
            yield Place(("--storage", url), url)


async def load_rooms(place: Place, rooms: list[str]) -> dict[str, Snapshot]:
    """What a restarted server would load for each room, read with no server running."""
    found = {}
    async with open_storage_backend(place.url) as backend:
        for room in rooms:
            snapshot = await backend.create_storage(room).load()
            found[room] = snapshot or Snapshot(0, {}, {})  # never saved
    return found


@pytest.fixture
def modules() -> str:
    """Where the npm client is (a skip, or a failure under CI, if nowhere)."""
    return node_modules()


@pytest.mark.node
async def test_sigkill_over_and_over_loses_no_acked_edit(place: Place, modules: str) -> None:
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    rooms = ["a", "b"]
    clients = [f"{room}-c{i}" for room in rooms for i in range(2)]
    serve = (*place.options, *DURABLE, "--save-throttle", "5")
    stored_before: dict[str, int] = {room: 0 for room in rooms}
    stored: dict[str, Snapshot] = {}
    top_at_kill: dict[str, int] = {}
    report = []
    with trio.fail_after(45):
        # The first server stays "open" (dead after round 0) around the editors, which
        # outlive it; later ones reuse its port, so the clients reconnect to them.
        async with (
            server_process(*serve) as first,
            editors(f"ws://127.0.0.1:{first.port}/", rooms, clients=2, modules=modules) as log,
        ):
            for round_ in range(ROUNDS):
                async with (
                    nullcontext(first) if round_ == 0
                    else server_process(*serve, port=first.port)
                ) as server:
                    if round_:
                        # As the restarted server serves it (the editors may be back, and
                        # be acked meanwhile: the reader's diff must hold what was acked
                        # before it joined, not what is acked while it reads).
                        for room in rooms:
                            acked, top_ack = dict(log.acked[room]), log.top_ack[room]
                            diff, timestamp = await read_room(server, room)
                            lost = lost_edits(acked, diff)
                            assert not lost, (
                                f"seed {seed}, round {round_}: served room {room!r} lacks acked "
                                f"edits: {sorted(lost.items())[:5]}; storage held "
                                f"{ {k: stored[room].state.get(k) for k in lost} } at timestamp "
                                f"{stored[room].timestamp}; served timestamp {timestamp}; "
                                f"reconnects: {log.reconnects[-8:]}")
                            assert timestamp >= top_ack
                    await log.wait_for(f"every client synced {round_ + 1} time(s)",
                                       functools.partial(log.all_synced, clients, round_ + 1),
                                       timeout=15)
                    for c in clients:  # the server never comes back behind what was acked
                        assert log.synced[c][-1] >= top_at_kill.get(c.split("-")[0], 0), (
                            c, log.synced[c], top_at_kill)
                    acks_before = log.acks
                    await trio.sleep(rng.uniform(0.3, 1.5))
                    closed_before = dict(log.closed)
                    server.process.send_signal(signal.SIGKILL)
                    await server.process.wait()
                assert server.process.returncode == -signal.SIGKILL
                # Shown if the test fails: what each server said, and how sockets closed.
                print(f"--- round {round_}: server log ---\n{server.log.decode(errors='replace')}"
                      f"--- closes so far (client, code): {log.close_codes}")
                # Every ack a client got came in before its socket closed.
                await log.wait_for("every client's socket to close",
                                   functools.partial(log.all_closed_since, closed_before),
                                   timeout=10)
                assert log.acks > acks_before, f"round {round_}: nothing was acked"
                top_at_kill = dict(log.top_ack)  # what the next server must not be behind
                stored = await load_rooms(place, rooms)
                for room, snapshot in stored.items():
                    lost = lost_edits(log.acked[room], snapshot.state)
                    assert not lost, (
                        f"seed {seed}, round {round_}: room {room!r} lost {len(lost)} of "
                        f"{len(log.acked[room])} acked keys (key: (acked, stored)): "
                        f"{sorted(lost.items())[:5]}; stored timestamp {snapshot.timestamp}, "
                        f"highest ack {log.top_ack[room]}")
                    assert snapshot.timestamp >= log.top_ack[room], (
                        f"seed {seed}, round {round_}: room {room!r} is at timestamp "
                        f"{snapshot.timestamp}, behind an ack of {log.top_ack[room]}")
                    assert snapshot.timestamp >= stored_before[room]
                    stored_before[room] = snapshot.timestamp
                report.append(f"round {round_}: {log.acks - acks_before} acks, stored "
                              f"timestamps {stored_before}")
        assert not log.still_in_flight, log.still_in_flight[:3]
        assert not log.resyncs, f"the server went back in time: {log.resyncs[:3]}"
        print(f"seed {seed}; " + "; ".join(report))

        # A last start: it serves every acked edit, and a SIGTERM ends it cleanly.
        async with server_process(*place.options, *DURABLE) as server:
            for room in rooms:
                diff, timestamp = await read_room(server, room)
                assert not lost_edits(log.acked[room], diff)
                assert timestamp >= log.top_ack[room]
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                await server.process.wait()
        assert server.process.returncode == 0, server.log.decode(errors="replace")


# --- ack order under group commit ----------------------------------------------------------


async def test_pipelined_clients_get_acks_and_broadcasts_in_one_increasing_order(
    tmp_path: Path,
) -> None:
    senders, per_sender = 5, 150
    total = senders * per_sender
    with trio.fail_after(30):
        async with (
            server_process("--data-dir", str(tmp_path), *DURABLE, "--save-throttle", "5")
            as server,
            AsyncExitStack() as stack,
        ):
            clients = [await stack.enter_async_context(client(server, "order", f"p{i}"))
                       for i in range(senders)]
            for c in clients:
                await c.reconnect()
            for c in clients:
                await c.drain(0.2)  # the clientCount frames of later joins
            received: dict[int, list[dict[str, Any]]] = {}

            async def send_all(i: int, c: FrameClient) -> None:
                for n in range(per_sender):  # never waiting for an ack
                    key = f"p{i}-{n}/c"
                    await c.send(type="patch", messageId=key,
                                 documentPatches=[{key: {"_exists": True, "v": n}}])

            async def receive_all(i: int, c: FrameClient) -> None:
                frames = received[i] = []
                while len(frames) < total:  # its own acks, and everyone else's edits
                    frame = await c.receive(timeout=10)
                    if frame["type"] in ("ack", "patch"):
                        frames.append(frame)

            async with trio.open_nursery() as nursery:
                for i, c in enumerate(clients):
                    nursery.start_soon(receive_all, i, c)
                    nursery.start_soon(send_all, i, c)

    for i, frames in received.items():
        acks = frames_of(frames, "ack")
        assert [a["messageId"] for a in acks] == [f"p{i}-{n}/c" for n in range(per_sender)]
        ack_stamps = [a["timestamp"] for a in acks]
        assert all(a < b for a, b in itertools.pairwise(ack_stamps)), ack_stamps
        # One edit, one timestamp: every client sees each of them once, in the room's order.
        stamps = [f["timestamp"] for f in frames]
        assert stamps == list(range(1, total + 1)), (i, [s for s in stamps if s][:40])
        for frame in frames_of(frames, "patch"):
            [patch] = frame["documentPatches"]
            assert not any(key.startswith(f"p{i}-") for key in patch)  # not its own edits


# --- clean shutdown: only snapshots remain --------------------------------------------------


async def write_acked(c: FrameClient, name: str, count: int, acked: dict[str, Any]) -> None:
    """``count`` edits of five keys, pipelined; record each key's last acked record."""
    records = {}
    for n in range(count):
        key = f"{name}{n % 5}/c"
        record = {"_exists": False} if n == count - 1 else {"_exists": True, "v": n}
        records[f"{name}-{n}"] = (key, record)
        await c.send(type="patch", messageId=f"{name}-{n}", documentPatches=[{key: record}])
    for _ in range(count):
        [*_, ack] = await c.receive_until("ack")
        key, record = records[ack["messageId"]]
        acked[key] = record


def only_snapshots(folder: Path, rooms: list[str], acked: dict[str, dict[str, Any]]) -> None:
    """The folder holds ``R.json`` per room and nothing else, with every acked record."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r}.json" for r in rooms)
    for room in rooms:
        snapshot = decode_snapshot((folder / f"{room}.json").read_bytes())
        stored = {key: dict(snapshot.state.get(key, {})) for key in acked[room]}
        assert stored == acked[room], room


async def test_sigterm_leaves_only_snapshots_holding_every_acked_edit(tmp_path: Path) -> None:
    rooms = ["r1", "r2"]
    acked: dict[str, dict[str, Any]] = {room: {} for room in rooms}
    with trio.fail_after(20):
        async with (
            server_process("--data-dir", str(tmp_path), *DURABLE, "--save-throttle", "1000")
            as server,
            client(server, "r1", "w1") as w1,
            client(server, "r1", "w2") as w2,
            client(server, "r2", "w3") as w3,
        ):
            for c in (w1, w2, w3):
                await c.reconnect()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_acked, w1, "w1-", 40, acked["r1"])
                nursery.start_soon(write_acked, w2, "w2-", 40, acked["r1"])
                nursery.start_soon(write_acked, w3, "w3-", 40, acked["r2"])
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                await server.process.wait()
        assert server.process.returncode == 0, server.log.decode(errors="replace")
    only_snapshots(tmp_path, rooms, acked)


async def test_after_a_sigkill_a_restart_folds_journals_of_rooms_nobody_reopens(
    tmp_path: Path,
) -> None:
    """``old`` was saved by a clean shutdown, then edited again; ``new`` was never saved.
    After a SIGKILL both have journals; a restart and a SIGTERM, with no client at all,
    must leave only snapshots with every acked edit."""
    rooms = ["old", "new"]
    acked: dict[str, dict[str, Any]] = {room: {} for room in rooms}
    serve = ("--data-dir", str(tmp_path), *DURABLE, "--save-throttle", "1000")
    with trio.fail_after(30):
        async with server_process(*serve) as server:
            async with client(server, "old", "w0") as w0:
                await w0.reconnect()
                await write_acked(w0, "before-", 20, acked["old"])
            server.process.send_signal(signal.SIGTERM)
            await server.process.wait()
        assert server.process.returncode == 0, server.log.decode(errors="replace")
        only_snapshots(tmp_path, ["old"], acked)

        async with server_process(*serve) as server:
            async with client(server, "old", "w1") as w1, client(server, "new", "w2") as w2:
                await w1.reconnect()
                await w2.reconnect()
                await write_acked(w1, "after-", 30, acked["old"])
                await write_acked(w2, "w2-", 30, acked["new"])
            server.process.send_signal(signal.SIGKILL)
            await server.process.wait()
        names = {p.name for p in tmp_path.iterdir()}
        assert {"old.journal", "new.journal"} <= names, names  # the edits are only journaled

        async with server_process(*serve) as server:
            server.process.send_signal(signal.SIGTERM)
            await server.process.wait()
        assert server.process.returncode == 0, server.log.decode(errors="replace")
    only_snapshots(tmp_path, rooms, acked)
