"""canvas_store_trio.testing: the helpers users get, used here on our own server.

The property tests drive a real ``Room`` over ``memory_socket_pair`` and check it
against ``ReferenceModel``; the integration tests use ``serve_in_nursery`` and the
plugin's ``canvas_store_server`` fixture over real loopback WebSockets; and
examples/test_patch_merging.py runs as a user would run it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, HandshakeError

from canvas_store_trio import Limits, ProtocolError, Room, RoomManager, parse_client_frame
from canvas_store_trio._protocol import AuthRefreshMessage, ReconnectMessage
from canvas_store_trio.testing import (
    PRESENCE_KEYS,
    SMALL_LIMITS,
    FrameClient,
    ReferenceModel,
    RunningServer,
    encode_frame,
    frames,
    hostile_frames,
    memory_socket_pair,
    open_server,
    patch_lists,
    serve_in_nursery,
)

ROOT = Path(__file__).resolve().parent.parent
ROOM_SETTINGS = settings(max_examples=40, deadline=None, report_multiple_bugs=False)

# --- memory_socket_pair --------------------------------------------------------------


async def test_a_close_reaches_the_other_end_after_what_was_sent_before_it() -> None:
    server_side, client = memory_socket_pair()
    await server_side.send_message('{"type":"one"}')
    await server_side.aclose(1008, "too many invalid frames")
    assert await client.receive() == {"type": "one"}
    assert await client.closed() == (1008, "too many invalid frames")
    assert server_side.closed is not None and server_side.closed.code == 1008
    with pytest.raises(ConnectionClosed):
        await client.send(type="patch")
    with pytest.raises(ConnectionClosed):
        await server_side.get_message()  # the end that closed reads nothing more
    await client.aclose(1000)  # a second close changes nothing
    assert await client.closed() == (1008, "too many invalid frames")


async def test_a_close_wakes_a_reader_waiting_at_either_end() -> None:
    server_side, client = memory_socket_pair()
    woken: list[Any] = []

    async def read(socket: Any) -> None:
        with pytest.raises(ConnectionClosed) as caught:
            await socket.get_message()
        woken.append(caught.value.reason.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, server_side)
        nursery.start_soon(read, client.socket)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose(4000, "bye")
    assert woken == [4000, 4000]


async def test_a_cancelled_read_loses_no_message() -> None:
    server_side, client = memory_socket_pair()
    with trio.move_on_after(0.01):
        await client.receive()
    await server_side.send_message('{"type":"late"}')
    assert await client.receive() == {"type": "late"}
    await server_side.ping()  # answered at once while open


async def test_a_bounded_buffer_makes_the_sender_wait() -> None:
    server_side, client = memory_socket_pair(buffer=1)
    await server_side.send_message("{}")
    with trio.move_on_after(0.05) as waited:
        await server_side.send_message("{}")
    assert waited.cancelled_caught
    assert await client.receive() == {}
    with trio.fail_after(1):
        await server_side.send_message('{"type":"now"}')


@asynccontextmanager
async def room_with(
    client_ids: Sequence[str], limits: Limits = SMALL_LIMITS
) -> AsyncIterator[tuple[Room, list[FrameClient]]]:
    """A room, and a client of it over memory_socket_pair for each id, joined one by
    one, each having read the client counts up to its own."""
    async with (
        RoomManager(limits=attrs.evolve(limits, ping_interval=None)) as manager,
        trio.open_nursery() as nursery,
    ):
        room = await manager.get_or_create_room("r")
        clients: list[FrameClient] = []
        for client_id in client_ids:
            server_side, client = memory_socket_pair()
            nursery.start_soon(functools.partial(room.serve, server_side, client_id=client_id))
            clients.append(client)
            for joined in clients:
                assert await joined.receive() == {"type": "clientCount", "count": len(clients)}
        yield room, clients
        nursery.cancel_scope.cancel()


async def test_the_room_closes_a_memory_socket_with_its_code_and_reason() -> None:
    async with room_with(["a"], attrs.evolve(SMALL_LIMITS, max_invalid_frames=1)) as (_, [a]):
        await a.send_raw("not json")
        await a.send_raw("not json either")
        assert await a.closed() == (1008, "too many invalid frames")


async def test_cancelling_room_serve_closes_the_client_with_1001() -> None:
    async with RoomManager() as manager:
        room = await manager.get_or_create_room("r")
        server_side, client = memory_socket_pair()
        with trio.move_on_after(0.1):
            await room.serve(server_side, client_id="a")
        assert await client.closed() == (1001, "server shutting down")


async def test_a_client_that_hangs_up_leaves_the_room() -> None:
    async with room_with(["a", "b"]) as (room, [a, b]):
        await b.aclose()
        assert await a.receive() == {"type": "clientCount", "count": 1}
        assert room.session_count() == 1


# --- a real Room against ReferenceModel --------------------------------------------

CLIENT_IDS = ("alice", "bob", "carol")
room_frames = frames(
    "patch",
    "reconnect",
    document_patches=patch_lists(),
    ephemeral_patches=patch_lists(keys=PRESENCE_KEYS),
    last_timestamps=st.integers(0, 12),
)


def diffs_in(received: list[dict[str, Any]]) -> list[Any]:
    """The documentPatches of every patch frame received."""
    return [f["documentPatches"] for f in received if "documentPatches" in f]


@ROOM_SETTINGS
@given(
    steps=st.lists(st.tuples(st.integers(0, len(CLIENT_IDS) - 1), room_frames), max_size=12),
    since=st.integers(0, 14),
)
async def test_a_room_over_memory_sockets_agrees_with_the_reference_model(
    steps: list[tuple[int, dict[str, Any]]], since: int
) -> None:
    """Acks, broadcasts, reconnect answers, a late joiner's diff and the saved snapshot
    are what the model says, frame by frame, for several clients at once."""
    model = ReferenceModel()
    async with room_with(CLIENT_IDS) as (room, clients):
        for client in clients:
            assert await client.reconnect() == [{"type": "synced", "timestamp": 0}]
        for index, frame in steps:
            sender, sender_id = clients[index], CLIENT_IDS[index]
            document = frame.get("documentPatches") or []
            ephemeral = frame.get("ephemeralPatches") or []
            before = model.timestamp
            await sender.send_raw(encode_frame(frame))
            moved = model.apply(document)
            if frame["type"] == "reconnect":
                received = await sender.receive_until("synced")
                last = frame["lastTimestamp"]
                resync = [{"type": "resync", "since": before}] if last > before else []
                assert [f for f in received if f["type"] == "resync"] == resync
                diff = model.diff_since(last)
                assert diffs_in(received) == ([[diff]] if diff else [])
                assert received[-1] == {"type": "synced", "timestamp": model.timestamp}
            elif document or ephemeral:
                ack = {"type": "ack", "timestamp": model.timestamp}
                if frame.get("messageId") is not None:
                    ack["messageId"] = frame["messageId"]
                assert await sender.receive() == ack
            if moved or ephemeral:
                broadcast: dict[str, Any] = {"type": "patch", "clientId": sender_id}
                if moved:
                    broadcast |= {"documentPatches": document, "timestamp": model.timestamp}
                if ephemeral:
                    broadcast["ephemeralPatches"] = ephemeral
                for other in clients:
                    if other is not sender:
                        assert await other.receive() == broadcast
        for client in clients:  # and nothing else was sent to anyone
            await client.send(type="patch", messageId="end", documentPatches=[{}])
            assert await client.receive() == {
                "type": "ack", "messageId": "end", "timestamp": model.timestamp}
        assert room.get_snapshot() == model.snapshot()

        server_side, late = memory_socket_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(room.serve, server_side, client_id="dave"))
            received = await late.reconnect(since)
            diff = model.diff_since(since)
            assert diffs_in(received) == ([[diff]] if diff else [])
            assert received[-1] == {"type": "synced", "timestamp": model.timestamp}
            await late.aclose()


@ROOM_SETTINGS
@given(st.lists(hostile_frames(), min_size=1, max_size=10))
async def test_hostile_frames_are_refused_whole_or_applied_whole(texts: list[str]) -> None:
    """After each frame, the room holds what the model holds with the frames the parser
    accepted, and a refused frame is answered with an error frame and changes nothing."""
    limits = attrs.evolve(SMALL_LIMITS, max_invalid_frames=1000)
    model = ReferenceModel()
    async with room_with(["mallory"], limits) as (room, [mallory]):
        for text in texts:
            await mallory.send_raw(text)
            await mallory.send(type="patch", messageId="sentinel", documentPatches=[{}])
            received = []
            while not received or received[-1].get("messageId") != "sentinel":
                received.append(await mallory.receive())
            try:
                message = parse_client_frame(text, limits)
            except ProtocolError as exc:
                errors = [f for f in received if f["type"] == "error"]
                assert [f["code"] for f in errors] == [exc.code]
            else:
                assert all(f["type"] != "error" for f in received)
                if not isinstance(message, AuthRefreshMessage) and not (
                    isinstance(message, ReconnectMessage) and not message.version_matches
                ):
                    model.apply(message.document_patches)
            assert received[-1]["timestamp"] == model.timestamp
            assert room.get_snapshot() == model.snapshot()


# --- a real server ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["wire", "trio-websocket"])
async def test_open_server_serves_real_websockets(transport: Any) -> None:
    async with open_server(transport=transport) as server:
        assert server.url == f"ws://127.0.0.1:{server.port}"
        async with server.connect("r", "a") as a, server.connect("r", "b") as b:
            await a.reconnect()
            await b.reconnect()
            edit = [{"e/c": {"_exists": True, "x": 1}}]
            await a.send(type="patch", messageId=1, documentPatches=edit)
            *_, ack = await a.receive_until("ack")
            assert ack == {"type": "ack", "messageId": 1, "timestamp": 1}
            *_, seen = await b.receive_until("patch")
            assert seen == {"type": "patch", "clientId": "a", "documentPatches": edit,
                            "timestamp": 1}
        room = server.manager.get_existing_room("r")
        assert room is not None and room.get_snapshot().timestamp == 1


async def test_serve_in_nursery_serves_until_cancelled() -> None:
    async with RoomManager() as manager, trio.open_nursery() as nursery:
        serving = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[RunningServer]) -> None:
            with serving:
                await serve_in_nursery(manager, task_status=task_status)

        server: RunningServer = await nursery.start(serve)
        assert server.url == f"ws://127.0.0.1:{server.port}"
        assert server.manager is manager
        async with server.connect("r", "a") as a:
            await a.reconnect()
            serving.cancel()
            assert await a.closed() == (1001, "server shutting down")
        with pytest.raises(HandshakeError):
            async with server.connect("r", "b"):
                pass  # nobody listens any more


async def test_open_server_passes_authorize_on() -> None:
    def authorize(info: Any) -> None:
        raise PermissionError(f"not you, {info.client_id}")

    async with open_server(authorize=authorize) as server:
        async with server.connect("r", "eve", token="t") as eve:
            assert await eve.closed() == (1008, "not you, eve")
        assert server.connect_url("r", "a b", "t") == f"{server.url}/?roomId=r&clientId=a+b&token=t"


async def test_the_plugin_fixture_is_a_running_server_with_memory_storage(
    canvas_store_server: RunningServer, request: pytest.FixtureRequest
) -> None:
    assert request.config.pluginmanager.has_plugin("canvas_store_trio")  # by entry point
    assert canvas_store_server.url == f"ws://127.0.0.1:{canvas_store_server.port}"
    edit = [{"e/c": {"_exists": True, "x": 1}}]
    async with canvas_store_server.connect("r", "a") as a:
        await a.reconnect()
        await a.send(type="patch", messageId=1, documentPatches=edit)
        await a.receive_until("ack")
    await canvas_store_server.manager.close_room("r")  # saved to memory, and forgotten
    assert canvas_store_server.manager.room_ids() == []
    async with canvas_store_server.connect("r", "b") as b:
        assert diffs_in(await b.reconnect()) == [edit]


def test_the_plugin_is_registered_by_its_entry_point() -> None:
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert [p.value for p in plugins if p.name == "canvas_store_trio"] == [
        "canvas_store_trio.testing._pytest_plugin"
    ]


# --- without a network or hypothesis; the example ------------------------------------


def test_the_plugin_and_the_helpers_load_without_hypothesis() -> None:
    """pytest loads the plugin wherever canvas-store-trio is installed: it must not need
    the testing extra, and a strategy asked for without it names the extra."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import canvas_store_trio.testing._pytest_plugin\n"
        "from canvas_store_trio.testing import ReferenceModel, memory_socket_pair\n"
        "try:\n"
        "    from canvas_store_trio.testing import patches\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "pip install 'canvas-store-trio[testing]'" in result.stdout, result.stderr


def test_the_patch_merging_example_passes_where_a_user_copies_it(tmp_path: Path) -> None:
    """Outside this repository (no conftest, no pytest configuration): the fixture
    comes from the installed plugin alone."""
    shutil.copy(ROOT / "examples" / "test_patch_merging.py", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_patch_merging.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout


def test_the_readme_snippet_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "canvas_store_trio.testing" in b]
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_public_name_is_there() -> None:
    import canvas_store_trio.testing as testing

    assert all(getattr(testing, name) is not None for name in testing.__all__)
