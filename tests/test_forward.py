"""HandshakeRequest.forward on both transports: a front server splices to a back one.

Real loopback sockets: the client speaks WebSocket to the front, whose handler forwards
every upgrade to the back (an echo server that records what it was sent). Nothing is
parsed on the way, so the back sees the client's own request plus the added headers,
and the client sees the back's own answers, closes included.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from canvas_store_trio import HandshakeRequest
from canvas_store_trio.transport import _forward
from canvas_store_trio.transport._forward import ForwardingError, split_address, with_headers
from canvas_store_trio.transport._listener import TRANSPORTS

from .test_handshake import Server, server


@asynccontextmanager
async def front_and_back(transport: str, back_address: str | None = None
                         ) -> AsyncIterator[tuple[Server, Server, list[BaseException]]]:
    """A front server on ``transport`` forwarding to an echo server (the back, on the
    wire transport), or to ``back_address``. A failed forward is recorded, then the
    front refuses the upgrade with a 503."""
    failures: list[BaseException] = []
    async with server("wire") as back, server(transport) as front:
        address = back_address or f"127.0.0.1:{back.port}"

        async def forward(request: HandshakeRequest) -> None:
            try:
                await request.forward(address, {"X-Canvas-Store-Forwarded": "front"})
            except ForwardingError as exc:
                failures.append(exc)
                await request.reject(503, b"no owner\n")

        front.answer = forward
        yield front, back, failures


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_forwarded_connection_is_the_back_servers(transport: str) -> None:
    async with front_and_back(transport) as (front, back, failures):
        url = f"ws://127.0.0.1:{front.port}/?roomId=r&clientId=c"
        big = os.urandom(300_000)  # many chunks each way: the splice keeps them in order
        async with open_websocket_url(url, max_message_size=1 << 20) as ws:
            for message in ("hello", big, "bye"):
                await ws.send_message(message)
                assert await ws.get_message() == message
        assert back.messages == ["hello", big, "bye"]
        [request] = back.requests
        assert request.path == "/?roomId=r&clientId=c"
        assert request.headers["x-canvas-store-forwarded"] == "front"
        assert not failures


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_that_reads_late_gets_everything_in_order(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends 6 MB and reads nothing for a while: the socket buffers fill,
    the splice's writes come up short and wait (backpressure, in both directions), and
    once the client reads, every byte arrives, in order."""
    short_writes = 0
    write_all = _forward._write_all

    async def counting_write_all(target: int, data: bytes) -> None:
        nonlocal short_writes
        short_writes += 1
        await write_all(target, data)

    monkeypatch.setattr(_forward, "_write_all", counting_write_all)
    messages = [bytes([n]) * 300_000 for n in range(20)]
    async with front_and_back(transport) as (front, back, failures):
        url = f"ws://127.0.0.1:{front.port}/?roomId=r&clientId=c"
        async with open_websocket_url(url, max_message_size=1 << 20) as ws, \
                trio.open_nursery() as nursery:

            async def send_all() -> None:
                for message in messages:
                    await ws.send_message(message)

            nursery.start_soon(send_all)
            await trio.sleep(0.5)  # nobody reads: every buffer on the way fills
            with trio.fail_after(10):
                assert [await ws.get_message() for _ in messages] == messages
        assert back.messages == messages and not failures
    if transport == "wire":  # the poller's copies came up short and left the rest
        assert short_writes > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_back_servers_close_reaches_the_client(transport: str) -> None:
    async with front_and_back(transport) as (front, back, _):

        async def close_at_once(request: HandshakeRequest) -> None:
            ws = await request.accept()
            await ws.aclose(4321, "from the back")

        back.answer = close_at_once
        url = f"ws://127.0.0.1:{front.port}/?roomId=r&clientId=c"
        with trio.fail_after(5):
            async with open_websocket_url(url) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert closed.value.reason.code == 4321
        assert closed.value.reason.reason == "from the back"


async def test_an_unreachable_owner_leaves_the_request_unanswered() -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with front_and_back("wire", f"127.0.0.1:{port}") as (front, _, failures):
        answer = await raw_upgrade(front.port)
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"no owner\n")
        [failure] = failures
        assert f"127.0.0.1:{port}" in str(failure)


async def test_an_owner_that_accepts_but_never_answers_is_given_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_forward, "FORWARD_TIMEOUT", 0.3)
    # A listener that never accepts: the kernel completes the TCP handshake for it, as it
    # does for a paused (SIGSTOPped) process.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        async with front_and_back("wire", f"127.0.0.1:{port}") as (front, _, failures):
            started = trio.current_time()
            answer = await raw_upgrade(front.port)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert 0.3 <= trio.current_time() - started < 2.0
            assert "did not answer in time" in str(failures[0])
    finally:
        for listener in listeners:
            await listener.aclose()


async def raw_upgrade(port: int) -> bytes:
    """Send an upgrade request and read the answer to the end."""
    key = base64.b64encode(os.urandom(16)).decode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /?roomId=r&clientId=c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                answer += chunk
        return answer


def test_headers_are_added_before_the_blank_line() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert with_headers(head, {"A": "1", "B": "2"}) == (
        b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\n\r\n")
    with pytest.raises(ValueError, match="line break"):
        with_headers(head, {"A": "1\r\nInjected: yes"})


@pytest.mark.parametrize(("address", "parsed"), [
    ("10.0.0.2:8087", ("10.0.0.2", 8087)),
    ("node-b.internal:1", ("node-b.internal", 1)),
    ("[::1]:8087", ("::1", 8087)),
])
def test_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert split_address(address) == parsed


@pytest.mark.parametrize("address", ["nohost", ":8087", "host:", "host:http", "host:70000"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_address(address)
