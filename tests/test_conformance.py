"""RFC 6455 conformance in the shape of the Autobahn testsuite (sections 1-7 and 9), on both
transports.

Each case starts an echo server (``serve_websockets`` with a handler that sends every
message back) and talks to it with :class:`~tests.ws_raw.RawClient`, which builds its
frames by hand so that it can break any rule. A case passes only with the strict outcome
Autobahn grades: the payload echoed exactly, a pong with the ping's payload, a close with
the right code (1000 echoed for a clean close, 1002 for a protocol error, 1007 for bad
UTF-8, 1009 for a message over the limit), and then the end of the TCP connection.

Case ids follow Autobahn's where Autobahn has the case (``5.19``); the UTF-8 and close-code
tables are named by what they send. Section 9 runs at our default ``max_message_size``
(``Limits().max_message_size``, not Autobahn's 16 MB): a message at the limit is echoed,
one byte more closes with 1009. The rest of section 9 runs at a 1 MiB limit, for speed.

Where the trio-websocket library (or wsproto under it) is wrong in a way our code cannot
fix, the case is an ``xfail`` for that transport only, its reason saying what the library
does instead (``Spec.trio_websocket_bug``): strict where the bug shows every run, not where
it depends on a race (the frames sent in several writes).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from canvas_store_trio._protocol import Limits
from canvas_store_trio.transport._listener import TRANSPORTS, Transport, serve_websockets

from .ws_raw import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    RawClient,
    close_payload,
    frame,
)

DEFAULT_LIMIT: int = Limits().max_message_size
SMALL_LIMIT = 1 << 20
"""The limit for the section 9 cases that measure throughput shapes, not the limit."""
CASE_TIMEOUT = 30.0
"""Seconds a whole case may take (each wait in it has ws_raw.TIMEOUT)."""


async def echo(request: Any) -> None:
    """Accept, then send every message back until the connection closes."""
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


@asynccontextmanager
async def echo_server(transport: Transport, max_message_size: int) -> AsyncIterator[int]:
    """An echo server on a loopback port (yielded); cancelled on exit."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_websockets,
            echo,
            "127.0.0.1",
            0,
            max_message_size=max_message_size,
            transport=transport,
        )
        listeners = await nursery.start(serve)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(
    transport: Transport, limit: int, early: bytes = b""
) -> AsyncIterator[RawClient]:
    """A raw client of a fresh echo server, past the handshake; closed on exit."""
    async with echo_server(transport, limit) as port:
        client = await RawClient.open(port, early=early)
        try:
            yield client
        finally:
            await client.aclose()


# --- the cases -----------------------------------------------------------------------

Case = Callable[[RawClient], Awaitable[None]]


@dataclass(frozen=True)
class Spec:
    run: Case
    limit: int = SMALL_LIMIT
    trio_websocket_bug: str | None = None
    """What trio-websocket (or wsproto under it) does wrong here, if it does."""
    bug_every_time: bool = True
    """Whether the bug shows every run (a strict xfail), or only when the handler loses
    a race (the frames sent in several writes)."""


CASES: dict[str, Spec] = {}

ECHO_LOST = (
    "on a protocol error (wsproto's ParseFailed) it fails the connection before the "
    "handler can answer the valid frames that came before (our listener sends the close "
    "frame it leaves out)"
)
CODE_1014 = "wsproto refuses the registered close code 1014 (Bad Gateway) as reserved"


def add(
    case_id: str, run: Case, limit: int = SMALL_LIMIT, bug: str | None = None,
    bug_every_time: bool = True,
) -> None:
    assert case_id not in CASES, case_id
    CASES[case_id] = Spec(run, limit, bug, bug_every_time)


def case(case_id: str, limit: int = SMALL_LIMIT) -> Callable[[Case], Case]:
    def register(run: Case) -> Case:
        add(case_id, run, limit)
        return run

    return register


