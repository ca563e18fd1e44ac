"""Plain counters the rooms keep as they work, read by ``/metrics`` when it is scraped.

The hot path only adds to ints and lists here: no lock, no label lookup, no call into
a metrics library. :mod:`canvas_store_trio.ops` turns them into Prometheus metrics.
One :class:`Stats` per :class:`~canvas_store_trio.RoomManager`.
"""

from __future__ import annotations

import bisect

import attrs

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of the duration histograms' buckets (``+Inf`` is implied)."""


@attrs.define(eq=False)
class Histogram:
    """Counts of observed values per bucket, their sum and their number."""

    buckets: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = attrs.field(init=False)
    """One count per bucket, plus one for values above the last bound."""
    total: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of values <= le)`` per bucket, ``+Inf`` last, as Prometheus has it."""
        running, out = 0, []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@attrs.define(eq=False)
class Stats:
    """What a manager's rooms have done since it started. Every field only grows."""

    patch_frames: int = 0
    reconnect_frames: int = 0
    auth_refresh_frames: int = 0
    refused_frames: dict[str, int] = attrs.Factory(dict)
    """Frames refused whole, by error code (``invalid-json``, ``too-many-keys``...)."""
    edits: int = 0
    """Accepted document edits: frames (and server edits) that changed the document."""
    bytes_sent: int = 0
    """Bytes of frames queued to clients (a broadcast counts once per recipient)."""
    save_seconds: Histogram = attrs.Factory(Histogram)
    save_failures: int = 0
    commit_seconds: Histogram = attrs.Factory(Histogram)
    """Durable commits: one observation per commit batch the rooms took part in."""
    slow_client_closes: int = 0
    """Sessions closed (1008) because their outbox passed ``outbox_max_bytes``."""
    forwarded_connections: int = 0
    """Connections handed to the cluster node that owns their room."""
    forward_failures: int = 0
    """Of those, the ones whose owner could not be reached (the client got 1013)."""
    loop_lag_seconds: Histogram = attrs.Factory(Histogram)
    """How late the event loop woke a sleeping task (see ``ops.watch_loop_lag``)."""

    def refused(self, code: str) -> None:
        self.refused_frames[code] = self.refused_frames.get(code, 0) + 1
