#!/usr/bin/env python3
"""Ack latency of a forwarded connection against a direct one, on two cluster nodes.

    .venv/bin/python bench/cluster_forwarding.py                  # 1 and 20 editors, 5 rounds
    .venv/bin/python bench/cluster_forwarding.py --editors 1 --rounds 9 --seconds 3

Starts two ``serve --cluster`` nodes, A and B, on a fresh schema of the PostgreSQL at
$CANVAS_STORE_TEST_POSTGRES (default: the local one), with durable acks as a cluster
always has them. Every room is opened on A first, so A owns it. Then, round after round,
the same editors edit through A directly and through B (which forwards to A), taking
turns at going first. An editor keeps one document patch in flight: send, wait for the
ack, send the next. It prints the median over the rounds of each side's p50 and p99 ack
latency, the difference forwarded - direct, and B's CPU per forwarded ack (the splice's
cost). The target (issue 15): forwarded p50 <= direct p50 + 0.3 ms.

The machine is noisy: read medians and differences, not one run's absolute times.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from canvas_store_trio.testing import FrameClient  # noqa: E402

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def fresh_schema(base: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"cst_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        query = urlencode({"options": f"-csearch_path={name}", "application_name": name})
        yield f"{base}{'&' if '?' in base else '?'}{query}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = %s", (name,))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@contextmanager
def node(url: str, node_id: str) -> Iterator[tuple[int, int]]:
    """A ``serve --cluster`` process: (port, pid). Its log goes to a temporary file."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "canvas_store_trio", "serve", "--port", "0",
             "--storage", url, "--cluster", "--node-id", node_id],
            stdin=subprocess.DEVNULL, stderr=log, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        deadline = time.monotonic() + 15
        while True:
            log.seek(0)
            text = log.read()
            if found := re.search(rb"Listening on ws://[\d.]+:(\d+)", text):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"node {node_id} did not start: {text.decode(errors='replace')}")
            time.sleep(0.05)
        try:
            yield int(found.group(1)), process.pid
        finally:
            process.terminate()
            process.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def edit_for(port: int, room: str, client_id: str, seconds: float) -> list[float]:
    """Ack latencies (seconds) of one editor that keeps a patch in flight."""
    url = f"ws://127.0.0.1:{port}/?roomId={room}&clientId={client_id}"
    latencies = []
    async with open_websocket_url(url) as ws:
        client = FrameClient(ws)
        await client.reconnect()
        end = time.perf_counter() + seconds
        n = 0
        while (sent := time.perf_counter()) < end:
            n += 1
            await client.send_raw(orjson.dumps({
                "type": "patch", "messageId": str(n),
                "documentPatches": [{f"{client_id}/pos": {"_exists": True, "x": n}}]}).decode())
            while (await client.receive())["type"] != "ack":
                pass
            latencies.append(time.perf_counter() - sent)
    return latencies


async def one_side(port: int, rooms: list[str], seconds: float) -> list[float]:
    results: list[list[float]] = []

    async def run(room: str) -> None:
        results.append(await edit_for(port, room, f"e-{uuid.uuid4().hex[:6]}", seconds))

    async with trio.open_nursery() as nursery:
        for room in rooms:
            nursery.start_soon(run, room)
    return [latency for result in results for latency in result]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(a: tuple[int, int], b: tuple[int, int], editors: int, rounds: int,
                  seconds: float) -> dict[str, Any]:
    rooms = [f"fwd-{editors}-{n}" for n in range(editors)]
    async with trio.open_nursery() as nursery:  # A opens (and so owns) every room
        holders_ready = trio.Event()
        release = trio.Event()

        async def hold(room: str, ready: list[str]) -> None:
            async with open_websocket_url(
                    f"ws://127.0.0.1:{a[0]}/?roomId={room}&clientId=holder") as ws:
                await FrameClient(ws).reconnect()
                ready.append(room)
                if len(ready) == len(rooms):
                    holders_ready.set()
                await release.wait()

        ready: list[str] = []
        for room in rooms:
            nursery.start_soon(hold, room, ready)
        await holders_ready.wait()
        sides: dict[str, list[dict[str, float]]] = {"direct": [], "forwarded": []}
        for r in range(rounds):
            order = [("direct", a), ("forwarded", b)]
            for name, (port, _) in order if r % 2 == 0 else order[::-1]:
                cpu_before = cpu_seconds(b[1])
                latencies = await one_side(port, rooms, seconds)
                sides[name].append({
                    "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                    "acks": len(latencies), "b_cpu": cpu_seconds(b[1]) - cpu_before})
        release.set()
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editors", type=int, action="append",
                        help="editors (one room each) per side; repeatable (default 1 and 20)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per side and round")
    args = parser.parse_args()
    base = os.environ.get("CANVAS_STORE_TEST_POSTGRES", DEFAULT_POSTGRES)
    with ExitStack() as stack:
        url = stack.enter_context(fresh_schema(base))
        a = stack.enter_context(node(url, "a"))
        b = stack.enter_context(node(url, "b"))
        print(f"{'editors':>7} {'direct p50':>11} {'fwd p50':>9} {'diff p50':>9} "
              f"{'direct p99':>11} {'fwd p99':>9} {'B CPU/fwd ack':>14}", flush=True)
        for editors in args.editors or [1, 20]:
            sides = trio.run(measure, a, b, editors, args.rounds, args.seconds)

            def med(side: str, key: str, sides: dict[str, Any] = sides) -> float:
                return statistics.median(run[key] for run in sides[side])

            per_ack = statistics.median(
                run["b_cpu"] / run["acks"] for run in sides["forwarded"]) * 1e6
            per_ack_idle = statistics.median(
                run["b_cpu"] / run["acks"] for run in sides["direct"]) * 1e6
            print(f"{editors:>7} {med('direct', 'p50') * 1e3:>9.3f}ms "
                  f"{med('forwarded', 'p50') * 1e3:>7.3f}ms "
                  f"{(med('forwarded', 'p50') - med('direct', 'p50')) * 1e3:>+7.3f}ms "
                  f"{med('direct', 'p99') * 1e3:>9.3f}ms {med('forwarded', 'p99') * 1e3:>7.3f}ms "
                  f"{per_ack - per_ack_idle:>11.1f} us", flush=True)


if __name__ == "__main__":
    main()
