"""canvas_store_trio.client over real loopback sockets: against our server (in this process,
or `canvas-store-trio serve`), the Node reference server, the real npm client, and small fake
servers for what no real server does (never acking, speaking another version).
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events

from canvas_store_trio import (
    AuthorizeInfo,
    HandshakeRequest,
    Limits,
    RoomManager,
    serve_connection,
    serve_websockets,
)
from canvas_store_trio.client import (
    Client,
    ClientClosed,
    ClientTimeout,
    PatchRefused,
    ServerClosed,
    Update,
    VersionMismatch,
    connect,
)
from canvas_store_trio.client import _client as client_module

from . import interop_auth
from .conftest import require_node
from .processes import npm_peer, npm_until, server_process

ROOT = Path(__file__).resolve().parent.parent
FAST = {"backoff": (0.05, 0.2), "timeout": 10.0}  # reconnect at once, in tests


def live(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


@asynccontextmanager
async def our_server(
    authorize: Any = None, **manager_options: Any
) -> AsyncIterator[tuple[str, RoomManager]]:
    """Our server in this process, on a free loopback port: (url, manager)."""
    async with RoomManager(**manager_options) as manager, trio.open_nursery() as nursery:

        async def handler(request: HandshakeRequest) -> None:
            await serve_connection(manager, request, authorize=authorize)

        listeners = await nursery.start(functools.partial(
            serve_websockets, handler, "127.0.0.1", 0, max_message_size=2**26))
        yield f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/", manager
        nursery.cancel_scope.cancel()


@pytest.fixture(params=["ours", pytest.param("node", marks=pytest.mark.node)])
async def server_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """`canvas-store-trio serve --memory`, or the Node reference server, as a process."""
    node = request.param == "node"
    if node:
        require_node()
    async with server_process("--memory", node=node) as server:
        yield f"ws://127.0.0.1:{server.port}/"


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def read_room(url: str, room_id: str) -> dict[str, Any]:
    """The room as a new client gets it from the server (the diff since 0)."""
    async with connect(url, room_id=room_id, client_id="reader") as reader:
        return dict(reader.document)


# --- patch, ack, document --------------------------------------------------------------


async def test_patch_returns_the_ack_timestamp_and_updates_the_document() -> None:
    async with our_server() as (url, manager), connect(url, room_id="r") as client:
        assert (client.timestamp, dict(client.document)) == (0, {})
        assert await client.patch(live("e1/pos", x=1, pts=[1, 2, 3])) == 1
        delta = {"__buf": 1, "len": 5, "runs": [[3, [8, 9]]]}
        assert await client.patch({"e1/pos": {"y": 2, "pts": delta}}) == 2
        assert await client.patch({"e2/pos": {"_exists": False}}) == 3  # a tombstone of nothing
        assert await client.patch({"e3/pos": {"x": 1}}) == 4  # a partial write: dropped
        assert await client.patch({}, ephemeral=live("me/cursor", x=1)) == 4  # presence only
        assert await client.patch({}) == 4  # nothing to send
        assert client.timestamp == 4
        assert dict(client.document) == {
            "e1/pos": {"_exists": True, "x": 1, "y": 2, "pts": [1, 2, 3, 8, 9]},
            "e2/pos": {"_exists": False},
        }
        room = manager.get_existing_room("r")
        assert room is not None
        assert dict(room.get_snapshot().state) == dict(client.document)


async def test_two_clients_converge(server_url: str) -> None:
    async with (
        connect(server_url, room_id="r", client_id="a") as a,
        connect(server_url, room_id="r", client_id="b") as b,
    ):

        async def edit(client: Client, name: str) -> None:
            for n in range(30):  # both write the same keys, never waiting for one another
                key = f"shared{n % 4}/c"
                if n % 7 == 6:
                    await client.patch({key: {"_exists": False}})
                else:
                    await client.patch(live(key, by=name, n=n, pts=[n] * 3))
                    await client.patch({key: {"pts": {"__buf": 1, "len": 4, "runs": [[3, [n]]]}}})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(edit, a, "a")
            nursery.start_soon(edit, b, "b")
        sent = 2 * sum(1 if n % 7 == 6 else 2 for n in range(30))
        await until(lambda: a.timestamp == b.timestamp == sent, "both to see every edit")
        assert a.document == b.document
        assert a.document == await read_room(server_url, "r")
        assert any(record.get("_exists") for record in a.document.values())


async def test_updates_and_presence_come_from_the_other_clients() -> None:
    async with our_server() as (url, _), connect(url, room_id="r", client_id="a") as a:
        updates = a.updates()
        async with connect(url, room_id="r", client_id="b") as b:
            await b.patch(live("n1/note", text="hi"), ephemeral=live("b/cursor", x=5))
            update = await anext(updates)
            assert update == Update("b", 1, (live("n1/note", text="hi"),),
                                    (live("b/cursor", x=5),))
            assert a.presence == live("b/cursor", x=5)
            assert a.document == live("n1/note", text="hi")
            await a.patch({"n1/note": {"text": "yo"}})  # one's own edits are not updates
            await b.patch({}, ephemeral={"b/cursor": {"x": 6}})
            assert await anext(updates) == Update("b", None, (), ({"b/cursor": {"x": 6}},))
            assert b.document == a.document == live("n1/note", text="yo")
        # b left: the server takes its presence away.
        assert await anext(updates) == Update("b", None, (), ({"b/cursor": {"_exists": False}},))
        assert a.presence == {}
    with pytest.raises(StopAsyncIteration):  # the client closed: its iterators end
        await anext(updates)
    with pytest.raises(ClientClosed):
        await a.patch(live("x/y"))


# --- the npm client ----------------------------------------------------------------------


@pytest.mark.node
async def test_converges_with_the_npm_client(server_url: str) -> None:
    """Edits both ways, in phases: the npm client mirrors what it pulls only after its own
    edits of the same frame, so same-field edits racing within 16 ms would diverge there."""
    async with (
        connect(server_url, room_id="r", client_id="trio") as ours,
        npm_peer(server_url, "r", "npm") as npm,
    ):
        await npm_until(npm, lambda report: report["synced"] > 0)
        await npm.send(edit=live("n1/note", text="from npm", x=0),
                       presence=live("npm/cursor", x=1))
        await until(lambda: "n1/note" in ours.document, "the npm client's note")
        for n in range(10):  # ours edit n1 while the npm client makes n2...n11
            await ours.patch({"n1/note": {"x": n, "text": "from trio"}},
                             ephemeral=live("trio/cursor", x=n))
            await npm.send(edit=live(f"n{n + 2}/note", text="npm", x=n))
        await ours.patch(live("stroke/s", pts=[0, 1, 2]))
        await npm_until(npm, lambda report: "stroke/s" in report["state"])
        # (A key made and deleted within one of its frames never reaches the server.)
        await until(lambda: "n11/note" in ours.document, "the npm client's notes")
        await npm.send(edit={"stroke/s": {"pts": {"__buf": 1, "len": 5, "runs": [[3, [3, 4]]]}},
                             "n3/note": {"_exists": False}})

        report = await npm_until(npm, lambda report: (
            report["unsent"] == 0 and report["state"] == ours.document
            and "trio/cursor" in report["presence"] and "npm/cursor" in ours.presence),
            also=lambda: f"ours: {dict(ours.document)}, presence {dict(ours.presence)}")
        assert ours.document["n1/note"] == {"_exists": True, "text": "from trio", "x": 9}
        assert ours.document["stroke/s"]["pts"] == [0, 1, 2, 3, 4]
        assert ours.document["n3/note"] == {"_exists": False}
        assert len(ours.document) == 12
        assert report["presence"]["trio/cursor"] == {"_exists": True, "x": 9}
        assert ours.presence["npm/cursor"] == {"_exists": True, "x": 1}
        assert await read_room(server_url, "r") == ours.document




# --- restarts and resync -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ours", pytest.param("node", marks=pytest.mark.node)])
async def test_survives_a_server_restart_mid_edit(kind: str, tmp_path: Path) -> None:
    """SIGKILL with edits in flight, before the server saved any: it comes back empty, the
    client heals it through resync, and every patch() returns once its edit is acked."""
    node = kind == "node"
    if node:
        require_node()
    options = ("--data-dir", str(tmp_path), "--save-throttle", "60")
    acked: dict[int, int] = {}
    with trio.fail_after(30):
        async with server_process(*options, node=node) as first:
            url = f"ws://127.0.0.1:{first.port}/"
            async with connect(url, room_id="r", client_id="w", **FAST) as client:

                async def edit(n: int) -> None:
                    acked[n] = await client.patch(live(f"k{n}/c", v=n))

                async with trio.open_nursery() as nursery:
                    for n in range(120):
                        nursery.start_soon(edit, n)
                        if n < 100:
                            await trio.sleep(0.002)
                    await trio.sleep(0)  # the last ones are on their way
                    first.process.send_signal(signal.SIGKILL)
                    await first.process.wait()
                    assert 0 < len(acked) < 120  # some were acked, some are in flight
                    for n in range(120, 150):  # and some wait while the server is down
                        nursery.start_soon(edit, n)
                    async with server_process(*options, port=first.port, node=node):
                        for n in range(150, 200):
                            nursery.start_soon(edit, n)
                            await trio.sleep(0.002)
                        await until(lambda: len(acked) == 200, "every ack", timeout=15)
                        assert client.document == {
                            f"k{n}/c": {"_exists": True, "v": n} for n in range(200)}
                        assert await read_room(url, "r") == client.document
                        assert max(acked.values()) <= client.timestamp


async def test_resync_heals_a_server_that_went_back_in_time() -> None:
    """The server restarts empty, and another client edits it before this one is back.

    The client sends what the new server lacks, and learns of the other edit too, though its
    timestamp is below the one the client reconnected with."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    b_edited = trio.Event()

    async def hold_a_back(info: AuthorizeInfo) -> dict[str, Any]:
        if info.client_id == "a":
            await b_edited.wait()
        return {"permissions": "readwrite"}

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def first_server(task_status: trio.TaskStatus[None]) -> None:
                with first:
                    async with our_server_on(port):
                        task_status.started()
                        await trio.sleep_forever()

            await nursery.start(first_server)
            async with connect(url, room_id="r", client_id="a", **FAST) as a:
                for n in range(5):
                    await a.patch(live(f"a{n}/c", v=n))
                assert a.timestamp == 5
                first.cancel()  # the sessions close with 1001, the room (in memory) is gone
                async with (
                    our_server_on(port, authorize=hold_a_back) as manager,
                    connect(url, room_id="r", client_id="b", **FAST) as b,
                ):
                    # b overwrites a's first edit, at timestamp 1: a's answer to the
                    # resync holds what came after 1, the rest it must learn.
                    assert await b.patch(live("a0/c", v="b")) == 1
                    b_edited.set()
                    expected = {f"a{n}/c": {"_exists": True, "v": n} for n in range(5)}
                    expected["a0/c"] = {"_exists": True, "v": "b"}
                    await until(lambda: a.document == expected == b.document, "convergence")
                    room = manager.get_existing_room("r")
                    assert room is not None and dict(room.get_snapshot().state) == expected
                    # a learned the room's new timestamps, and keeps going from there.
                    assert await a.patch(live("a9/c", v=9)) == room.get_snapshot().timestamp
            nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def our_server_on(port: int, authorize: Any = None) -> AsyncIterator[RoomManager]:
    async with RoomManager() as manager, trio.open_nursery() as nursery:

        async def handler(request: HandshakeRequest) -> None:
            await serve_connection(manager, request, authorize=authorize)

        await nursery.start(functools.partial(
            serve_websockets, handler, "127.0.0.1", port, max_message_size=2**26))
        yield manager
        nursery.cancel_scope.cancel()


