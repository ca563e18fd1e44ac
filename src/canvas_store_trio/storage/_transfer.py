"""Moving rooms between storages: export to and import from the Node snapshot format.

A snapshot file is ``{"timestamp": N, "state": {...}, "timestamps": {...}}``, exactly
what the Node server's ``FileStorage`` writes to ``<dir>/<roomId>.json``. Export writes
that; import reads it (any file the Node server wrote, or ours) and makes a full
``save()`` into the target backend, in one transaction for the SQL backends.

Imports refuse to replace a room that already exists unless ``overwrite=True``. Do not
import into a room that a running server has open: its next save would be made against
the state it loaded, not the imported one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

from .._document import (
    Snapshot,
    SnapshotError,
    decode_snapshot,
    encode_snapshot,
    encode_snapshot_parts,
)
from ._backends import StorageBackend
from ._files import room_file_name, room_id_from_file_name, write_file_atomically

__all__ = [
    "TransferError",
    "add_storage_options",
    "add_transfer_commands",
    "backend_from_args",
    "check_exists",
    "copy_rooms",
    "export_room",
    "export_room_to_file",
    "import_directory",
    "import_file",
    "import_room",
    "room_id_for_file",
    "run_transfer_command",
]


class TransferError(Exception):
    """An export or import could not be done. The message is meant for the user."""


@attrs.frozen
class _Found:
    room_id: str
    path: Path


def room_id_for_file(path: str | os.PathLike[str]) -> str | None:
    """The room a snapshot file is for, from its name, or None if it is not ``*.json``.

    Our encoded names (``~<base64url>.json``) decode to the id they encode. Any other
    ``<name>.json`` is the Node server's naming, ``<roomId>.json``, so the id is
    ``<name>``, whatever characters it holds.
    """
    name = Path(path).name
    room_id = room_id_from_file_name(name)
    if room_id is not None and room_file_name(room_id) == name:
        return room_id
    if name.endswith(".json") and len(name) > len(".json"):
        return name[: -len(".json")]
    return None


async def export_room(backend: StorageBackend, room_id: str) -> Snapshot:
    """The snapshot of one room. Raise :class:`TransferError` if the room has none."""
    snapshot = await backend.create_storage(room_id).load()
    if snapshot is None:
        raise TransferError(f"room {room_id!r} not found in {backend}")
    return snapshot


async def export_room_to_file(
    backend: StorageBackend, room_id: str, path: str | os.PathLike[str]
) -> Snapshot:
    """Write one room's snapshot to ``path`` in the Node format, atomically."""
    snapshot = await export_room(backend, room_id)
    try:
        await trio.to_thread.run_sync(
            write_file_atomically, Path(path), encode_snapshot_parts(snapshot)
        )
    except OSError as exc:
        raise TransferError(f"cannot write {path}: {exc.strerror or exc}") from None
    return snapshot


async def import_room(
    backend: StorageBackend,
    room_id: str,
    snapshot: Snapshot | bytes | str,
    *,
    overwrite: bool = False,
) -> Snapshot:
    """Store a snapshot (or its JSON) as room ``room_id``, with one full ``save()``.

    Raise :class:`TransferError` if the JSON is not a snapshot, or if the room exists
    and ``overwrite`` is false.
    """
    if not isinstance(snapshot, Snapshot):
        snapshot = await _decode(snapshot, f"the snapshot for room {room_id!r}")
    if not overwrite and room_id in await backend.list_room_ids():
        raise TransferError(
            f"room {room_id!r} already exists in {backend}; pass --force to replace it"
        )
    await backend.create_storage(room_id).save(snapshot)
    return snapshot


async def import_file(
    backend: StorageBackend,
    path: str | os.PathLike[str],
    *,
    room_id: str | None = None,
    overwrite: bool = False,
) -> str:
    """Import one snapshot file; the room id defaults to the file's name. Return it."""
    path = Path(path)
    if room_id is None:
        room_id = room_id_for_file(path)
        if room_id is None:
            raise TransferError(f"cannot tell the room id from the name {path.name!r}")
    data = await _read(path)
    snapshot = await _decode(data, str(path))
    await import_room(backend, room_id, snapshot, overwrite=overwrite)
    return room_id


