"""A bot that joins a room and keeps a summary of the board in it, as a record of its own.

    python examples/bot.py ws://127.0.0.1:8087/ [--room demo]

It counts the shapes on the board (the entities with a live record, such as the demo's
notes) and writes the count to `SINGLETON/summary` whenever an edit changes it, so every
client sees it. It reacts to other clients' edits only (its own are not in `updates()`),
and rewrites the record only when the count differs, so two bots do not echo each other.
If the server restarts, the client reconnects and carries on by itself. SIGINT or SIGTERM
closes its socket with 1000 and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping
from typing import Any

import trio

from canvas_store_trio.client import Client, ClientError, connect

SUMMARY = "SINGLETON/summary"


def count_shapes(document: Mapping[str, Mapping[str, Any]]) -> int:
    """Entities (keys `<entity>/<component>`) with at least one live record."""
    return len({
        key.split("/", 1)[0]
        for key, record in document.items()
        if not key.startswith("SINGLETON/") and record.get("_exists") is not False
    })


async def write_summary(client: Client) -> None:
    summary = {"_exists": True, "shapes": count_shapes(client.document)}
    if client.document.get(SUMMARY) != summary:
        timestamp = await client.patch({SUMMARY: summary})
        print(f"bot: {summary['shapes']} shape(s), written at {timestamp}", flush=True)


async def follow(url: str, room: str) -> None:
    async with connect(url, room_id=room, client_id="summary-bot") as client:
        print(f"bot: joined room {room!r} at timestamp {client.timestamp}", flush=True)
        updates = client.updates()  # before the first summary, so no edit slips by
        await write_summary(client)
        async for update in updates:
            if update.document:
                await write_summary(client)


async def main(url: str, room: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, url, room)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()  # leaving connect() closes the socket with 1000


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Keep a shape count in a canvas-store room.")
    parser.add_argument("url", help="the sync server, e.g. ws://127.0.0.1:8087/")
    parser.add_argument("--room", default="demo", help="the room to join (default: demo)")
    args = parser.parse_args()
    try:
        trio.run(main, args.url, args.room)
    except* ClientError as failed:  # the server refused us, or stayed away too long
        sys.exit(f"bot: {failed.exceptions[0]}")
