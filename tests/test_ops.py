"""Metrics and health (issue 16): real HTTP requests against a running server.

``/metrics`` is read from a real ``serve`` process while real clients edit; ``/readyz``
flips to 503 on SIGTERM while the final save is held up by a real PostgreSQL lock.
The counters themselves are checked in process too, where a storage can be made to fail.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from canvas_store_trio import Limits, RoomManager
from canvas_store_trio.cluster import SoleOwnership
from canvas_store_trio.ops import metrics_registry, metrics_text, ops_http_handler, watch_loop_lag
from canvas_store_trio.transport._http import HttpRequest

from .conftest import connect
from .processes import client, server_process
from .storage_helpers import CommandedStorage, postgres_schema
from .test_demo_http import get, http
from .test_front_door import free_port
from .test_room import RecordingStorage

NO_PINGS = Limits(ping_interval=None)


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    status, _, body = await http(f"http://127.0.0.1:{port}", get(path))
    return status, body.decode()


# --- a real server, real clients ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_metrics_move_under_real_client_traffic(tmp_path: Path, transport: str) -> None:
    async with server_process("--data-dir", str(tmp_path), "--save-throttle", "0.2",
                              "--transport", transport) as server:
        _, before = await scrape(server.port)
        start = parse(before)
        assert value(start, "canvas_store_rooms") == 0
        assert value(start, "canvas_store_edits_total") == 0
        async with client(server, "r", "a") as a, client(server, "r", "b") as b:
            await a.reconnect()
            await b.reconnect()
            for i in range(3):
                await a.send(type="patch", messageId=f"m{i}",
                             documentPatches=[create(f"e{i}/c", v=i)])
                await a.receive_until("ack")
            await a.send_raw("{not json")
            await a.receive_until("error")
            await a.send(type="patch", messageId="x", documentPatches=[{"k": {"_exists": 1}}])
            await a.receive_until("error")
            await trio.sleep(1.0)  # the throttled save, and a few loop-lag samples
            _, during = await scrape(server.port)
        now = parse(during)
        assert value(now, "canvas_store_rooms") == 1
        assert value(now, "canvas_store_sessions") == 2
        assert value(now, "canvas_store_frames_received_total", type="patch") == 3
        assert value(now, "canvas_store_frames_received_total", type="reconnect") == 2
        assert value(now, "canvas_store_frames_refused_total", code="invalid-json") == 1
        assert value(now, "canvas_store_frames_refused_total", code="invalid-component") == 1
        assert value(now, "canvas_store_edits_total") == 3
        # Three broadcasts to b, three acks and two errors to a, the joins' frames...
        assert value(now, "canvas_store_bytes_sent_total") > value(start,
                                                                   "canvas_store_bytes_sent_total")
        assert value(now, "canvas_store_save_seconds_count") >= 1
        assert value(now, "canvas_store_save_failures_total") == 0
        assert value(now, "canvas_store_event_loop_lag_seconds_count") >= 2
        assert value(now, "process_resident_memory_bytes") > 0


async def test_metrics_port_takes_metrics_off_the_serving_port(tmp_path: Path) -> None:
    metrics_port = free_port()
    async with server_process("--memory", "--metrics-port", str(metrics_port)) as server:
        assert f"Metrics on http://127.0.0.1:{metrics_port}/metrics" in server.log.decode()
        async with client(server, "r", "a") as a:
            await a.reconnect()
            status, text = await scrape(metrics_port)
            assert status == 200
            assert value(parse(text), "canvas_store_sessions") == 1
            _, served = await scrape(server.port)
            assert "canvas_store_sessions" not in served
            assert (await scrape(metrics_port, "/elsewhere"))[0] == 404
            for port in (server.port, metrics_port):
                assert await scrape(port, "/healthz") == (200, "ok\n")
                assert await scrape(port, "/readyz") == (200, "ready\n")


async def test_readyz_answers_503_while_the_server_drains_after_sigterm() -> None:
    import psycopg

    with postgres_schema(as_url=True) as url:
        async with server_process("--storage", url, "--save-throttle", "600") as server:
            async with client(server, "r", "a") as a:
                await a.reconnect()
                await a.send(type="patch", messageId="m", documentPatches=[create("k/c", v=1)])
                await a.receive_until("ack")
                assert await scrape(server.port, "/readyz") == (200, "ready\n")
                # Hold the rooms table: the final save on SIGTERM waits for the lock.
                with psycopg.connect(url) as lock:
                    lock.execute("LOCK TABLE canvas_store_rooms IN ACCESS EXCLUSIVE MODE")
                    server.process.send_signal(signal.SIGTERM)
                    with trio.fail_after(10):
                        while (await scrape(server.port, "/readyz"))[0] != 503:
                            await trio.sleep(0.05)
                    assert await scrape(server.port, "/healthz") == (200, "ok\n")
                    lock.rollback()
            with trio.fail_after(15):
                await server.process.wait()
            assert server.process.returncode == 0, server.log.decode()


# --- the counters, in process --------------------------------------------------------------


@asynccontextmanager
async def scraped(manager: RoomManager) -> AsyncIterator[Any]:
    registry = metrics_registry(manager)
    yield lambda: parse(metrics_text(registry).decode())


async def test_save_failures_and_durations_are_counted(autojump_clock: Any) -> None:
    storage = RecordingStorage(fail_saves=2)
    async with RoomManager(create_storage=lambda room_id: storage, save_throttle=1.0,
                           limits=NO_PINGS) as manager, scraped(manager) as samples:
        async with connect(manager, "roomId=r&clientId=a") as a:
            await a.reconnect()
            await a.send(type="patch", messageId="m", documentPatches=[create("k/c", v=1)])
            await a.receive_until("ack")
            await trio.sleep(10)  # a save, two failures, retried after 1 s and 2 s
        now = samples()
        assert value(now, "canvas_store_save_failures_total") == 2
        assert value(now, "canvas_store_save_seconds_count") == 1
        # RecordingStorage takes no time to save: the first bucket holds it.
        assert value(now, "canvas_store_save_seconds_bucket", le="0.0005") == 1


async def test_durable_commits_are_timed_once_per_batch(autojump_clock: Any) -> None:
    storage = CommandedStorage()
    async with RoomManager(durable_acks=True, create_storage=lambda room_id: storage,
                           save_throttle=1000.0, limits=NO_PINGS) as manager, \
            scraped(manager) as samples:
        async with connect(manager, "roomId=r&clientId=a") as a:
            await a.reconnect()
            storage.block()
            await a.send(type="patch", messageId="m1", documentPatches=[create("k/c", v=1)])
            await storage.wait_attempts(1)
            await trio.sleep(0.3)
            storage.release()
            await a.receive_until("ack")
            now = samples()
        assert value(now, "canvas_store_commit_seconds_count") == 1
        assert value(now, "canvas_store_commit_seconds_bucket", le="0.25") == 0
        assert value(now, "canvas_store_commit_seconds_bucket", le="0.5") == 1
        assert 0.3 <= value(now, "canvas_store_commit_seconds_sum") < 0.35


async def test_loop_lag_records_how_late_a_sleeper_woke(autojump_clock: Any) -> None:
    async with RoomManager(limits=NO_PINGS) as manager, trio.open_nursery() as nursery:
        nursery.start_soon(watch_loop_lag, manager.stats, 0.25)
        await trio.sleep(1.01)
        assert manager.stats.loop_lag_seconds.count == 4
        assert manager.stats.loop_lag_seconds.total == 0  # the virtual clock is never late
        nursery.cancel_scope.cancel()


async def test_health_answers_and_falls_through_to_the_wrapped_handler() -> None:
    async with RoomManager(limits=NO_PINGS) as manager:
        handle = ops_http_handler(manager, metrics=None,
                                  fallback=lambda request: (200, "text/plain", b"page"))
        async def answer(path: str, method: str = "GET") -> Any:
            return await handle(HttpRequest(method, path, {}))  # type: ignore[misc]

        assert await answer("/healthz?x=1") == (200, "text/plain; charset=utf-8", b"ok\n")
        assert (await answer("/metrics"))[2] == b"page"
        assert (await answer("/readyz"))[0] == 200
        assert (await answer("/readyz", "POST"))[0] == 405
        assert (await answer("/admin/rooms"))[0] == 404  # no token, no admin API
        await manager.close_all()
        assert (await answer("/readyz"))[0] == 503


def test_metrics_are_named_as_the_issue_says(tmp_path: Path) -> None:
    names = {family.name for family in text_string_to_metric_families(
        metrics_text(metrics_registry(RoomManager())).decode())}
    assert {
        "canvas_store_rooms", "canvas_store_sessions", "canvas_store_frames_received",
        "canvas_store_frames_refused", "canvas_store_edits", "canvas_store_bytes_sent",
        "canvas_store_save_seconds", "canvas_store_save_failures",
        "canvas_store_commit_seconds", "canvas_store_slow_client_closes",
        "canvas_store_event_loop_lag_seconds",
    } <= names



async def test_readyz_answers_503_while_the_ownership_is_fenced() -> None:
    class Fenced(SoleOwnership):
        fenced = True  # as PostgresLeases is while it cannot renew

    async with RoomManager(limits=NO_PINGS, ownership=Fenced()) as manager:
        handle = ops_http_handler(manager, metrics=None)
        status, _, body = await handle(HttpRequest("GET", "/readyz", {}))  # type: ignore[misc]
        assert (status, body) == (503, b"fenced: cannot renew its room leases\n")
        assert (await handle(HttpRequest("GET", "/healthz", {})))[0] == 200  # type: ignore[misc]
