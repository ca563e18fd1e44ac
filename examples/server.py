"""The example server: port 8087 (or $PORT), rooms in ./data, 5 s saves, 60 s idle.

Run it with `python examples/server.py`; connect with
ws://localhost:8087/?roomId=ROOM&clientId=CLIENT. Ctrl-C (or SIGTERM) closes every
session, saves every room and exits.
"""

import functools
import logging
import os
import signal

import trio

from canvas_store_trio import (
    FileStorage,
    HandshakeRequest,
    Limits,
    RoomManager,
    serve_connection,
    serve_websockets,
)

PORT = int(os.environ.get("PORT") or 8087)


async def main() -> None:
    limits = Limits()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            RoomManager(
                idle_timeout=60.0,
                save_throttle=5.0,
                create_storage=lambda room_id: FileStorage(dir="data", room_id=room_id),
                limits=limits,
            ) as manager,
            trio.open_nursery() as nursery,
        ):

            async def handler(request: HandshakeRequest) -> None:
                await serve_connection(manager, request)

            await nursery.start(
                functools.partial(
                    serve_websockets,
                    handler,
                    "127.0.0.1",
                    PORT,
                    max_message_size=limits.max_message_size,
                )
            )
            print(f"Listening on ws://localhost:{PORT}/?roomId=ROOM&clientId=CLIENT")
            async for _ in signals:
                break
            await manager.close_all()  # sessions first, then every room is saved
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    trio.run(main)
