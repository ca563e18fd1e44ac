"""A room's kept versions, read and restored on its storage, and the ``history`` commands.

``canvas-store-trio history list ROOM`` lists the versions a room keeps (serve
``--history-interval`` keeps them) and ``history restore ROOM VERSION`` makes the room's
stored snapshot hold a version's state again, as an edit. Both work on the storage
directly: restore a room only while no server has it open (its next save would be made
against the state it loaded). A running server restores through its admin API,
``POST /admin/rooms/{id}/history/{version}/restore``, which its clients see live.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from .._document import Document, Snapshot, replacement_patches
from ._backends import StorageBackend
from ._base import HistoryStorage, VersionInfo
from ._transfer import TransferError, add_storage_options, backend_from_args, check_exists

__all__ = [
    "add_history_commands",
    "history_storage",
    "restore_version",
    "run_history_command",
    "versions_json",
]


def history_storage(backend: StorageBackend, room_id: str) -> HistoryStorage:
    """The storage of one room, for its versions. Raise :class:`TransferError` if the
    backend keeps none (memory)."""
    storage = backend.create_storage(room_id)
    if not isinstance(storage, HistoryStorage):
        raise TransferError(f"{backend} keeps no history")
    return storage


def versions_json(room_id: str, versions: Sequence[VersionInfo]) -> dict[str, Any]:
    """``{"room_id", "versions": [{"version", "timestamp", "saved_at"}]}``, oldest first:
    what ``history list --json`` prints and the admin API answers."""
    return {
        "room_id": room_id,
        "versions": [
            {"version": v.version, "timestamp": v.version, "saved_at": v.saved_at.isoformat()}
            for v in versions
        ],
    }


async def restore_version(backend: StorageBackend, room_id: str, version: int) -> Snapshot:
    """Store, as room ``room_id``'s snapshot, its document with the state of ``version``:
    one edit over the stored snapshot (with a timestamp above it, so clients that
    reconnect get the change as a diff) that deletes, writes and re-creates what
    differs. Return the snapshot stored (the one there, if nothing differs).

    Raise :class:`TransferError` for a backend without history or an unknown version.
    Only for a room that no running server has open.
    """
    storage = history_storage(backend, room_id)
    kept = await storage.load_version(version)
    if kept is None:
        raise TransferError(f"room {room_id!r} has no version {version} in {backend}")
    document = Document.from_snapshot(await storage.load() or Snapshot())
    if document.apply(replacement_patches(document.state, kept.state)):
        await storage.save(document.snapshot())
    return document.snapshot()


# --- command line: `canvas-store-trio history list|restore` ----------------------------


def add_history_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``history`` subcommand (``list`` and ``restore``) to the CLI's subparsers."""
    history = commands.add_parser(
        "history",
        help="list and restore the versions a room keeps (serve --history-interval)",
        description="List the versions a room keeps, or restore one.",
    )
    actions = history.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="list a room's versions, oldest first", description="List a room's "
        "versions, oldest first: each one's id (the room timestamp it holds) and when it "
        "was saved (UTC). Only reads.",
    )
    listing.add_argument("room", metavar="ROOM", help="the room id")
    listing.add_argument("--json", action="store_true", help="print JSON, as the admin API does")
    add_storage_options(listing, "read from")
    restore = actions.add_parser(
        "restore",
        help="make a room's snapshot hold a version's state again",
        description="Store the room's snapshot with the state of VERSION, as one edit over "
        "it (clients that reconnect get it as a diff). Stop the server first, or restore "
        "through its admin API (POST /admin/rooms/ROOM/history/VERSION/restore).",
    )
    restore.add_argument("room", metavar="ROOM", help="the room id")
    restore.add_argument("version", metavar="VERSION", type=_version, help="the version id")
    add_storage_options(restore, "restore in")


def _version(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"a version is a room timestamp (0, 1, ...), not {text!r}")
    return int(text)


async def run_history_command(args: argparse.Namespace) -> str:
    """Run ``history list`` or ``history restore``; return a line for stderr.

    Raise :class:`TransferError`, :class:`~canvas_store_trio.StorageError` or
    :class:`ValueError` (a bad URL) with a message for the user. Neither creates a folder
    or a database file.
    """
    source = backend_from_args(args)
    check_exists(source)
    async with source as backend:
        if args.action == "list":
            versions = await history_storage(backend, args.room).list_versions()
            if args.json:
                out = orjson.dumps(versions_json(args.room, versions)) + b"\n"
            else:
                out = "".join(
                    f"{v.version}\t{v.saved_at:%Y-%m-%d %H:%M:%S}\n" for v in versions
                ).encode()
            sys.stdout.buffer.write(out)
            sys.stdout.buffer.flush()
            return f"room {args.room!r} keeps {len(versions)} version(s) in {backend}"
        snapshot = await restore_version(backend, args.room, args.version)
        return (
            f"restored room {args.room!r} to version {args.version} in {backend} "
            f"(its timestamp is now {snapshot.timestamp})"
        )
