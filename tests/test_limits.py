"""Every limit: hitting it gives the documented error frame or close, and nobody else notices.

Most tests run a RoomManager under ``autojump_clock`` with sessions over real WebSocket
framing on in-memory streams (``conftest.connect``). The slow-reader, CLI and
100k-component tests use the CLI server on a real loopback port.
"""

from __future__ import annotations

import functools
import logging
import re
import socket as stdlib_socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto.events import CloseConnection, Ping

from canvas_store_trio import Limits, RoomManager, serve_connection
from canvas_store_trio.cli._main import build_parser, limits_from
from canvas_store_trio.rooms import _room
from canvas_store_trio.rooms._session import Session
from canvas_store_trio.testing import FrameClient
from canvas_store_trio.transport._handshake import serve_wire_stream
from canvas_store_trio.transport._listener import serve_websocket_stream

from .conftest import connect, frames_of
from .test_hostile import RawWebSocket, start_server, ws_client

NO_PINGS = Limits(ping_interval=None)


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


def keys(prefix: str, n: int) -> dict[str, Any]:
    return {f"{prefix}{i}/c": {"_exists": True, "i": i} for i in range(n)}


@asynccontextmanager
async def manager_with(limits: Limits, **kwargs: Any) -> AsyncIterator[RoomManager]:
    async with RoomManager(idle_timeout=60.0, save_throttle=5.0, limits=limits,
                           **kwargs) as manager:
        yield manager


async def joined(client: FrameClient, **extra: Any) -> FrameClient:
    await client.reconnect(**extra)
    return client


async def edit_is_seen(sender: FrameClient, observer: FrameClient, n: int) -> None:
    """``sender`` edits; it is acked and ``observer`` is sent the patch."""
    key = f"n{n}/c"
    await sender.send(type="patch", messageId=f"m{n}", documentPatches=[create(key, n=n)])
    ack = (await sender.receive_until("ack"))[-1]
    assert ack["messageId"] == f"m{n}"
    got = (await observer.receive_until("patch"))[-1]
    assert got["documentPatches"] == [create(key, n=n)]


class RecordingSession(Session):
    """Records every session and the most bytes its outbox ever held."""

    instances: ClassVar[list[RecordingSession]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_outbox_bytes = 0
        RecordingSession.instances.append(self)

    def send(self, frame: bytes) -> None:
        super().send(frame)
        raw = getattr(self, "_raw", None)  # bytes the socket took but could not write yet
        backlog = self.outbox_bytes + (raw.unsent_bytes if raw is not None else 0)
        self.max_outbox_bytes = max(self.max_outbox_bytes, backlog)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[RecordingSession]:
    RecordingSession.instances = []
    monkeypatch.setattr(_room, "Session", RecordingSession)
    return RecordingSession.instances


# --- frame limits: error frames ------------------------------------------------------


async def test_max_keys_per_frame_counts_document_and_presence_keys(
    autojump_clock: Any,
) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_keys_per_frame=10)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await joined(a)
        await joined(b)
        await a.drain()
        # exactly at the limit: accepted
        await a.send(type="patch", messageId="ten", documentPatches=[keys("d", 6)],
                     ephemeralPatches=[keys("p", 4)])
        assert (await a.receive_until("ack"))[-1] == {
            "type": "ack", "messageId": "ten", "timestamp": 1}
        assert len((await b.receive_until("patch"))[-1]["documentPatches"][0]) == 6
        # one over, however it is split: refused whole
        for frame in (
            {"documentPatches": [keys("x", 11)]},
            {"documentPatches": [keys("x", 6), keys("y", 1)], "ephemeralPatches": [keys("q", 4)]},
            {"documentPatches": [{}, {}, keys("x", 11)]},
            {"ephemeralPatches": [keys("q", 11)]},
        ):
            await a.send(type="patch", messageId="big", **frame)
            assert (await a.receive_until("error"))[-1] == {
                "type": "error", "code": "too-many-keys", "messageId": "big",
                "message": "a frame may hold at most 10 keys"}
        # reconnect frames are bound by the same limit
        await a.send(type="reconnect", lastTimestamp=1, protocolVersion=2,
                     documentPatches=[keys("x", 11)])
        assert (await a.receive_until("error"))[-1]["code"] == "too-many-keys"
        assert await b.drain() == []
        room = manager.get_existing_room("r")
        assert room is not None and room.document.timestamp == 1
        await edit_is_seen(b, a, 1)
        await edit_is_seen(a, b, 2)