# --- what ends a client ---------------------------------------------------------------------


async def test_a_version_mismatch_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", 3)
    async with our_server() as (url, _):
        with pytest.raises(VersionMismatch) as caught:
            async with connect(url, room_id="r"):
                pytest.fail("a client of another version got in sync")
    assert caught.value.server_version == 2


async def test_a_refused_token_raises_and_so_does_a_refused_refresh() -> None:
    async with our_server(authorize=interop_auth.authorize) as (url, manager):
        with pytest.raises(ServerClosed) as caught:
            async with connect(url, room_id="r", token="deny"):
                pytest.fail("a refused client got in sync")
        assert (caught.value.code, caught.value.reason) == (1008, "token refused")

        with pytest.raises(ServerClosed) as caught:
            async with connect(url, room_id="r", token="ro") as client:
                assert await client.patch(live("e/c", v=1)) == 0  # readonly: acked, not applied
                assert client.document == {}
                await client.refresh_auth("rw")
                assert await client.patch(live("e/c", v=2)) == 1
                assert client.document == live("e/c", v=2)
                await client.refresh_auth("deny")
                await trio.sleep_forever()
        assert (caught.value.code, caught.value.reason) == (
            1008, "token refresh refused: token refused")
        room = manager.get_existing_room("r")
        assert room is not None and dict(room.get_snapshot().state) == live("e/c", v=2)


