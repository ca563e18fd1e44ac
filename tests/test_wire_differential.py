"""Our WebSocket frame codec against wsproto's, on any byte stream a client might send.

Hypothesis builds a stream of client frames after the handshake (fragmented text and
binary messages, pings, pongs and close frames among them, and hostile ones: unmasked,
reserved bits, bad opcodes, fragmented or oversized control frames, invalid UTF-8 split
anywhere, close frames with 0, 1 or more bytes, bad codes and bad reasons), sometimes cut
short, and sends it in random chunks. Our server runs for real (``serve_wire_stream`` over
an in-memory stream pair, a handler that takes every message) and must give what a
wsproto server fed the same bytes gives: the same messages, the same pongs, and the same
close frame (its code; 1005 stands for an empty one), or none when the stream just ends.

Where the two may differ, RFC 6455 decides:

- A text message is checked as a whole ("Invalid UTF-8 in reassembled messages",
  section 5.6); wsproto fails as soon as a fragment cannot start valid UTF-8. Both are
  allowed, so the reference decodes whole messages (:class:`_WholeMessageDecoder`).
- A frame the stream ends inside may or may not be found bad before the end: either
  close is right (``_expected``).
- wsproto refuses close code 1014 (Bad Gateway), which IANA registered like 1012 and
  1013 that it takes; the reference is handed 1013 in its place (``_for_wsproto``).
- wsproto refuses a length not written in the fewest bytes, and a 64-bit length with its
  top bit set: RFC 6455 (5.2) asks both of the sender and says nothing of the receiver.
  We take the first and answer 1009 to the second, as the Node server's ``ws`` does; the
  frames here always use the fewest bytes and lengths far below the limit.
- wsproto has no size limit: the differential runs with a huge one, and 1009 at a small
  limit has a property of its own.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Sequence
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import (
    CloseReason,
    Frame,
    MessageDecoder,
    Opcode,
    ParseFailed,
    XorMaskerSimple,
)

from canvas_store_trio.transport._handshake import HandshakeRequest, serve_wire_stream

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
BIG = 2**31
REQUEST = (
    b"GET /?room=r HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
INVALID_UTF8 = (
    b"\x80", b"\xbf", b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80",
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",
    b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3",
)
"""Lone continuation bytes, bytes UTF-8 never uses, overlong forms, surrogates, code
points above U+10FFFF, and code points cut short."""
VALID_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
               3000, 3999, 4000, 4999)
INVALID_CODES = (0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)

Outcome = tuple[list[str | bytes], list[bytes], int | bytes | None]
"""Messages delivered, pong payloads sent, and the close frame sent: its code (1005 for
an empty payload, the bytes themselves for a 1-byte one) or None for no close frame."""


@attrs.frozen
class ClientFrame:
    """One frame as a client puts it on the wire; ``mask`` None sends it unmasked."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    mask: bytes | None = b"\x00\x00\x00\x00"

    def encode(self) -> bytes:
        first = (0x80 if self.fin else 0) | self.rsv << 4 | self.opcode
        length = len(self.payload)
        mask_bit = 0x80 if self.mask is not None else 0
        if length < 126:
            head = bytes((first, mask_bit | length))
        elif length < 65536:
            head = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", first, mask_bit | 127, length)
        if self.mask is None:
            return head + self.payload
        masked = XorMaskerSimple(self.mask).process(bytearray(self.payload))
        return head + self.mask + bytes(masked)


@attrs.frozen
class Case:
    """Frames, how many of their bytes are sent (None: all), and where the client's
    bytes (the request head, then the frames) are cut into separate sends."""

    frames: tuple[ClientFrame, ...]
    sent: int | None = None
    cuts: tuple[int, ...] = ()


def _split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped to its length), empty pieces kept."""
    points = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n``; shrinks to False."""
    return st.integers(0, n - 1).map(lambda i: i == n - 1)


def _frame(draw: st.DrawFn, opcode: int, payload: bytes, fin: bool = True) -> ClientFrame:
    """A masked frame, now and then unmasked or with reserved bits set."""
    mask = None if draw(_one_in(40)) else draw(st.binary(min_size=4, max_size=4))
    rsv = draw(st.integers(1, 7)) if draw(_one_in(40)) else 0
    return ClientFrame(opcode, payload, fin, rsv, mask)


