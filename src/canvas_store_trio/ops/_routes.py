"""The operations endpoints of plain HTTP: ``/healthz``, ``/readyz``, ``/metrics``, ``/admin/``.

:func:`ops_http_handler` answers them and hands every other request to the handler
it wraps (the health "ok", or the demo page). Both transports, and the
``--metrics-port`` listener, serve plain HTTP through such a handler.
"""

from __future__ import annotations

import inspect
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from ..rooms._manager import RoomManager
from ..transport._http import (
    TEXT,
    HttpHandler,
    HttpRequest,
    HttpResponse,
    default_http_handler,
    not_get_or_head,
)
from ._admin import AdminAPI
from ._metrics import METRICS_CONTENT_TYPE, metrics_text


def ops_http_handler(
    manager: RoomManager,
    *,
    metrics: CollectorRegistry | None,
    admin_token: str | None = None,
    fallback: HttpHandler = default_http_handler,
) -> HttpHandler:
    """Answer ``GET /healthz``, ``/readyz``, (with a registry) ``/metrics`` and (with
    a token) ``/admin/``; hand anything else to ``fallback``.

    - ``/healthz``: 200 while the process runs and serves HTTP at all;
    - ``/readyz``: 200 while ``manager`` takes sessions, 503 once it drains (its
      ``close_all`` has begun, as after SIGTERM) and while its ownership is fenced (a
      cluster node that cannot renew its leases);
    - ``/metrics``: ``metrics`` in Prometheus text format;
    - ``/admin/``: the :class:`~._admin.AdminAPI`, for requests bearing
      ``admin_token``; without a token, 404.
    """
    admin = AdminAPI(manager, admin_token) if admin_token else None

    async def handle(request: HttpRequest) -> HttpResponse:
        path = urlsplit(request.path).path
        if path == "/admin" or path.startswith("/admin/"):
            if admin is None:
                return 404, TEXT, b"Not found: the admin API is off (serve --admin-token).\n"
            return await admin(request)
        if path in ("/healthz", "/readyz") or (path == "/metrics" and metrics is not None):
            refusal = not_get_or_head(request)
            if refusal is not None:
                return refusal
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            if manager.closing:
                return 503, TEXT, b"draining: takes no new sessions\n"
            if manager.ownership.fenced:
                return 503, TEXT, b"fenced: cannot renew its room leases\n"
            return 200, TEXT, b"ready\n"
        if path == "/metrics" and metrics is not None:
            return 200, METRICS_CONTENT_TYPE, metrics_text(metrics)
        answered = fallback(request)
        return await answered if inspect.isawaitable(answered) else answered

    return handle
