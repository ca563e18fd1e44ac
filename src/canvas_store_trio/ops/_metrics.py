"""Prometheus metrics for a RoomManager, built from its plain counters when scraped.

The rooms count what they do in :class:`~canvas_store_trio.rooms._stats.Stats` (ints
and bucket lists, nothing else on the hot path); :class:`ManagerCollector` turns them
into metric families only when ``/metrics`` is read. prometheus-client writes the text
format, and adds the process's own metrics (CPU, memory, open files, garbage collector).
"""

from __future__ import annotations

from collections.abc import Iterator

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from ..rooms._manager import RoomManager
from ..rooms._stats import Histogram, Stats

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of :func:`metrics_text`'s answer (Prometheus text format 0.0.4)."""

LOOP_LAG_INTERVAL = 0.25
"""Seconds between two wake-ups of :func:`watch_loop_lag`."""


class ManagerCollector:
    """A prometheus-client collector reading one manager's rooms and counters."""

    def __init__(self, manager: RoomManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        """The metrics, built from the manager's counters (prometheus-client calls this)."""
        manager, stats = self.manager, self.manager.stats
        yield GaugeMetricFamily(
            "canvas_store_rooms", "Rooms open, loading and closing ones included.",
            value=len(manager.room_ids()),
        )
        yield GaugeMetricFamily(
            "canvas_store_sessions", "Client sessions in the open rooms.",
            value=manager.session_count(),
        )
        frames = CounterMetricFamily(
            "canvas_store_frames_received",
            "Client frames that passed their checks, by type.",
            labels=["type"],
        )
        frames.add_metric(["patch"], stats.patch_frames)
        frames.add_metric(["reconnect"], stats.reconnect_frames)
        frames.add_metric(["auth-refresh"], stats.auth_refresh_frames)
        yield frames
        refused = CounterMetricFamily(
            "canvas_store_frames_refused",
            "Client frames refused whole (an error frame was sent), by error code.",
            labels=["code"],
        )
        for code, count in sorted(stats.refused_frames.items()):
            refused.add_metric([code], count)
        yield refused
        yield _counter("canvas_store_edits", "Accepted document edits.", stats.edits)
        yield _counter(
            "canvas_store_bytes_sent",
            "Bytes of frames queued to clients, once per recipient.",
            stats.bytes_sent,
        )
        yield _histogram(
            "canvas_store_save_seconds", "Duration of successful room saves.", stats.save_seconds
        )
        yield _counter(
            "canvas_store_save_failures",
            "Room saves that failed or timed out (each is retried).",
            stats.save_failures,
        )
        yield _histogram(
            "canvas_store_commit_seconds",
            "Duration of durable commit batches (with durable acks).",
            stats.commit_seconds,
        )
        yield _counter(
            "canvas_store_slow_client_closes",
            "Sessions closed (1008) because their outbox passed outbox_max_bytes.",
            stats.slow_client_closes,
        )
        held = getattr(manager.ownership, "held", None)  # a cluster node's leases
        if callable(held):
            yield GaugeMetricFamily(
                "canvas_store_room_leases", "Room leases this cluster node holds.",
                value=len(held()),
            )
            yield _counter(
                "canvas_store_forwarded_connections",
                "Connections this node tried to forward to the node that owns their room "
                "(failed tries included).",
                stats.forwarded_connections,
            )
            yield _counter(
                "canvas_store_forward_failures",
                "Forwarded connections whose owner could not be reached (closed 1013).",
                stats.forward_failures,
            )
        yield _histogram(
            "canvas_store_event_loop_lag_seconds",
            "How late the event loop woke a task that slept, sampled every "
            f"{LOOP_LAG_INTERVAL:g} s.",
            stats.loop_lag_seconds,
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total
    )


def metrics_registry(manager: RoomManager) -> CollectorRegistry:
    """A registry with ``manager``'s metrics and the process's (CPU, memory, GC)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ManagerCollector(manager))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (see :data:`METRICS_CONTENT_TYPE`)."""
    return generate_latest(registry)


async def watch_loop_lag(stats: Stats, interval: float = LOOP_LAG_INTERVAL) -> None:
    """Sleep ``interval`` over and over, recording how late each wake-up came, until
    cancelled. A loop step that runs long (a big JSON parse, a blocking call) shows up
    as lag in ``canvas_store_event_loop_lag_seconds``."""
    while True:
        due = trio.current_time() + interval
        await trio.sleep_until(due)
        stats.loop_lag_seconds.observe(max(0.0, trio.current_time() - due))
