"""The read poller: one task reads every parked wire socket, on real loopback TCP sockets.

The hostile-frame, limit and end-to-end suites run the whole server through the poller;
these tests pin down the hand-overs between the poller's task and a socket's own task.
"""

from __future__ import annotations

import os
import select
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed

from canvas_store_trio.transport._http import HttpRequest
from canvas_store_trio.transport._poller import ReadPoller, open_read_poller
from canvas_store_trio.transport._wire import WireSocket

from .test_hostile import mask_frame

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="the poller needs epoll")

TEXT, PING, PONG = 0x1, 0x9, 0xA


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected (server side, client side) pair of loopback TCP streams."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    assert isinstance(server, trio.SocketStream)
    async with client, server, listeners[0]:
        yield server, client


def wire_socket(stream: trio.SocketStream, poller: ReadPoller | None) -> WireSocket:
    return WireSocket(stream, HttpRequest("GET", "/", {}), max_message_size=1 << 16, poller=poller)


def text(payload: str) -> bytes:
    return mask_frame(TEXT, payload.encode())


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < size:
            data += await stream.receive_some(size - len(data))
    return data


@asynccontextmanager
async def delivering(
    ws: WireSocket, on_message: Callable[[str | bytes], None]
) -> AsyncIterator[dict[str, BaseException]]:
    """Run ``deliver_messages`` in a task; the dict gets what it raised (if anything)."""
    ended: dict[str, BaseException] = {}

    async def run() -> None:
        try:
            await ws.deliver_messages(on_message)
        except (ConnectionClosed, ValueError) as exc:
            ended["error"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield ended
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


async def test_messages_are_read_by_the_poller_task_not_the_sockets_own() -> None:
    tasks: list[str] = []
    async with open_read_poller() as poller, tcp_pair() as (server, client):
        assert poller is not None
        ws = wire_socket(server, poller)
        fd = server.socket.fileno()

        def on_message(message: str | bytes) -> None:
            tasks.append(trio.lowlevel.current_task().name)
            assert message == f"m{len(tasks) - 1}"

        async with delivering(ws, on_message):
            await until(lambda: poller.is_waiting(fd))
            # Three in one TCP write, then one more: all four, in order.
            await client.send_all(text("m0") + text("m1") + text("m2"))
            await until(lambda: len(tasks) == 3)
            await client.send_all(text("m3"))
            await until(lambda: len(tasks) == 4)
            assert poller.is_waiting(fd)
    assert all(name.endswith("ReadPoller.run") for name in tasks), tasks


async def test_a_ping_between_messages_is_answered_and_reading_goes_on() -> None:
    seen: list[str | bytes] = []
    async with open_read_poller() as poller, tcp_pair() as (server, client):
        ws = wire_socket(server, poller)
        async with delivering(ws, seen.append):
            await client.send_all(text("before") + mask_frame(PING, b"hi") + text("after"))
            assert await read_exactly(client, 4) == bytes([0x80 | PONG, 2]) + b"hi"
            await until(lambda: len(seen) == 2)
            assert seen == ["before", "after"]
            await client.send_all(text("later"))
            await until(lambda: len(seen) == 3)


async def test_a_bad_frame_closes_with_1002_after_the_good_ones_before_it() -> None:
    seen: list[str | bytes] = []
    async with open_read_poller() as poller, tcp_pair() as (server, client):
        ws = wire_socket(server, poller)
        async with delivering(ws, seen.append) as ended:
            bad = mask_frame(TEXT, b"x", masked=False)
            await client.send_all(text("good") + bad + text("never"))
            head = await read_exactly(client, 2)
            assert head[0] == 0x88  # a close frame
            close = await read_exactly(client, head[1])
            assert int.from_bytes(close[:2], "big") == 1002, close
            await client.send_eof()
            await until(lambda: "error" in ended)
        assert seen == ["good"]
        assert isinstance(ended["error"], ConnectionClosed)
        assert ended["error"].reason.code == 1002


async def test_cancelling_from_a_handler_stops_delivery_at_once() -> None:
    """A session closed by the frame it is handling gets nothing more; the rest stays buffered."""
    seen: list[str | bytes] = []
    async with open_read_poller() as poller, tcp_pair() as (server, client):
        ws = wire_socket(server, poller)
        fd = server.socket.fileno()
        with trio.CancelScope() as scope:

            def on_message(message: str | bytes) -> None:
                seen.append(message)
                if message == "stop":
                    scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, text("a") + text("stop") + text("b"))
                await ws.deliver_messages(on_message)
        assert scope.cancelled_caught
        assert seen == ["a", "stop"]
        assert not poller.is_waiting(fd)
        # The unread message is still there for whoever reads next.
        assert await ws.get_message() == "b"