async def import_directory(
    backend: StorageBackend,
    directory: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> list[str]:
    """Import every ``<room>.json`` of a folder (a Node server's ``data`` folder, say).

    Every file is read and checked first, and every room id checked against the
    target; if anything is wrong nothing is written and :class:`TransferError` lists
    all the problems. Files that are not ``*.json`` (such as the ``*.tmp`` of a save in
    progress) and subfolders are skipped. Return the room ids imported, sorted.
    """
    directory = Path(directory)

    def scan() -> list[_Found]:
        found = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_file():
                room_id = room_id_for_file(entry.name)
                if room_id is not None:
                    found.append(_Found(room_id, Path(entry.path)))
        return found

    try:
        files = await trio.to_thread.run_sync(scan)
    except OSError as exc:
        raise TransferError(f"cannot read the folder {directory}: {exc.strerror}") from None
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for item in files:
        if item.room_id in seen:
            problems.append(f"{item.path}: room {item.room_id!r} is also in {seen[item.room_id]}")
        seen[item.room_id] = item.path
        try:
            await _decode(await _read(item.path), str(item.path))
        except TransferError as exc:
            problems.append(str(exc))
    if not overwrite:
        existing = set(await backend.list_room_ids())
        problems.extend(
            f"room {item.room_id!r} ({item.path.name}) already exists in {backend} "
            "(--force replaces it)"
            for item in files
            if item.room_id in existing
        )
    if problems:
        raise TransferError("nothing was imported:\n  " + "\n  ".join(problems))
    for item in files:
        snapshot = await _decode(await _read(item.path), str(item.path))
        await backend.create_storage(item.room_id).save(snapshot)
    return [item.room_id for item in files]


async def copy_rooms(
    source: StorageBackend,
    target: StorageBackend,
    room_ids: Iterable[str] | None = None,
    *,
    overwrite: bool = False,
) -> list[str]:
    """Copy rooms (all of them by default) from one backend to another; return their ids.

    With ``target=FileBackend(dir)`` this exports every room as Node snapshot files.
    Existing rooms in the target are an error unless ``overwrite`` is true; this is
    checked for every room before anything is written.
    """
    ids = sorted(await source.list_room_ids()) if room_ids is None else list(room_ids)
    if not overwrite:
        clash = sorted(set(ids) & set(await target.list_room_ids()))
        if clash:
            raise TransferError(
                f"nothing was copied: {len(clash)} room(s) already exist in {target}: "
                + ", ".join(repr(r) for r in clash[:10])
                + (" ..." if len(clash) > 10 else "")
                + " (--force replaces them)"
            )
    for room_id in ids:
        snapshot = await export_room(source, room_id)
        await target.create_storage(room_id).save(snapshot)
    return ids


async def _read(path: Path) -> bytes:
    try:
        return await trio.to_thread.run_sync(path.read_bytes)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _decode(data: bytes | str, what: str) -> Snapshot:
    try:
        return await trio.to_thread.run_sync(decode_snapshot, data)
    except SnapshotError as exc:
        raise TransferError(f"{what} is not a valid snapshot ({exc})") from None


# --- command line: `canvas-store-trio export` and `canvas-store-trio import` ------------


def add_transfer_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export`` and ``import`` subcommands to the CLI's subparsers."""
    export = commands.add_parser(
        "export",
        help="write rooms in the Node server's snapshot format",
        description="Write a room's snapshot as JSON in the Node server's file format "
        "(to stdout, or to -o FILE), or every room into a folder (--all -o DIR).",
    )
    export.add_argument("room", nargs="?", metavar="ROOM", help="the room id")
    export.add_argument(
        "--all", action="store_true", help="export every room as files in the folder -o DIR"
    )
    export.add_argument(
        "-o", "--output", metavar="FILE", help="where to write (stdout; with --all, a folder)"
    )
    export.add_argument("--force", action="store_true", help="with --all: replace existing files")
    add_storage_options(export, "read from")

    imp = commands.add_parser(
        "import",
        help="store snapshot files (the Node server's format) as rooms",
        description="Store a snapshot file as a room, with one full save, or every "
        "ROOM.json of a folder (a Node server's data folder) with --from-dir. Stop the "
        "server first, or make sure those rooms are not open.",
    )
    imp.add_argument("file", nargs="?", metavar="FILE", help="snapshot file, or - for stdin")
    imp.add_argument("--room", help="the room id (default: the file name without .json)")
    imp.add_argument(
        "--from-dir", type=Path, metavar="DIR", help="import every ROOM.json in this folder"
    )
    imp.add_argument("--force", action="store_true", help="replace rooms that already exist")
    add_storage_options(imp, "write to")


def add_storage_options(parser: argparse.ArgumentParser, verb: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--storage",
        metavar="URL",
        help=f"storage to {verb}: sqlite:///FILE.db, postgresql://USER@HOST/DB, file:///DIR",
    )
    where.add_argument(
        "--data-dir", type=Path, metavar="DIR", help=f"folder of room files to {verb} (./data)"
    )


def backend_from_args(args: argparse.Namespace) -> StorageBackend:
    """The backend ``--storage URL`` or ``--data-dir DIR`` names (default: ``./data``)."""
    from ._backends import FileBackend, open_storage_backend

    if getattr(args, "storage", None):
        return open_storage_backend(args.storage)
    return FileBackend(getattr(args, "data_dir", None) or Path("data"))


def check_exists(backend: StorageBackend) -> None:
    """Raise :class:`TransferError` if the folder or SQLite file to read from is missing.

    Reading must create nothing: opening a missing SQLite file would make an empty one.
    """
    from ._backends import FileBackend
    from ._sqlite import SQLiteDatabase

    if isinstance(backend, FileBackend) and not backend.dir.is_dir():
        raise TransferError(f"there is no folder {backend.dir}")
    if (
        isinstance(backend, SQLiteDatabase)
        and backend.path != ":memory:"
        and not Path(backend.path).is_file()
    ):
        raise TransferError(f"there is no SQLite database at {backend.path}")


async def run_transfer_command(args: argparse.Namespace) -> str:
    """Run ``export`` or ``import``; return a line for stderr.

    Raise :class:`TransferError`, :class:`~canvas_store_trio.StorageError` or
    :class:`ValueError` (a bad URL or bad arguments) with a message for the user.
    """
    from ._backends import FileBackend

    source = backend_from_args(args)
    if args.command == "export":
        check_exists(source)
    async with source as backend:
        if args.command == "export":
            if args.all:
                if args.room or not args.output or args.output == "-":
                    raise ValueError("export --all takes no ROOM, and needs -o DIR")
                ids = await copy_rooms(backend, FileBackend(args.output), overwrite=args.force)
                return f"exported {len(ids)} room(s) from {backend} to {args.output}"
            if args.room is None:
                raise ValueError("export needs a ROOM (or --all -o DIR)")
            if args.output in (None, "-"):
                snapshot = await export_room(backend, args.room)
                sys.stdout.buffer.write(encode_snapshot(snapshot))
                sys.stdout.buffer.flush()
                return f"exported room {args.room!r} (timestamp {snapshot.timestamp})"
            snapshot = await export_room_to_file(backend, args.room, args.output)
            return f"exported room {args.room!r} (timestamp {snapshot.timestamp}) to {args.output}"
        if args.from_dir is not None:
            if args.file or args.room:
                raise ValueError("import --from-dir takes no FILE and no --room")
            ids = await import_directory(backend, args.from_dir, overwrite=args.force)
            return f"imported {len(ids)} room(s) from {args.from_dir} into {backend}"
        if args.file is None:
            raise ValueError("import needs a FILE (or --from-dir DIR)")
        if args.file == "-":
            if not args.room:
                raise ValueError("import - (stdin) needs --room ROOM")
            data = await trio.to_thread.run_sync(sys.stdin.buffer.read)
            await import_room(backend, args.room, data, overwrite=args.force)
            room_id = args.room
        else:
            room_id = await import_file(backend, args.file, room_id=args.room, overwrite=args.force)
        return f"imported room {room_id!r} into {backend}"
