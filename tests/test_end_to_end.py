"""The CLI server over real loopback sockets: every frame type, in the documented order.

Each test runs once per transport: our wire transport and trio-websocket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from canvas_store_trio.cli._main import build_parser, serve
from canvas_store_trio.testing import FrameClient


@pytest.fixture(params=["wire", "trio-websocket"])
async def url(
    nursery: trio.Nursery, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    args = build_parser().parse_args(
        ["serve", "--port", "0", "--data-dir", str(tmp_path), "--save-throttle", "0.05",
         "--transport", request.param])
    port = await nursery.start(serve, args)
    yield f"ws://127.0.0.1:{port}"


@asynccontextmanager
async def client(url: str, query: str) -> AsyncIterator[FrameClient]:
    async with open_websocket_url(f"{url}/?{query}", max_message_size=2**30) as ws:
        yield FrameClient(ws)


def create(key: str, **fields: Any) -> dict[str, Any]:
    return {key: {"_exists": True, **fields}}


async def test_every_frame_in_order(url: str) -> None:
    async with client(url, "roomId=r&clientId=a") as a:
        assert await a.reconnect() == [
            {"type": "clientCount", "count": 1},
            {"type": "synced", "timestamp": 0},
        ]
        await a.send(type="patch", messageId="a1", ephemeralPatches=[create("cursor/a", x=1)])
        assert await a.receive() == {"type": "ack", "messageId": "a1", "timestamp": 0}

        async with client(url, "roomId=r&clientId=b") as b:
            # The newcomer gets others' presence first, then everyone gets the count.
            assert await b.receive() == {
                "type": "patch", "ephemeralPatches": [create("cursor/a", x=1)], "clientId": ""}
            assert await b.receive() == {"type": "clientCount", "count": 2}
            assert await a.receive() == {"type": "clientCount", "count": 2}

            offline = [create("e1/pos", x=1)]
            assert await b.reconnect(documentPatches=offline) == [
                {"type": "patch", "clientId": "", "documentPatches": offline, "timestamp": 1,
                 "ephemeralPatches": [create("cursor/a", x=1)]},
                {"type": "synced", "timestamp": 1},
            ]
            assert await a.receive() == {
                "type": "patch", "clientId": "b", "documentPatches": offline, "timestamp": 1}

            delta = {"__buf": 1, "len": 3, "runs": [[1, [7, 8]]]}
            doc = [{"e1/pos": {"y": 2, "pts": delta}}]
            presence = [create("cursor/b", x=2)]
            await a.send(type="patch", messageId="a2", documentPatches=doc,
                         ephemeralPatches=presence)
            assert await a.receive() == {"type": "ack", "messageId": "a2", "timestamp": 2}
            assert await b.receive() == {"type": "patch", "clientId": "a",
                                         "documentPatches": doc, "timestamp": 2,
                                         "ephemeralPatches": presence}

            await b.send(type="patch", messageId="b1", documentPatches=[],
                         ephemeralPatches=[])
            await b.send(type="patch", messageId="b2", documentPatches=[{"e1/pos": {"z": 0}}])
            assert await b.receive() == {"type": "ack", "messageId": "b2", "timestamp": 3}

            await b.send(type="reconnect", lastTimestamp=0, protocolVersion=1)
            assert await b.receive() == {"type": "version-mismatch", "serverProtocolVersion": 2}

            # A client ahead of the server is asked to resend what it has after 3.
            assert await b.reconnect(last_timestamp=9) == [
                {"type": "resync", "since": 3},
                {"type": "patch", "clientId": "", "ephemeralPatches": [
                    {"cursor/a": {"_exists": True, "x": 1}, "cursor/b": {"_exists": True, "x": 2}}
                ]},
                {"type": "synced", "timestamp": 3},
            ]
            assert await a.drain() == [
                {"type": "patch", "clientId": "b", "documentPatches": [{"e1/pos": {"z": 0}}],
                 "timestamp": 3}]
        # b left: its presence (none; cursor/b is a's) is not broadcast, the count is.
        assert await a.receive() == {"type": "clientCount", "count": 1}

    async with client(url, "roomId=r&clientId=late") as late:
        frames = await late.reconnect(last_timestamp=1)
        assert frames[1] == {"type": "patch", "clientId": "", "timestamp": 3,
                             "documentPatches": [{"e1/pos": {"y": 2, "pts": [0, 7, 8], "z": 0}}]}


async def test_presence_is_cleared_when_its_owner_leaves(url: str) -> None:
    async with client(url, "roomId=p&clientId=stay") as stay:
        await stay.reconnect()
        async with client(url, "roomId=p&clientId=go") as go:
            await go.reconnect(ephemeralPatches=[create("cursor/go", x=1)])
            await stay.drain()
        assert await stay.receive() == {"type": "patch", "clientId": "go",
                                        "ephemeralPatches": [{"cursor/go": {"_exists": False}}]}
        assert await stay.receive() == {"type": "clientCount", "count": 1}


async def test_missing_client_id_is_refused_and_missing_room_means_default(url: str) -> None:
    async with client(url, "roomId=x") as nobody:
        assert await nobody.closed() == (1008, "Missing clientId query parameter")
    async with client(url, "clientId=a") as a, client(url, "roomId=default&clientId=b") as b:
        frames = await a.reconnect()
        await b.reconnect()
        frames += await a.drain()
        assert {"type": "clientCount", "count": 2} in frames


async def test_edits_reach_the_data_folder(url: str, tmp_path: Path) -> None:
    async with client(url, "roomId=saved&clientId=a") as a:
        await a.reconnect()
        await a.send(type="patch", messageId="m", documentPatches=[create("e/c", v=1)])
        await a.receive_until("ack")
    with trio.fail_after(5):
        while not (tmp_path / "saved.json").exists():
            await trio.sleep(0.02)