async def test_max_buffer_length_bounds_len_and_the_values_carried(autojump_clock: Any) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_buffer_length=100)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await joined(a)
        await joined(b)
        await a.drain()

        def buf(length: int, *runs: Any) -> dict[str, Any]:
            return {"e/c": {"_exists": True, "pts": {"__buf": 1, "len": length,
                                                     "runs": list(runs)}}}

        await a.send(type="patch", messageId="ok", documentPatches=[buf(100, [0, [1] * 100])])
        assert (await a.receive_until("ack"))[-1]["timestamp"] == 1
        for bad in (buf(101), buf(10, [0, [1] * 60], [50, [1] * 41]), buf(10, [0, [1] * 101])):
            await a.send(type="patch", messageId="bad", documentPatches=[bad])
            assert (await a.receive_until("error"))[-1]["code"] == "invalid-buffer-delta"
        # in presence too
        await a.send(type="patch", messageId="bad", ephemeralPatches=[buf(101)])
        assert (await a.receive_until("error"))[-1]["code"] == "invalid-buffer-delta"
        room = manager.get_existing_room("r")
        assert room is not None
        assert room.get_snapshot().state["e/c"]["pts"] == [1] * 100
        assert room.ephemeral.by_client == {}
        await edit_is_seen(b, a, 1)


async def test_max_buffer_total_per_frame_bounds_what_one_small_frame_allocates(
    autojump_clock: Any,
) -> None:
    """A buffer delta with a big ``len`` and no runs is a few bytes on the wire but
    ``len`` zeros in memory. Many of them in one frame must not multiply that: the
    zeros one frame may create are bounded by ``max_buffer_length`` in all, or a
    ~4 KB frame allocates ``max_buffer_length * keys`` list items (with the defaults,
    50 keys of 4,000,000 are 200 million items, gigabytes, for 3 KB)."""
    limit = 1000
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_buffer_length=limit)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
    ):
        await joined(a)
        frame = {f"k{i}/c": {"_exists": True, "b": {"__buf": 1, "len": limit, "runs": []}}
                 for i in range(50)}
        await a.send(type="patch", messageId="zeros", documentPatches=[frame])
        reply = await a.receive()
        room = manager.get_existing_room("r")
        assert room is not None
        created = sum(len(record.get("b", ())) for record in room.get_snapshot().state.values())
        assert created <= limit, (reply, created)
        if reply["type"] == "error":
            assert reply["code"] == "invalid-buffer-delta"
        # Deltas that carry their values are not what this bounds.
        carried = {f"c{i}/c": {"_exists": True, "b": {"__buf": 1, "len": limit,
                                                     "runs": [[0, [1] * limit]]}}
                   for i in range(5)}
        await a.send(type="patch", messageId="carried", documentPatches=[carried])
        assert (await a.receive_until("ack"))[-1]["messageId"] == "carried"