def _utf8(max_size: int) -> st.SearchStrategy[bytes]:
    """UTF-8 text, one time in three with an invalid sequence put in somewhere."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = draw(st.text(max_size=max_size)).encode()
        if draw(_one_in(3)):
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.sampled_from(INVALID_UTF8)) + data[at:]
        return data

    return build()


close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(
        st.one_of(
            st.sampled_from(VALID_CODES),
            st.sampled_from(INVALID_CODES),
            st.integers(0, 65535),
            st.integers(3000, 4999),
        ),
        _utf8(20),
    ).map(lambda code_reason: struct.pack("!H", code_reason[0]) + code_reason[1]),
)


@st.composite
def control_frames(draw: st.DrawFn) -> ClientFrame:
    """A ping, pong or close; now and then fragmented or over 125 bytes."""
    opcode = draw(st.sampled_from((PING, PONG, PING, PONG, CLOSE)))
    payload = draw(close_payloads if opcode == CLOSE else st.binary(max_size=125))
    if draw(_one_in(20)):
        payload += bytes(126 - len(payload)) + draw(st.binary(max_size=4))
    return _frame(draw, opcode, payload, fin=not draw(_one_in(20)))


@st.composite
def messages(draw: st.DrawFn) -> list[ClientFrame]:
    """A text or binary message in random fragments, control frames between them.

    Now and then the last fragment lacks FIN or the first one is a continuation.
    """
    text = draw(st.booleans())
    payload = draw(_utf8(40) if text else st.binary(max_size=200))
    if draw(_one_in(25)):  # past 65535 bytes: a 64-bit length
        payload = (payload or b"a") * (65536 // len(payload or b"a") + 1)
    pieces = _split(payload, draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    frames = []
    for i, piece in enumerate(pieces):
        opcode = (TEXT if text else BINARY) if i == 0 else CONTINUATION
        last = i == len(pieces) - 1
        frames.append(_frame(draw, opcode, piece, fin=last))
        if not last and draw(_one_in(3)):
            frames.append(draw(control_frames()))
    data_frames = [i for i, frame in enumerate(frames) if frame.opcode < 0x8]
    if draw(_one_in(15)):
        frames[data_frames[-1]] = attrs.evolve(frames[data_frames[-1]], fin=False)
    if draw(_one_in(15)):
        frames[0] = attrs.evolve(frames[0], opcode=CONTINUATION)
    return frames


@st.composite
def raw_frames(draw: st.DrawFn) -> ClientFrame:
    """Any opcode (most of them unknown), FIN or not, a short payload."""
    opcode = draw(st.integers(0, 15))
    return _frame(draw, opcode, draw(st.binary(max_size=20)), fin=draw(st.booleans()))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    items = draw(st.lists(
        st.one_of(  # three times as many messages as single frames of each kind
            messages(), messages(), messages(),
            control_frames().map(lambda frame: [frame]),
            raw_frames().map(lambda frame: [frame]),
        ),
        max_size=10,
    ))
    frames = tuple(frame for item in items for frame in item)
    size = sum(len(frame.encode()) for frame in frames)
    sent = draw(st.integers(0, size)) if draw(_one_in(5)) else None
    total = len(REQUEST) + (size if sent is None else sent)
    cuts = tuple(draw(st.lists(st.integers(0, total), max_size=10)))
    return Case(frames, sent, cuts)


def _client_bytes(frames: Sequence[ClientFrame], sent: int | None) -> bytes:
    return b"".join(frame.encode() for frame in frames)[:sent]




# --- ours, for real -----------------------------------------------------------------------


def run_ours(case: Case, max_message_size: int = BIG) -> Outcome:
    """Serve the case's bytes with ``serve_wire_stream``; what the handler got and what
    the server sent. Runs on a mock clock: a 2 s wait for a close frame takes none."""
    data = REQUEST + _client_bytes(case.frames, case.sent)
    received: list[str | bytes] = []
    output = bytearray()

    async def handler(request: HandshakeRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                received.append(await ws.get_message())
        except ConnectionClosed:
            pass

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()

        async def send() -> None:
            try:
                for chunk in _split(data, case.cuts):
                    if chunk:
                        await client.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server closed first
            await client.send_stream.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(
                    serve_wire_stream, handler, server, max_message_size=max_message_size
                ))
                nursery.start_soon(send)
                while chunk := await client.receive_some():
                    output.extend(chunk)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return (received, *_server_frames(bytes(output)))


def _server_frames(output: bytes) -> tuple[list[bytes], int | bytes | None]:
    """The pongs and the close frame in what the server sent after its 101 answer.

    Server frames are unmasked, unfragmented, without reserved bits, and end with the
    close frame; nothing but pongs and a close is expected from a handler that sends
    nothing.
    """
    head, _, rest = output.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), output[:200]
    pongs: list[bytes] = []
    close: int | bytes | None = None
    pos = 0
    while pos < len(rest):
        assert close is None, f"bytes after the close frame: {rest[pos:]!r}"
        first, second = rest[pos], rest[pos + 1]
        assert first & 0xF0 == 0x80 and not second & 0x80, rest[pos:]
        length, pos = second & 0x7F, pos + 2
        if length == 126:
            (length,), pos = struct.unpack_from("!H", rest, pos), pos + 2
        elif length == 127:
            (length,), pos = struct.unpack_from("!Q", rest, pos), pos + 8
        payload, pos = rest[pos : pos + length], pos + length
        assert len(payload) == length, "a server frame cut short"
        if first & 0x0F == PONG:
            pongs.append(payload)
        else:
            assert first & 0x0F == CLOSE, rest
            close = 1005 if not payload else payload if len(payload) == 1 else (
                struct.unpack_from("!H", payload)[0]
            )
    return pongs, close


# --- the reference --------------------------------------------------------------------------


class _WholeMessageDecoder(MessageDecoder):
    """wsproto's message decoder, but a text message is decoded once it is whole.

    RFC 6455 (5.6) asks for valid UTF-8 in the reassembled message; wsproto fails on the
    first fragment that cannot start valid UTF-8, which is allowed but not required, and
    which we do not do. Non-final fragments of a text message come out as "".
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = bytearray()

    def process_frame(self, frame: Frame) -> Frame:
        if self.opcode is None and frame.opcode is Opcode.CONTINUATION:
            raise ParseFailed("unexpected CONTINUATION")
        if self.opcode is not None and frame.opcode is not Opcode.CONTINUATION:
            raise ParseFailed(f"expected CONTINUATION, got {frame.opcode!r}")
        opcode = self.opcode = self.opcode or frame.opcode
        finished = frame.frame_finished and frame.message_finished
        data = frame.payload
        if opcode is Opcode.TEXT:
            assert isinstance(data, bytes | bytearray)
            self.text += data
            data = ""
            if finished:
                try:
                    data = self.text.decode()
                except UnicodeDecodeError as exc:
                    raise ParseFailed(str(exc), CloseReason.INVALID_FRAME_PAYLOAD_DATA) from None
        if finished:
            self.opcode = None
            self.text = bytearray()
        return Frame(opcode, data, frame.frame_finished, finished)


