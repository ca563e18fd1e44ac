"""The library inside an existing Trio app, with the app's own auth and lifetime.

The app owns the nursery and decides who may do what: tokens come from its own
session table here, and a token may be readonly. The sync endpoint is one of the
app's tasks; when the app is cancelled (here on SIGINT or SIGTERM), `RoomManager` closes
every session with 1001 and saves every room before the `async with` block ends, and the
process exits 0. Rooms are kept in ./app-data.
"""

import functools
import logging
import os
import signal

import trio

from canvas_store_trio import (
    AuthorizeInfo,
    AuthorizeResult,
    FileStorage,
    HandshakeRequest,
    Limits,
    RoomManager,
    serve_connection,
    serve_websockets,
)

PORT = int(os.environ.get("PORT") or 8088)

# The app's own users: token -> (user, rooms they may edit, rooms they may only view).
TOKENS = {
    "alice-token": ("alice", {"plans"}, set()),
    "bob-token": ("bob", set(), {"plans"}),
}


async def authorize(info: AuthorizeInfo) -> AuthorizeResult:
    """Called on connect and on every auth-refresh frame. Raise to refuse."""
    user, editable, viewable = TOKENS.get(info.token, (None, set(), set()))
    if info.room_id in editable:
        return AuthorizeResult("readwrite", metadata={"user": user})
    if info.room_id in viewable:
        return AuthorizeResult("readonly", metadata={"user": user})
    raise PermissionError("this token may not open this room")


def audit(room, patches) -> None:  # type: ignore[no-untyped-def]
    logging.info("room %s changed: %d patch(es)", room.room_id, len(patches))


async def app() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync_service)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()  # the sync service closes and saves on the way out


async def sync_service() -> None:
    async with (
        RoomManager(
            idle_timeout=30.0,
            save_throttle=2.0,
            create_storage=lambda room_id: FileStorage(dir="app-data", room_id=room_id),
            on_document_patch=audit,
        ) as manager,
        trio.open_nursery() as nursery,
    ):

        async def sync_endpoint(request: HandshakeRequest) -> None:
            await serve_connection(manager, request, authorize=authorize)

        await nursery.start(
            functools.partial(
                serve_websockets,
                sync_endpoint,
                "127.0.0.1",
                PORT,
                max_message_size=Limits().max_message_size,
            )
        )
        print(f"sync endpoint on ws://127.0.0.1:{PORT}/?roomId=plans&clientId=C&token=alice-token")
        # ... the rest of the app runs here, in the same nursery ...


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    trio.run(app)