async def test_a_refused_patch_raises_and_the_client_goes_on() -> None:
    async with (
        our_server(limits=Limits(max_depth=2)) as (url, manager),
        connect(url, room_id="r") as client,
    ):
        with pytest.raises(PatchRefused) as caught:  # our server refuses it
            await client.patch(live("e/c", deep=[[[1]]]))
        assert caught.value.code == "too-deep"
        with pytest.raises(PatchRefused) as caught:  # this one is never sent
            await client.patch({"e/c": {"_exists": "yes"}})
        assert caught.value.code == "invalid-component"
        room = manager.get_existing_room("r")
        assert room is not None and room.get_snapshot().timestamp == 0
        assert await client.patch(live("e/c", flat=[1])) == 1
        assert client.document == live("e/c", flat=[1])


async def test_the_timeout_bounds_the_wait_on_a_dead_port(
    autojump_clock: trio.testing.MockClock,
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/"  # nothing listens there
    start = trio.current_time()
    with pytest.raises(ClientTimeout, match="could not connect"):
        async with connect(url, room_id="r", timeout=20):
            pytest.fail("got in sync with nobody")
    assert 20 <= trio.current_time() - start < 21


# --- fake servers ------------------------------------------------------------------------------


@asynccontextmanager
async def fake_server(
    handle: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]],
) -> AsyncIterator[str]:
    """A trio-websocket server that runs ``handle`` on each connection it accepts."""
    async with trio.open_nursery() as nursery:

        async def handler(request: trio_websocket.WebSocketRequest) -> None:
            await handle(await request.accept())

        server = await nursery.start(functools.partial(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None))
        yield f"ws://127.0.0.1:{server.port}/?app=1"
        nursery.cancel_scope.cancel()


