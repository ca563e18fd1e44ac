"""The demo page, served on the sync server's own port (``canvas-store-trio serve --demo``).

The page must come from the same origin as its socket. The wire transport reads every
request head itself and hands plain HTTP requests to an ``http_handler``:
:func:`demo_http_handler` is one that answers with the built demo files. Only the
files of the ``_demo`` folder are served, by exact name, from memory: a request path
never reaches the file system.
"""

from __future__ import annotations

import importlib.resources
import logging
import socket
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

from ..transport._http import HttpHandler, HttpRequest, HttpResponse, not_get_or_head

__all__ = [
    "DemoNotBuiltError",
    "demo_http_handler",
    "load_demo_assets",
    "page_url",
]

logger = logging.getLogger("canvas_store_trio.demo")

#: Content types of the files the demo build writes.
CONTENT_TYPES: Mapping[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


_BUILD_HINT = "run `node demo/build.mjs` in the source tree (after `npm ci` in node/)"


class DemoNotBuiltError(RuntimeError):
    """The demo page has not been built into the package (``_demo/index.html`` is missing)."""


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str


def _demo_folder() -> Traversable:
    return importlib.resources.files("canvas_store_trio") / "_demo"


def load_demo_assets(folder: Path | Traversable | None = None) -> dict[str, _Asset]:
    """Read the built demo files: ``{file name: asset}``.

    Raises :class:`DemoNotBuiltError` when there is no ``index.html``.
    """
    root: Path | Traversable = _demo_folder() if folder is None else folder
    assets: dict[str, _Asset] = {}
    if root.is_dir():
        for entry in root.iterdir():
            if not entry.is_file() or entry.name.startswith("."):
                continue
            suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
            content_type = CONTENT_TYPES.get(suffix.lower(), "application/octet-stream")
            assets[entry.name] = _Asset(entry.read_bytes(), content_type)
    if "index.html" not in assets:
        raise DemoNotBuiltError(f"the demo page is not built into {root}: {_BUILD_HINT}")
    return assets


def _answer(target: str, assets: Mapping[str, _Asset]) -> HttpResponse:
    """The demo's answer to a GET or HEAD (the wire transport answers other methods)."""
    path = urlsplit(target).path
    asset = assets.get("index.html" if path in ("", "/") else path[1:])
    if asset is None:
        return 404, "text/plain; charset=utf-8", b"Not found.\n"
    return 200, asset.content_type, asset.body


def demo_http_handler(
    folder: Path | Traversable | None = None,
) -> HttpHandler:
    """An ``http_handler`` for the wire transport that serves the demo files.

    The files are read now, so a missing build raises :class:`DemoNotBuiltError` here.
    """
    assets = load_demo_assets(folder)

    def answer(request: HttpRequest) -> HttpResponse:
        return not_get_or_head(request) or _answer(request.path, assets)

    return answer


def page_url(listener: trio.SocketListener) -> str:
    """An ``http://`` address of the page for a listener (loopback for a wildcard bind)."""
    address, port = listener.socket.getsockname()[:2]
    if listener.socket.family == socket.AF_INET6:
        return f"http://[{'::1' if address == '::' else address}]:{port}/"
    return f"http://{'127.0.0.1' if address == '0.0.0.0' else address}:{port}/"
