"""Server-side edits and the change feed: app code that writes into a room and follows it.

The app holds room "board" open (it loads, and saves, with no client connected) and
runs one task beside the sync endpoint. That task follows the room's change feed:

- for every client edit it updates a summary record, ``SINGLETON/Stats``, with a
  server-side edit, which every client receives under ``SERVER_CLIENT_ID``;
- and it POSTs the edit as JSON to ``$WEBHOOK_URL`` (printed when that is unset): the
  same hook feeds a search index or an audit log.

A webhook slower than the room falls behind the feed's buffer; it then gets
``ChangeFeedOverflow``, follows again, and first posts what it missed as one diff. Ctrl-C or
SIGTERM closes the clients with 1001, saves the room into ./app-data and exits 0.
"""

import functools
import logging
import os
import signal
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson
import trio

from canvas_store_trio import (
    ChangeFeedOverflow,
    FileStorage,
    HandshakeRequest,
    RoomManager,
    serve_connection,
    serve_websockets,
)

PORT = int(os.environ.get("PORT") or 8088)
WEBHOOK_URL = os.environ.get("WEBHOOK_URL")
ROOM = "board"


async def main() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            RoomManager(create_storage=lambda room_id: FileStorage(dir="app-data", room_id=room_id))
            as manager,
            trio.open_nursery() as nursery,
        ):

            async def endpoint(request: HandshakeRequest) -> None:
                await serve_connection(manager, request)

            await nursery.start(
                functools.partial(serve_websockets, endpoint, "127.0.0.1", PORT,
                                  max_message_size=manager.limits.max_message_size)
            )
            nursery.start_soon(follow_room, manager)
            print(f"sync endpoint on ws://127.0.0.1:{PORT}/?roomId={ROOM}&clientId=C")
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()  # the manager closes and saves on the way out


async def follow_room(manager: RoomManager) -> None:
    """Keep the room open, and react to every client edit, until cancelled."""
    async with manager.open_room(ROOM) as room:
        edits = 0
        missed_since: int | None = None
        while not room.closed:
            try:
                async with room.subscribe(max_buffer=100) as changes:
                    if missed_since is not None:  # what the last feed could not hold
                        missed = room.document.diff_since(missed_since)
                        await notify(room.document.timestamp, None, [missed])
                    async for change in changes:
                        if change.client_id is None:
                            continue  # our own summary edit
                        edits += 1
                        await room.apply_patch(
                            {"SINGLETON/Stats": {"_exists": True, "edits": edits,
                                                 "lastEditor": change.client_id}}
                        )
                        await notify(change.timestamp, change.client_id, change.patches)
            except ChangeFeedOverflow as behind:
                missed_since = behind.last_timestamp


async def notify(timestamp: int, client_id: str | None, patches: Any) -> None:
    """POST one change to the webhook. A failed delivery is logged, never fatal."""
    body = orjson.dumps({"room": ROOM, "timestamp": timestamp, "clientId": client_id,
                         "documentPatches": patches})
    if WEBHOOK_URL is None:
        print(body.decode())
        return
    try:
        with trio.fail_after(5):
            status = await post_json(WEBHOOK_URL, body)
    except (OSError, trio.TooSlowError, h11.ProtocolError) as exc:
        logging.warning("webhook delivery failed: %r", exc)
        return
    if status >= 300:
        logging.warning("webhook answered %d", status)


async def post_json(url: str, body: bytes) -> int:
    """One HTTP/1.1 POST with h11; returns the status code."""
    parts = urlsplit(url)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="POST", target=parts.path or "/", headers=[
        ("Host", parts.netloc), ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))), ("Connection", "close"),
    ])
    async with await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80) as s:
        await s.send_all(connection.send(request) + connection.send(h11.Data(data=body))
                         + connection.send(h11.EndOfMessage()))
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await s.receive_some())
            elif isinstance(event, h11.Response):
                return event.status_code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    trio.run(main)
