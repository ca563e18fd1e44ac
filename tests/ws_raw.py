"""A raw WebSocket client for conformance tests: frames built byte by byte, and a strict
reader of the server's frames.

The client sends exactly the bytes it is given (:func:`frame` can set any bit, opcode or
length, masked or not), so it can break every rule of RFC 6455 on purpose. Whatever the
server sends back is checked against the rules a server must keep: frames unmasked, no
reserved bits (no extension is negotiated), known opcodes, control frames whole and at
most 125 bytes, text and close reasons valid UTF-8, close codes a server may send. Any
slip is an ``AssertionError`` naming it.

Every wait is bounded (``TIMEOUT`` seconds, ``trio.TooSlowError`` past it). The client owns
its TCP stream; :meth:`RawClient.aclose` closes it and is safe to call twice.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass

import trio

TIMEOUT = 5.0
"""Seconds any one wait for the server may take."""
RECEIVE_SIZE = 1 << 20

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2
CLOSE, PING, PONG = 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MASK = b"\x37\xfa\x21\x3d"
"""The masking key of every client frame (asymmetric, so a misaligned unmask shows)."""


def is_valid_close_code(code: int) -> bool:
    """Whether an endpoint may send ``code`` in a close frame (RFC 6455 7.4, IANA registry)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def mask(payload: bytes, key: bytes = MASK) -> bytes:
    """``payload`` XORed with ``key`` repeated (fast for megabytes: one big-int XOR)."""
    length = len(payload)
    if not length:
        return b""
    stream = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(
        length, "big"
    )


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
) -> bytes:
    """One client frame: ``rsv`` is the three reserved bits as a number (0-7)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length, bit = len(payload), 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    return head + MASK + mask(payload) if masked else head + payload


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    """A close frame's payload: nothing when ``code`` is None, else the code and reason."""
    return b"" if code is None else struct.pack("!H", code) + reason


@dataclass(frozen=True)
class Frame:
    """A frame from the server, or a whole message (``fin`` set, fragments joined)."""

    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        """A close frame's code, None when it carries none."""
        assert self.opcode == CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if self.payload else None


def _check_close(payload: bytes) -> None:
    assert len(payload) != 1, "server close frame with a 1-byte payload"
    if payload:
        (code,) = struct.unpack("!H", payload[:2])
        assert is_valid_close_code(code), f"server sent close code {code}"
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise AssertionError(f"server close reason is not UTF-8: {payload[2:]!r}") from None


