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

import collections
import logging
import os
import struct
from collections.abc import Callable, Sequence

import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._logs import log_event
from ._http import HttpRequest
from ._poller import ReadPoller

RECEIVE_SIZE = 64 * 1024

_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA


class _ProtocolViolation(Exception):
    """A frame RFC 6455 forbids; ``in_close`` if it was the peer's (bad) close frame."""

    def __init__(self, code: int, reason: str, *, in_close: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.in_close = in_close


def _text_header(length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | _OP_TEXT, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | _OP_TEXT, 126, length)
    return struct.pack("!BBQ", 0x80 | _OP_TEXT, 127, length)


def _control_frame(opcode: int, payload: bytes = b"") -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int, reason: str) -> bytes:
    """A server's close frame (see :func:`_close_payload`)."""
    return _control_frame(_OP_CLOSE, _close_payload(code, reason))


def _close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and at most 123 bytes of reason, cut between
    characters; nothing for a code that must not be sent (1005, 1006)."""
    if not is_sendable_close_code(code):
        return b""
    return struct.pack("!H", code) + reason.encode()[:123].decode(errors="ignore").encode()


def is_sendable_close_code(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 7.4 and the IANA registry).

    1004-1006 and 1015 are reserved or for local use only, 1016-2999 unassigned, and
    codes outside 1000-4999 are not close codes at all.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _check_close_payload(payload: bytes) -> None:
    """Refuse a close frame's payload as RFC 6455 5.5.1 does: a code, then UTF-8."""
    if not payload:
        return
    if len(payload) == 1:
        raise _ProtocolViolation(1002, "close frame with a 1-byte payload", in_close=True)
    (code,) = struct.unpack_from("!H", payload)
    if not is_sendable_close_code(code):
        raise _ProtocolViolation(
            1002, f"close code {code} is not allowed on the wire", in_close=True
        )
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise _ProtocolViolation(
            1007, "close reason is not valid UTF-8", in_close=True
        ) from None


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
        self._peer_closed = False
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
            # A writer already cancelled (its session closing) leaves the kept bytes for
            # the close's own write, rather than taking them into a send that fails.
            await trio.lowlevel.checkpoint_if_cancelled()
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
        per client); without one, ``after_messages`` follows each message. It is also
        called before each wait for more bytes, so what the caller queued before this
        is written once the bytes that had already arrived are handled. Control
        frames, protocol errors and the end of the stream come back to this task, which
        answers them as :meth:`get_message` does. An exception from ``on_message`` is
        raised here. Cancellation stops delivery between two messages; bytes not yet
        handled stay buffered. The callbacks are dropped when this returns or raises:
        they usually hold whoever owns this socket (a room's session), and keeping them
        would make a cycle that only a full garbage collection frees.
        """
        first_wait = True
        try:
            while self._pending:
                on_message(self._pending.popleft())
                after_messages()
            while True:
                message = await self._next_buffered()
                if message is not None:
                    on_message(message)
                    after_messages()
                    continue
                # The first frames (a reconnect) have often arrived by now: read them
                # here, so that what the caller queued before (its join) goes out in
                # one write with their answers, not one write each.
                if first_wait and self._read_nowait():
                    first_wait = False
                    continue
                first_wait = False
                after_messages()
                if self._poller is None or self._fd is None:
                    await self._read_more()
                else:
                    self._on_message, self._after_messages = on_message, after_messages
                    if not await self._poller.wait(self._fd, self._on_readable):
                        self._poller = None  # the poller stopped: read in this task now
        finally:
            self._on_message = lambda message: None
            self._after_messages = lambda: None

    def _read_nowait(self) -> bool:
        """Buffer what the socket has now, without waiting; True if it had bytes.

        The end of the stream, or an error, is left for the next read to find.
        """
        if self._fd is None:
            return False
        try:
            data = os.read(self._fd, RECEIVE_SIZE)
        except OSError:
            return False
        self._buffer += data
        return bool(data)

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
                self._held = violation.with_traceback(None)  # its frames hold this socket
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
                await self._fail(violation)
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
                if opcode == _OP_CLOSE:
                    _check_close_payload(payload)
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
            if payload:  # checked by _check_close_payload
                (code,) = struct.unpack_from("!H", payload)
                reason = payload[2:].decode()
            if not self._close_sent:
                self._close_sent = True
                await self._write(_control_frame(_OP_CLOSE, payload[:2]))
            self._set_closed(code, reason)
            await self._stream.aclose()
        else:
            raise _ProtocolViolation(1002, f"unknown control opcode {opcode}")

    async def _fail(self, violation: _ProtocolViolation) -> None:
        code, reason = violation.code, violation.reason
        # The reader (a session) logs the close with its room and client; this line is
        # for debugging the transport.
        log_event(logging.DEBUG, "protocol_error", "closing a connection: %s (%d)", reason, code)
        # After a bad close frame the peer has closed its side: no close to wait for.
        self._peer_closed = self._peer_closed or violation.in_close
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
        """Close with ``code``; wait up to 2 s for the peer's close frame (unless it came
        already). Idempotent."""
        if self._close_sent or self.closed is not None:
            await trio.aclose_forcefully(self._stream)
            return
        self._close_sent = True
        try:
            await self._write(close_frame(code, reason or ""))
            with trio.move_on_after(2.0):
                while not self._peer_closed and not self._close_in_buffer():
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    self._buffer += data
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._set_closed(code, reason)
            await trio.aclose_forcefully(self._stream)
