"""HTTP/1.1 on the cold path: read one request with h11, answer it, hang up.

Every connection starts here: a WebSocket upgrade, or a plain request (the health
answer, ``/metrics``, ``/admin/``, the demo page). h11 does the parsing, so a request
line or header that RFC 9112 refuses gets a 400, and a head over
:data:`MAX_HEAD_SIZE` a 431, before any of our code looks at it. A plain request's body
must come with ``Content-Length`` (411 otherwise) and fit :data:`MAX_BODY_SIZE` (413).
Responses are ours to write: a status line and a few fixed headers, always
``Connection: close``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping

import attrs
import h11
import trio

MAX_HEAD_SIZE = 16 * 1024
"""Bytes in an HTTP request head (request line and headers)."""
MAX_BODY_SIZE = 64 * 1024 * 1024
"""Bytes in a plain request's body (a room snapshot ``PUT`` to ``/admin/``)."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def header_tokens(headers: Mapping[str, str], name: str) -> list[str]:
    """The comma-separated tokens of a header, lower-cased (``Connection: keep-alive, Upgrade``)."""
    return [token.strip().lower() for token in headers.get(name, "").split(",") if token.strip()]


@attrs.frozen
class HttpRequest:
    """A parsed HTTP request head.

    Header names are lower-case; a header sent more than once has its values joined
    with ``", "``. ``remote`` is the peer's ``(host, port)`` when it is a TCP socket.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    remote: tuple[str, int] | None = None
    http_version: str = "1.1"
    body: bytes = b""
    """A plain request's body (read before the handler runs); empty for an upgrade."""

    @property
    def is_websocket(self) -> bool:
        """Whether this asks for a WebSocket (``Upgrade: websocket``)."""
        return "websocket" in header_tokens(self.headers, "upgrade")


HttpResponse = tuple[int, str, bytes] | tuple[int, str, bytes, Mapping[str, str]]
"""``(status, content_type, body)``, or with extra headers as a fourth item."""
HttpHandler = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
"""Answers a plain request, of any method; sync or async. Its exceptions become 500s."""
TEXT = "text/plain; charset=utf-8"


def not_get_or_head(request: HttpRequest) -> HttpResponse | None:
    """The 405 for a method other than GET and HEAD, or None for those two."""
    if request.method in ("GET", "HEAD"):
        return None
    return 405, TEXT, b"Only GET and HEAD are served here.\n", {"Allow": "GET, HEAD"}


def default_http_handler(request: HttpRequest) -> HttpResponse:
    """Plain GET requests get a health answer, as the Node example server gives."""
    return not_get_or_head(request) or (200, TEXT, b"ok")


class BadRequest(Exception):
    """A request head that cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def receive_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """What a TCP stream's socket holds now (b"" at its end), read without waiting, and
    without the schedule point of ``receive_some``; None if it holds nothing yet or
    ``stream`` is not a socket. An error is left for an awaited read to raise."""
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        return os.read(stream.socket.fileno(), max_bytes)
    except OSError:  # nothing yet (or an error the awaited read reports)
        return None


async def send_all_soon(stream: trio.abc.Stream, data: bytes) -> None:
    """``stream.send_all(data)``, but as much as the socket takes now is written at
    once, with no schedule point; only the rest is awaited. On a new connection the
    kernel takes a whole answer: its client hears back one loop round sooner."""
    if isinstance(stream, trio.SocketStream):
        try:
            sent = os.write(stream.socket.fileno(), data)
        except OSError:  # full (or an error the awaited send reports)
            sent = 0
        data = data[sent:]
        if not data:
            return
    await stream.send_all(data)


async def read_request(stream: trio.abc.Stream) -> tuple[HttpRequest, bytes, bytes] | None:
    """Read one request head; return it parsed, its raw bytes, and the bytes after it.

    Returns None if the peer hangs up before a whole head arrives. Raises
    :class:`BadRequest` for a head h11 refuses, or one over :data:`MAX_HEAD_SIZE`.
    The bytes after the head are a WebSocket client's first frames (or a body, which
    no request we serve has). The head is found by its blank line, then parsed by h11.
    Cancellation leaves the stream to the caller.
    """
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD_SIZE:
            raise BadRequest(431, "request head too large")
        data = receive_now(stream, MAX_HEAD_SIZE)
        if data is None:
            data = bytes(await stream.receive_some(MAX_HEAD_SIZE))
        if not data:
            return None
        buffer += data
    if end + 4 > MAX_HEAD_SIZE:
        raise BadRequest(431, "request head too large")
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(bytes(buffer[: end + 4]))
    try:
        request = connection.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(exc.error_status_hint, str(exc)) from None
    assert isinstance(request, h11.Request)  # a whole head is a Request or an error
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    remote = None
    if isinstance(stream, trio.SocketStream):
        peer = stream.socket.getpeername()
        remote = (peer[0], peer[1]) if isinstance(peer, tuple) else None
    parsed = HttpRequest(
        request.method.decode("ascii"),
        request.target.decode("latin-1"),
        headers,
        remote,
        request.http_version.decode("ascii"),
    )
    return parsed, bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])


async def read_body(stream: trio.abc.Stream, request: HttpRequest, received: bytes) -> bytes:
    """The body of ``request``, of which ``received`` came with its head.

    Raises :class:`BadRequest`: 411 for a body without ``Content-Length`` (chunked),
    413 for one over :data:`MAX_BODY_SIZE`, 400 for one cut short.
    """
    if "transfer-encoding" in request.headers:
        raise BadRequest(411, "send the body with Content-Length")
    length_text = request.headers.get("content-length")
    if length_text is None:
        return b""
    length = int(length_text)  # h11 has checked that it is a number
    if length > MAX_BODY_SIZE:
        raise BadRequest(413, f"a request body may hold at most {MAX_BODY_SIZE} bytes")
    body = bytearray(received[:length])
    while len(body) < length:
        data = await stream.receive_some(min(length - len(body), 1 << 20))
        if not data:
            raise BadRequest(400, "the body ended before its Content-Length")
        body += data
    return bytes(body)


def http_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    head_only: bool = False,
    extra_headers: Mapping[str, str] | None = None,
) -> bytes:
    """A whole ``Connection: close`` response; ``head_only`` leaves the body out (HEAD)."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-cache",
        *(f"{name}: {value}" for name, value in (extra_headers or {}).items()),
        "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


async def answer(stream: trio.abc.Stream, response: bytes) -> None:
    """Send a plain HTTP response, then let the client hang up first (briefly).

    Closing a socket with unread request bytes resets it, which can cut the response
    short on the client's side; a half-close and a short wait avoid that. The caller
    closes the stream.
    """
    await stream.send_all(response)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
        with trio.move_on_after(2.0):
            while await stream.receive_some(MAX_HEAD_SIZE):
                pass
