"""Real processes for tests: ``python -m canvas_store_trio serve``, clients of it, and
the real npm client driven line by line (tests/node/npm_peer.mjs).

Shared by the crash, client and cluster tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio.testing import FrameClient

from .conftest import NODE_DIR, node_modules

REFERENCE_SERVER = Path(NODE_DIR) / "reference-server.mjs"
NPM_PEER = Path(__file__).parent / "node" / "npm_peer.mjs"


class Server:
    def __init__(self, process: trio.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log = bytearray()

    def url(self, room: str, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/?roomId={room}&clientId={client_id}"


@asynccontextmanager
async def server_process(*options: str, port: int = 0, node: bool = False
                         ) -> AsyncIterator[Server]:
    """``python -m canvas_store_trio serve --port PORT *options``; killed on the way out.

    ``options`` name the storage (``--data-dir DIR``, ``--storage URL``) and anything
    else. Port 0 picks a free one; ``server.port`` is the one it listens on. The server's
    log (stderr) is kept in ``server.log``. ``node=True`` runs the Node reference server
    (node/reference-server.mjs, which takes the same options) instead.
    """
    command = (["node", str(REFERENCE_SERVER)] if node
               else [sys.executable, "-m", "canvas_store_trio", "serve"])
    process = await trio.lowlevel.open_process(  # Node logs on stdout
        [*command, "--port", str(port), *options], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if node else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if node else subprocess.PIPE)
    output = process.stdout if node else process.stderr
    assert output is not None
    try:
        async with trio.open_nursery() as nursery:
            log = bytearray()
            with trio.fail_after(15):
                while (found := re.search(rb"Listening on ws://[\d.]+:(\d+)", log)) is None:
                    chunk = await output.receive_some(65536)
                    assert chunk, f"the server exited: {log.decode(errors='replace')}"
                    log += chunk
            server = Server(process, int(found.group(1)))
            server.log = log

            read_all = trio.Event()

            async def keep_reading() -> None:  # never let the pipe fill up
                while chunk := await output.receive_some(65536):
                    server.log += chunk
                read_all.set()

            nursery.start_soon(keep_reading)
            yield server
            if process.returncode is not None:  # it exited: read its last words
                with trio.move_on_after(5):
                    await read_all.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def client(server: Server, room: str, client_id: str) -> AsyncIterator[FrameClient]:
    """A raw protocol client of ``server`` (real loopback socket, trio-websocket)."""
    async with open_websocket_url(server.url(room, client_id), max_message_size=2**30,
                                  receive_buffer_size=1 << 20) as ws:
        yield FrameClient(ws)


class NpmPeer:
    """tests/node/npm_peer.mjs: the real WebsocketAdapter, driven line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.pending = b""

    async def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(orjson.dumps(command) + b"\n")

    async def report(self) -> dict[str, Any]:
        await self.send(report=True)
        assert self.process.stdout is not None
        while b"\n" not in self.pending:
            chunk = await self.process.stdout.receive_some()
            assert chunk, "npm_peer.mjs exited"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        report: dict[str, Any] = json.loads(line)
        return report


@asynccontextmanager
async def npm_peer(url: str, room: str, client_id: str) -> AsyncIterator[NpmPeer]:
    process = await trio.lowlevel.open_process(
        ["node", str(NPM_PEER), "--url", url, "--room", room, "--client", client_id,
         "--node-modules", node_modules()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield NpmPeer(process)
        assert process.stdin is not None
        await process.stdin.aclose()
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()




async def npm_until(npm: NpmPeer, condition: Callable[[dict[str, Any]], bool],
                    timeout: float = 10.0, also: Callable[[], str] = str) -> dict[str, Any]:
    """The npm client's first report that meets ``condition``."""
    with trio.move_on_after(timeout):
        while not condition(report := await npm.report()):
            await trio.sleep(0.02)
        return report
    raise AssertionError(f"the npm client never got there; its last report: {report}; {also()}")