async def test_max_ephemeral_keys_per_client(autojump_clock: Any) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_ephemeral_keys=5)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await joined(a, ephemeralPatches=[keys("p", 5)])
        await joined(b)
        await a.drain()
        room = manager.get_existing_room("r")
        assert room is not None
        # A sixth key is refused whole: its document patch is not applied either.
        await a.send(type="patch", messageId="six", documentPatches=[create("e/c")],
                     ephemeralPatches=[{"p0/c": {"i": 9}}, create("p5/c")])
        assert (await a.receive_until("error"))[-1] == {
            "type": "error", "code": "too-many-ephemeral-keys", "messageId": "six",
            "message": "a client may hold at most 5 presence keys"}
        assert room.document.timestamp == 0
        assert room.ephemeral.by_client["a"]["p0/c"]["i"] == 0
        # Updating held keys, or deleting one and adding one, is fine.
        await a.send(type="patch", messageId="upd", ephemeralPatches=[{"p0/c": {"i": 9}}])
        await a.receive_until("ack")
        await a.send(type="patch", messageId="swap",
                     ephemeralPatches=[{"p1/c": {"_exists": False}}])
        await a.receive_until("ack")
        await a.send(type="patch", messageId="add", ephemeralPatches=[create("p5/c")])
        assert (await a.receive_until("ack"))[-1]["messageId"] == "add"
        assert room.ephemeral.key_count("a") == 5
        # b has a budget of its own.
        await b.send(type="patch", messageId="b", ephemeralPatches=[keys("bp", 5)])
        assert (await b.receive_until("ack"))[-1]["messageId"] == "b"
        await b.send(type="patch", messageId="b6", ephemeralPatches=[create("bp9/c")])
        assert (await b.receive_until("error"))[-1]["code"] == "too-many-ephemeral-keys"
        # A reconnect carrying too many is refused the same way (and gets no synced).
        await b.send(type="reconnect", lastTimestamp=0, protocolVersion=2,
                     ephemeralPatches=[create("bp9/c")])
        frames = await b.receive_until("error")
        assert frames_of(frames, "synced") == []
        await edit_is_seen(a, b, 1)


async def test_invalid_frames_are_counted_over_the_window(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    limits = attrs.evolve(NO_PINGS, max_invalid_frames=3, invalid_frame_window=10.0)
    async with (
        manager_with(limits) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await joined(a)
        await joined(b)
        for _ in range(4):  # 3 per 10 s, spread over 40 s: never closed
            for _ in range(3):
                await a.send_raw("junk")
                await a.receive_until("error")
            await trio.sleep(10.5)
        await edit_is_seen(a, b, 1)
        for _ in range(3):
            await a.send_raw("junk")
            await a.receive_until("error")
        await a.send_raw("junk")
        assert (await a.closed())[0] == 1008
        room = manager.get_existing_room("r")
        assert room is not None and [s.client_id for s in room.get_sessions()] == ["b"]
        lines = [r.getMessage() for r in caplog.records if "refused a frame" in r.getMessage()]
        assert len(lines) == 4 * 3 + 4


# --- connection limits: closes -------------------------------------------------------


async def test_max_sessions_per_room_closes_the_next_with_1013(autojump_clock: Any) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_sessions_per_room=2)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
        connect(manager, "roomId=r&clientId=b") as b,
    ):
        await joined(a)
        await joined(b)
        await a.drain()
        async with connect(manager, "roomId=r&clientId=c") as c:
            assert await c.closed() == (1013, "room 'r' has 2 sessions")
        async with connect(manager, "roomId=other&clientId=c") as c:  # other rooms: fine
            await joined(c)
        assert frames_of(await a.drain(), "clientCount") == []  # c never joined r
        await edit_is_seen(a, b, 1)
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_sessions_per_room=2)) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
    ):
        async with connect(manager, "roomId=r&clientId=b") as b:
            await joined(b)
        async with connect(manager, "roomId=r&clientId=c") as c:  # b left: room for c
            await joined(c)
            await joined(a)
            await edit_is_seen(a, c, 1)


