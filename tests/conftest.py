"""Shared test helpers: sessions over real WebSocket framing, and Node's whereabouts.

``connect`` runs trio-websocket's client (as a ``FrameClient`` of
``canvas_store_trio.testing``) and our wire server over an in-memory stream pair, so
room and manager tests can use ``autojump_clock``: a 60 s idle timeout takes
milliseconds. End-to-end tests use real loopback sockets instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import wrap_client_stream

from canvas_store_trio import Authorize, HandshakeRequest, RoomManager, serve_connection
from canvas_store_trio.testing import FrameClient
from canvas_store_trio.transport._handshake import serve_wire_stream

NODE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "node")


def require_node() -> None:
    """Fail in CI, skip elsewhere, when Node or node/node_modules is missing."""
    missing = None
    if shutil.which("node") is None:
        missing = "node is not installed"
    elif not os.path.isdir(os.path.join(NODE_DIR, "node_modules")):
        missing = "node/node_modules is missing (run `cd node && npm ci`)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must install it")
        pytest.skip(missing)


def node_modules() -> str:
    """The folder that holds the npm client, for a Node script outside node/ to load it from.

    node/node_modules, else the first ``$NODE_PATH`` entry that holds
    ``@woven-ecs/canvas-store`` (a worktree without its own copy). Without node or the
    packages: fail in CI, skip elsewhere.
    """
    if shutil.which("node") is None:
        require_node()
    candidates = [os.path.join(NODE_DIR, "node_modules")]
    candidates += [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "@woven-ecs", "canvas-store", "package.json")):
            return folder
    missing = ("@woven-ecs/canvas-store is in neither node/node_modules (run `cd node && "
               "npm ci`) nor $NODE_PATH")
    if os.environ.get("CI"):
        pytest.fail(missing)
    pytest.skip(missing)


@asynccontextmanager
async def connect(
    manager: RoomManager,
    query: str,
    *,
    authorize: Authorize | None = None,
) -> AsyncIterator[FrameClient]:
    """A session on ``manager`` over real WebSocket framing and an in-memory stream."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def handler(request: HandshakeRequest) -> None:
            await serve_connection(manager, request, authorize=authorize)

        async def serve_side() -> None:
            await serve_wire_stream(handler, server_stream,
                                    max_message_size=manager.limits.max_message_size)

        nursery.start_soon(serve_side)
        ws = await wrap_client_stream(nursery, client_stream, "localhost",  # type: ignore[arg-type]
                                      f"/?{query}", max_message_size=2**30)
        try:
            yield FrameClient(ws)
        finally:
            await ws.aclose()
            nursery.cancel_scope.deadline = trio.current_time() + 5


@asynccontextmanager
async def joined(manager: RoomManager, client_id: str, room: str = "r"
                 ) -> AsyncIterator[FrameClient]:
    """A session of ``client_id`` in ``room`` (see :func:`connect`), past its ``synced``."""
    async with connect(manager, f"roomId={room}&clientId={client_id}") as client:
        await client.reconnect()
        yield client


def frames_of(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [frame for frame in frames if frame["type"] == kind]
