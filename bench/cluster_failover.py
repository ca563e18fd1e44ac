#!/usr/bin/env python3
"""Failover time of a cluster: kill -9 a room's owner, time until another node acks an edit.

    .venv/bin/python bench/cluster_failover.py                  # 3 nodes, 10 kills, 2 s TTL
    .venv/bin/python bench/cluster_failover.py --kills 20 --ttl 10
    .venv/bin/python bench/cluster_failover.py --postgres postgresql://me@127.0.0.1/db

Starts three ``serve --cluster`` nodes on a fresh PostgreSQL database (dropped
afterwards). Each round opens a new room on one node (a raw protocol client, edit
acked), waits a random part of a renewal interval, kills that node with SIGKILL, and at
once connects to the other nodes in turn, every 10 ms while they refuse it (1013: the
dead node's lease has not expired), until one serves the room and acks a new edit. The
killed node is started again (under a new node id) before the next round, whose victim
is the next node. Without forwarding a client must find the owner itself: this is what
a client that reconnects at once, to any other node, waits.

Reported: the time from the kill to that ack (p50, max, min), and the part of it after
the dead lease expired in the database (when the takeover became possible): take the
lease, load the room, commit the edit. Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from run import postgres_database, postgres_problem, postgres_url  # bench/run.py
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio.testing import FrameClient

LISTEN = re.compile(rb"Listening on ws://[\d.]+:(\d+)")


class Node:
    """One ``serve --cluster`` process."""

    def __init__(self, node_id: str, process: trio.Process, port: int) -> None:
        self.node_id, self.process, self.port = node_id, process, port

    def url(self, room: str, client: str) -> str:
        return f"ws://127.0.0.1:{self.port}/?roomId={room}&clientId={client}"


async def start_node(url: str, node_id: str, ttl: float, nursery: trio.Nursery) -> Node:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "canvas_store_trio", "serve", "--port", "0", "--storage", url,
         "--cluster", "--node-id", node_id, "--lease-ttl", str(ttl)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    log = b""
    with trio.fail_after(20):
        while (found := LISTEN.search(log)) is None:
            chunk = await process.stderr.receive_some(65536)
            if not chunk:
                raise SystemExit(f"node {node_id} exited: {log.decode(errors='replace')}")
            log += chunk

    async def drain(stream: Any) -> None:  # never let the pipe fill up
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while await stream.receive_some(65536):
                pass

    nursery.start_soon(drain, process.stderr)
    return Node(node_id, process, int(found.group(1)))


@asynccontextmanager
async def served(node: Node, room: str, client: str) -> AsyncIterator[FrameClient | None]:
    """A synced client of ``room`` on ``node``, or None if the node refused it."""
    async with open_websocket_url(node.url(room, client)) as ws:
        c = FrameClient(ws)
        try:
            await c.reconnect()
        except ConnectionClosed:
            yield None
        else:
            yield c


async def edit(c: FrameClient, message_id: str) -> None:
    await c.send(type="patch", messageId=message_id,
                 documentPatches=[{f"{message_id}/c": {"_exists": True, "v": 1}}])
    while (await c.receive(timeout=10))["type"] != "ack":
        pass


def seconds_to_expiry(url: str, room: str) -> float:
    """How long the room's lease has left, as the database sees it."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT extract(epoch FROM expires_at - now()) FROM "
                           "canvas_store_leases WHERE room = %s", (room,)).fetchone()
    assert row is not None
    return float(row[0])


async def failover(url: str, nodes: list[Node], victim: int, room: str, ttl: float
                   ) -> tuple[float, float, str]:
    """Kill the owner of a new room; (kill to the first ack elsewhere, expiry to that ack,
    which node served it)."""
    async with served(nodes[victim], room, "owner") as owner:
        assert owner is not None, "a new room must be served where it is first opened"
        await edit(owner, f"{room}-before")
        await trio.sleep(random.uniform(0, ttl / 4))  # anywhere between two renewals
        nodes[victim].process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        left = await trio.to_thread.run_sync(seconds_to_expiry, url, room)
        others = [n for i, n in enumerate(nodes) if i != victim]
        with trio.fail_after(ttl + 30):
            for attempt in range(10**6):
                node = others[attempt % len(others)]
                async with served(node, room, f"client-{attempt}") as c:
                    if c is not None:
                        await edit(c, f"{room}-after")
                        acked = time.monotonic()
                        break
                await trio.sleep(0.01)
    await nodes[victim].process.wait()
    return acked - killed, acked - killed - left, node.node_id


def summary(values: list[float]) -> str:
    return (f"p50 {statistics.median(values):.3f} s, max {max(values):.3f} s, "
            f"min {min(values):.3f} s")


async def main(args: argparse.Namespace) -> None:
    base = postgres_url(args)
    problem = postgres_problem(base)
    if problem:
        raise SystemExit(f"PostgreSQL at {base} is not usable: {problem}")
    with postgres_database(base) as (url, _name):
        async with trio.open_nursery() as nursery:
            nodes = [await start_node(url, f"n{i}", args.ttl, nursery) for i in range(3)]
            results = []
            try:
                for round_ in range(args.kills):
                    victim = round_ % 3
                    total, after_expiry, by = await failover(url, nodes, victim,
                                                             f"failover-{round_}", args.ttl)
                    results.append((total, after_expiry))
                    print(f"round {round_ + 1}: killed {nodes[victim].node_id}, served by {by} "
                          f"{total:.3f} s after the kill ({after_expiry * 1000:.0f} ms after "
                          "the lease expired)", flush=True)
                    nodes[victim] = await start_node(url, f"n{victim}-{round_}", args.ttl,
                                                     nursery)
            finally:
                for node in nodes:
                    if node.process.returncode is None:
                        node.process.kill()
                nursery.cancel_scope.cancel()
    print(f"\n{args.kills} kills, lease TTL {args.ttl:g} s (renewed every {args.ttl / 4:g} s), "
          f"{platform.machine()} with {platform.python_implementation()} "
          f"{platform.python_version()}")
    print(f"kill -9 to the first ack on another node: {summary([t for t, _ in results])}")
    print(f"lease expiry to that ack:                 {summary([a for _, a in results])}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="rounds (10)")
    parser.add_argument("--ttl", type=float, default=2.0, help="--lease-ttl of the nodes (2)")
    parser.add_argument("--postgres", metavar="URL",
                        help="server to create the database on ($CANVAS_STORE_BENCH_POSTGRES, "
                        "$CANVAS_STORE_TEST_POSTGRES, else the local default)")
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