async def deliver(c: RawClient, frames: list[bytes], how: str) -> None:
    """Send ``frames`` in one write ("whole"), a write each ("framewise"), or a byte a
    write ("chop")."""
    if how == "whole":
        await c.send(*frames)
    elif how == "framewise":
        for one in frames:
            await c.send(one)
    else:
        assert how == "chop", how
        await c.send(*frames, chop=1)


HOWS = ("whole", "framewise", "chop")
KOSME = "κόσμε".encode()
HELLO_UTF8 = "Hello-µ@ßöäüàá-UTF-8!!".encode()


def payload_of(opcode: int, size: int) -> bytes:
    return (b"*" if opcode == TEXT else b"\xfe") * size


async def echo_frames(
    c: RawClient, opcode: int, frames: list[bytes], expected: bytes, how: str = "whole"
) -> None:
    """Send a message as ``frames``; it comes back whole as ``expected``; close cleanly."""
    await deliver(c, frames, how)
    await c.expect(opcode, expected)
    await c.close()


async def echo_one(c: RawClient, opcode: int, payload: bytes, chop: int | None = None) -> None:
    await c.send(frame(opcode, payload), chop=chop)
    await c.expect(opcode, payload)
    await c.close()


async def fails(
    c: RawClient, code: int, frames: list[bytes], how: str = "whole", echoed: int = 0
) -> None:
    """Send ``frames``; the first ``echoed`` text messages come back, then a close ``code``."""
    await deliver(c, frames, how)
    for _ in range(echoed):
        await c.expect(TEXT, b"Hello")
    await c.expect_close(code)


def add_failing(
    case_id: str, code: int, frames: list[bytes], how: str = "whole", echoed: int = 0,
) -> None:
    """A case where the server must fail the connection with ``code`` (see :func:`fails`)."""
    add(case_id, functools.partial(fails, code=code, frames=frames, how=how, echoed=echoed),
        bug=ECHO_LOST if echoed else None, bug_every_time=how == "whole")


# Section 1: framing, text and binary messages of every length encoding.
for kind, opcode in ((1, TEXT), (2, BINARY)):
    for number, size in enumerate((0, 125, 126, 127, 128, 65535, 65536), 1):
        add(f"1.{kind}.{number}", functools.partial(echo_one, opcode=opcode,
                                                   payload=payload_of(opcode, size)))
    add(f"1.{kind}.8", functools.partial(echo_one, opcode=opcode,
                                         payload=payload_of(opcode, 65535), chop=997))


# Section 2: pings and pongs.
async def ping_pong(c: RawClient, payload: bytes, chop: int | None = None) -> None:
    await c.send(frame(PING, payload), chop=chop)
    await c.expect(PONG, payload)
    await c.close()


