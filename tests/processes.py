"""A real server process for tests: ``python -m canvas_store_trio serve`` and clients of it.

Shared by the crash tests (tests/test_crash.py, tests/test_durable_crash.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from canvas_store_trio.testing import FrameClient

from .conftest import NODE_DIR

REFERENCE_SERVER = Path(NODE_DIR) / "reference-server.mjs"


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