class SilentServer:
    """Syncs every client, then records what it sends and never answers."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.closes: list[int | None] = []
        self.changed = trio.Event()

    async def handle(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.paths.append(ws.path)
        try:
            while True:
                frame = json.loads(await ws.get_message())
                self.received.append(frame)
                if frame["type"] == "reconnect":
                    await ws.send_message('{"type":"synced","timestamp":7}')
                self.changed.set()
        except trio_websocket.ConnectionClosed as exc:
            self.closes.append(exc.reason.code if exc.reason else None)
            self.changed.set()


async def test_patch_waits_at_most_the_timeout_and_leaving_closes_with_1000() -> None:
    silent = SilentServer()
    async with fake_server(silent.handle) as url:
        async with connect(url, room_id="my room", client_id="c", token="t k",
                           timeout=0.5) as client:
            assert client.timestamp == 7
            with pytest.raises(ClientTimeout, match=r"no ack for c-1 within 0\.5 s"):
                await client.patch(live("e/c", v=1))
        with trio.fail_after(5):
            while not silent.closes:
                await silent.changed.wait()
        assert silent.closes == [1000]
        # The npm client's URL and first frame; the edit was sent, once.
        assert silent.paths == ["/?app=1&roomId=my+room&clientId=c&token=t+k"]
        assert silent.received == [
            {"type": "reconnect", "lastTimestamp": 0, "protocolVersion": 2},
            {"type": "patch", "messageId": "c-1", "documentPatches": [live("e/c", v=1)]},
        ]

        with trio.CancelScope() as scope:  # leaving by cancellation closes with 1000 too
            async with connect(url, room_id="r", timeout=5) as client:
                scope.cancel()
                await trio.sleep_forever()
        with trio.fail_after(5):
            while len(silent.closes) < 2:
                await silent.changed.wait()
        assert silent.closes == [1000, 1000]


async def test_a_server_gone_silent_is_noticed_by_the_keepalive() -> None:
    """A peer that stops answering (no FIN, no RST) is dropped for a missing pong; then,
    with nothing to reconnect to, the client gives up after ``timeout``."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/"
    async with trio.open_nursery() as nursery:

        async def serve_once() -> None:  # the handshake and `synced`, then silence
            stream = await listener.accept()
            await listener.aclose()
            ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
            ws.receive_data(await stream.receive_some())
            assert isinstance(next(ws.events()), wsproto.events.Request)
            await stream.send_all(ws.send(wsproto.events.AcceptConnection())
                                  + ws.send(wsproto.events.TextMessage('{"type":"synced"}')))
            await trio.sleep_forever()

        nursery.start_soon(serve_once)
        start = trio.current_time()
        with pytest.raises(ClientTimeout, match=r"no pong within 0\.2 s"):
            async with connect(url, room_id="r", timeout=0.4):
                await trio.sleep_forever()
        assert trio.current_time() - start < 3
        nursery.cancel_scope.cancel()


# --- examples/bot.py ---------------------------------------------------------------------------


async def test_the_bot_example_keeps_the_shape_count() -> None:
    summary = "SINGLETON/summary"
    async with our_server() as (url, _), connect(url, room_id="board") as me:
        await me.patch(live("n1/note", text="before the bot"))
        await me.patch(live("n1/pos", x=1))  # one shape, two components
        bot = await trio.lowlevel.open_process(
            [sys.executable, str(ROOT / "examples" / "bot.py"), url, "--room", "board"])
        try:
            await until(lambda: me.document.get(summary) == live(summary, shapes=1)[summary],
                        "the bot's first summary", timeout=10)
            await me.patch(live("n2/note", text="two"))
            await me.patch(live("n3/note", text="three"))
            await until(lambda: me.document[summary]["shapes"] == 3, "a count of 3")
            await me.patch({"n1/note": {"_exists": False}})  # n1 still has a live pos
            await me.patch({"n2/note": {"_exists": False}})
            await until(lambda: me.document[summary]["shapes"] == 2, "a count of 2")
            bot.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                assert await bot.wait() == 0
        finally:
            if bot.returncode is None:
                bot.kill()
            with trio.CancelScope(shield=True):
                await bot.wait()
