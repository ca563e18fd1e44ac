"""A lean server-side WebSocket (RFC 6455) on Trio streams: the default transport.

It does only what a sync server needs, with no reader task and no channel hop per
frame. Frames are read and parsed either in the session's own task (:meth:`WireSocket.
get_message`) or, given a :class:`~._poller.ReadPoller`, in the poller's task, which
hands each message to a callback (:meth:`WireSocket.deliver_messages`); pings and close
frames are answered in the session's task. Queued frames go out in one write. Server
frames are never masked, so framing a payload is a few header bytes. No extension is
negotiated (browsers fall back to plain frames).

Measured in bench/: against trio-websocket, the per-frame cost on the fan-out and
many-rooms shapes is what decides whether we keep up with the Node server.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

from ._poller import ReadPoller

logger = logging.getLogger("canvas_store_trio")

MAX_HEAD_SIZE = 16 * 1024
"""Bytes in an HTTP request head (request line and headers)."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has to send its request head."""
RECEIVE_SIZE = 64 * 1024

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA


class _ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class HttpRequest:
    """A parsed HTTP request head. Header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    remote: Any = None

    @property
    def is_websocket(self) -> bool:
        return (
            "websocket" in self.headers.get("upgrade", "").lower()
            and "upgrade" in self.headers.get("connection", "").lower()
        )


HttpResponse = tuple[int, str, bytes]
"""``(status, content_type, body)``"""
HttpHandler = Callable[[HttpRequest], HttpResponse]


def default_http_handler(request: HttpRequest) -> HttpResponse:
    """Plain HTTP requests get a health answer, as the Node example server gives."""
    return 200, "text/plain; charset=utf-8", b"ok"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}


def _http_response(status: int, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _parse_head(head: bytes) -> HttpRequest | None:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return HttpRequest(method, path, headers)


def _text_header(length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | _OP_TEXT, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | _OP_TEXT, 126, length)
    return struct.pack("!BBQ", 0x80 | _OP_TEXT, 127, length)


def _control_frame(opcode: int, payload: bytes = b"") -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


def _close_payload(code: int, reason: str) -> bytes:
    return struct.pack("!H", code) + reason.encode()[:123] if code not in (1005, 1006) else b""


def _unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
    length = len(payload)
    if not length:
        return b""
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(length, "little")


class WireSocket:
    """One accepted WebSocket connection. Used by one reader task and one writer task.

    :meth:`get_message` reads and parses in the calling task, answering pings and
    close frames on the way; :meth:`deliver_messages` does the same through a poller.
    :meth:`frame_text` frames payloads for one :meth:`write` (or :meth:`write_nowait`,
    which never waits). :meth:`aclose` sends a close frame, waits (briefly) for the
    peer's, and closes the stream; it is safe to call twice.
    Errors surface as ``trio_websocket.ConnectionClosed``, so code written for
    trio-websocket works.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        *,
        max_message_size: int,
        buffered: bytes = b"",
        poller: ReadPoller | None = None,
    ) -> None:
        self._stream = stream
        self.request = request
        self.path = request.path
        self._max_message_size = max_message_size
        self._buffer = bytearray(buffered)
        self._pending: collections.deque[str | bytes] = collections.deque()
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._send_lock = trio.Lock()
        self._unsent = bytearray()
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._poller = poller
        self._held: tuple[int, bytes] | _ProtocolViolation | None = None
        self._on_message: Callable[[str | bytes], None] = lambda message: None
        self._after_messages: Callable[[], None] = lambda: None
        self._pong = trio.Event()
        self._close_sent = False
        self.closed: CloseReason | None = None

    @property
    def unsent_bytes(self) -> int:
        return len(self._unsent)

    def frame_text(self, payloads: Sequence[bytes]) -> bytes:
        """UTF-8 JSON payloads as text frames, ready to write."""
        parts = []
        for payload in payloads:
            parts.append(_text_header(len(payload)))
            parts.append(payload)
        return b"".join(parts)

    def write_nowait(self, data: bytes) -> bool:
        """Write ``data`` now, as far as the kernel takes it; True if all of it went.

        The rest is kept and goes first with the next :meth:`write`. Nothing is written
        now while another write is under way, so bytes never interleave.
        """
        if self._close_sent or self.closed is not None:
            raise ConnectionClosed(self.closed or CloseReason(1006, None))
        if self._fd is None or self._unsent or self._send_lock.locked():
            self._unsent += data
            return False
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._set_closed(1006, "connection lost")
            raise ConnectionClosed(self.closed) from None
        if sent < len(data):
            self._unsent += data[sent:]
            return False
        return True

    async def write(self, data: bytes) -> None:
        """Write what :meth:`write_nowait` kept, then ``data``, waiting as needed."""
        if self._close_sent or self.closed is not None:
            raise ConnectionClosed(self.closed or CloseReason(1006, None))
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            if self._unsent:
                data = bytes(self._unsent) + data
                self._unsent.clear()
            if not data:
                return
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._set_closed(1006, "connection lost")
                raise ConnectionClosed(self.closed) from None

    def _set_closed(self, code: int, reason: str | None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)

    async def send_message(self, message: str | bytes) -> None:
        """trio-websocket's API: a str goes as text, bytes as a binary frame."""
        if isinstance(message, str):
            await self.write(self.frame_text([message.encode()]))
            return
        header = bytes((0x80 | _OP_BINARY,)) + _text_header(len(message))[1:]
        await self._write(header + message)

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for a pong (the reader task must be reading)."""
        self._pong = trio.Event()
        await self._write(_control_frame(_OP_PING, payload or b"ping"))
        await self._pong.wait()

    async def get_message(self) -> str | bytes:
        """The next text (str) or binary (bytes) message from the peer."""
        if self._pending:
            return self._pending.popleft()
        return await self._receive()

    async def deliver_messages(
        self,
        on_message: Callable[[str | bytes], None],
        after_messages: Callable[[], None] = lambda: None,
    ) -> None:
        """Call ``on_message`` with each message as it arrives, until the connection ends.

        Ends, like :meth:`get_message`, by raising ``ConnectionClosed``. With a read
        poller, the poller's task reads the socket and calls ``on_message`` there, with
        no task switch per message, and calls ``after_messages`` once it has served
        every socket of its batch (so a room writes what a batch queued in one write
        per client); without one, ``after_messages`` follows each message. Control
        frames, protocol errors and the end of the stream come back to this task, which
        answers them as :meth:`get_message` does. An exception from ``on_message`` is
        raised here. Cancellation stops delivery between two messages; bytes not yet
        handled stay buffered. The callbacks are dropped when this returns or raises:
        they usually hold whoever owns this socket (a room's session), and keeping them
        would make a cycle that only a full garbage collection frees.
        """
        try:
            while self._pending:
                on_message(self._pending.popleft())
                after_messages()
            while True:
                message = await self._next_buffered()
                if message is not None:
                    on_message(message)
                    after_messages()
                elif self._poller is None or self._fd is None:
                    await self._read_more()
                else:
                    self._on_message, self._after_messages = on_message, after_messages
                    if not await self._poller.wait(self._fd, self._on_readable):
                        self._poller = None  # the poller stopped: read in this task now
        finally:
            self._on_message = lambda message: None
            self._after_messages = lambda: None

    def _on_readable(self) -> bool:
        """The poller's callback: read once, deliver whole messages; False to hand back."""
        poller, fd = self._poller, self._fd
        assert poller is not None and fd is not None
        try:
            data = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._set_closed(1006, "connection lost")
            return False
        self._buffer += data
        delivered = False
        while True:
            try:
                message = self._next_message()
            except _ProtocolViolation as violation:
                self._held = violation
                return False
            if message is None:
                return True
            if isinstance(message, tuple):
                self._held = message
                return False
            if not delivered:
                delivered = True
                poller.call_after_batch(self._after_messages)
            self._on_message(message)
            if not poller.is_waiting(fd):  # the handler ended the session's wait
                return False

    async def until_closed(self) -> None:
        """Read until the peer closes, keeping its messages for :meth:`get_message`.

        Run it while the connection waits for something else (authorization) to learn
        that the client left; cancel it when done waiting. Nothing read is lost.
        """
        try:
            while True:
                self._pending.append(await self._receive())
        except ConnectionClosed:
            return

    async def _receive(self) -> str | bytes:
        while (message := await self._next_buffered()) is None:
            await self._read_more()
        return message

    async def _next_buffered(self) -> str | bytes | None:
        """The next message among the bytes read; None if more are needed.

        Answers control frames and fails the connection on a protocol error on the way.
        """
        while True:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            held, self._held = self._held, None
            try:
                if isinstance(held, _ProtocolViolation):
                    raise held
                message = held or self._next_message()
            except _ProtocolViolation as violation:
                await self._fail(violation.code, violation.reason)
                continue
            if isinstance(message, tuple):
                await self._on_control(*message)
                continue
            return message

    async def _read_more(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self._buffer += data
        else:
            self._set_closed(1006, "connection lost")

    def _next_message(self) -> str | bytes | tuple[int, bytes] | None:
        """Parse buffered bytes: a whole message, a control frame, or None for more."""
        while True:
            buffer = self._buffer
            if len(buffer) < 2:
                return None
            first, second = buffer[0], buffer[1]
            if first & 0x70:
                raise _ProtocolViolation(1002, "no extension was negotiated")
            if not second & 0x80:
                raise _ProtocolViolation(1002, "client frames must be masked")
            opcode = first & 0x0F
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return None
                (length,) = struct.unpack_from("!H", buffer, 2)
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return None
                (length,) = struct.unpack_from("!Q", buffer, 2)
                offset = 10
            if opcode >= 0x8:
                if opcode > _OP_PONG or length > 125 or not first & 0x80:
                    raise _ProtocolViolation(1002, "bad control frame")
            elif self._fragment_size + length > self._max_message_size:
                raise _ProtocolViolation(1009, f"message over {self._max_message_size} bytes")
            end = offset + 4 + length
            if len(buffer) < end:
                return None
            payload = _unmask(buffer[offset + 4 : end], bytes(buffer[offset : offset + 4]))
            del buffer[:end]
            if opcode >= 0x8:
                return opcode, payload
            if opcode == _OP_CONTINUATION:
                if not self._fragment_opcode:
                    raise _ProtocolViolation(1002, "continuation without a message")
            elif opcode in (_OP_TEXT, _OP_BINARY):
                if self._fragment_opcode:
                    raise _ProtocolViolation(1002, "new message inside a fragmented one")
                self._fragment_opcode = opcode
            else:
                raise _ProtocolViolation(1002, f"unknown opcode {opcode}")
            self._fragments.append(payload)
            self._fragment_size += length
            if not first & 0x80:
                continue
            data = b"".join(self._fragments)
            kind = self._fragment_opcode
            self._fragments, self._fragment_opcode, self._fragment_size = [], 0, 0
            if kind == _OP_BINARY:
                return data
            try:
                return data.decode()
            except UnicodeDecodeError:
                raise _ProtocolViolation(1007, "text frame is not valid UTF-8") from None

    async def _on_control(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            if not self._close_sent:
                await self._write(_control_frame(_OP_PONG, payload))
        elif opcode == _OP_PONG:
            self._pong.set()
        elif opcode == _OP_CLOSE:
            code, reason = 1005, None
            if len(payload) >= 2:
                (code,) = struct.unpack_from("!H", payload)
                reason = payload[2:].decode(errors="replace")
            if not self._close_sent:
                self._close_sent = True
                await self._write(_control_frame(_OP_CLOSE, payload[:2]))
            self._set_closed(code, reason)
            await self._stream.aclose()
        else:
            raise _ProtocolViolation(1002, f"unknown control opcode {opcode}")

    async def _fail(self, code: int, reason: str) -> None:
        logger.info("closing a connection: %s (%d)", reason, code)
        try:
            await self.aclose(code, reason)
        finally:
            self._set_closed(code, reason)

    def _close_in_buffer(self) -> bool:
        """Whether the peer's close frame is in what we have read."""
        try:
            while (message := self._next_message()) is not None:
                if isinstance(message, tuple) and message[0] == _OP_CLOSE:
                    return True
        except _ProtocolViolation:
            # Unparseable from here on (after a 1009, say): drop it and keep reading
            # until EOF or the timeout, so the peer can finish sending and read our close.
            self._buffer.clear()
        return False

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with ``code``; wait up to 2 s for the peer's close frame. Idempotent."""
        if self._close_sent or self.closed is not None:
            await trio.aclose_forcefully(self._stream)
            return
        self._close_sent = True
        try:
            await self._write(_control_frame(_OP_CLOSE, _close_payload(code, reason or "")))
            with trio.move_on_after(2.0):
                while not self._close_in_buffer():
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    self._buffer += data
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._set_closed(code, reason)
            await trio.aclose_forcefully(self._stream)


class WireRequest:
    """A WebSocket handshake waiting for :meth:`accept` (trio-websocket's request API)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        buffered: bytes,
        max_message_size: int,
        poller: ReadPoller | None = None,
    ) -> None:
        self._stream = stream
        self._poller = poller
        self._request = request
        self._buffered = buffered
        self._max_message_size = max_message_size
        self.path = request.path
        self.headers = request.headers
        self.remote = request.remote

    async def accept(self) -> WireSocket:
        key = self._request.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        await self._stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        return WireSocket(
            self._stream,
            self._request,
            max_message_size=self._max_message_size,
            buffered=self._buffered,
            poller=self._poller,
        )


class _HeadTooLarge(Exception):
    pass


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes] | None:
    """The request head and the bytes after it; None if the peer hangs up first."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD_SIZE or (end < 0 and len(buffer) > MAX_HEAD_SIZE):
            raise _HeadTooLarge
        if end >= 0:
            return bytes(buffer[:end]), bytes(buffer[end + 4 :])
        data = await stream.receive_some(MAX_HEAD_SIZE)
        if not data:
            return None
        buffer += data


async def _answer(stream: trio.abc.Stream, response: bytes) -> None:
    """Send a plain HTTP response, then let the client hang up first (briefly).

    Closing a socket with unread request bytes resets it, which can cut the response
    short on the client's side; a half-close and a short wait avoid that.
    """
    await stream.send_all(response)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
        with trio.move_on_after(2.0):
            while await stream.receive_some(MAX_HEAD_SIZE):
                pass


async def serve_wire_stream(
    handler: Callable[[WireRequest], Awaitable[None]],
    stream: trio.abc.Stream,
    *,
    max_message_size: int,
    http_handler: HttpHandler = default_http_handler,
    poller: ReadPoller | None = None,
) -> None:
    """Serve one TCP connection: a WebSocket handshake for ``handler``, or plain HTTP.

    With ``poller``, the accepted socket's messages are read by the poller's task (see
    :meth:`WireSocket.deliver_messages`). Never raises except Cancelled; the stream is
    closed when this returns.
    """
    try:
        read = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                read = await _read_head(stream)
            except _HeadTooLarge:
                await _answer(stream, _http_response(431, "text/plain", b"head too large"))
                return
        if read is None:
            return  # hung up, or sent no head in time
        request = _parse_head(read[0])
        if request is None:
            await _answer(stream, _http_response(400, "text/plain", b"bad request"))
            return
        rest = read[1]
        if isinstance(stream, trio.SocketStream):
            request = attrs.evolve(request, remote=stream.socket.getpeername())
        if not request.is_websocket:
            if request.method not in ("GET", "HEAD"):
                await _answer(stream, _http_response(405, "text/plain", b"GET only"))
                return
            status, content_type, body = http_handler(request)
            head_only = request.method == "HEAD"
            await _answer(stream, _http_response(status, content_type, body, head_only))
            return
        if request.headers.get("sec-websocket-version") != "13" or not request.headers.get(
            "sec-websocket-key"
        ):
            await _answer(stream, _http_response(426, "text/plain", b"WebSocket version 13"))
            return
        await handler(WireRequest(stream, request, rest, max_message_size, poller))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
        pass
    except Exception as exc:
        logger.warning("a connection failed and was closed: %r", exc)
    finally:
        await trio.aclose_forcefully(stream)
