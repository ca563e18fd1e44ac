"""Shared test helpers: a protocol client, and sessions over real WebSocket framing.

``connect`` runs trio-websocket's client and our wire server over an in-memory
stream pair, so room and manager tests can use ``autojump_clock``: a 60 s idle
timeout takes milliseconds. End-to-end tests use real loopback sockets instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)

from canvas_store_trio import Authorize, HandshakeRequest, RoomManager, serve_connection
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


class Client:
    """A test client: sends frames as dicts, receives them parsed."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(orjson.dumps(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def reconnect(self, last_timestamp: int = 0, **extra: Any) -> list[dict[str, Any]]:
        """Send ``reconnect`` and return every frame up to and including ``synced``."""
        await self.send(type="reconnect", lastTimestamp=last_timestamp, protocolVersion=2,
                        **extra)
        return await self.receive_until("synced")

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            frame: dict[str, Any] = orjson.loads(await self.ws.get_message())
            return frame

    async def receive_until(self, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        frames = []
        while True:
            frame = await self.receive(timeout)
            frames.append(frame)
            if frame["type"] == kind:
                return frames

    async def drain(self, quiet: float = 0.05) -> list[dict[str, Any]]:
        """Every frame that arrives until none has for ``quiet`` seconds."""
        frames = []
        while True:
            with trio.move_on_after(quiet):
                frames.append(orjson.loads(await self.ws.get_message()))
                continue
            return frames

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Wait for the server to close the socket; return (code, reason)."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code, exc.reason.reason


@asynccontextmanager
async def connect(
    manager: RoomManager,
    query: str,
    *,
    authorize: Authorize | None = None,
) -> AsyncIterator[Client]:
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
            yield Client(ws)
        finally:
            await ws.aclose()
            nursery.cancel_scope.deadline = trio.current_time() + 5


def frames_of(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [frame for frame in frames if frame["type"] == kind]