add("2.1", functools.partial(ping_pong, payload=b""))
add("2.2", functools.partial(ping_pong, payload=b"Hello, world!"))
add("2.3", functools.partial(ping_pong, payload=b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"))
add("2.4", functools.partial(ping_pong, payload=b"\xfe" * 125))
add_failing("2.5", code=1002, frames=[frame(PING, b"\xfe" * 126)])
add("2.6", functools.partial(ping_pong, payload=b"\xfe" * 125, chop=1))


@case("2.7")
async def unsolicited_pong(c: RawClient) -> None:
    await c.send(frame(PONG))
    await c.close()


@case("2.8")
async def unsolicited_pong_with_payload(c: RawClient) -> None:
    await c.send(frame(PONG, b"unsolicited pong payload"))
    await c.close()


@case("2.9")
async def unsolicited_pong_then_ping(c: RawClient) -> None:
    await c.send(frame(PONG, b"unsolicited pong payload"), frame(PING, b"ping payload"))
    await c.expect(PONG, b"ping payload")
    await c.close()


async def ten_pings(c: RawClient, how: str) -> None:
    payloads = [f"payload-{n}".encode() for n in range(10)]
    await deliver(c, [frame(PING, p) for p in payloads], how)
    for payload in payloads:
        await c.expect(PONG, payload)
    await c.close()


add("2.10", functools.partial(ten_pings, how="whole"))
add("2.11", functools.partial(ten_pings, how="framewise"))


# Section 3: reserved bits, with nothing negotiated, fail the connection.
add_failing("3.1", code=1002, frames=[frame(TEXT, b"Hello", rsv=1)])
for number, (rsv, how) in enumerate(((2, "whole"), (3, "framewise"), (4, "chop")), 2):
    frames = [frame(TEXT, b"Hello"), frame(TEXT, b"Hello", rsv=rsv), frame(PING)]
    add_failing(f"3.{number}", code=1002, frames=frames, how=how, echoed=1)
add_failing("3.5", code=1002, frames=[frame(BINARY, b"\x00\xff", rsv=5)])
add_failing("3.6", code=1002, frames=[frame(PING, b"Hello", rsv=6)])
add_failing("3.7", code=1002, frames=[frame(CLOSE, close_payload(1000), rsv=7)])


# Section 4: reserved opcodes fail the connection, after what came before is echoed.
for group, opcodes in ((1, (3, 4, 5, 6, 7)), (2, (11, 12, 13, 14, 15))):
    add_failing(f"4.{group}.1", code=1002, frames=[frame(opcodes[0])])
    add_failing(f"4.{group}.2", code=1002, frames=[frame(opcodes[1], b"reserved opcode payload")])
    for number, reserved in enumerate(opcodes[2:], 3):
        frames = [frame(TEXT, b"Hello"), frame(reserved, b"reserved payload"), frame(PING)]
        add_failing(f"4.{group}.{number}", code=1002, frames=frames, echoed=1)


# Section 5: fragmentation.
F1, F2 = b"fragment1", b"fragment2"
add_failing("5.1", code=1002, frames=[
    frame(PING, F1, fin=False), frame(CONTINUATION, F2)])
add_failing("5.2", code=1002, frames=[
    frame(PONG, F1, fin=False), frame(CONTINUATION, F2)])
for number, how in enumerate(HOWS, 3):
    add(f"5.{number}", functools.partial(
        echo_frames, opcode=TEXT, expected=F1 + F2, how=how,
        frames=[frame(TEXT, F1, fin=False), frame(CONTINUATION, F2)]))


async def ping_inside_fragments(c: RawClient, how: str) -> None:
    await deliver(c, [frame(TEXT, F1, fin=False), frame(PING, b"ping payload"),
                      frame(CONTINUATION, F2)], how)
    await c.expect(PONG, b"ping payload")
    await c.expect(TEXT, F1 + F2)
    await c.close()


for number, how in enumerate(HOWS, 6):
    add(f"5.{number}", functools.partial(ping_inside_fragments, how=how))
for first, fin in ((9, True), (12, False)):
    for number, how in enumerate(HOWS, first):
        frames = [frame(CONTINUATION, b"non-continuation payload", fin=fin),
                  frame(TEXT, b"Hello, world!")]
        add_failing(f"5.{number}", code=1002, frames=frames, how=how)
add_failing("5.15", code=1002, echoed=1, frames=[
    frame(TEXT, b"Hel", fin=False), frame(CONTINUATION, b"lo"),
    frame(CONTINUATION, b"fragment3", fin=False), frame(TEXT, b"fragment4")])
for number, fin in ((16, False), (17, True)):
    frames = [frame(CONTINUATION, F1, fin=fin), frame(TEXT, F2, fin=False),
              frame(CONTINUATION, b"fragment3")] * 2
    add_failing(f"5.{number}", code=1002, frames=frames)
add_failing("5.18", code=1002, frames=[
    frame(TEXT, F1, fin=False), frame(TEXT, F2)])
add_failing("5.close-fragmented", code=1002, frames=[
    frame(CLOSE, close_payload(1000), fin=False), frame(CONTINUATION)])


async def pings_among_five_fragments(c: RawClient, how: str) -> None:
    parts = [f"fragment{n}".encode() for n in range(1, 6)]
    await deliver(c, [
        frame(TEXT, parts[0], fin=False), frame(CONTINUATION, parts[1], fin=False),
        frame(PING, b"pongme 1!"), frame(CONTINUATION, parts[2], fin=False),
        frame(CONTINUATION, parts[3], fin=False), frame(PING, b"pongme 2!"),
        frame(CONTINUATION, parts[4])], how)
    await c.expect(PONG, b"pongme 1!")
    await c.expect(PONG, b"pongme 2!")
    await c.expect(TEXT, b"".join(parts))
    await c.close()


add("5.19", functools.partial(pings_among_five_fragments, how="whole"))
add("5.20", functools.partial(pings_among_five_fragments, how="framewise"))


# Section 6: UTF-8 in text messages, whole and split across fragments.
def fragments(payload: bytes, cuts: list[int], opcode: int = TEXT) -> list[bytes]:
    """A message cut at ``cuts`` into a first frame and continuations."""
    bounds = [0, *cuts, len(payload)]
    pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
    return [
        frame(opcode if n == 0 else CONTINUATION, piece, fin=n == len(pieces) - 1)
        for n, piece in enumerate(pieces)
    ]


def per_octet(payload: bytes) -> list[bytes]:
    return fragments(payload, list(range(1, len(payload))))


add("6.1.1", functools.partial(echo_frames, opcode=TEXT, frames=[frame(TEXT)], expected=b""))
add("6.1.2", functools.partial(echo_frames, opcode=TEXT, expected=b"", frames=[
    frame(TEXT, fin=False), frame(CONTINUATION, fin=False), frame(CONTINUATION)]))
add("6.1.3", functools.partial(echo_frames, opcode=TEXT, expected=b"middle", frames=[
    frame(TEXT, fin=False), frame(CONTINUATION, b"middle", fin=False), frame(CONTINUATION)]))
add("6.2.1", functools.partial(
    echo_frames, opcode=TEXT, frames=[frame(TEXT, HELLO_UTF8)], expected=HELLO_UTF8))
add("6.2.2", functools.partial(  # cut between "µ" and "@", a code point boundary
    echo_frames, opcode=TEXT, frames=fragments(HELLO_UTF8, [8]), expected=HELLO_UTF8))
add("6.2.3", functools.partial(
    echo_frames, opcode=TEXT, frames=per_octet(HELLO_UTF8), expected=HELLO_UTF8))
add("6.2.4", functools.partial(
    echo_frames, opcode=TEXT, frames=per_octet(KOSME), expected=KOSME))
BAD_KOSME = KOSME + b"\xed\xa0\x80edited"  # Autobahn 6.3: a surrogate inside
add_failing("6.3.1", code=1007, frames=[frame(TEXT, BAD_KOSME)])
add_failing("6.3.2", code=1007, frames=per_octet(BAD_KOSME))
for number, (cuts, how) in enumerate((
    ([len(KOSME), len(KOSME) + 4], "framewise"),  # 6.4.1: a whole bad code point
    ([len(KOSME) + 1, len(KOSME) + 4], "framewise"),  # 6.4.2: the bad one split
    ([len(KOSME), len(KOSME) + 4], "chop"),
    ([len(KOSME) + 1, len(KOSME) + 4], "chop"),
), 1):
    add_failing(f"6.4.{number}", code=1007, how=how,
                frames=fragments(KOSME + b"\xf4\x90\x80\x80edited", cuts))

VALID_UTF8 = {
    "kosme": KOSME,
    "nul": b"\x00",
    "first-2-byte": b"\xc2\x80",
    "first-3-byte": b"\xe0\xa0\x80",
    "first-4-byte": b"\xf0\x90\x80\x80",
    "last-1-byte": b"\x7f",
    "last-2-byte": b"\xdf\xbf",
    "last-3-byte": b"\xef\xbf\xbf",
    "last-4-byte-10ffff": b"\xf4\x8f\xbf\xbf",
    "d7ff-before-surrogates": b"\xed\x9f\xbf",
    "e000-after-surrogates": b"\xee\x80\x80",
    "fffd-replacement": b"\xef\xbf\xbd",
    "fffe-noncharacter": b"\xef\xbf\xbe",
    "fdd0-noncharacter": b"\xef\xb7\x90",
    "feff-bom": b"\xef\xbb\xbf",
    "mixed": "a€𝄞ü\U0010fffd".encode(),
}
INVALID_UTF8 = {
    "5-byte-sequence": b"\xf8\x88\x80\x80\x80",
    "6-byte-sequence": b"\xfc\x84\x80\x80\x80\x80",
    "above-10ffff": b"\xf4\x90\x80\x80",
    "f7-start": b"\xf7\xbf\xbf\xbf",
    "lone-continuation-80": b"\x80",
    "lone-continuation-bf": b"\xbf",
    "continuations-only": b"\x80\xbf\x80\xbf",
    "2-byte-start-then-space": b"\xc2 ",
    "3-byte-start-then-space": b"\xe0\xa0 ",
    "4-byte-start-then-space": b"\xf0\x90\x80 ",
    "truncated-2-byte": b"\xdf",
    "truncated-3-byte": b"\xef\xbf",
    "truncated-4-byte": b"\xf4\x8f\xbf",
    "kosme-then-truncated": KOSME + b"\xce",
    "fe": b"\xfe",
    "ff": b"\xff",
    "fe-fe-ff-ff": b"\xfe\xfe\xff\xff",
    "overlong-slash-2-byte": b"\xc0\xaf",
    "overlong-slash-3-byte": b"\xe0\x80\xaf",
    "overlong-slash-4-byte": b"\xf0\x80\x80\xaf",
    "overlong-max-2-byte": b"\xc1\xbf",
    "overlong-max-3-byte": b"\xe0\x9f\xbf",
    "overlong-max-4-byte": b"\xf0\x8f\xbf\xbf",
    "overlong-nul": b"\xc0\x80",
    "surrogate-d800": b"\xed\xa0\x80",
    "surrogate-dfff": b"\xed\xbf\xbf",
    "surrogate-pair": b"\xed\xa0\x80\xed\xb0\x80",
    "valid-then-bad-then-valid": b"ok\xe0\x80\xafok",
}
SPLITS: dict[str, Callable[[bytes], list[bytes]]] = {
    "one-frame": lambda payload: [frame(TEXT, payload)],
    "per-octet": per_octet,
    # Two fragments cut in the middle: inside a code point when there is one there.
    "halves": lambda payload: fragments(payload, [len(payload) // 2]),
}
for split_name, split in SPLITS.items():
    for name, payload in VALID_UTF8.items():
        add(f"6.valid.{name}.{split_name}", functools.partial(
            echo_frames, opcode=TEXT, frames=split(payload), expected=payload))
    for name, payload in INVALID_UTF8.items():
        add_failing(f"6.invalid.{name}.{split_name}", code=1007, frames=split(payload))


# Section 7: the close handshake.
@case("7.1.1")
async def echo_then_close(c: RawClient) -> None:
    await c.send(frame(TEXT, b"Hello World!"))
    await c.expect(TEXT, b"Hello World!")
    await c.close()


async def after_close(c: RawClient, before: list[bytes], after: list[bytes]) -> None:
    """Whatever follows the client's close frame is ignored: only the close comes back."""
    c.close_sent = True
    await c.send(*before, frame(CLOSE, close_payload(1000)), *after)
    await c.expect_close(1000)


add("7.1.2", functools.partial(after_close, before=[], after=[frame(CLOSE, close_payload(1000))]))
add("7.1.3", functools.partial(after_close, before=[], after=[frame(PING, b"after close")]))
add("7.1.4", functools.partial(after_close, before=[], after=[frame(TEXT, b"after close")]))
add("7.1.5", functools.partial(
    after_close, before=[frame(TEXT, F1, fin=False)], after=[frame(CONTINUATION, F2)]))


async def message_then_close(c: RawClient, payload: bytes) -> None:
    """A message, a close and a ping in one write: the echo may come or not (Autobahn
    leaves it to the implementation), then the close; never a pong."""
    c.close_sent = True
    await c.send(frame(TEXT, payload), frame(CLOSE, close_payload(1000)), frame(PING, b"late"))
    got = await c.next_message()
    assert got is not None, "EOF without a close frame"
    if got.opcode == TEXT:
        assert got.payload == payload
    else:
        c.push_back(got)
    await c.expect_close(1000)


add("7.1.6", functools.partial(message_then_close, payload=payload_of(TEXT, 256 * 1024)))


add("7.3.1", functools.partial(RawClient.close, code=None))
add_failing("7.3.2", code=1002, frames=[frame(CLOSE, b"\x03")])
add("7.3.3", functools.partial(RawClient.close, code=1000))
add("7.3.4", functools.partial(RawClient.close, code=1000, reason=b"Hello World!"))
add("7.3.5", functools.partial(RawClient.close, code=1000, reason=b"*" * 123))
add_failing("7.3.6", code=1002, frames=[frame(CLOSE, close_payload(1000, b"*" * 124))])
add_failing("7.5.1", code=1007, frames=[frame(CLOSE, close_payload(1000, BAD_KOSME))])

VALID_CLOSE_CODES = (*range(1000, 1004), *range(1007, 1015), 3000, 3999, 4000, 4999)
INVALID_CLOSE_CODES = (0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
for code in VALID_CLOSE_CODES:
    add(f"7.7.{code}", functools.partial(RawClient.close, code=code),
        bug=CODE_1014 if code == 1014 else None)
for code in INVALID_CLOSE_CODES:
    add_failing(f"7.9.{code}", code=1002, frames=[frame(CLOSE, close_payload(code))])


# RFC 6455 5.1: a server fails the connection on a client frame that is not masked.
add_failing("extra.unmasked", code=1002, echoed=1,
            frames=[frame(TEXT, b"Hello"), frame(TEXT, b"Hello", masked=False)])


# Section 9: limits and throughput shapes.
async def too_big(c: RawClient, frames: list[bytes]) -> None:
    """Send a message over the limit; the server closes with 1009."""
    await c.expect_close_while_sending(b"".join(frames), 1009)


for opcode, name in ((TEXT, "text"), (BINARY, "binary")):
    at_limit = payload_of(opcode, DEFAULT_LIMIT)
    add(f"9.limit.{name}-at-default-limit",
        functools.partial(echo_one, opcode=opcode, payload=at_limit), DEFAULT_LIMIT)
    add(f"9.limit.{name}-over-default-limit", functools.partial(
        too_big, frames=[frame(opcode, at_limit + payload_of(opcode, 1))]), DEFAULT_LIMIT)
add("9.limit.fragments-over-default-limit", functools.partial(too_big, frames=fragments(
    payload_of(TEXT, DEFAULT_LIMIT + 1), list(range(1 << 22, DEFAULT_LIMIT + 1, 1 << 22)))),
    DEFAULT_LIMIT)

for kind, opcode in ((1, TEXT), (2, BINARY)):
    for number, size in enumerate((1 << 16, 1 << 18, SMALL_LIMIT), 1):
        add(f"9.{kind}.{number}", functools.partial(
            echo_one, opcode=opcode, payload=payload_of(opcode, size)))
    add(f"9.{kind}.over", functools.partial(
        too_big, frames=[frame(opcode, payload_of(opcode, SMALL_LIMIT + 1))]))
    for number, piece in enumerate((64, 256, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18,
                                    SMALL_LIMIT), 1):
        message = payload_of(opcode, SMALL_LIMIT)
        add(f"9.{kind + 2}.{number}", functools.partial(
            echo_frames, opcode=opcode, expected=message,
            frames=fragments(message, list(range(piece, SMALL_LIMIT, piece)), opcode)))
    over = payload_of(opcode, SMALL_LIMIT + 1)
    add(f"9.{kind + 2}.over", functools.partial(too_big, frames=fragments(
        over, list(range(1 << 16, SMALL_LIMIT + 1, 1 << 16)), opcode)))
    for number, chop in enumerate((64, 128, 256, 512, 1024, 2048), 1):
        add(f"9.{kind + 4}.{number}", functools.partial(
            echo_one, opcode=opcode, payload=payload_of(opcode, SMALL_LIMIT), chop=chop))


async def many_messages(c: RawClient, opcode: int, size: int) -> None:
    """1000 messages, sent while their echoes are read; every echo comes back in order."""
    payloads = [(b"%04d" % n * size)[:size] for n in range(1000)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send, *(frame(opcode, p) for p in payloads))
        for payload in payloads:
            await c.expect(opcode, payload)
    await c.close()


for kind, opcode in ((7, TEXT), (8, BINARY)):
    for number, size in enumerate((0, 16, 64, 256, 1 << 10, 1 << 12), 1):
        add(f"9.{kind}.{number}", functools.partial(many_messages, opcode=opcode, size=size))


# --- the runner ----------------------------------------------------------------------

def case_params() -> list[Any]:
    """Every case on every transport; trio-websocket's known bugs are xfails."""
    params = []
    for transport in TRANSPORTS:
        for case_id, spec in CASES.items():
            bug = spec.trio_websocket_bug if transport == "trio-websocket" else None
            marks = [pytest.mark.xfail(strict=spec.bug_every_time,
                                       reason=f"trio-websocket: {bug}")] if bug else []
            params.append(pytest.param(transport, case_id, id=f"{transport}-{case_id}",
                                       marks=marks))
    return params


@pytest.mark.parametrize(("transport", "case_id"), case_params())
async def test_case(transport: Transport, case_id: str) -> None:
    spec = CASES[case_id]
    with trio.fail_after(CASE_TIMEOUT):
        async with connected(transport, spec.limit) as client:
            await spec.run(client)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_frames_in_the_same_write_as_the_handshake(transport: Transport) -> None:
    """Frames right behind the upgrade request, before its answer, are served in order.

    (RFC 6455 4.1 tells a client to wait for the answer; a server that serves them anyway
    loses nothing.) The ping sent after the handshake shows whether they were dropped.
    """
    early = frame(TEXT, b"Hello") + frame(PING, b"early") + frame(BINARY, b"\x00\xff")
    with trio.fail_after(CASE_TIMEOUT):
        async with connected(transport, SMALL_LIMIT, early) as client:
            await client.send(frame(PING, b"after the handshake"))
            got = [await client.next_frame() for _ in range(4)]
            # Pongs may overtake echoes (trio-websocket answers pings in its reader
            # task), but each kind keeps its order.
            assert [(f.opcode, f.payload) for f in got if f and f.opcode != PONG] == [
                (TEXT, b"Hello"), (BINARY, b"\x00\xff")]
            assert [f.payload for f in got if f and f.opcode == PONG] == [
                b"early", b"after the handshake"]
            await client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_close_right_behind_a_message_is_answered_every_time(transport: Transport) -> None:
    """7.1.6 small and twenty times over: the close is answered whichever task runs first
    (the handler echoing the message, or the reader answering the close)."""
    with trio.fail_after(CASE_TIMEOUT):
        async with echo_server(transport, SMALL_LIMIT) as port:
            for _ in range(20):
                client = await RawClient.open(port)
                try:
                    await message_then_close(client, b"Hello")
                finally:
                    await client.aclose()