async def test_max_rooms_closes_a_connection_needing_one_more_with_1013(
    autojump_clock: Any,
) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, max_rooms=2)) as manager,
        connect(manager, "roomId=r1&clientId=a") as a,
        connect(manager, "roomId=r2&clientId=b") as b,
        connect(manager, "roomId=r2&clientId=b2") as b2,
    ):
        await joined(a)
        await joined(b)
        await joined(b2)
        async with connect(manager, "roomId=r3&clientId=c") as c:
            assert await c.closed() == (1013, "this server already has 2 rooms open")
        assert sorted(manager.room_ids()) == ["r1", "r2"]
        # A new session in an open room is fine.
        async with connect(manager, "roomId=r1&clientId=a2") as a2:
            await joined(a2)
            await edit_is_seen(a, a2, 1)
        await edit_is_seen(b, b2, 1)
    async with manager_with(attrs.evolve(NO_PINGS, max_rooms=1)) as manager:
        async with connect(manager, "roomId=r1&clientId=a") as a:
            await joined(a)
        await trio.sleep(61)  # r1 closes for idleness: a new room may open
        assert manager.room_ids() == []
        async with connect(manager, "roomId=r2&clientId=c") as c:
            assert (await c.reconnect())[-1] == {"type": "synced", "timestamp": 0}


# --- slow readers ----------------------------------------------------------------------


class StallingStream(trio.abc.Stream):
    """A stream whose writes block for ever once ``stall`` is set (a reader gone silent)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.stall = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stall:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def raw_session(
    manager: RoomManager, query: str, *, transport: str = "wire",
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream] = lambda s: s, **kwargs: Any,
) -> AsyncIterator[RawWebSocket]:
    """A raw client (see test_hostile.RawWebSocket) on an in-memory stream."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def handler(request: Any) -> None:
            await serve_connection(manager, request)

        serve = serve_wire_stream if transport == "wire" else serve_websocket_stream
        nursery.start_soon(functools.partial(
            serve, handler, wrap(server_stream),
            max_message_size=manager.limits.max_message_size))
        raw = RawWebSocket(client_stream, **kwargs)
        await raw.handshake(f"/?{query}")
        yield raw
        nursery.cancel_scope.cancel()


async def test_a_reader_that_stops_reading_is_closed_at_outbox_max_bytes(
    autojump_clock: Any, sessions: list[RecordingSession]
) -> None:
    limit = 20_000
    streams: list[StallingStream] = []

    def stalling(stream: trio.abc.Stream) -> trio.abc.Stream:
        streams.append(StallingStream(stream))
        return streams[-1]

    async with (
        manager_with(attrs.evolve(NO_PINGS, outbox_max_bytes=limit)) as manager,
        connect(manager, "roomId=r&clientId=w") as writer,
        connect(manager, "roomId=r&clientId=o") as observer,
        raw_session(manager, "roomId=r&clientId=slow", wrap=stalling) as slow,
    ):
        await joined(writer)
        await joined(observer)
        await slow.send_json(type="reconnect", lastTimestamp=0, protocolVersion=2)
        await slow.receive_until("synced")
        streams[0].stall = True
        [slow_session] = [s for s in sessions if s.client_id == "slow"]
        room = manager.get_existing_room("r")
        assert room is not None
        blob = "x" * 1000
        for n in range(100):  # ~100 KB of broadcasts, 5 times the slow one's outbox
            start = trio.current_time()
            await writer.send(type="patch", messageId=n,
                              documentPatches=[create(f"e{n}/c", blob=blob)])
            await writer.receive_until("ack")
            assert (await observer.receive_until("patch"))[-1]["timestamp"] == n + 1
            assert trio.current_time() - start < 0.1
            # queued bytes stay under the limit (give or take the one frame that hits it)
            assert slow_session.max_outbox_bytes <= limit + len(blob) + 200
        assert (slow_session.close_code, slow_session.close_reason) == (
            1008, "too slow: outbox full")
        assert sorted(s.client_id for s in room.get_sessions()) == ["o", "w"]
        assert manager.stats.slow_client_closes == 1  # canvas_store_slow_client_closes_total


