"""The operations endpoints on a plain HTTP request: ``/healthz``, ``/readyz``, ``/metrics``.

:func:`ops_http_handler` answers them and hands every other request to the handler
it wraps (the health "ok", or the demo page). Both transports, and the
``--metrics-port`` listener, serve plain HTTP through such a handler.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from ..rooms._manager import RoomManager
from ..transport._http import HttpHandler, HttpRequest, HttpResponse, default_http_handler
from ._metrics import METRICS_CONTENT_TYPE, metrics_text

_TEXT = "text/plain; charset=utf-8"


def ops_http_handler(
    manager: RoomManager,
    *,
    metrics: CollectorRegistry | None,
    fallback: HttpHandler = default_http_handler,
) -> HttpHandler:
    """Answer ``GET /healthz``, ``/readyz`` and (with a registry) ``/metrics``.

    - ``/healthz``: 200 while the process runs and serves HTTP at all;
    - ``/readyz``: 200 while ``manager`` takes sessions, 503 once it drains (its
      ``close_all`` has begun, as after SIGTERM);
    - ``/metrics``: ``metrics`` in Prometheus text format; without a registry the
      path goes to ``fallback``, like every other one.
    """

    def handle(request: HttpRequest) -> HttpResponse:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            if manager.closing:
                return 503, _TEXT, b"draining: takes no new sessions\n"
            return 200, _TEXT, b"ready\n"
        if path == "/metrics" and metrics is not None:
            return 200, METRICS_CONTENT_TYPE, metrics_text(metrics)
        return fallback(request)

    return handle