def _for_wsproto(frame: ClientFrame) -> ClientFrame:
    """Close code 1014 as 1013, which wsproto takes (see the module docstring)."""
    if frame.opcode == CLOSE and frame.payload[:2] == struct.pack("!H", 1014):
        return attrs.evolve(frame, payload=struct.pack("!H", 1013) + frame.payload[2:])
    return frame


def run_wsproto(frames: Sequence[ClientFrame], sent: int | None) -> Outcome:
    """What a wsproto server does with the frames' first ``sent`` bytes."""
    connection = Connection(ConnectionType.SERVER)
    connection._proto._message_decoder = _WholeMessageDecoder()
    connection.receive_data(_client_bytes([_for_wsproto(frame) for frame in frames], sent))
    received: list[str | bytes] = []
    parts: list[Any] = []  # all str or all bytes
    pongs: list[bytes] = []
    for event in connection.events():
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                joined = "".join(parts) if isinstance(event.data, str) else b"".join(parts)
                received.append(joined)
                parts = []
        elif isinstance(event, Ping):
            pongs.append(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            code = event.code
            if connection.state is ConnectionState.REMOTE_CLOSING:
                # An echo of the client's close: of its first close frame, as sent.
                first = next(frame for frame in frames if frame.opcode == CLOSE)
                code = struct.unpack_from("!H", first.payload)[0] if first.payload else 1005
            return received, pongs, code
    return received, pongs, None


def _expected(case: Case) -> list[Outcome]:
    """wsproto's outcome; when the stream ends inside a frame, also its outcome for the
    stream without that frame (finding the frame bad before it ends is optional)."""
    outcomes = [run_wsproto(case.frames, case.sent)]
    if case.sent is not None:
        ends = [0]
        for frame in case.frames:
            ends.append(ends[-1] + len(frame.encode()))
        whole = max(end for end in ends if end <= case.sent)
        if whole != case.sent:
            outcomes.append(run_wsproto(case.frames, whole))
    return outcomes


# --- the properties ------------------------------------------------------------------------


def _close(code: int, reason: bytes = b"") -> ClientFrame:
    return ClientFrame(CLOSE, struct.pack("!H", code) + reason, mask=b"\x01\x02\x03\x04")


@settings(max_examples=1000, deadline=None)
@given(cases())
@example(Case((ClientFrame(CLOSE, b"\x03"),)))  # a 1-byte close payload: 1002
@example(Case((_close(999),)))  # codes outside 1000-4999 and the reserved ones: 1002
@example(Case((_close(1004),)))
@example(Case((_close(1006),)))
@example(Case((_close(1015),)))
@example(Case((_close(2000),)))
@example(Case((_close(5000),)))
@example(Case((_close(1000, b"bye \xff"),)))  # a reason that is not UTF-8: 1007
@example(Case((_close(1014),)))  # Bad Gateway, registered: echoed
@example(Case((  # "é" (c3 a9) split between fragments, a ping in between: delivered
    ClientFrame(TEXT, b"caf\xc3", fin=False),
    ClientFrame(PING, b"p"),
    ClientFrame(CONTINUATION, b"\xa9"),
)))
@example(Case((  # an invalid sequence split inside a code point, the ping still answered
    ClientFrame(TEXT, b"\xed", fin=False),
    ClientFrame(PING, b"p"),
    ClientFrame(CONTINUATION, b"\xa0\x80"),
)))
def test_frames_as_wsproto_takes_them(case: Case) -> None:
    ours = run_ours(case)
    expected = _expected(case)
    assert ours in expected, f"ours {ours!r}, wsproto {expected[0]!r}"


@st.composite
def sized_messages(draw: st.DrawFn) -> tuple[int, list[list[ClientFrame]]]:
    """A size limit, and binary messages around it, each in random fragments."""
    limit = draw(st.integers(1, 300))
    result = []
    for size in draw(st.lists(st.integers(0, 2 * limit), max_size=5)):
        pieces = _split(bytes(size), draw(st.lists(st.integers(0, size), max_size=3)))
        mask = draw(st.binary(min_size=4, max_size=4))
        result.append([
            ClientFrame(CONTINUATION if i else BINARY, piece, i == len(pieces) - 1, 0, mask)
            for i, piece in enumerate(pieces)
        ])
    return limit, result


@settings(max_examples=300, deadline=None)
@given(sized_messages(), st.lists(st.integers(0, 2000), max_size=6))
def test_a_message_over_the_limit_closes_with_1009(
    limit_and_messages: tuple[int, list[list[ClientFrame]]], cuts: list[int]
) -> None:
    """Messages up to ``max_message_size`` bytes are delivered; the first one past it
    (counted over its fragments) closes the connection with 1009, and nothing after it
    is delivered."""
    limit, sized = limit_and_messages
    frames = tuple(frame for message in sized for frame in message)
    received, pongs, close = run_ours(Case(frames, cuts=tuple(cuts)), max_message_size=limit)
    sizes = [sum(len(frame.payload) for frame in message) for message in sized]
    fitting = [bytes(size) for size in sizes[: next(
        (i for i, size in enumerate(sizes) if size > limit), len(sizes)
    )]]
    assert received == fitting
    assert pongs == []
    assert close == (1009 if len(fitting) < len(sizes) else None)