async def test_an_error_in_a_handler_is_raised_in_the_sockets_task_only() -> None:
    async with (
        open_read_poller() as poller,
        tcp_pair() as (server_a, client_a),
        tcp_pair() as (server_b, client_b),
    ):
        a, b = wire_socket(server_a, poller), wire_socket(server_b, poller)
        seen_b: list[str | bytes] = []

        def explode(message: str | bytes) -> None:
            raise ValueError(f"bad {message!r}")

        async with delivering(a, explode) as ended_a, delivering(b, seen_b.append):
            await client_a.send_all(text("boom"))
            await until(lambda: "error" in ended_a)
            assert str(ended_a["error"]) == "bad 'boom'"
            await client_b.send_all(text("still here"))
            await until(lambda: seen_b == ["still here"])


async def test_the_peer_hanging_up_ends_delivery_with_1006() -> None:
    async with open_read_poller() as poller, tcp_pair() as (server, client):
        ws = wire_socket(server, poller)
        async with delivering(ws, lambda message: None) as ended:
            await client.aclose()
            await until(lambda: "error" in ended)
        assert isinstance(ended["error"], ConnectionClosed)
        assert ended["error"].reason.code == 1006


async def test_sockets_still_waiting_when_the_poller_stops_read_in_their_own_task() -> None:
    seen: list[str | bytes] = []
    async with tcp_pair() as (server, client), trio.open_nursery() as nursery:
        async with open_read_poller() as poller:
            assert poller is not None
            ws = wire_socket(server, poller)
            nursery.start_soon(ws.deliver_messages, seen.append)
            await client.send_all(text("through the poller"))
            await until(lambda: len(seen) == 1)
        await client.send_all(text("after it stopped"))
        await until(lambda: len(seen) == 2)
        assert seen == ["through the poller", "after it stopped"]
        nursery.cancel_scope.cancel()


async def test_after_messages_runs_once_per_socket_after_the_whole_batch() -> None:
    """Frames read in one batch are all handled before any socket's after-batch call."""
    events: list[str] = []
    async with (
        open_read_poller() as poller,
        tcp_pair() as (server_a, client_a),
        tcp_pair() as (server_b, client_b),
    ):
        assert poller is not None
        a, b = wire_socket(server_a, poller), wire_socket(server_b, poller)
        async with trio.open_nursery() as nursery:
            for name, ws in (("a", a), ("b", b)):
                nursery.start_soon(
                    ws.deliver_messages,
                    lambda message, name=name: events.append(f"{name}:{message}"),
                    lambda name=name: events.append(f"{name} after"),
                )
            await until(lambda: poller.is_waiting(server_a.socket.fileno()))
            await until(lambda: poller.is_waiting(server_b.socket.fileno()))
            assert sorted(events) == ["a after", "b after"]  # each before its first wait
            events.clear()
            # Written without a checkpoint, so both are ready when the poller next wakes.
            os.write(client_a.socket.fileno(), text("1") + text("2"))
            os.write(client_b.socket.fileno(), text("3"))
            await until(lambda: len(events) == 5)
            nursery.cancel_scope.cancel()
    messages, afters = events[:3], events[3:]
    assert sorted(messages) == ["a:1", "a:2", "b:3"]
    assert sorted(afters) == ["a after", "b after"]


async def test_frames_waiting_before_the_first_wait_are_handled_in_the_task() -> None:
    """What arrived before ``deliver_messages`` began is read in its own task, and one
    ``after_messages`` call follows them, before it parks in the poller."""
    events: list[str] = []
    tasks: set[trio.lowlevel.Task] = set()

    def on_message(message: str | bytes) -> None:
        events.append(str(message))
        tasks.add(trio.lowlevel.current_task())

    async with open_read_poller() as poller, tcp_pair() as (server, client):
        assert poller is not None
        ws = wire_socket(server, poller)
        os.write(client.socket.fileno(), text("1") + text("2"))
        await until(lambda: select.select([server.socket], [], [], 0)[0] != [])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.deliver_messages, on_message, lambda: events.append("after"))
            await until(lambda: poller.is_waiting(server.socket.fileno()))
            assert tasks == set(nursery.child_tasks)  # not the poller's task
            nursery.cancel_scope.cancel()
    assert events == ["1", "after", "2", "after", "after"]
