"""The WebSocket opening handshake (RFC 6455 section 4), and the one request type.

:class:`HandshakeRequest` is what a connection handler gets on either transport: the
path, the headers, the peer's address, the offered subprotocols, and ``accept()`` or
``reject()``. On the wire transport :func:`serve_wire_stream` reads the request head
with h11 (:mod:`._http`), answers plain HTTP and refused upgrades itself, and hands
a well-formed upgrade to the handler; ``accept()`` writes the 101 and returns a
:class:`~._wire.WireSocket`. The trio-websocket transport wraps wsproto's request in the
same type, from the same h11 reading of the head (see :mod:`._listener`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._logs import log_event
from ._forward import forward_upgrade
from ._http import (
    BadRequest,
    HttpHandler,
    HttpRequest,
    answer,
    default_http_handler,
    header_tokens,
    http_response,
    read_body,
    read_request,
    send_all_soon,
)
from ._poller import ReadPoller
from ._wire import WireSocket

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to send its whole request head (either transport)."""
BODY_TIMEOUT = 60.0
"""Seconds a plain request has to send its body, once its head is in."""

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT = "text/plain; charset=utf-8"


ForwardWith = Callable[[str, Mapping[str, str], Callable[[], None]], Awaitable[None]]
"""``(address, headers, answered)``: splice the connection to ``address``
(:func:`~._forward.forward_upgrade` on the connection's stream)."""


class MessageSocket(Protocol):
    """The part of a WebSocket connection a room uses (trio-websocket's API)."""

    async def get_message(self) -> str | bytes:
        """The next message; raises once the connection has closed."""
        ...

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (a text frame for ``str``)."""
        ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame with this code and reason, and end the connection."""
        ...

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping; returns once the peer's pong arrives."""
        ...


class AcceptedSocket(MessageSocket, Protocol):
    """What ``HandshakeRequest.accept()`` returns: ``closed`` is set once it has ended."""

    @property
    def closed(self) -> CloseReason | None: ...


@attrs.define(eq=False)
class HandshakeRequest:
    """A WebSocket upgrade waiting for an answer: :meth:`accept` or :meth:`reject`.

    ``path`` is the request target (path and query), ``headers`` has lower-case names
    (a repeated header's values joined with ``", "``), ``remote`` is the peer's
    ``(host, port)`` (None when the stream is not a TCP socket) and ``subprotocols``
    the ones the client offered, in its order. Answer once; the handler that got the
    request owns the accepted socket and closes it (the transport closes the TCP
    stream when the handler returns).
    """

    path: str
    headers: Mapping[str, str]
    remote: tuple[str, int] | None
    subprotocols: tuple[str, ...]
    _accept_with: Callable[[str | None], Awaitable[AcceptedSocket]] = attrs.field(
        alias="accept_with", repr=False
    )
    _reject_with: Callable[[int, bytes], Awaitable[None]] = attrs.field(
        alias="reject_with", repr=False
    )
    _forward_with: ForwardWith | None = attrs.field(
        default=None, alias="forward_with", repr=False
    )
    _answered: bool = attrs.field(default=False, init=False, repr=False)

    async def accept(self, *, subprotocol: str | None = None) -> AcceptedSocket:
        """Send the 101 answer and return the connection.

        ``subprotocol`` must be one of :attr:`subprotocols` (or None for none).
        """
        if subprotocol is not None and subprotocol not in self.subprotocols:
            raise ValueError(f"subprotocol {subprotocol!r} was not offered")
        self._answer_once()
        return await self._accept_with(subprotocol)

    async def reject(self, status: int = 403, body: bytes | str = b"") -> None:
        """Refuse the upgrade with an HTTP ``status`` (400-599) and a plain-text body."""
        if not 400 <= status <= 599:
            raise ValueError(f"a rejection's status must be 400-599, not {status}")
        self._answer_once()
        await self._reject_with(status, body.encode() if isinstance(body, str) else body)

    async def forward(self, address: str, headers: Mapping[str, str] | None = None) -> None:
        """Hand the connection to the server at ``address`` (``host:port``): replay this
        upgrade there, ``headers`` added, and splice bytes both ways until either side
        closes (see :mod:`._forward`).

        Raises :class:`~._forward.ForwardingError` if that server cannot be reached or
        does not answer in time; the request is then still unanswered. Otherwise this
        returns once the forwarded connection has ended, and the request counts as
        answered (by the other server). Cancellation ends the splice.
        """
        if self._forward_with is None:
            raise RuntimeError("this transport cannot forward connections")
        if self._answered:
            raise RuntimeError("this handshake was already answered")
        await self._forward_with(address, headers or {}, self._answer_once)

    def _answer_once(self) -> None:
        if self._answered:
            raise RuntimeError("this handshake was already answered")
        self._answered = True


