"""A real server on a free loopback port, for integration tests."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import attrs
import trio
from trio_websocket import open_websocket_url

from ..rooms._connection import Authorize, serve_connection
from ..rooms._manager import RoomManager
from ..storage._backends import MemoryBackend
from ..transport._handshake import HandshakeRequest
from ..transport._listener import Transport, serve_websockets
from ._sockets import FrameClient


@attrs.frozen
class RunningServer:
    """A server started by :func:`serve_in_nursery`: where it listens, and its rooms."""

    url: str
    """``ws://127.0.0.1:PORT``: add ``/?roomId=R&clientId=C`` to connect."""
    port: int
    manager: RoomManager

    def connect_url(self, room_id: str, client_id: str, token: str | None = None) -> str:
        """The URL a client of ``room_id`` connects to, as the npm client builds it."""
        query = {"roomId": room_id, "clientId": client_id}
        if token is not None:
            query["token"] = token
        return f"{self.url}/?{urlencode(query)}"

    @asynccontextmanager
    async def connect(
        self, room_id: str, client_id: str, token: str | None = None
    ) -> AsyncIterator[FrameClient]:
        """A :class:`FrameClient` on a real WebSocket to this server, closed (1000) on
        leaving the block. It sends nothing by itself: ``await client.reconnect()``."""
        url = self.connect_url(room_id, client_id, token)
        async with open_websocket_url(url, max_message_size=2**30) as ws:
            yield FrameClient(ws)


async def serve_in_nursery(
    manager: RoomManager,
    *,
    authorize: Authorize | None = None,
    transport: Transport = "wire",
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``manager``'s rooms on a free port of 127.0.0.1 until cancelled.

    Start it with ``server = await nursery.start(serve_in_nursery, manager)``: once the
    port listens, ``nursery.start`` returns a :class:`RunningServer` (``.url``,
    ``.port``, ``.manager``). Connections are served as ``canvas-store-trio serve``
    serves them (:func:`~canvas_store_trio.serve_connection` on
    :func:`~canvas_store_trio.serve_websockets`, our wire transport by default), with
    ``authorize`` if given.

    The caller owns ``manager`` and closes it. Cancel the nursery (or the scope around
    this task) to stop: the listener closes, and every connection's session is closed
    with 1001 (going away), as in a server's shutdown. Leave the nursery before the
    ``async with manager`` block ends, so that no connection outlives the manager.
    """

    async def handler(request: HandshakeRequest) -> None:
        await serve_connection(manager, request, authorize=authorize)

    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            functools.partial(
                serve_websockets,
                handler,
                "127.0.0.1",
                0,
                max_message_size=manager.limits.max_message_size,
                transport=transport,
            )
        )
        port = int(listeners[0].socket.getsockname()[1])
        task_status.started(RunningServer(f"ws://127.0.0.1:{port}", port, manager))


@asynccontextmanager
async def open_server(
    *, authorize: Authorize | None = None, transport: Transport = "wire", **manager_options: Any
) -> AsyncIterator[RunningServer]:
    """A :class:`RunningServer` for the block: a ``RoomManager(**manager_options)``
    served by :func:`serve_in_nursery`, with rooms in memory (kept while it runs)
    unless ``create_storage`` says otherwise.

    Leaving the block (or cancelling it) stops the listener, closes every session with
    1001 and flushes every room. This is what the ``canvas_store_server`` fixture runs;
    in a hypothesis test, open one per example.
    """
    manager_options.setdefault("create_storage", MemoryBackend().create_storage)
    async with RoomManager(**manager_options) as manager, trio.open_nursery() as nursery:
        yield await nursery.start(
            functools.partial(serve_in_nursery, manager, authorize=authorize, transport=transport)
        )
        nursery.cancel_scope.cancel()
