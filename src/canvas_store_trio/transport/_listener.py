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

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

import trio
from trio_websocket import WebSocketConnection, wrap_server_stream

from .._logs import log_event
from ._handshake import (
    AcceptedSocket,
    HandshakeRequest,
    handshake_request,
    read_upgrade,
    serve_http_stream,
    serve_wire_stream,
)
from ._http import HttpHandler, default_http_handler
from ._poller import open_read_poller
from ._wire import close_frame

Handler = Callable[[HandshakeRequest], Awaitable[None]]
"""Takes the upgrade request, on either transport, and answers it."""
Transport = Literal["wire", "trio-websocket"]
TRANSPORTS: tuple[Transport, ...] = ("wire", "trio-websocket")


CLOSE_TIMEOUT = 2.0
"""Seconds trio-websocket's reader gets, after the handler returns, to finish the close
handshake (answer the peer's close frame, or read the peer's answer to ours)."""


class _HeldBackStream(trio.abc.Stream):
    """A stream for trio-websocket: the request head again, then nothing until released.

    wsproto keeps bytes that arrive with the request head aside until the upgrade is
    accepted, and trio-websocket's reader does not look at them again until more bytes
    arrive: a client's first frames, sent in the handshake's segment, would wait for
    its next frame (docs/upstream-trio-websocket.md). So the head is replayed alone, and
    the bytes after it are handed over only once the answer is sent.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, rest: bytes) -> None:
        self._stream = stream
        self._pending = head
        """What the next reads return: the head, then (once released) the rest."""
        self._rest = rest
        self.released = trio.Event()
        self.connection: WebSocketConnection | None = None
        """The accepted connection, once it is."""
        self._close_sent = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            await self.released.wait()
            self._pending, self._rest = self._rest, b""
        if not self._pending:
            return bytes(await self._stream.receive_some(max_bytes))
        size = len(self._pending) if max_bytes is None else max_bytes
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # trio-websocket sends one wsproto event a call: a close frame starts the data.
        self._close_sent = self._close_sent or data[:1] == _CLOSE_FRAME_START
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the stream; first, send the close frame trio-websocket owes the peer
        after a protocol error (it fails the connection without one:
        docs/upstream-trio-websocket.md)."""
        closed = self.connection.closed if self.connection is not None else None
        if closed is not None and closed.code in _PROTOCOL_ERROR_CODES and not self._close_sent:
            self._close_sent = True
            with (
                trio.move_on_after(CLOSE_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError, trio.BusyResourceError,
                                    trio.ClosedResourceError),
            ):
                await self._stream.send_all(close_frame(closed.code, closed.reason or ""))
                # Then EOF, and read on until the peer closes too: closing with unread
                # bytes would reset the connection, and a reset can destroy the close
                # frame before the peer reads it.
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                while await self._stream.receive_some(65536):
                    pass
        await self._stream.aclose()


_CLOSE_FRAME_START = b"\x88"
"""The first byte of a server's close frame (FIN, opcode 8, unmasked)."""
_PROTOCOL_ERROR_CODES = frozenset((1002, 1007, 1009))
"""Close codes with which wsproto reports a frame it could not parse."""


async def serve_websocket_stream(
    handler: Handler,
    stream: trio.abc.Stream,
    *,
    max_message_size: int,
    http_handler: HttpHandler = default_http_handler,
) -> None:
    """Run one connection on trio-websocket: the handshake, then ``handler``. Never raises.

    The head is read and checked as on the wire transport (:func:`read_upgrade`: the
    same answers to plain HTTP and to refused upgrades), then replayed to
    trio-websocket. ``handler`` gets the request and owns the connection from there (it
    accepts or rejects it, and closes it). When ``handler`` returns, an accepted socket
    it left open is closed, and trio-websocket's reader gets up to
    :data:`CLOSE_TIMEOUT` to finish the close handshake; then the stream is closed.
    Cancellation closes the stream too, and propagates.
    """
    try:
        upgrade = await read_upgrade(stream, http_handler)
        if upgrade is None:
            return
        held = _HeldBackStream(stream, upgrade.head, upgrade.rest)
        async with trio.open_nursery() as nursery:
            ws_request = await wrap_server_stream(
                nursery, held, max_message_size=max_message_size
            )
            accepted: list[AcceptedSocket] = []

            async def accept(subprotocol: str | None) -> AcceptedSocket:
                held.connection = await ws_request.accept(subprotocol=subprotocol)
                accepted.append(held.connection)
                held.released.set()
                return accepted[0]

            async def reject(status: int, body: bytes) -> None:
                extra_headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
                await ws_request.reject(status, extra_headers=extra_headers, body=body)

            await handler(handshake_request(stream, upgrade, accept, reject))
            if accepted:
                await accepted[0].aclose()
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            else:
                nursery.cancel_scope.cancel()  # ends trio-websocket's reader task
    except Exception as exc:
        log_event(
            logging.WARNING, "connection_failed", "a connection failed and was closed: %r", exc
        )
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(
    http_handler: HttpHandler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` for plain HTTP only (GET and HEAD, ``http_handler``'s
    answers) until cancelled; ``task_status.started`` gets the listeners."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    await trio.serve_listeners(functools.partial(serve_http_stream, http_handler=http_handler),
                               listeners)


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
    answer (a health "ok" by default), on either transport.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners)
    if transport != "wire":
        serve_stream = functools.partial(
            serve_websocket_stream,
            handler,
            max_message_size=max_message_size,
            http_handler=http_handler,
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
