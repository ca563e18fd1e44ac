"""A closed room, its document and its sessions are freed by reference counting alone.

With thousands of connections, a cycle through a closed room keeps its document alive
until a full collection, and those pauses were 130-175 ms. Each test runs with the
collector off (never calling it) and checks that no room, document, session or server
socket it made is still alive once its rooms have closed. The last test checks that
``serve`` freezes what its start-up left, so that the full collections that do run
walk the server's own objects only.
"""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio import (
    AuthorizeResult,
    Document,
    Limits,
    MemoryStorage,
    RoomManager,
    Snapshot,
    serve_connection,
)
from canvas_store_trio.rooms._connection import AuthorizeInfo
from canvas_store_trio.rooms._room import Room
from canvas_store_trio.rooms._saver import Saver
from canvas_store_trio.rooms._session import Session
from canvas_store_trio.testing import FrameClient
from canvas_store_trio.transport._handshake import HandshakeRequest
from canvas_store_trio.transport._listener import serve_websockets
from canvas_store_trio.transport._wire import WireSocket

from .conftest import connect


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()  # what earlier tests left behind is not ours to explain
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


OURS = (Room, Saver, Document, Session, WireSocket, HandshakeRequest)


class Watch:
    """What a test's rooms leave alive: every room, its document, and any room, saver,
    document, session or server socket that was not alive when the watch began."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []
        self._before = {id(obj) for obj in gc.get_objects() if isinstance(obj, OURS)}

    def on_removed(self, room: Room, session_id: str, remaining: int) -> None:
        if not any(ref() is room for ref in self.refs):
            self.refs += [weakref.ref(room), weakref.ref(room.document)]

    def assert_all_freed(self) -> None:
        alive = [obj for ref in self.refs if (obj := ref()) is not None] or [
            obj for obj in gc.get_objects() if isinstance(obj, OURS) and id(obj) not in self._before
        ]
        assert not alive, f"{alive[0]!r} is alive, held by:\n{describe_referrers(alive[0])}"


def describe_referrers(obj: object, depth: int = 4) -> str:
    """Who holds ``obj`` (for the failure message), a few levels up."""
    lines: list[str] = []
    seen = {id(obj), id(sys._getframe())}

    def walk(target: object, level: int) -> None:
        seen.add(id(sys._getframe()))
        for holder in gc.get_referrers(target):
            if id(holder) in seen or holder is lines:
                continue
            seen.add(id(holder))
            lines.append("  " * level + f"{type(holder).__name__}: {repr(holder)[:120]}")
            if level < depth:
                walk(holder, level + 1)

    walk(obj, 0)
    return "\n".join(lines[:60])


def edit(key: str) -> dict[str, Any]:
    return {"type": "patch", "messageId": key, "documentPatches": [{key: {"_exists": True}}]}


async def test_a_closed_room_is_freed_without_the_collector(autojump_clock: Any) -> None:
    store = MemoryStorage()
    with collector_off():
        watch = Watch()
        async with RoomManager(idle_timeout=5.0, save_throttle=1.0,
                               limits=Limits(ping_interval=None),
                               on_session_removed=watch.on_removed,
                               create_storage=lambda room_id: store) as manager:
            for rnd in range(2):
                async with connect(manager, "roomId=r&clientId=a") as a:
                    await a.reconnect()
                    async with connect(manager, "roomId=r&clientId=b") as b:
                        await b.reconnect()
                        await a.send(**edit(f"a{rnd}/c"))
                        await a.receive_until("ack")
                        await b.receive_until("patch")
                await trio.sleep(10)
                assert manager.room_ids() == []
            assert len(watch.refs) == 4  # two rooms, two documents
            watch.assert_all_freed()


@pytest.mark.parametrize("ping_interval", [None, 0.05])
async def test_a_closed_room_on_loopback_is_freed_without_the_collector(
    ping_interval: float | None,
) -> None:
    """The wire transport with its read poller, over real sockets, pings on and off."""
    with collector_off():
        watch = Watch()
        async with (
            RoomManager(idle_timeout=0.1, save_throttle=0.02,
                        limits=Limits(ping_interval=ping_interval, ping_timeout=1.0),
                        on_session_removed=watch.on_removed,
                        create_storage=lambda room_id: MemoryStorage()) as manager,
            trio.open_nursery() as nursery,
        ):

            async def handler(request: HandshakeRequest) -> None:
                await serve_connection(manager, request)

            listeners = await nursery.start(functools.partial(
                serve_websockets, handler, "127.0.0.1", 0,
                max_message_size=manager.limits.max_message_size, transport="wire"))
            port = listeners[0].socket.getsockname()[1]
            url = f"ws://127.0.0.1:{port}"
            for rnd in range(2):
                async with (
                    open_websocket_url(f"{url}/?roomId=r&clientId=a") as ws_a,
                    open_websocket_url(f"{url}/?roomId=r&clientId=b") as ws_b,
                ):
                    a, b = FrameClient(ws_a), FrameClient(ws_b)
                    await a.reconnect()
                    await b.reconnect()
                    await a.send(**edit(f"a{rnd}/c"))
                    await a.receive_until("ack")
                    await b.receive_until("patch")
                    await trio.sleep(3 * (ping_interval or 0))  # a few pings answered
                with trio.fail_after(5):
                    while manager.room_ids():
                        await trio.sleep(0.02)
                await trio.sleep(0.05)  # the sessions' tasks end
            nursery.cancel_scope.cancel()
            assert len(watch.refs) == 4
            watch.assert_all_freed()


class BrokenStorage:
    """Loads fail while ``load_error`` is set; saves fail, or hang once ``hang`` is set."""

    def __init__(self) -> None:
        self.load_error: Exception | None = OSError("unreadable")
        self.hang = False

    async def load(self) -> Snapshot | None:
        if self.load_error is not None:
            raise self.load_error
        return None

    async def save(self, snapshot: Snapshot) -> None:
        if self.hang:
            await trio.sleep_forever()
        raise OSError("disk on fire")


async def test_rooms_that_fail_are_freed_without_the_collector(autojump_clock: Any) -> None:
    """A failed load, failed saves, a refused token refresh and a session closed for
    invalid frames: the errors a room keeps must not hold it in a cycle."""
    storage = BrokenStorage()

    def authorize(info: AuthorizeInfo) -> AuthorizeResult:
        if info.token == "bad":
            raise ValueError("expired")
        return AuthorizeResult("readwrite")

    with collector_off():
        watch = Watch()
        async with RoomManager(idle_timeout=5.0, save_throttle=1.0, flush_timeout=1.0,
                               limits=Limits(ping_interval=None, max_invalid_frames=1),
                               on_session_removed=watch.on_removed,
                               create_storage=lambda room_id: storage) as manager:
            async with connect(manager, "roomId=r&clientId=a") as a:
                assert (await a.closed())[0] == 1011  # the load failed
            storage.load_error = None
            async with connect(manager, "roomId=r&clientId=a", authorize=authorize) as a:
                await a.reconnect()
                await a.send(**edit("a/c"))
                await a.receive_until("ack")
                await trio.sleep(3)  # saves fail and are retried
                room = manager.get_existing_room("r")
                assert room is not None and room.save_error is not None
                del room
                async with connect(manager, "roomId=r&clientId=b", authorize=authorize) as b:
                    await b.reconnect()
                    await b.send(type="auth-refresh", token="bad")
                    assert (await b.closed())[0] == 1008
                async with connect(manager, "roomId=r&clientId=c") as c:
                    await c.reconnect()
                    await c.send_raw("not json")
                    await c.send_raw("not json")
                    assert (await c.closed())[0] == 1008
                room = manager.get_existing_room("r")
                assert room is not None
                with pytest.raises(OSError):
                    await room.flush()  # the error raised has a traceback now
                del room
            storage.hang = True
            assert await manager.close_all() == ["r"]  # its last flush times out
            assert len(watch.refs) == 2
            watch.assert_all_freed()


def test_serve_freezes_what_start_up_left_so_that_full_collections_skip_it(
    tmp_path: Path,
) -> None:
    # In a process of its own: gc.freeze() holds for the whole process.
    script = """
import gc, sys, trio
from canvas_store_trio.cli._main import build_parser, serve

async def main():
    args = build_parser().parse_args(["serve", "--port", "0", "--data-dir", sys.argv[1]])
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, args)
        print(gc.get_freeze_count(), len(gc.get_objects()))
        nursery.cancel_scope.cancel()

trio.run(main)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    frozen, left = map(int, done.stdout.split())
    assert frozen > 10_000  # the modules, classes and functions of start-up
    assert left < frozen / 10  # what a full collection still walks
