"""TCP listeners that hand each WebSocket connection to a handler, one failure at a time.

Two transports serve the same handler: ``"wire"`` (the default, :mod:`._wire`, lean and
in-task) and ``"trio-websocket"``. For the latter: trio-websocket's own
``serve_websocket`` runs every connection's reader task in the server's nursery, so
an error in one connection's protocol state ends the whole server: a client that sends
a ping after the server's close frame is enough (wsproto refuses to answer it and
trio-websocket lets that escape). Here each connection gets a nursery of
its own, and whatever goes wrong in it closes that connection and is logged. The
WebSocket side is still trio-websocket's (``wrap_server_stream``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio
from trio_websocket import wrap_server_stream

from . import _wire
from ._poller import open_read_poller
from ._wire import HttpHandler, default_http_handler, serve_wire_stream

logger = logging.getLogger("canvas_store_trio")

Handler = Callable[[Any], Awaitable[None]]
"""Takes a request with ``path`` and ``async accept()`` (``WireRequest`` or
trio-websocket's ``WebSocketRequest``)."""
Transport = Literal["wire", "trio-websocket"]
TRANSPORTS: tuple[Transport, ...] = ("wire", "trio-websocket")


async def serve_websocket_stream(
    handler: Handler, stream: trio.abc.Stream, *, max_message_size: int
) -> None:
    """Run one connection: the handshake, then ``handler``. Never raises.

    ``handler`` gets the request and owns the connection from there (it accepts or
    rejects it, and closes it). When ``handler`` returns, or the connection fails,
    the stream is closed. Cancellation closes the stream too, and propagates.
    """
    try:
        async with trio.open_nursery() as nursery:
            request = None
            with trio.move_on_after(_wire.HANDSHAKE_TIMEOUT):
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=max_message_size
                )
            if request is not None:
                await handler(request)
            nursery.cancel_scope.cancel()  # ends trio-websocket's reader task
    except Exception as exc:
        logger.warning("a connection failed and was closed: %r", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_websockets(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_message_size: int,
    transport: Transport = "wire",
    http_handler: HttpHandler = default_http_handler,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve every connection with ``handler`` until cancelled.

    ``task_status.started`` gets the listeners (port 0 picks a free port; read it from
    ``listeners[0].socket.getsockname()``). Plain HTTP requests get ``http_handler``'s
    answer on the wire transport (a health "ok" by default).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    if transport != "wire":
        serve_stream = functools.partial(
            serve_websocket_stream, handler, max_message_size=max_message_size
        )
        await trio.serve_listeners(serve_stream, listeners)
        return
    async with open_read_poller() as poller:
        serve_stream = functools.partial(
            serve_wire_stream,
            handler,
            max_message_size=max_message_size,
            http_handler=http_handler,
            poller=poller,
        )
        await trio.serve_listeners(serve_stream, listeners)