async def test_one_frame_bigger_than_the_outbox_is_still_sent(autojump_clock: Any) -> None:
    async with (
        manager_with(attrs.evolve(NO_PINGS, outbox_max_bytes=1000)) as manager,
        connect(manager, "roomId=r&clientId=w") as writer,
        connect(manager, "roomId=r&clientId=o") as observer,
    ):
        await joined(writer)
        await joined(observer)
        await writer.send(type="patch", messageId="big",
                          documentPatches=[create("e/c", blob="x" * 5000)])
        await writer.receive_until("ack")
        assert (await observer.receive_until("patch"))[-1]["timestamp"] == 1
        await edit_is_seen(writer, observer, 2)


async def test_a_newcomer_to_a_document_bigger_than_the_outbox_is_not_too_slow(
    autojump_clock: Any,
) -> None:
    """The reconnect diff is one frame, and the room queues it right behind the
    newcomer's clientCount (still queued: always on trio-websocket, whose writer task
    has not run yet; on the wire transport when the socket is not writable at once),
    then queues synced behind it. A document bigger than ``outbox_max_bytes`` (with
    the defaults, 64 MiB) must not make every newcomer "too slow"."""
    async with (
        manager_with(attrs.evolve(NO_PINGS, outbox_max_bytes=20_000)) as manager,
        connect(manager, "roomId=r&clientId=w") as writer,
    ):
        await joined(writer)
        for n in range(10):  # ~50 KB of document, in frames under the outbox size
            await writer.send(type="patch", messageId=n,
                              documentPatches=[create(f"e{n}/c", blob="x" * 5000)])
            await writer.receive_until("ack")
        for name in ("late", "later"):
            async with connect(manager, f"roomId=r&clientId={name}") as late:
                frames = await late.reconnect()
                assert frames[-1] == {"type": "synced", "timestamp": 10}
                assert len(frames_of(frames, "patch")[0]["documentPatches"][0]) == 10
        await writer.send(type="patch", messageId="all",
                          documentPatches=[{f"e{n}/c": {"blob": "y" * 5000} for n in range(10)}])
        await writer.receive_until("ack")
        async with connect(manager, "roomId=r&clientId=last") as late:
            assert (await late.reconnect())[-1] == {"type": "synced", "timestamp": 11}


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_a_silent_tcp_reader_is_closed_1008_and_slows_nobody(
    transport: str, sessions: list[RecordingSession]
) -> None:
    """A raw TCP client completes the handshake and never reads again. With a 64 KiB
    outbox, the others in its room keep getting every broadcast at once while a writer
    floods, the silent one's queue never passes 64 KiB (and a frame), and it is closed
    with 1008."""
    limit = 64 * 1024
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, "--transport", transport,
                                  "--outbox-max-bytes", str(limit))
        sock = trio.socket.socket()
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        silent = RawWebSocket(trio.SocketStream(sock))
        await silent.handshake("/?roomId=r&clientId=silent")
        await silent.send_json(type="reconnect", lastTimestamp=0, protocolVersion=2)
        async with ws_client(port, "r", "w") as writer, ws_client(port, "r", "o") as observer:
            await joined(writer)
            await joined(observer)
            [silent_session] = [s for s in sessions if s.client_id == "silent"]
            blob = "x" * 8192
            start = time.monotonic()
            worst = 0.0
            n = 0
            while not silent_session.closing:
                n += 1
                assert n <= 2000, "the silent reader was never closed"
                sent = time.monotonic()
                await writer.send(type="patch", messageId=n,  # one key: the document stays small
                                  documentPatches=[create("e/c", blob=blob, n=n)])
                assert (await observer.receive_until("patch"))[-1]["timestamp"] == n
                await writer.receive_until("ack")
                worst = max(worst, time.monotonic() - sent)
                assert silent_session.max_outbox_bytes <= limit + len(blob) + 200
            for _ in range(20):  # and after it is closed
                n += 1
                await writer.send(type="patch", messageId=n,
                                  documentPatches=[create("e/c", blob=blob, n=n)])
                assert (await observer.receive_until("patch"))[-1]["timestamp"] == n
            assert worst < 0.5, worst
            assert time.monotonic() - start < 15
            assert (silent_session.close_code, silent_session.close_reason) == (
                1008, "too slow: outbox full")
            # It left the room at once.
            async with ws_client(port, "r", "probe") as probe:
                joined_frames = await probe.reconnect()
                assert joined_frames[0] == {"type": "clientCount", "count": 3}, joined_frames
            # Its socket is closed within the close timeout (checked on one transport: on
            # trio-websocket it takes the whole timeout).
            with trio.fail_after(_room.CLOSE_TIMEOUT + 3):
                while transport == "wire":
                    try:
                        if not await silent.stream.receive_some(1 << 20):
                            break
                    except trio.BrokenResourceError:
                        break
        await silent.aclose()
        nursery.cancel_scope.cancel()