class RawClient:
    """One client connection: :meth:`open` does the handshake, then send and read at will."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.close_sent = False
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_opcode: int | None = None
        self._pushed: Frame | None = None

    @classmethod
    async def open(cls, port: int, *, path: str = "/", early: bytes = b"") -> RawClient:
        """Connect and upgrade; ``early`` (frames, say) goes in the same write as the request."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        try:
            await client._handshake(path, early)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _handshake(self, path: str, early: bytes) -> None:
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode() + b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
        await self.stream.send_all(request + early)
        with trio.fail_after(TIMEOUT):
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                assert data, f"EOF during the handshake: {bytes(self._buffer)!r}"
                self._buffer += data
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        assert head[0].startswith("HTTP/1.1 101 "), head[0]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, headers
        assert headers.get("upgrade", "").lower() == "websocket", headers
        assert "upgrade" in headers.get("connection", "").lower(), headers
        assert "sec-websocket-extensions" not in headers, "an extension nobody offered"

    async def send(self, *frames: bytes, chop: int | None = None) -> None:
        """Write ``frames`` in one write, or in writes of ``chop`` bytes each."""
        data = b"".join(frames)
        if chop is None:
            await self.stream.send_all(data)
            return
        for start in range(0, len(data), chop):
            await self.stream.send_all(data[start : start + chop])

    async def send_close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        self.close_sent = True
        await self.send(frame(CLOSE, close_payload(code, reason)))

    async def _fill(self, size: int) -> bool:
        """Read until ``size`` bytes are buffered; False at EOF (or reset) before that."""
        with trio.fail_after(TIMEOUT):
            while len(self._buffer) < size:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except trio.BrokenResourceError:  # a reset ends the connection too
                    data = b""
                if not data:
                    return False
                self._buffer += data
        return True

    async def next_frame(self) -> Frame | None:
        """The server's next frame, checked; None if the connection ends cleanly first."""
        if not await self._fill(2):
            assert not self._buffer, f"EOF inside a frame header: {bytes(self._buffer)!r}"
            return None
        first, second = self._buffer[0], self._buffer[1]
        assert not first & 0x70, f"server frame with reserved bits {first >> 4 & 7}"
        assert not second & 0x80, "server frame is masked"
        opcode, length, offset = first & 0x0F, second & 0x7F, 2
        assert opcode in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG), f"opcode {opcode}"
        if length >= 126:
            offset = 4 if length == 126 else 10
            assert await self._fill(offset), "EOF inside a frame header"
            length = int.from_bytes(self._buffer[2:offset], "big")
        assert await self._fill(offset + length), "EOF inside a frame payload"
        payload = bytes(self._buffer[offset : offset + length])
        del self._buffer[: offset + length]
        fin = bool(first & 0x80)
        if opcode >= CLOSE:
            assert fin and length <= 125, "server control frame fragmented or too long"
            if opcode == CLOSE:
                _check_close(payload)
        return Frame(opcode, payload, fin)

    async def next_message(self) -> Frame | None:
        """The next control frame or whole data message (fragments joined and checked)."""
        if self._pushed is not None:
            pushed, self._pushed = self._pushed, None
            return pushed
        while (got := await self.next_frame()) is not None:
            if got.opcode >= CLOSE:
                return got
            if got.opcode == CONTINUATION:
                assert self._fragment_opcode is not None, "server continuation of nothing"
            else:
                assert self._fragment_opcode is None, "server message inside a message"
                self._fragment_opcode = got.opcode
            self._fragments.append(got.payload)
            if got.fin:
                message = Frame(self._fragment_opcode, b"".join(self._fragments))
                self._fragments, self._fragment_opcode = [], None
                if message.opcode == TEXT:
                    message.payload.decode()  # raises on bad UTF-8
                return message
        assert self._fragment_opcode is None, "EOF inside a server message"
        return None

    def push_back(self, got: Frame) -> None:
        """Have :meth:`next_message` return ``got`` once more."""
        self._pushed = got

    async def expect(self, opcode: int, payload: bytes) -> None:
        """The next thing the server sends is this message or control frame."""
        got = await self.next_message()
        assert got == Frame(opcode, payload), f"expected {Frame(opcode, payload)}, got {got}"

    async def expect_eof(self) -> None:
        """The server closes the TCP connection (a reset counts), sending nothing more."""
        assert await self._fill(1) is False, f"bytes after the close: {bytes(self._buffer)!r}"

    async def expect_close(self, *codes: int | None) -> Frame:
        """The server's next frame is a close with one of ``codes`` (None: no code).

        If the client has not sent its close frame yet, it answers with the same code (or
        with an empty close frame); either way the server then ends the TCP connection.
        """
        got = self._closing(await self.next_message(), codes)
        if not self.close_sent:
            with contextlib.suppress(trio.BrokenResourceError):  # the server may hang up first
                await self.send_close(got.close_code)
        await self.expect_eof()
        return got

    async def expect_close_while_sending(self, data: bytes, *codes: int | None) -> Frame:
        """Send ``data`` while waiting for the server to fail the connection with ``codes``.

        The server may close before it has read everything (then the rest of ``data`` is
        dropped). The client answers with a close frame and half-closes: after a frame it
        refused, the server cannot be expected to find that close in the bytes that follow.
        """

        async def push() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await self.stream.send_all(data)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(push)
                got = self._closing(await self.next_message(), codes)
        with contextlib.suppress(trio.BrokenResourceError):
            await self.send_close(got.close_code)
            await self.stream.send_eof()
        await self.expect_eof()
        return got

    @staticmethod
    def _closing(got: Frame | None, codes: tuple[int | None, ...]) -> Frame:
        assert got is not None, f"EOF without a close frame, expected {codes}"
        assert got.opcode == CLOSE, f"expected a close {codes}, got {got}"
        assert got.close_code in codes, f"close code {got.close_code}, expected {codes}"
        return got

    async def close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        """A clean close started by the client: the server echoes the code, then hangs up."""
        await self.send_close(code, reason)
        await self.expect_close(*((code,) if code is not None else (None, 1000)))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
