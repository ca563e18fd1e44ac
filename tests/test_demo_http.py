"""Plain HTTP on the wire transport (the demo page, health answers) beside the WebSocket.

Uses a small stand-in for the built page, so neither Node nor a build is needed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio.cli._demo_page import DemoNotBuiltError, demo_http_handler, page_url
from canvas_store_trio.transport import _handshake, _http
from canvas_store_trio.transport._listener import serve_websockets

from .test_handshake import parse_response
from .test_hostile import wait_eof


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    folder = tmp_path / "_demo"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>demo</title>")
    (folder / "app.js").write_text("console.log('hi')")
    (folder / ".hidden").write_text("secret")
    (tmp_path / "outside.txt").write_text("secret")
    return folder


async def echo(request: Any) -> None:
    """A WebSocket handler: reports its path, then echoes one message."""
    ws = await request.accept()
    await ws.send_message(f"path={request.path}")
    await ws.send_message(await ws.get_message())


async def start(nursery: trio.Nursery, assets: Path) -> str:
    listeners = await nursery.start(
        functools.partial(
            serve_websockets,
            echo,
            "127.0.0.1",
            0,
            max_message_size=1 << 16,
            http_handler=demo_http_handler(assets),
        )
    )
    url: str = page_url(listeners[0])
    return url


async def http(url: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the server, read until it closes, parse the response."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        return parse_response(await wait_eof(stream))


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".encode()


async def test_page_files_and_websocket_share_the_port(assets: Path) -> None:
    async with trio.open_nursery() as nursery:
        url = await start(nursery, assets)

        status, headers, body = await http(url, get("/?room=abc"))
        assert (status, body) == (200, b"<!doctype html><title>demo</title>")
        assert headers["content-type"] == "text/html; charset=utf-8"
        status, headers, body = await http(url, get("/app.js"))
        assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
        assert headers["content-length"] == str(len(body))
        status, headers, body = await http(url, get("/app.js", "HEAD"))
        assert (status, body) == (200, b"")
        assert headers["content-length"] == str(len("console.log('hi')"))
        for path in ("/nope", "/.hidden", "/../outside.txt", "/%2e%2e/outside.txt", "//etc/passwd"):
            assert (await http(url, get(path)))[0] == 404, path
        assert (await http(url, get("/", "POST")))[0] == 405

        ws_url = url.replace("http://", "ws://") + "?roomId=r&clientId=c"
        async with open_websocket_url(ws_url) as ws:
            assert await ws.get_message() == "path=/?roomId=r&clientId=c"
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
        nursery.cancel_scope.cancel()


async def test_request_head_edge_cases(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_handshake, "HANDSHAKE_TIMEOUT", 0.2)
    async with trio.open_nursery() as nursery:
        url = await start(nursery, assets)
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)

        # A head that arrives in pieces is waited for.
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            for piece in (b"GET /app", b".js HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
                await stream.send_all(piece)
                await trio.sleep(0.05)
            response = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    response += chunk
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(b"console.log('hi')")

        assert (await http(url, b"\x16\x03\x01 not http\r\n\r\n"))[0] == 400
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * _http.MAX_HEAD_SIZE + b"\r\n\r\n"
        assert (await http(url, big))[0] == 431

        # A client that never sends a head is closed after HANDSHAKE_TIMEOUT.
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""

        # The server is still fine.
        assert (await http(url, get("/")))[0] == 200
        nursery.cancel_scope.cancel()


async def test_missing_build_is_reported_before_listening(tmp_path: Path) -> None:
    with pytest.raises(DemoNotBuiltError, match=r"node demo/build\.mjs"):
        demo_http_handler(tmp_path)


async def test_without_the_demo_plain_http_gets_a_health_answer(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(
        functools.partial(serve_websockets, echo, "127.0.0.1", 0, max_message_size=1 << 16))
    url = page_url(listeners[0])
    assert await http(url, get("/")) == (200, {
        "content-type": "text/plain; charset=utf-8", "content-length": "2",
        "cache-control": "no-cache", "connection": "close"}, b"ok")
