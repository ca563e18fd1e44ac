"""Real processes for tests: ``python -m canvas_store_trio serve``, raw clients of it, and
the real npm clients: editors (tests/node/durable_editor.mjs) editing through it, and a
peer driven line by line (tests/node/npm_peer.mjs).

Shared by the crash, client and cluster tests.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio.testing import FrameClient

from .conftest import NODE_DIR, frames_of, node_modules

REFERENCE_SERVER = Path(NODE_DIR) / "reference-server.mjs"
EDITOR_SCRIPT = Path(__file__).resolve().parent / "node" / "durable_editor.mjs"
NPM_PEER = Path(__file__).resolve().parent / "node" / "npm_peer.mjs"


class Server:
    def __init__(self, process: trio.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log = bytearray()

    def url(self, room: str, client_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/?roomId={room}&clientId={client_id}"

    @property
    def address(self) -> str:
        """HOST:PORT, as a cluster node advertises itself and the npm editors name it."""
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The URL the npm client is given (it adds the room and client id)."""
        return f"ws://127.0.0.1:{self.port}/"


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


def cluster_options(url: str, node_id: str, ttl: float) -> tuple[str, ...]:
    """``serve`` options for node ``node_id`` of the cluster in the database ``url``."""
    return ("--storage", url, "--cluster", "--node-id", node_id, "--lease-ttl", str(ttl))


@asynccontextmanager
async def cluster_nodes(url: str, count: int, ttl: float) -> AsyncIterator[list[Server]]:
    """``count`` nodes, ``n0``, ``n1``, ..., of the cluster in ``url``; killed on the way out."""
    async with AsyncExitStack() as stack:
        servers = []
        for n in range(count):
            servers.append(await stack.enter_async_context(
                server_process(*cluster_options(url, f"n{n}", ttl))))
        yield servers


@asynccontextmanager
async def client(server: Server, room: str, client_id: str) -> AsyncIterator[FrameClient]:
    """A raw protocol client of ``server`` (real loopback socket, trio-websocket)."""
    async with open_websocket_url(server.url(room, client_id), max_message_size=2**30,
                                  receive_buffer_size=1 << 20) as ws:
        yield FrameClient(ws)


# --- the npm clients (tests/node/durable_editor.mjs) -------------------------------------


@attrs.frozen
class Ack:
    """One ack an editor got: which room, at what room timestamp, from which server."""

    room: str
    client: str
    server: str
    timestamp: int
    at: float
    """Trio time the test read it."""