# --- rate limit ------------------------------------------------------------------------


async def test_rate_limit_is_off_by_default(autojump_clock: Any) -> None:
    async with (
        manager_with(NO_PINGS) as manager,
        connect(manager, "roomId=r&clientId=a") as a,
    ):
        await joined(a)
        for n in range(1000):
            await a.send(type="patch", messageId=n, ephemeralPatches=[create("p/c", n=n)])
        acks = [f for f in await a.receive_until("ack") if f["type"] == "ack"]
        while acks[-1]["messageId"] != 999:
            acks.append(await a.receive())
        assert len(acks) == 1000


async def test_rate_limit_closes_a_flooding_session_1008(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    limits = attrs.evolve(NO_PINGS, rate_limit=10.0, rate_burst=5)
    async with (
        manager_with(limits) as manager,
        connect(manager, "roomId=r&clientId=calm") as calm,
        connect(manager, "roomId=r&clientId=flood") as flood,
    ):
        await joined(calm)  # 1 frame
        await joined(flood)
        # calm: 8 frames a second for 10 s, under the rate: never closed
        async with trio.open_nursery() as nursery:

            async def steady() -> None:
                for n in range(80):
                    await calm.send(type="patch", messageId=n,
                                    ephemeralPatches=[create("c/c", n=n)])
                    await trio.sleep(0.125)

            nursery.start_soon(steady)
            await trio.sleep(1)
            for n in range(20):  # 20 frames at once: the burst is 5
                await flood.send(type="patch", messageId=n, ephemeralPatches=[create("f/c")])
            frames = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    frames.append(orjson.loads(await flood.socket.get_message()))
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                1008, "rate limit exceeded")
            assert 1 <= len(frames_of(frames, "ack")) <= 5
        acks = frames_of(await calm.drain(), "ack")
        assert acks[-1]["messageId"] == 79
        room = manager.get_existing_room("r")
        assert room is not None and [s.client_id for s in room.get_sessions()] == ["calm"]
        [line] = [r.getMessage() for r in caplog.records if "frames/s" in r.getMessage()]
        assert "'r'" in line and "'flood'" in line


