"""The opening handshake on both transports: one request type, and RFC 6455 4.2.1's refusals.

Every test speaks raw HTTP over a loopback socket, so a request can be wrong on purpose,
and checks both what the client is answered and that the handler never saw a refused
upgrade.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio import HandshakeRequest
from canvas_store_trio.transport._handshake import accept_token
from canvas_store_trio.transport._http import read_request, send_all_soon
from canvas_store_trio.transport._listener import TRANSPORTS, serve_websockets

from .test_hostile import mask_frame, wait_eof

KEY = base64.b64encode(os.urandom(16)).decode()


class Server:
    """A listener whose handler records each request and does what ``answer`` says."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[HandshakeRequest] = []
        self.messages: list[str | bytes] = []
        self.answer: Any = None

    async def handle(self, request: HandshakeRequest) -> None:
        self.requests.append(request)
        if self.answer is not None:
            await self.answer(request)
            return
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                self.messages.append(message)
                await ws.send_message(message)
        except ConnectionClosed:
            pass


@asynccontextmanager
async def server(transport: str) -> AsyncIterator[Server]:
    s = Server()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_websockets(
                s.handle, "127.0.0.1", 0, max_message_size=1 << 20,
                transport=transport,  # type: ignore[arg-type]
                task_status=task_status,
            )
        )
        s.port = listeners[0].socket.getsockname()[1]
        yield s
        nursery.cancel_scope.cancel()


def upgrade(
    *,
    method: str = "GET",
    target: str = "/?roomId=r&clientId=c",
    version: str = "HTTP/1.1",
    key: str = KEY,
    ws_version: str = "13",
    connection: str = "Upgrade",
    extra: str = "",
) -> bytes:
    return (
        f"{method} {target} {version}\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: {connection}\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {ws_version}\r\n{extra}\r\n"
    ).encode()


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """A whole HTTP response: status, headers (lower-case names), body."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        return parse_response(await wait_eof(stream))


# --- RFC 6455 4.2.1: what the wire transport refuses before any handler runs ----------

REFUSED = {
    "key not base64": (upgrade(key="not base64!!"), 400, {}),
    "key of 15 bytes": (upgrade(key=base64.b64encode(b"x" * 15).decode()), 400, {}),
    "key of 17 bytes": (upgrade(key=base64.b64encode(b"x" * 17).decode()), 400, {}),
    "no key": (upgrade(key=""), 400, {}),
    "POST": (upgrade(method="POST"), 405, {"allow": "GET"}),
    "PUT": (upgrade(method="PUT"), 405, {"allow": "GET"}),
    "version 8": (upgrade(ws_version="8"), 426, {"sec-websocket-version": "13"}),
    "no version": (upgrade(ws_version=""), 426, {"sec-websocket-version": "13"}),
    "HTTP/1.0": (upgrade(version="HTTP/1.0"), 400, {}),
    "no Connection: Upgrade": (upgrade(connection="keep-alive"), 400, {}),
    "no Host": (upgrade().replace(b"Host: 127.0.0.1\r\n", b""), 400, {}),
    "space before a colon": (upgrade(extra="X-Bad : 1\r\n"), 400, {}),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_an_upgrade_rfc_6455_refuses_is_answered_and_never_reaches_the_handler(
    case: str,
) -> None:
    raw, status, headers = REFUSED[case]
    async with server("wire") as s:
        got, got_headers, _ = await exchange(s.port, raw)
        assert got == status
        for name, value in headers.items():
            assert got_headers[name] == value
        assert got_headers["connection"] == "close"
        assert s.requests == []


async def test_a_token_in_the_connection_list_counts_and_the_accept_token_is_rfcs() -> None:
    # RFC 6455 1.3's worked example.
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    async with server("wire") as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        async with stream:
            await stream.send_all(upgrade(connection="keep-alive, Upgrade"))
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
            status, headers, _ = parse_response(data)
        assert status == 101
        assert headers["sec-websocket-accept"] == accept_token(KEY)


# --- one request type on both transports ---------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_both_transports_hand_the_same_request_type(transport: str) -> None:
    async with server(transport) as s:
        url = f"ws://127.0.0.1:{s.port}/?roomId=r&clientId=c"
        async with open_websocket_url(
            url, subprotocols=["one", "two"], extra_headers=[(b"X-Thing", b"a"), (b"X-Thing", b"b")]
        ) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
        (request,) = s.requests
        assert isinstance(request, HandshakeRequest)
        assert request.path == "/?roomId=r&clientId=c"
        assert request.headers["x-thing"] == "a, b"
        assert request.headers["upgrade"].lower() == "websocket"
        assert request.subprotocols == ("one", "two")
        assert request.remote is not None
        host, port = request.remote
        assert host == "127.0.0.1" and isinstance(port, int) and port > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_accept_with_a_subprotocol_names_it_in_the_101(transport: str) -> None:
    async with server(transport) as s:

        async def accept_two(request: HandshakeRequest) -> None:
            with pytest.raises(ValueError, match="not offered"):
                await request.accept(subprotocol="three")
            ws = await request.accept(subprotocol="two")
            await ws.aclose()

        s.answer = accept_two
        url = f"ws://127.0.0.1:{s.port}/"
        async with open_websocket_url(url, subprotocols=["one", "two"]) as ws:
            assert ws.subprotocol == "two"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reject_answers_http_with_the_status_and_body(transport: str) -> None:
    async with server(transport) as s:
        errors: list[Exception] = []
        done = trio.Event()

        async def refuse(request: HandshakeRequest) -> None:
            with pytest.raises(ValueError, match="400-599"):
                await request.reject(302)
            await request.reject(403, "no entry\n")
            try:
                await request.accept()
            except RuntimeError as exc:
                errors.append(exc)
            done.set()

        s.answer = refuse
        status, headers, body = await exchange(s.port, upgrade())
        assert status == 403
        assert body == b"no entry\n"
        assert headers["content-type"].startswith("text/plain")
        with trio.fail_after(5):
            await done.wait()
        assert [str(e) for e in errors] == ["this handshake was already answered"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_frames_in_the_handshakes_tcp_segment_are_not_lost(transport: str) -> None:
    async with server(transport) as s:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        async with stream:
            await stream.send_all(
                upgrade() + mask_frame(0x1, b"first") + mask_frame(0x1, b"second")
            )
            data = b""
            with trio.fail_after(5):
                while data.count(b"second") < 1:
                    data += await stream.receive_some(4096)
        assert s.messages == ["first", "second"]



async def test_a_head_already_in_is_read_and_answered_without_a_schedule_point() -> None:
    # Each schedule point makes a join of a burst wait behind every other task of it.
    ours, theirs = trio.socket.socketpair()
    server, client = trio.SocketStream(ours), trio.SocketStream(theirs)
    await client.send_all(upgrade() + b"early")
    with trio.testing.assert_no_checkpoints():
        read = await read_request(server)
        await send_all_soon(server, b"answer")
    assert read is not None and read[0].method == "GET" and read[2] == b"early"
    assert await client.receive_some(100) == b"answer"
    await server.aclose()
    await client.aclose()