@attrs.define
class EditorLog:
    """What the node editors reported, folded as it arrives."""

    acked: dict[str, dict[str, int]] = attrs.Factory(lambda: defaultdict(dict))
    """room -> key -> the highest value an ack covered"""
    top_ack: dict[str, int] = attrs.Factory(lambda: defaultdict(int))
    """room -> the highest ack timestamp"""
    acks: int = 0
    ack_list: list[Ack] = attrs.Factory(list)
    synced: dict[str, list[int]] = attrs.Factory(lambda: defaultdict(list))
    """client -> the timestamp of each ``synced`` it got, one per connection"""
    synced_on: dict[str, list[str]] = attrs.Factory(lambda: defaultdict(list))
    """client -> the server of each ``synced`` it got"""
    closed: dict[str, int] = attrs.Factory(lambda: defaultdict(int))
    close_codes: list[tuple[str, int]] = attrs.Factory(list)
    closes: list[tuple[float, str, str, int]] = attrs.Factory(list)
    """(trio time, client, server, code) of every close"""
    resyncs: list[dict[str, Any]] = attrs.Factory(list)
    reconnects: list[dict[str, Any]] = attrs.Factory(list)
    """Every ``reconnect`` frame the editors sent, with the values it carried."""
    still_in_flight: list[dict[str, Any]] = attrs.Factory(list)
    states: dict[str, tuple[str, dict[str, Any]]] = attrs.Factory(dict)
    """client -> (room, its adapter's document), once the editors have settled"""
    settled: bool = False
    serving: dict[str, str | None] = attrs.Factory(dict)
    """client -> the server it is synced with now (None between connections)"""
    errors: list[str] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    def take(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        now = trio.current_time()
        if kind == "ack":
            self.acks += 1
            room = event["room"]
            mine = self.acked[room]
            for key, value in event["values"].items():
                mine[key] = max(mine.get(key, value), value)
            self.top_ack[room] = max(self.top_ack[room], event["timestamp"])
            self.ack_list.append(Ack(room, event["client"], event["server"],
                                     event["timestamp"], now))
            if event["inFlight"]:
                self.still_in_flight.append(event)
        elif kind == "synced":
            self.synced[event["client"]].append(event["timestamp"])
            self.synced_on[event["client"]].append(event["server"])
            self.serving[event["client"]] = event["server"]
        elif kind == "closed":
            self.closed[event["client"]] += 1
            self.close_codes.append((event["client"], event["code"]))
            self.closes.append((now, event["client"], event["server"], event["code"]))
            self.serving[event["client"]] = None
        elif kind == "resync":
            self.resyncs.append(event)
        elif kind == "reconnect":
            self.reconnects.append(event)
        elif kind == "state":
            self.states[event["client"]] = (event["room"], event["state"])
        elif kind == "settled":
            self.settled = True
        elif kind == "error":
            self.errors.append(event["message"])
        self.changed.set()
        self.changed = trio.Event()

    def all_synced(self, clients: list[str], times: int) -> bool:
        return all(len(self.synced[c]) >= times for c in clients)

    def all_closed_since(self, before: dict[str, int]) -> bool:
        """Whether every client's socket closed since ``closed`` was ``before``."""
        return all(self.closed[c] > n for c, n in before.items())

    def acks_since(self, moment: float, room: str | None = None, server: str | None = None
                   ) -> list[Ack]:
        return [a for a in self.ack_list if a.at >= moment
                and (room is None or a.room == room) and (server is None or a.server == server)]

    async def wait_for(self, what: str, condition: Any, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not condition():
                assert not self.errors, self.errors
                await self.changed.wait()
            return
        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self.summary()}")

    def summary(self) -> str:
        return (f"{self.acks} acks, synced {dict(self.synced)}, closed {dict(self.closed)}, "
                f"errors {self.errors}")


class Editors:
    """The running tests/node/durable_editor.mjs: its :class:`EditorLog` and its stdin."""

    def __init__(self, process: trio.Process, log: EditorLog) -> None:
        self.process = process
        self.log = log

    async def command(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def point(self, room: str, server: Server) -> None:
        """From their next (re)connect on, ``room``'s clients go to ``server``."""
        await self.command(f"url {room} ws://127.0.0.1:{server.port}/")

    async def settle(self, timeout: float) -> dict[str, tuple[str, dict[str, Any]]]:
        """Stop editing; once every edit is acked and the frames have stopped, each
        client's view of its room's document (client -> (room, document))."""
        await self.command("settle")
        await self.log.wait_for("the editors to settle", lambda: self.log.settled, timeout)
        return self.log.states


@asynccontextmanager
async def editor_processes(urls: list[str], rooms: list[str], clients: int, modules: str
                           ) -> AsyncIterator[Editors]:
    """tests/node/durable_editor.mjs: ``clients`` npm clients per room, editing at once,
    loading the npm packages from the folder ``modules``; client i of the j-th room
    connects to ``urls[(i + j) % len(urls)]``.

    On the way out it is told to stop, and must exit 0.
    """
    process = await trio.lowlevel.open_process(
        ["node", str(EDITOR_SCRIPT), *(f"--url={url}" for url in urls),
         "--clients", str(clients), "--node-modules", modules,
         *(f"--room={room}" for room in rooms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    log = EditorLog()
    stderr = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def read_events() -> None:
                assert process.stdout is not None
                pending = b""
                while chunk := await process.stdout.receive_some(65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        log.take(orjson.loads(line))

            async def read_stderr() -> None:
                assert process.stderr is not None
                while chunk := await process.stderr.receive_some(65536):
                    stderr.extend(chunk)

            nursery.start_soon(read_events)
            nursery.start_soon(read_stderr)
            yield Editors(process, log)
            with trio.fail_after(10):
                await process.stdin.send_all(b"stop\n")
                await process.stdin.aclose()
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    assert process.returncode == 0, (process.returncode, log.errors, stderr.decode()[-3000:])
    assert not log.errors, log.errors


@asynccontextmanager
async def editors(url: str, rooms: list[str], clients: int, modules: str
                  ) -> AsyncIterator[EditorLog]:
    """:func:`editor_processes` on one server: what it reported."""
    async with editor_processes([url], rooms, clients, modules) as running:
        yield running.log


def lost_edits(acked: dict[str, int], state: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """The acked keys whose stored value is older than the last acked one (key -> both).

    Each key has one writer, whose values only grow: last writer wins, so a value at
    least as new as the last acked one is right.
    """
    lost = {}
    for key, value in acked.items():
        record = state.get(key, {})
        stored = record.get("v") if record.get("_exists", True) else None
        if not (isinstance(stored, int) and stored >= value):
            lost[key] = (value, stored)
    return lost


async def read_room(server: Server, room: str) -> tuple[dict[str, Any], int]:
    """The room as a fresh raw client gets it: (the diff since 0, the synced timestamp)."""
    async with client(server, room, f"reader-{random.randrange(10**9)}") as reader:
        frames = await reader.reconnect()
    diff: dict[str, Any] = {}
    for patch in frames_of(frames, "patch"):  # presence comes too; only one has the diff
        for document_patch in patch.get("documentPatches", ()):
            diff.update(document_patch)
    return diff, frames[-1]["timestamp"]


# --- one npm client driven line by line (tests/node/npm_peer.mjs) -----------------------


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
    report = None  # none at all while the client is still connecting (it reads no stdin)
    with trio.move_on_after(timeout):
        while not condition(report := await npm.report()):
            await trio.sleep(0.02)
        return report
    raise AssertionError(f"the npm client never got there; its last report: {report}; {also()}")