# --- ping timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_a_peer_that_never_answers_pings_is_dropped(
    transport: str, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_store_trio")
    limits = Limits(ping_interval=5.0, ping_timeout=3.0)
    async with (
        manager_with(limits) as manager,
        raw_session(manager, "roomId=r&clientId=live", transport=transport,
                    auto_pong=True) as live,
        raw_session(manager, "roomId=r&clientId=dead", transport=transport) as dead,
    ):
        with trio.fail_after(1):
            while (room := manager.get_existing_room("r")) is None or room.session_count() < 2:
                await trio.sleep(0.001)
        start = trio.current_time()
        frames: list[dict[str, Any]] = []

        async def keep_reading() -> None:
            while True:
                frames.append(await live.receive(timeout=1000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_reading)
            with trio.fail_after(20):
                while room.session_count() == 2:
                    await trio.sleep(0.1)
            dropped = trio.current_time() - start
            assert 5 + 3 - 0.5 <= dropped <= 5 + 3 + 1
            assert [s.client_id for s in room.get_sessions()] == ["live"]
            await trio.sleep(120)  # the live one answers and stays
            assert [s.client_id for s in room.get_sessions()] == ["live"]
            assert live.pings >= 120 // 5 - 2
            nursery.cancel_scope.cancel()
        assert {"type": "clientCount", "count": 1} in frames
        [line] = [r.getMessage() for r in caplog.records if "no pong" in r.getMessage()]
        assert "'r'" in line and "'dead'" in line
        # What the dead one would read: pings, then a close (1001) after the timeout.
        event = await dead.close_event(timeout=10)
        assert event.code in (1001, 1006)


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_a_peer_slower_to_pong_than_the_ping_interval_stays(
    transport: str, autojump_clock: Any
) -> None:
    """Each pong comes 3 s after its ping, pings are due every 2 s, and the timeout is 7 s:
    the room waits for each pong before the next ping, so the peer is never dropped."""
    limits = Limits(ping_interval=2.0, ping_timeout=7.0)
    async with (
        manager_with(limits) as manager,
        raw_session(manager, "roomId=r&clientId=slow", transport=transport) as slow,
        trio.open_nursery() as nursery,
    ):
        pongs = 0

        async def pong_later(ping: Ping) -> None:
            nonlocal pongs
            await trio.sleep(3)
            await slow.stream.send_all(slow.ws.send(ping.response()))
            pongs += 1

        async def answer_slowly() -> None:
            while True:
                event = await slow.next_event(timeout=1000)
                if isinstance(event, CloseConnection):
                    return
                if isinstance(event, Ping):
                    nursery.start_soon(pong_later, event)

        nursery.start_soon(answer_slowly)
        await trio.sleep(60)
        room = manager.get_existing_room("r")
        assert room is not None and [s.client_id for s in room.get_sessions()] == ["slow"]
        assert 10 <= pongs <= 16  # one ping every 4 s at most: 2 s wait, then 3 s for the pong
        nursery.cancel_scope.cancel()


# --- the CLI sets every limit ------------------------------------------------------------


def test_every_limit_is_a_serve_option() -> None:
    args = build_parser().parse_args([
        "serve", "--max-rooms", "3", "--max-sessions-per-room", "7",
        "--max-keys-per-frame", "100", "--max-buffer-length", "50",
        "--max-ephemeral-keys", "9", "--outbox-max-bytes", "4096",
        "--max-invalid-frames", "2", "--invalid-frame-window", "1.5",
        "--rate-limit", "20", "--rate-burst", "5", "--ping-interval", "off",
        "--ping-timeout", "4", "--max-message-size", "1024",
    ])
    assert limits_from(args) == Limits(
        max_rooms=3, max_sessions_per_room=7, max_keys_per_frame=100, max_buffer_length=50,
        max_ephemeral_keys=9, outbox_max_bytes=4096, max_invalid_frames=2,
        invalid_frame_window=1.5, rate_limit=20.0, rate_burst=5, ping_interval=None,
        ping_timeout=4.0, max_message_size=1024)
    assert limits_from(build_parser().parse_args(["serve"])) == Limits()
    assert {f.name for f in attrs.fields(Limits)} <= set(vars(args))
    rate = limits_from(build_parser().parse_args(["serve", "--rate-limit", "2.5"]))
    assert rate.rate_limit == 2.5 and isinstance(rate.max_rooms, int)


@pytest.mark.parametrize("bad", [["--max-rooms", "-1"], ["--max-rooms", "2.5"],
                                 ["--rate-limit", "fast"], ["--max-rooms", "off"]])
def test_a_bad_limit_option_is_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *bad])


async def test_cli_limits_apply_on_the_wire() -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, "--max-rooms", "1", "--max-sessions-per-room", "1")
        async with ws_client(port, "r", "a") as a:
            await joined(a)
            async with ws_client(port, "r", "b") as b:
                assert (await b.closed())[0] == 1013
            async with ws_client(port, "other", "c") as c:
                assert (await c.closed())[0] == 1013
            await a.send(type="patch", messageId="m", documentPatches=[create("e/c")])
            assert (await a.receive_until("ack"))[-1]["timestamp"] == 1
        nursery.cancel_scope.cancel()