def offered_subprotocols(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The client's ``Sec-WebSocket-Protocol`` list, in its order."""
    return tuple(header_tokens(headers, "sec-websocket-protocol"))


def accept_token(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def _is_valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def upgrade_refusal(request: HttpRequest) -> bytes | None:
    """The HTTP answer to an upgrade RFC 6455 (section 4.2.1) does not allow; None if fine."""
    if request.method != "GET":
        return http_response(
            405, _TEXT, b"A WebSocket upgrade must be a GET.\n", extra_headers={"Allow": "GET"}
        )
    if request.http_version != "1.1":
        return http_response(400, _TEXT, b"A WebSocket upgrade needs HTTP/1.1.\n")
    if "upgrade" not in header_tokens(request.headers, "connection"):
        return http_response(400, _TEXT, b"A WebSocket upgrade needs Connection: Upgrade.\n")
    if request.headers.get("sec-websocket-version", "").strip() != "13":
        return http_response(
            426,
            _TEXT,
            b"Only WebSocket version 13 is supported.\n",
            extra_headers={"Sec-WebSocket-Version": "13"},
        )
    if not _is_valid_key(request.headers.get("sec-websocket-key", "").strip()):
        return http_response(
            400, _TEXT, b"Sec-WebSocket-Key must be 16 bytes in base64.\n"
        )
    return None


@attrs.frozen
class Upgrade:
    """A well-formed upgrade request: parsed, its raw head, and the bytes after the head."""

    request: HttpRequest
    head: bytes
    rest: bytes


async def read_upgrade(
    stream: trio.abc.Stream, http_handler: HttpHandler = default_http_handler
) -> Upgrade | None:
    """Read a request head; answer everything but a well-formed WebSocket upgrade.

    A client gets :data:`HANDSHAKE_TIMEOUT` to send its head. A head h11 refuses gets
    400 (431 if too large), plain GET and HEAD requests ``http_handler``'s answer, an
    upgrade RFC 6455 refuses its 4xx; each of these returns None, as does a client
    that hangs up or runs out of time. The caller closes the stream either way.
    """
    read = None
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            read = await read_request(stream)
        except BadRequest as exc:
            await answer(stream, http_response(exc.status, _TEXT, f"{exc}\n".encode()))
            return None
    if read is None:
        return None
    request, head, rest = read
    if not request.is_websocket:
        await answer(stream, await _plain_answer(stream, request, rest, http_handler))
        return None
    refusal = upgrade_refusal(request)
    if refusal is not None:
        await answer(stream, refusal)
        return None
    return Upgrade(request, head, rest)


def handshake_request(
    stream: trio.abc.Stream,
    upgrade: Upgrade,
    accept_with: Callable[[str | None], Awaitable[AcceptedSocket]],
    reject_with: Callable[[int, bytes], Awaitable[None]],
    poller: ReadPoller | None = None,
) -> HandshakeRequest:
    """The handler's view of a well-formed upgrade read from ``stream``, the same on
    both transports (either can forward it: nothing of the WebSocket has begun; a
    forwarded connection's bytes are copied in ``poller``'s task, if given)."""
    request = upgrade.request
    return HandshakeRequest(
        request.path,
        request.headers,
        request.remote,
        offered_subprotocols(request.headers),
        accept_with=accept_with,
        reject_with=reject_with,
        forward_with=functools.partial(
            forward_upgrade, stream, upgrade.head, upgrade.rest, poller=poller
        ) if isinstance(stream, trio.SocketStream) else None,
    )


async def serve_wire_stream(
    handler: Callable[[HandshakeRequest], Awaitable[None]],
    stream: trio.abc.Stream,
    *,
    max_message_size: int,
    http_handler: HttpHandler = default_http_handler,
    poller: ReadPoller | None = None,
) -> None:
    """Serve one TCP connection: a WebSocket handshake for ``handler``, or plain HTTP.

    Only a well-formed upgrade reaches ``handler`` (see :func:`read_upgrade`). With
    ``poller``, the accepted socket's messages are read by the poller's task (see
    :meth:`WireSocket.deliver_messages`). Never raises except Cancelled; the stream is
    closed when this returns.
    """
    try:
        upgrade = await read_upgrade(stream, http_handler)
        if upgrade is None:
            return
        accept = functools.partial(
            _accept, stream, upgrade.request, upgrade.rest, max_message_size, poller
        )
        reject = functools.partial(_reject, stream)
        await handler(handshake_request(stream, upgrade, accept, reject, poller))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
        pass
    except Exception as exc:  # a bug in the handler: this connection ends, not the server
        log_event(
            logging.ERROR,
            "connection_failed",
            "a connection failed and was closed: %r",
            exc,
            exc_info=exc,
        )
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http_stream(stream: trio.abc.Stream, http_handler: HttpHandler) -> None:
    """Serve one TCP connection of a plain HTTP port (``--metrics-port``): GET and HEAD
    get ``http_handler``'s answer, a WebSocket upgrade a 404. Never raises except
    Cancelled; the stream is closed when this returns."""
    try:
        if await read_upgrade(stream, http_handler) is not None:
            await answer(stream, http_response(404, _TEXT, b"No WebSockets on this port.\n"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:
        log_event(logging.WARNING, "connection_failed",
                  "an HTTP connection failed and was closed: %r", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def _plain_answer(
    stream: trio.abc.Stream, request: HttpRequest, received: bytes, http_handler: HttpHandler
) -> bytes:
    """The answer to a request that is not an upgrade: its body is read (within
    :data:`BODY_TIMEOUT`), then ``http_handler`` answers it."""
    try:
        with trio.fail_after(BODY_TIMEOUT):
            request = attrs.evolve(request, body=await read_body(stream, request, received))
    except BadRequest as exc:
        return http_response(exc.status, _TEXT, f"{exc}\n".encode())
    except trio.TooSlowError:
        return http_response(408, _TEXT, b"The request body did not arrive in time.\n")
    try:
        answered = http_handler(request)
        response = await answered if inspect.isawaitable(answered) else answered
    except Exception as exc:  # a bug in the handler: the client gets a 500
        log_event(logging.ERROR, "http_handler_failed", "answering %s %s failed",
                  request.method, urlsplit(request.path).path, exc_info=exc)
        response = (500, _TEXT, b"Internal error; the server log has the cause.\n")
    status, content_type, body, *headers = response
    return http_response(status, content_type, body, head_only=request.method == "HEAD",
                         extra_headers=headers[0] if headers else None)


async def _accept(
    stream: trio.abc.Stream,
    request: HttpRequest,
    rest: bytes,
    max_message_size: int,
    poller: ReadPoller | None,
    subprotocol: str | None,
) -> WireSocket:
    key = request.headers["sec-websocket-key"].strip()
    head = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_token(key)}",
    ]
    if subprotocol is not None:
        head.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    await send_all_soon(stream, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    return WireSocket(
        stream,
        request,
        max_message_size=max_message_size,
        buffered=rest,
        poller=poller,
    )


async def _reject(stream: trio.abc.Stream, status: int, body: bytes) -> None:
    await answer(stream, http_response(status, _TEXT, body))