# --- the defaults never refuse a legitimate client -------------------------------------


def seed_document(n: int) -> dict[str, Any]:
    """A document as the client's ``seedRoom`` sends it: n components, several fields each."""
    document: dict[str, Any] = {}
    for i in range(n):
        entity = f"{i:08x}-4b1d-4c7e-9a3f-{i:012x}"
        if i % 10 == 0:
            document[f"{entity}/Stroke"] = {
                "_exists": True, "_version": "1", "width": 2.5, "color": "#1e1e1e",
                "points": {"__buf": 1, "len": 8, "runs": [[0, [i, i + 1.5, 3, 4, 5, 6, 7, 8]]]},
            }
        else:
            document[f"{entity}/Block"] = {
                "_exists": True, "_version": "1", "position": [i * 1.5, i * 0.5],
                "size": [120, 80], "rotateZ": 0.0, "rank": f"a{i:06d}",
                "tag": "rect", "locked": False,
            }
    return document


async def test_the_defaults_take_a_100k_component_document_in_one_frame() -> None:
    document = seed_document(100_000)
    frame = orjson.dumps({"type": "patch", "messageId": "seed-s",
                          "documentPatches": [document]})
    assert len(frame) > 10_000_000
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await start_server(nursery)  # default limits
            url = f"ws://127.0.0.1:{port}/?roomId=big"
            async with open_websocket_url(f"{url}&clientId=s", max_message_size=2**30,
                                          receive_buffer_size=1 << 20) as ws:
                # as seedRoom does: the patch as soon as the socket opens, no reconnect
                await ws.send_message(frame.decode())
                seeder = FrameClient(ws)
                acks = [f for f in await seeder.receive_until("ack", timeout=20)
                        if f["type"] == "ack"]
                assert acks == [{"type": "ack", "messageId": "seed-s", "timestamp": 1}]
            async with open_websocket_url(f"{url}&clientId=r", max_message_size=2**30,
                                          receive_buffer_size=1 << 20) as ws:
                frames = await FrameClient(ws).reconnect()
            [synced] = frames_of(frames, "synced")
            assert synced["timestamp"] == 1
            [diff] = frames_of(frames, "patch")[-1]["documentPatches"]
            assert len(diff) == 100_000
            key = next(k for k in diff if k.endswith("/Stroke"))
            assert diff[key]["points"] == [0, 1.5, 3, 4, 5, 6, 7, 8]
            nursery.cancel_scope.cancel()


# --- what the README promises --------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
SRC = Path(__file__).resolve().parent.parent / "src" / "canvas_store_trio"


def documented_limits() -> dict[str, str]:
    section = README.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|$", section, re.M)
    return {name: default.strip() for name, default, _ in rows}


def parse_default(text: str) -> float | None:
    if text.startswith("off"):
        return None
    found = re.match(r"([\d,.]+)\s*(MiB|KiB)?", text)
    assert found, text
    number = float(found.group(1).replace(",", ""))
    return number * {"MiB": 2**20, "KiB": 2**10, None: 1}[found.group(2)]


def test_the_documented_defaults_are_the_defaults() -> None:
    documented = documented_limits()
    assert len(documented) >= 9
    defaults = Limits()
    wrong = {name: (text, getattr(defaults, name)) for name, text in documented.items()
             if parse_default(text) != getattr(defaults, name)}
    assert not wrong, f"README default != Limits() default: {wrong}"


def test_every_error_code_the_server_sends_is_documented() -> None:
    codes = set()
    for path in SRC.rglob("*.py"):
        codes |= set(re.findall(r'ProtocolError\(\s*"([a-z-]+)"', path.read_text()))
    assert {"invalid-json", "too-many-keys"} <= codes
    documented = README.read_text().split("Error codes in `error` frames:")[1].split("\n\n")[0]
    missing = sorted(code for code in codes if f"`{code}`" not in documented)
    assert not missing, f"error codes missing from the README: {missing}"
